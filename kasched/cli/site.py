"""``kasched reconcile`` and ``kasched doctor``: an admin's view of the site against its schedulers."""

from __future__ import annotations

import argparse
from typing import Any

from kasched.cli.common import Context, print_json, print_table
from kasched.errors import InputError
from kasched.nodeset import fold


def register(subparsers: Any) -> None:
    reconcile = subparsers.add_parser(
        "reconcile", help="revoke the grants of jobs the schedulers no longer run, and give their nodes back"
    )
    reconcile.add_argument("--dry-run", action="store_true", help="say what would be revoked, change nothing")
    reconcile.add_argument("--grace", type=float, default=60.0, help="seconds a new grant is left alone (60)")
    reconcile.add_argument(
        "--walltime-grace",
        type=float,
        help="seconds a grant past its end is left to the epilog (default: reconcile_walltime_grace)",
    )
    reconcile.add_argument(
        "--bmc-timeout", type=float, default=5.0, help="seconds each BMC has to say its node's power status (5)"
    )
    reconcile.add_argument("--json", action="store_true")
    reconcile.set_defaults(handler=reconcile_command)
    doctor = subparsers.add_parser("doctor", help="check the site: configuration, database, service, schedulers")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(handler=doctor_command)


def _local_api(context: Context) -> Any:
    return context.front.beside_database("this command runs beside the database: run it on the kaschedd host as root")


def reconcile_command(args: argparse.Namespace, context: Context) -> int:
    from kasched.reconcile import reconcile

    if not args.grace >= 0:
        raise InputError("expected seconds (0 or more)", field="grace")
    if args.walltime_grace is not None and not 0 <= args.walltime_grace < float("inf"):
        raise InputError("expected seconds (0 or more)", field="walltime-grace")
    if not 0 < args.bmc_timeout <= 600:
        raise InputError("expected seconds (more than 0, at most 600)", field="bmc-timeout")
    report = reconcile(
        _local_api(context),
        grace=args.grace,
        dry_run=args.dry_run,
        walltime_grace=args.walltime_grace,
        bmc_timeout=args.bmc_timeout,
    )
    if args.json:
        print_json(
            {
                "running": [g.job for g in report.running],
                "young": [g.job for g in report.young],
                "revoked": [{"grant": g.id, "job": g.job, "why": why} for g, why in report.revoked],
                "unknown": report.unknown,
                "ending": [g.job for g in report.ending],
                "orphans": report.orphans,
                "power": [
                    {"node": f.node, "recorded": f.recorded, "bmc": f.bmc, "marked": f.marked} for f in report.power
                ],
                "dry_run": args.dry_run,
            }
        )
        return 0
    verb = "would revoke" if args.dry_run else "revoked"
    for grant, why in report.revoked:
        print(f"{verb} grant {grant.id} of {grant.job} ({grant.user} on {fold(grant.nodes)}): {why}")
    for source, why in sorted(report.unknown.items()):
        print(f"left alone: grants of {source}: {why}")
    for grant in report.ending:
        print(f"left to the epilog: grant {grant.id} of {grant.job}, past its end since {grant.expires_at:%H:%M:%S}Z")
    _print_power(report.power, args.dry_run)
    if report.orphans:
        verb_back = "would give back" if args.dry_run else "giving back"
        print(f"{verb_back} {fold(report.orphans)}: out of the reference environment, held by no grant")
    print(
        f"{len(report.running)} grant(s) of running jobs kept, {len(report.young)} too recent to judge, "
        f"{len(report.revoked)} {verb}"
    )
    return 0


def _print_power(findings: list[Any], dry_run: bool) -> None:
    """One line per BMC answer that contradicts a recorded state, nodes with the same answer together."""
    by_answer: dict[tuple[str, str, bool], list[str]] = {}
    for finding in findings:
        by_answer.setdefault((finding.recorded, finding.bmc, finding.marked), []).append(finding.node)
    for (recorded, bmc, marked), nodes in sorted(by_answer.items()):
        if not bmc.startswith("not checked"):
            done = "marked deploy_failed" if marked else "changed meanwhile, left as it is"
            done = "would mark deploy_failed" if dry_run else done
            print(f"BMC contradicts {fold(nodes)} (recorded {recorded}): {bmc}: {done}")
        else:
            print(f"BMC of {fold(nodes)} (recorded {recorded}) {bmc}")


def doctor_command(args: argparse.Namespace, context: Context) -> int:
    from kasched.doctor import doctor

    checks = doctor(_local_api(context))
    if args.json:
        print_json([{"what": c.what, "ok": c.ok, "detail": c.detail} for c in checks])
    else:
        print_table(["check", "result", "detail"], [(c.what, "ok" if c.ok else "PROBLEM", c.detail) for c in checks])
    return 0 if all(c.ok for c in checks) else 1
