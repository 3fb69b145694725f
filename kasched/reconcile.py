"""``kasched reconcile``: grants against the jobs the schedulers say are running.

An epilog can be lost (the scheduler's host crashed, the hook timed out, kasched's database was down
when it ran). Reconciliation finds the grants left behind and revokes them as the epilog would have,
which gives their nodes back (:mod:`kasched.builtin.reclaimer`):

- a grant of a job its scheduler no longer runs;
- a grant past its end (the job's walltime) that no epilog revoked within ``walltime_grace`` seconds
  (the site's ``reconcile_walltime_grace``, 300 by default): until then it is the epilog's, which runs
  after the scheduler's kill and says how the job ended.

It also gives back *orphans*: nodes out of the reference environment (and not down) that no active
grant and no operation holds, unchanged for ``grace`` seconds (a revert that failed or was lost, a
deploy that outlived its grant), with ``kasched job reclaim --orphans`` in the background. A node an
admin deployed outside any grant is one too: hold it with a grant (``kasched rights grant``) or set it
down.

Before that, it asks the BMC of every node recorded ``reference`` or ``deployed`` that no grant and no
operation holds for its power status (:mod:`kasched.powercheck`): a node its BMC says is off, or whose
BMC cannot say or does not answer within ``bmc_timeout`` seconds, is reported and marked
``deploy_failed``, and given back with the orphans.

A scheduler that cannot tell (not installed here, unreachable) is left alone: reconciliation never
guesses. A grant younger than ``grace`` seconds is left alone too: its prolog may still be running,
before the scheduler lists the job as running.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

from kasched import powercheck
from kasched.api import Kasched
from kasched.deploy import reclaim
from kasched.errors import KaschedError, PermissionDenied
from kasched.messages import JobEnd
from kasched.models import utcnow
from kasched.schedulers import Check
from kasched.views import GrantView

GRACE_SECONDS = 60.0


@dataclass
class ReconcileReport:
    running: list[GrantView] = field(default_factory=list)  # job still running: kept
    young: list[GrantView] = field(default_factory=list)  # too recent to judge: kept
    ending: list[GrantView] = field(default_factory=list)  # past its end, within the walltime grace: the epilog's
    orphans: list[str] = field(default_factory=list)  # nodes given back (reverted in the background)
    revoked: list[tuple[GrantView, str]] = field(default_factory=list)  # (grant, why)
    unknown: dict[str, str] = field(default_factory=dict)  # "scheduler:cluster" -> why it was left alone
    power: list[powercheck.PowerFinding] = field(default_factory=list)  # BMCs contradicting recorded states


def reconcile(
    api: Kasched,
    *,
    grace: float = GRACE_SECONDS,
    dry_run: bool = False,
    walltime_grace: float | None = None,
    bmc_timeout: float = powercheck.BMC_TIMEOUT,
) -> ReconcileReport:
    """Check idle nodes against their BMCs; compare every unrevoked job grant with its scheduler; revoke
    the stale grants and give back the orphan nodes and those the BMC check marked (unless ``dry_run``)."""
    if not api.caller.is_admin:
        raise PermissionDenied("only admins may reconcile grants with the schedulers")
    report = ReconcileReport()
    now = utcnow()
    ending = timedelta(seconds=api.config.reconcile_walltime_grace if walltime_grace is None else walltime_grace)
    report.power = powercheck.check(api, dry_run=dry_run, timeout=bmc_timeout)
    marked = [f.node for f in report.power if f.marked or (dry_run and f.checked)]
    with api.database.session() as session:  # before this round's revokes: their nodes are their reclaim's
        report.orphans = sorted({*reclaim.orphans(session, min_age=grace), *marked})
    if report.orphans and not dry_run:
        reclaim.spawn(api.config, None)
    pending = [g for g in api.rights(include_ended=True) if g.revoked_at is None and g.scheduler != reclaim.HAND_MADE]
    by_job_source: dict[tuple[str, str], list[GrantView]] = defaultdict(list)
    for grant in pending:
        if grant.expires_at + ending <= now:
            _revoke(api, report, grant, "reconcile: past its end, no epilog revoked it", dry_run)
        elif grant.expires_at <= now:
            report.ending.append(grant)
        elif (now - grant.created_at).total_seconds() < grace:
            report.young.append(grant)
        else:
            by_job_source[(grant.scheduler, grant.cluster)].append(grant)
    adapters = {adapter.name: adapter for adapter in api.bus.scheduler_adapters()}
    for (scheduler, cluster), grants in sorted(by_job_source.items()):
        running = _running_jobs(adapters.get(scheduler), cluster, report, f"{scheduler}:{cluster}")
        if running is None:
            continue
        for grant in grants:
            if grant.job_id in running:
                report.running.append(grant)
            else:
                _revoke(api, report, grant, f"reconcile: {scheduler} no longer runs job {grant.job_id}", dry_run)
    return report


def _running_jobs(adapter: object, cluster: str, report: ReconcileReport, source: str) -> set[str] | None:
    if adapter is None:
        report.unknown[source] = "no plugin for this scheduler is installed"
        return None
    try:
        running = adapter.running_jobs(cluster)  # type: ignore[attr-defined]
    except KaschedError as error:
        report.unknown[source] = f"cannot list its jobs: {error}"
        return None
    if running is None:
        report.unknown[source] = "the scheduler cannot tell which jobs run (not reachable from here?)"
        return None
    return set(running)


def reach(api: Kasched) -> list[Check]:
    """Whether this process can tell, for each scheduler and cluster its grants came from, which jobs
    run: where it cannot, reconcile leaves that scheduler's grants alone and a lost epilog is never
    repaired. One line per scheduler and cluster (a plugin whose scheduler granted nothing yet: one line
    saying so)."""
    if not api.caller.is_admin:
        raise PermissionDenied("only admins may check what reconcile sees of the schedulers")
    sources = sorted(
        {(g.scheduler, g.cluster) for g in api.rights(include_ended=True) if g.scheduler != reclaim.HAND_MADE}
    )
    checks = []
    for adapter in api.bus.scheduler_adapters():
        clusters = [cluster for scheduler, cluster in sources if scheduler == adapter.name]
        if not clusters:
            checks.append(Check(f"{adapter.name}: reconcile", True, "no job of this scheduler was granted yet"))
        for cluster in clusters:
            report = ReconcileReport()
            running = _running_jobs(adapter, cluster, report, cluster)
            detail = (
                f"lists its jobs ({len(running)} running)"
                if running is not None
                else (f"{report.unknown[cluster]}: its grants are left alone, a lost epilog is never repaired")
            )
            checks.append(Check(f"{adapter.name}:{cluster}: reconcile", running is not None, detail))
    return checks


def _revoke(api: Kasched, report: ReconcileReport, grant: GrantView, why: str, dry_run: bool) -> None:
    if not dry_run:
        api.record_job_end(JobEnd(scheduler=grant.scheduler, cluster=grant.cluster, job_id=grant.job_id, reason=why))
    report.revoked.append((grant, why))
