"""``kasched config``: show and check the service configuration; ``kasched db``: migrate the schema."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kasched.cli.common import Context, print_mapping
from kasched.db import Database
from kasched.errors import ConfigError, KaschedError


def register(subparsers: Any) -> None:
    config = subparsers.add_parser("config", help="the service configuration")
    commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    commands.add_parser("show", help="print the settings in force").set_defaults(handler=show_config)
    commands.add_parser("check", help="validate the configuration and reach the database").set_defaults(
        handler=check_config
    )

    db = subparsers.add_parser("db", help="the database schema")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    db_commands.add_parser("upgrade", help="apply the schema migrations").set_defaults(handler=upgrade_db)


def show_config(args: argparse.Namespace, context: Context) -> int:
    settings = asdict(context.config)
    settings["path"] = settings["path"] or "(none: embedded defaults)"
    settings["service_address"] = settings["service_address"] or "(automatic)"
    for key, value in settings.items():  # optional settings left unset: say so (an empty value misleads)
        if value == "" or value == Path():
            settings[key] = "(not set)"
    print_mapping(settings)
    return 0


def check_config(args: argparse.Namespace, context: Context) -> int:
    from kasched.config import check

    config = context.config
    problems, warnings = check(config)
    for warning in warnings:
        print(f"warning: {warning}")
    database = Database(config.database)
    try:
        database.upgrade()
    except KaschedError as error:
        problems.append(str(error))
    finally:
        database.dispose()
    source = config.path or "embedded defaults"
    if problems:
        for problem in problems:
            print(f"problem: {problem}")
        raise ConfigError(f"{source}: {len(problems)} problem(s)")
    print(f"{source}: ok (database {database.engine.url.render_as_string(hide_password=True)})")
    return 0


def upgrade_db(args: argparse.Namespace, context: Context) -> int:
    database = Database(context.config.database)
    try:
        database.upgrade()
    finally:
        database.dispose()
    print("database schema is up to date")
    return 0
