"""``kasched stats``: the history of deployments, reboots and power operations (like kastat)."""

from __future__ import annotations

import argparse
from typing import Any

from kasched.cli.common import Context, print_json, print_table
from kasched.nodeset import expand
from kasched.stats import GROUPS, StatsFilter, parse_time


def register(subparsers: Any) -> None:
    stats = subparsers.add_parser("stats", help="history of operations per node and step")
    stats.add_argument("-u", "--user")
    stats.add_argument("-m", "--machines", metavar="NODES")
    stats.add_argument("-e", "--env", help="environment name (prefix of NAME@OWNER:VERSION)")
    stats.add_argument("--kind", choices=["deploy", "reboot", "power", "revert", "reconcile"])
    stats.add_argument("--failed", action="store_true", help="failed steps only")
    stats.add_argument("--since", help="a date (2026-11-20T10:00) or a duration ago (3h, 2d)")
    stats.add_argument("--until")
    stats.add_argument("--by", choices=sorted(GROUPS), help="aggregate per node, step, user...")
    stats.add_argument("--limit", type=int, default=1000)
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(handler=show_stats)


def show_stats(args: argparse.Namespace, context: Context) -> int:
    selection = StatsFilter(
        user=args.user,
        nodes=tuple(expand(args.machines)) if args.machines else (),
        environment=args.env,
        kind=args.kind,
        failed_only=args.failed,
        since=parse_time(args.since, field="since") if args.since else None,
        until=parse_time(args.until, field="until") if args.until else None,
        limit=args.limit,
    )
    if args.by:
        groups = context.front.stats_summary(selection, args.by)
        if args.json:
            print_json([vars(g) for g in groups])
            return 0
        print_table(
            [args.by, "count", "failures", "mean_s", "max_s"],
            [(g.key, g.count, g.failures, f"{g.mean_duration:.2f}", f"{g.max_duration:.2f}") for g in groups],
        )
        return 0
    operations = context.front.stats(selection)
    if args.json:
        print_json([op.as_dict() for op in operations])
        return 0
    print_table(
        ["started", "kind", "node", "user", "env", "step", "seconds", "result"],
        [
            (
                op.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                op.kind,
                op.node,
                op.user,
                op.environment or "",
                op.step,
                f"{op.duration:.2f}",
                "ok" if op.ok else f"failed: {op.error}",
            )
            for op in operations
        ],
    )
    return 0
