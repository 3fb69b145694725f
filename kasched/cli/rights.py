"""``kasched rights``: who may deploy which nodes, why and until when; admins grant and revoke."""

from __future__ import annotations

import argparse
from typing import Any

from kasched.cli.common import Context, print_json, print_table
from kasched.nodeset import fold


def register(subparsers: Any) -> None:
    rights = subparsers.add_parser("rights", help="who may deploy which nodes")
    rights.add_argument("-u", "--user", help="only this user's grants")
    rights.add_argument("-m", "--machines", metavar="NODES", help="only grants covering these nodes")
    rights.add_argument("--all", action="store_true", help="ended grants too")
    rights.add_argument("--json", action="store_true")
    rights.set_defaults(handler=list_rights)
    commands = rights.add_subparsers(dest="rights_command", metavar="ACTION")

    check = commands.add_parser("check", help="may a user deploy these nodes now? (exit 0: yes, 5: no)")
    check.add_argument("-m", "--machines", metavar="NODES", required=True)
    check.add_argument("-u", "--user", dest="check_user", help="the user to check (admins; default: you)")
    check.set_defaults(handler=check_rights)

    grant = commands.add_parser("grant", help="grant nodes to a user by hand (admins)")
    grant.add_argument("-u", "--user", dest="grant_user", required=True)
    grant.add_argument("-m", "--machines", metavar="NODES", required=True)
    grant.add_argument("--hours", type=float, default=1.0, help="how long (default 1)")
    grant.add_argument("--job", help="a job id to bind the grant to (default: a new one)")
    grant.set_defaults(handler=grant_rights)

    revoke = commands.add_parser("revoke", help="revoke a grant by its id (admins)")
    revoke.add_argument("grant_id", type=int)
    revoke.add_argument("--reason", default="revoked by an admin")
    revoke.set_defaults(handler=revoke_rights)


def list_rights(args: argparse.Namespace, context: Context) -> int:
    grants = context.front.rights(user=args.user, nodes=args.machines, include_ended=args.all)
    if args.json:
        print_json([g.as_dict() for g in grants])
        return 0
    print_table(
        ["id", "user", "nodes", "why", "from", "until", "state"],
        [
            (
                g.id,
                g.user,
                fold(g.nodes),
                f"{g.scheduler} job {g.job_id}",
                _time(g.created_at),
                _time(g.expires_at),
                _state(g),
            )
            for g in grants
        ],
    )
    return 0


def check_rights(args: argparse.Namespace, context: Context) -> int:
    decision = context.front.check(args.machines, user=args.check_user)
    if decision.allowed:
        jobs = sorted(set(decision.grants.values()))
        print(f"{decision.user} may deploy {args.machines} (grant of {', '.join(jobs)})")
        return 0
    print(f"{decision.user} may not deploy {args.machines}: {decision.reason()}")
    return 5


def grant_rights(args: argparse.Namespace, context: Context) -> int:
    grant = context.front.grant(args.grant_user, args.machines, args.hours, job_id=args.job)
    print(f"grant {grant.id}: {grant.user} may deploy {fold(grant.nodes)} until {_time(grant.expires_at)}")
    return 0


def revoke_rights(args: argparse.Namespace, context: Context) -> int:
    grant = context.front.revoke(args.grant_id, args.reason)
    print(f"grant {grant.id} revoked: {grant.user} on {fold(grant.nodes)} ({grant.revoke_reason})")
    return 0


def _time(moment: Any) -> str:
    return str(moment.strftime("%Y-%m-%d %H:%M:%SZ"))


def _state(grant: Any) -> str:
    if grant.revoked_at:
        return f"revoked {_time(grant.revoked_at)}"
    return "active" if grant.active else "expired"
