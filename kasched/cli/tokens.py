"""``kasched token``: signed tokens for reaching kaschedd over TCP (admins issue and revoke them)."""

from __future__ import annotations

import argparse
import pwd
import time
from typing import Any

from kasched.cli.common import Context, print_json
from kasched.errors import InputError


def register(subparsers: Any) -> None:
    token = subparsers.add_parser("token", help="signed tokens to reach kaschedd over TCP (admins)")
    commands = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    issue = commands.add_parser("issue", help="issue a token for a user (printed once: hand it over privately)")
    issue.add_argument("user")
    issue.add_argument("--hours", type=float, default=24.0, help="how long it is valid (default 24)")
    issue.add_argument("--json", action="store_true")
    issue.set_defaults(handler=issue_token)
    revoke = commands.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id")
    revoke.set_defaults(handler=revoke_token)


def issue_token(args: argparse.Namespace, context: Context) -> int:
    try:
        pwd.getpwnam(args.user)
    except KeyError:
        raise InputError(f"{args.user!r} is not a user of this host", field="user") from None
    issued = context.front.issue_token(args.user, args.hours)
    if args.json:
        print_json(vars(issued))
        return 0
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(issued.expires))
    print(issued.token)
    print(f"# token {issued.id} for {issued.user}, valid until {expires}; the user puts it in "
          "~/.config/kasched/token (mode 600) or $KASCHED_TOKEN")  # fmt: skip
    return 0


def revoke_token(args: argparse.Namespace, context: Context) -> int:
    context.front.revoke_token(args.id)
    print(f"token {args.id} revoked")
    return 0
