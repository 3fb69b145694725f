"""The ``kasched`` command: a thin layer over :mod:`kasched.api`.

Each command group lives in its own module with a ``register(subparsers)`` function that adds its
sub-commands and sets ``handler`` on them. A handler receives the parsed arguments and a
:class:`~kasched.cli.common.Context`, prints, and returns an exit code. Every
:class:`~kasched.errors.KaschedError` becomes one line on stderr and the error's exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from kasched import __version__, deadline
from kasched.cli.common import Context
from kasched.errors import KaschedError
from kasched.text import PrintableStream, printable

# Command groups, in the order ``kasched --help`` lists them.
COMMAND_MODULES = [
    "kasched.cli.nodes",
    "kasched.cli.environments",
    "kasched.cli.rights",
    "kasched.cli.jobs",
    "kasched.cli.deploy",
    "kasched.cli.console",
    "kasched.cli.stats",
    "kasched.cli.config",
    "kasched.cli.tokens",
    "kasched.cli.site",
    "kasched.cli.lab",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kasched",
        description="Deploy the operating system of your choice on the nodes of your batch job.",
    )
    parser.add_argument("--version", action="version", version=f"kasched {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $KASCHED_CONFIG or /etc/kasched/kasched.yaml)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # a command group not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    context = Context(config_path=args.config)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrintableStream(stdout), PrintableStream(stderr)  # names, comments... are users'
    left = deadline.from_environ()  # a hook's: the direct mode's database waits end before it too
    try:
        with deadline.within(None if left is None else left - deadline.CLIENT_MARGIN):
            return int(handler(args, context) or 0)
    except KaschedError as error:
        print(f"kasched: error: {printable(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("kasched: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:  # a bug of ours: say so in one line, keep the traceback for those who ask
        if os.environ.get("KASCHED_DEBUG"):
            raise
        print(
            f"kasched: internal error: {type(error).__name__}: {error} (set KASCHED_DEBUG=1 for the "
            "traceback, and report it)",
            file=sys.stderr,
        )
        return 70
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        context.close()
