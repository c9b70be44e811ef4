"""The ``pyrovae`` command line: ``pyrovae simulate | train | iwelbo | ate | sample | grn | demo``.

Each subcommand lives in a module of :mod:`pyrovae.commands` exposing ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed arguments).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "pyrovae.commands.simulate",
    "pyrovae.commands.train",
    "pyrovae.commands.evaluate",
    "pyrovae.commands.grn",
    "pyrovae.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"pyrovae {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
