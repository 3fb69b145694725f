"""``kasched env``: the environment catalog."""

from __future__ import annotations

import argparse
from typing import Any

from kasched.cli.common import Context, print_json, print_table, print_view


def register(subparsers: Any) -> None:
    env = subparsers.add_parser("env", help="environments you can deploy")
    commands = env.add_subparsers(dest="env_command", metavar="ACTION", required=True)

    add = commands.add_parser("add", help="add an environment from its YAML description")
    add.add_argument("file")
    add.add_argument("--owner", help="owner of the environment (admins; default: you)")
    add.set_defaults(handler=add_environment)

    lst = commands.add_parser("list", help="your environments and public ones")
    lst.add_argument("--all", action="store_true", help="shared ones too (admins: everyone's)")
    lst.add_argument("-u", "--owner", help="only this user's environments")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=list_environments)

    for name, helptext, handler in (
        ("show", "show an environment", show_environment),
        ("check", "re-check an environment's image against its sha256", check_env),
        ("remove", "remove an environment (its owner, or admins)", remove_env),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("environment", metavar="NAME[@OWNER][:VERSION]")
        if name == "show":
            sub.add_argument("--json", action="store_true")
        sub.set_defaults(handler=handler)


def add_environment(args: argparse.Namespace, context: Context) -> int:
    env = context.front.add_environment(args.file, owner=args.owner)
    print(f"added {env.label} ({env.visibility}, {env.image_size} bytes, sha256 {env.sha256[:16]}...)")
    return 0


def list_environments(args: argparse.Namespace, context: Context) -> int:
    envs = context.front.list_environments(include_shared=args.all, owner=args.owner)
    if args.json:
        print_json([e.as_dict() for e in envs])
        return 0
    print_table(
        ["name", "version", "owner", "visibility", "kind", "flags", "description"],
        [(e.name, e.version, e.owner, e.visibility, _kind(e), _flags(e), e.description) for e in envs],
    )
    return 0


def show_environment(args: argparse.Namespace, context: Context) -> int:
    env = context.front.show_environment(args.environment)
    print_view(env.as_dict(), args.json)
    return 0


def check_env(args: argparse.Namespace, context: Context) -> int:
    env = context.front.check_environment(args.environment)
    print(f"{env.label}: image {env.image_location} matches sha256 {env.sha256}")
    return 0


def remove_env(args: argparse.Namespace, context: Context) -> int:
    env = context.front.remove_environment(args.environment)
    print(f"removed {env.label}")
    return 0


def _kind(env: Any) -> str:
    return env.image_kind if env.compression == "none" else f"{env.image_kind}.{env.compression}"


def _flags(env: Any) -> str:
    return ",".join(flag for flag, on in (("reference", env.reference), ("destructive", env.destructive)) if on)
