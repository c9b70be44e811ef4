"""The ``pyrovae`` command line: ``pyrovae simulate | train | iwelbo | ate | sample | grn | demo``.

Each subcommand lives in a module of :mod:`pyrovae.commands` exposing ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed arguments).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from pyrovae import __version__
from pyrovae.config import PyrovaeWarning

COMMAND_MODULES = (
    "pyrovae.commands.simulate",
    "pyrovae.commands.train",
    "pyrovae.commands.evaluate",
    "pyrovae.commands.grn",
    "pyrovae.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovae", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyrovae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


#: errors that are the user's to fix (bad input, existing outputs, missing files): one line, exit code 2
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


def _one_line_warnings(command: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"pyrovae {command}: warning: {message}", file=sys.stderr if file is None else file)

    return show


def main(argv: list[str] | None = None) -> int:
    try:  # the subcommands' imports (torch, pyro, anndata) take seconds: Ctrl-C there is one line too
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("pyrovae: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    saved = warnings.showwarning
    warnings.showwarning = _one_line_warnings(args.command)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", PyrovaeWarning)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(
            f"pyrovae {args.command}: interrupted; every file already written is complete "
            "(a training run continues with --resume)",
            file=sys.stderr,
        )
        return 130
    except USER_ERRORS as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, FileExistsError)):
            msg = f"{err.strerror or err.__class__.__name__}: {err.filename or msg}" if err.filename else msg
        print(f"pyrovae {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = saved


if __name__ == "__main__":
    sys.exit(main())
