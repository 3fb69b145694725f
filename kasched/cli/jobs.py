"""``kasched job start|end``: what a scheduler's prolog and epilog run. The scheduler is recognised
from the hook's environment and arguments by the adapters the scheduler plugins register."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from kasched.cli.common import Context
from kasched.deploy.release import release
from kasched.errors import ConflictError, InputError, KaschedError, PermissionDenied
from kasched.nodeset import fold
from kasched.schedulers import HOLD_MARK, SchedulerAdapter


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
    reclaim = commands.add_parser("reclaim", help="revert the nodes of an ended job (the epilog starts it)")
    reclaim.add_argument("grant", nargs="?", type=_grant_id, help="the id of the job's revoked grant")
    reclaim.add_argument(
        "--orphans",
        action="store_true",
        help="instead, revert every node out of the reference environment that no grant or operation holds",
    )
    reclaim.add_argument("--wait", type=float, default=600.0, help="seconds to wait for cancelled operations")
    reclaim.set_defaults(handler=job_reclaim)


def _grant_id(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a grant id")
    return int(text)


def _hook_output() -> None:
    """What the built-in plugins report during a hook (e.g. nodes being reverted) goes to the hook's
    output, which the scheduler keeps in its log."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("kasched")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def job_start(args: argparse.Namespace, context: Context) -> int:
    _hook_output()
    adapter = _adapter(args, context)
    job = adapter.read_job_start(os.environ, args.hook_args)
    if not adapter.is_deploy_job(job):
        print(f"{adapter.name} job {job.job_id} is not a deploy job: no grant")
        return 0
    grant = context.front.record_job_start(job)
    print(
        f"grant {grant.id}: {grant.user} may deploy {fold(grant.nodes)} for {adapter.name} job {job.job_id} "
        f"until {grant.expires_at:%Y-%m-%d %H:%M:%S}Z"
    )
    return 0


def job_end(args: argparse.Namespace, context: Context) -> int:
    _hook_output()
    adapter = _adapter(args, context)
    end = adapter.read_job_end(os.environ, args.hook_args)
    grant = context.front.record_job_end(end)
    print(f"grant {grant.id} of {adapter.name} job {end.job_id} revoked: {grant.user} on {fold(grant.nodes)}")
    return 0


def job_reclaim(args: argparse.Namespace, context: Context) -> int:
    """Wait for the cancelled operations to stop, then revert the grant's nodes that are not back and
    that no other active grant holds (asked again in the transaction that takes them)."""
    from kasched.deploy import reclaim

    if not 0 <= args.wait < float("inf"):
        raise InputError("expected seconds (0 or more)", field="wait")
    if args.orphans == (args.grant is not None):
        raise InputError("give either a grant id or --orphans", field="grant")
    api = context.front.beside_database("'kasched job reclaim' runs beside the database: set KASCHED_DIRECT=1")
    if not api.caller.is_admin:
        raise PermissionDenied("only an admin (or the epilog) gives a job's nodes back")
    what = "orphans" if args.orphans else f"grant {args.grant}"
    busy: list[str] = []
    scheduler, job_id = None, None
    with api.database.session() as session:
        if args.orphans:
            user, nodes = "nobody", reclaim.orphans(session)
        else:
            grant = reclaim.revoked_grant(session, args.grant)
            user, nodes, scheduler, job_id = grant.user, list(grant.nodes), grant.scheduler, grant.job_id
    if not args.orphans:
        busy = reclaim.wait_not_busy(api.database.session, nodes, args.wait)
    if busy:
        print(f"{what}: {fold(busy)} still busy after {args.wait:g} s: left as they are")
    with api.database.session() as session:
        states, others = reclaim.node_states(session, nodes), reclaim.held(session, nodes)
    if others:
        print(f"{what}: {fold(sorted(others))} granted to another job already: left alone")
    todo = [n for n in nodes if n in states and states[n] not in reclaim.SETTLED and n not in {*busy, *others}]
    failed = {n: f"{HOLD_MARK} still busy in another operation after {args.wait:g} s" for n in busy}
    failed |= {n: f"{HOLD_MARK} set down in kasched" for n in nodes if states.get(n) in reclaim.SETTLED}
    failed |= {n: f"{HOLD_MARK} granted to another job meanwhile: not given back" for n in others}
    back: list[str] = []
    try:
        code, back = _revert(api, what, user, todo, failed)
    except KaschedError as error:  # before any node had an outcome (no reference environment, no BMC...)
        failed |= dict.fromkeys(todo, f"{HOLD_MARK} revert failed: {error}")
        raise
    finally:
        if scheduler != reclaim.HAND_MADE:
            release(api.bus, scheduler, job_id, back, failed)
    return code or (1 if busy else 0)


def _revert(api: Any, what: str, user: str, todo: list[str], failed: dict[str, str]) -> tuple[int, list[str]]:
    """Revert ``todo`` but for the nodes granted or taken meanwhile: 0 if every node reverted is back,
    and those back; the others' failures are added to ``failed``."""
    from kasched.deploy.operations import Operations

    if not todo:
        print(f"{what}: nothing to revert")
        return 0, []
    print(f"{what}: reverting {fold(todo)} (job of {user})", flush=True)
    try:
        result = Operations(api, releasing=True).revert(todo)
    except ConflictError as error:  # granted to a new job, or taken, since the look above
        print(f"{what}: {error}")
        failed.update(dict.fromkeys(todo, f"{HOLD_MARK} not given back: {error}"))
        return 0, []
    for node, outcome in result.results.items():
        print(f"{node}: {'ok' if outcome.ok else 'failed'} in {outcome.duration:.1f} s {outcome.error or ''}".rstrip())
        if not outcome.ok:
            failed[node] = f"{HOLD_MARK} revert {result.deployment_id} failed: {outcome.error or outcome.step}"
    for node in todo:
        if node not in result.results:  # granted or taken since the look above: not this job's to give back
            failed[node] = f"{HOLD_MARK} granted or taken meanwhile: not given back"
    print(f"revert {result.deployment_id}: {result.state}")
    return (1 if result.failed else 0), list(result.succeeded)


def _adapter(args: argparse.Namespace, context: Context) -> SchedulerAdapter:
    adapters = context.front.scheduler_adapters()
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
