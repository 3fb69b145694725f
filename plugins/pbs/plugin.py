"""PBS adapter: reads a job from the environment kasched's PBS server hook gives ``kasched job start|end``.

PBS runs its hooks inside its own Python with the ``pbs`` module, where kasched need not be installed,
so the hook (hooks/kasched_pbs_hook.py, docs/pbs.md) reads the job from ``pbs.event().job`` and runs
``kasched job start|end --scheduler pbs`` with it in these variables:

PBS_JOBID (the full id, ``123.server``), KASCHED_PBS_EVENT (start or end), KASCHED_PBS_CLUSTER,
KASCHED_PBS_USER (``euser``), KASCHED_PBS_NODES (the vnodes of ``exec_vnode``, comma-separated),
KASCHED_PBS_WALLTIME (``Resource_List.walltime`` in seconds), KASCHED_PBS_ENV (``-l kasched_env=``),
KASCHED_PBS_DEPLOY (``-l deploy=true``), KASCHED_PBS_QUEUE, and at the end KASCHED_PBS_EXIT_STATUS.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from kasched_pbs import hold, pbscli

from kasched.errors import InputError
from kasched.hookspecs import hookimpl
from kasched.messages import JobEnd, JobInfo
from kasched.schedulers import Check, SchedulerAdapter, positive_seconds

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SIGNAL_BASE = 256  # PBS reports a job killed by signal N as exit status 256 + N


class PbsAdapter(SchedulerAdapter):
    name = "pbs"

    def detect(self, environ: Mapping[str, str], argv: list[str]) -> bool:
        return "KASCHED_PBS_EVENT" in environ

    def read_job_start(self, environ: Mapping[str, str], argv: list[str]) -> JobInfo:
        missing = [v for v in ("PBS_JOBID", "KASCHED_PBS_USER", "KASCHED_PBS_NODES") if not environ.get(v)]
        if missing:
            raise InputError(f"the PBS hook did not set {', '.join(missing)}", field="pbs")
        return JobInfo(
            scheduler=self.name,
            cluster=environ.get("KASCHED_PBS_CLUSTER") or "cluster",
            job_id=environ["PBS_JOBID"],
            user=environ["KASCHED_PBS_USER"],
            nodes=_nodes(environ["KASCHED_PBS_NODES"]),
            environment=environ.get("KASCHED_PBS_ENV") or None,
            walltime=positive_seconds(environ.get("KASCHED_PBS_WALLTIME", "")),
            extra={
                "deploy": environ.get("KASCHED_PBS_DEPLOY", "").lower() == "true",
                "queue": environ.get("KASCHED_PBS_QUEUE", ""),
            },
        )

    def read_job_end(self, environ: Mapping[str, str], argv: list[str]) -> JobEnd:
        if not environ.get("PBS_JOBID"):
            raise InputError("the PBS hook did not set PBS_JOBID", field="pbs")
        return JobEnd(
            scheduler=self.name,
            cluster=environ.get("KASCHED_PBS_CLUSTER") or "cluster",
            job_id=environ["PBS_JOBID"],
            reason=end_reason(environ.get("KASCHED_PBS_EXIT_STATUS", "")),
        )

    def is_deploy_job(self, job: JobInfo) -> bool:
        """A deploy job asks for the ``deploy`` resource: ``qsub -l deploy=true``."""
        return bool(job.extra.get("deploy"))

    def running_jobs(self, cluster: str) -> set[str] | None:
        return pbscli.running_jobs(cluster)

    def release(self, job_id: str | None, back: Sequence[str], failed: Mapping[str, str]) -> list[str]:
        """The vnodes the hook marked offline (comment starting with HOLD_MARK) at the job's end: back
        into service, or kept offline with the reason in their comment (kasched_pbs.hold)."""
        if not back and not failed:
            return []
        pbsnodes = hold.pbs_command("pbsnodes")
        if pbsnodes is None:
            return ["pbsnodes not found (set KASCHED_PBS_EXEC in scheduler_settings): held vnodes stay offline"]
        return hold.release(pbsnodes, back, failed)

    def doctor(self) -> list[Check]:
        qstat, qmgr = hold.pbs_command("qstat"), hold.pbs_command("qmgr")
        pbsnodes = hold.pbs_command("pbsnodes")
        if not qstat and not qmgr and not pbsnodes:
            return []  # no PBS client on this host: nothing of PBS's to check
        checks = [pbscli.jobs_check(qstat), pbscli.pbsnodes_check(pbsnodes)]
        if qmgr:
            checks.extend(pbscli.server_checks(qmgr))
        else:
            checks.append(Check("PBS qmgr", False, "not on PATH: cannot check the kasched hook and resources"))
        return checks


def end_reason(exit_status: str) -> str:
    """How a job ended, from its PBS Exit_status."""
    try:
        status = int(exit_status)
    except ValueError:
        return "job ended"
    if status > SIGNAL_BASE:
        return f"killed by signal {status - SIGNAL_BASE}, e.g. qdel or walltime (exit {status})"
    if status < 0:
        return f"PBS could not run the job (exit {status})"
    return f"job ended (exit {status})"


def _nodes(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if not NODE_NAME.match(n)]
    if bad or not names:
        raise InputError(f"KASCHED_PBS_NODES: not a list of vnode names: {value!r}", field="KASCHED_PBS_NODES")
    return names




@hookimpl
def kasched_scheduler_adapters() -> list[SchedulerAdapter]:
    return [PbsAdapter()]
