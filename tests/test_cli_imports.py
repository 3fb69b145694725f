"""The kasched command imports only the command group it runs: ``--help`` and ``--version`` without
SQLAlchemy, and :data:`kasched.cli.COMMANDS` names every group's commands with their help."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from kasched.cli import COMMAND_MODULES, COMMANDS, build_parser

PROBE = """
import contextlib, io, sys
from kasched.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main({argv!r})
heavy = sorted(m for m in ("sqlalchemy", "kasched.models", "kasched.api", "yaml") if m in sys.modules)
print(len(out.getvalue()), ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], [], ["--config", "x.yaml", "--help"]])
def test_help_and_version_do_not_import_sqlalchemy(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, check=True)
    printed, heavy = done.stdout.split(" ", 1)
    assert heavy.strip() == ""
    assert int(printed) > 0 or argv == []  # the help or the version was printed (no command: usage on stderr)


def test_a_command_imports_its_own_group_only() -> None:
    probe = PROBE.format(argv=["rights", "--help"]).replace(
        '("sqlalchemy", "kasched.models", "kasched.api", "yaml")', '("kasched.cli.deploy", "kasched.cli.stats")'
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    printed, heavy = done.stdout.split(" ", 1)
    assert int(printed) > 0 and heavy.strip() == ""


def test_the_command_table_matches_what_the_groups_register() -> None:
    registered: dict[str, tuple[str, str]] = {}
    for module_name in COMMAND_MODULES:
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module_name).register(subparsers)
        registered |= {action.dest: (module_name, action.help or "") for action in subparsers._choices_actions}
    assert registered == COMMANDS


def test_the_lazy_parser_parses_as_the_full_one() -> None:
    for argv in (
        ["rights", "--json", "check", "-m", "n-1"],
        ["--config", "site.yaml", "job", "start", "--", "a"],
        ["nodes", "list"],
    ):
        assert vars(build_parser(argv).parse_args(argv)) == vars(build_parser().parse_args(argv))
