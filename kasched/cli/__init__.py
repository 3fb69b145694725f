"""The ``kasched`` command: a thin layer over :mod:`kasched.api`.

Each command group lives in its own module with a ``register(subparsers)`` function that adds its
sub-commands and sets ``handler`` on them. A handler receives the parsed arguments and a
:class:`~kasched.cli.common.Context`, prints, and returns an exit code. Every
:class:`~kasched.errors.KaschedError` becomes one line on stderr and the error's exit code.

Only the group of the command given is imported (:data:`COMMANDS` names the others and their help):
``kasched --version``, ``kasched --help`` and a hook's ``kasched job ...`` do not pay for the imports
of every other group (SQLAlchemy, the deploy workflow), tests/test_cli_imports.py.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from kasched import __version__, deadline
from kasched.errors import KaschedError
from kasched.text import PrintableStream, printable

# Top-level commands, in the order ``kasched --help`` lists them: the module that registers each and
# its one-line help (tests/test_cli_imports.py checks this table against the modules).
COMMANDS: dict[str, tuple[str, str]] = {
    "nodes": ("kasched.cli.nodes", "the site's nodes (inventory)"),
    "env": ("kasched.cli.environments", "environments you can deploy"),
    "rights": ("kasched.cli.rights", "who may deploy which nodes"),
    "job": ("kasched.cli.jobs", "record a job's start or end (run by scheduler hooks)"),
    "deploy": ("kasched.cli.deploy", "deploy an environment on nodes"),
    "revert": ("kasched.cli.deploy", "return nodes to the site's reference environment"),
    "reboot": ("kasched.cli.deploy", "reboot nodes"),
    "power": ("kasched.cli.deploy", "power nodes on or off, or show their power state"),
    "console": ("kasched.cli.console", "a node's console (the nodes of your grants; admins any)"),
    "stats": ("kasched.cli.stats", "history of operations per node and step"),
    "config": ("kasched.cli.config", "the service configuration"),
    "db": ("kasched.cli.config", "the database schema"),
    "token": ("kasched.cli.tokens", "signed tokens to reach kaschedd over TCP (admins)"),
    "reconcile": (
        "kasched.cli.site",
        "revoke the grants of jobs the schedulers no longer run, and give their nodes back",
    ),
    "doctor": ("kasched.cli.site", "check the site: configuration, database, service, schedulers"),
    "lab": ("kasched.cli.lab", "a virtual cluster to try kasched on (needs root)"),
}
# Command groups, in the order ``kasched --help`` lists them.
COMMAND_MODULES = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``argv``: the group of the command it names is registered in full, the other
    commands by name and help only. Without ``argv``, every group in full (the documented parser)."""
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
    wanted = set(COMMAND_MODULES) if argv is None else {COMMANDS[c][0] for c in [_command(argv)] if c in COMMANDS}
    for module_name in COMMAND_MODULES:
        if module_name not in wanted:
            for command, (group, helptext) in COMMANDS.items():
                if group == module_name:
                    subparsers.add_parser(command, help=helptext, add_help=False)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # a command group not built yet
            raise
        module.register(subparsers)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is neither an option nor ``--config``'s value."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif word == "--":
            return next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(words)
    args = parser.parse_args(words)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    from kasched.cli.common import Context

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
