"""``kasched job start|end``: what a scheduler's prolog and epilog run. The scheduler is recognised
from the hook's environment and arguments by the adapters the scheduler plugins register."""

from __future__ import annotations

import argparse
import os
from typing import Any

from kasched.cli.common import Context
from kasched.errors import InputError
from kasched.nodeset import fold
from kasched.schedulers import SchedulerAdapter


def register(subparsers: Any) -> None:
    job = subparsers.add_parser("job", help="record a job's start or end (run by scheduler hooks)")
    commands = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    for name, helptext, handler in (
        ("start", "a deploy job started: grant its nodes to its user", job_start),
        ("end", "a job ended: revoke its grant", job_end),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--scheduler", help="the scheduler (default: recognised from the environment)")
        sub.add_argument("hook_args", nargs="*", metavar="ARG", help="the arguments the scheduler gave the hook")
        sub.set_defaults(handler=handler)


def job_start(args: argparse.Namespace, context: Context) -> int:
    adapter = _adapter(args, context)
    job = adapter.job_started(os.environ, args.hook_args)
    if not adapter.is_deploy_job(job):
        print(f"{adapter.name} job {job.job_id} is not a deploy job: no grant")
        return 0
    grant = context.api.job_started(job)
    print(
        f"grant {grant.id}: {grant.user} may deploy {fold(grant.nodes)} for {adapter.name} job {job.job_id} "
        f"until {grant.expires_at:%Y-%m-%d %H:%M:%S}Z"
    )
    return 0


def job_end(args: argparse.Namespace, context: Context) -> int:
    adapter = _adapter(args, context)
    end = adapter.job_ended(os.environ, args.hook_args)
    grant = context.api.job_ended(end)
    print(f"grant {grant.id} of {adapter.name} job {end.job_id} revoked: {grant.user} on {fold(grant.nodes)}")
    return 0


def _adapter(args: argparse.Namespace, context: Context) -> SchedulerAdapter:
    adapters = context.api.bus.scheduler_adapters()
    if args.scheduler:
        chosen = [a for a in adapters if a.name == args.scheduler]
        if not chosen:
            known = ", ".join(sorted(a.name for a in adapters)) or "none"
            raise InputError(f"no plugin for scheduler {args.scheduler!r} (installed: {known})", field="scheduler")
        return chosen[0]
    detected = [a for a in adapters if a.detect(os.environ, args.hook_args)]
    if len(detected) != 1:
        names = ", ".join(a.name for a in detected) or "none"
        raise InputError(
            f"cannot tell which scheduler runs this hook (recognised: {names}); use --scheduler", field="scheduler"
        )
    return detected[0]
