"""The ``pyrovae`` command line: ``pyrovae simulate | train | iwelbo | ate | sample | grn | enrich | demo``.

Each subcommand lives in a module of :mod:`pyrovae.commands` exposing ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import warnings
from collections.abc import Iterator

from pyrovae import __version__

COMMAND_MODULES = (
    "pyrovae.commands.simulate",
    "pyrovae.commands.train",
    "pyrovae.commands.evaluate",
    "pyrovae.commands.grn",
    "pyrovae.commands.enrich",
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


#: how torch reports an allocation that failed (CPU, CUDA, MPS)
OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "not enough memory")


@contextlib.contextmanager
def _held_interrupts() -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) recorded in the yielded list instead of raised, until the block ends (main thread
    only: elsewhere signals cannot be handled and the block runs as it is)."""
    held: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:  # not the main thread
        previous = None
    try:
        yield held
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _one_line_warnings(command: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"pyrovae {command}: warning: {message}", file=sys.stderr if file is None else file)

    return show


def main(argv: list[str] | None = None) -> int:
    # everything but the standard library is imported here, not at the top: the imports (torch, pyro,
    # anndata) take seconds, and a Ctrl-C during them must end in one line too. It is held until they are
    # done (an interrupt inside a library's import can leave that library half-imported and broken)
    try:
        with _held_interrupts() as held:
            from pyrovae.config import PyrovaeWarning

            args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        held = [signal.SIGINT]
    if held:
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
    except (MemoryError, RuntimeError) as err:
        text = str(err)
        if not isinstance(err, MemoryError) and not any(m in text.lower() for m in OUT_OF_MEMORY):
            raise
        first = (text.strip().splitlines() or ["MemoryError"])[0][:160]
        print(
            f"pyrovae {args.command}: error: out of memory ({first}); lower batch_size, the layer sizes "
            "or --n-samples / --particles, or use a machine with more memory (files already written are "
            "complete)",
            file=sys.stderr,
        )
        return 2
    except USER_ERRORS as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, FileExistsError)):
            msg = f"{err.strerror or err.__class__.__name__}: {err.filename or msg}" if err.filename else msg
            if isinstance(err, PermissionError) and err.filename:
                msg += " (pyrovae may not write or read there: fix its permissions or choose another path)"
        print(f"pyrovae {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = saved


if __name__ == "__main__":
    sys.exit(main())
