"""Subcommands of the ``pyrovae`` command line (one module each, with ``register(subparsers)``)."""
