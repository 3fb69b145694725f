"""Slurm adapter: reads a job from the environment Slurm gives PrologSlurmctld and EpilogSlurmctld.

The variables (SLURM_JOB_ID, SLURM_JOB_USER, SLURM_JOB_NODELIST, SLURM_JOB_CONSTRAINTS,
SLURM_JOB_COMMENT, SLURM_CLUSTER_NAME, SLURM_SCRIPT_CONTEXT...) were observed with Slurm 22.05's
slurmctld; see ../shared/LAB-NOTES.md and docs/slurm.md. slurmctld does not give its hooks the job's
time limit: kasched_slurm.hooks reads it from ``squeue --json`` and passes it in KASCHED_SLURM_TIME_LIMIT
(seconds), which becomes the grant's walltime.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence

from kasched.errors import InputError, KaschedError
from kasched.hookspecs import hookimpl
from kasched.messages import JobEnd, JobInfo
from kasched.nodeset import expand
from kasched.schedulers import Check, SchedulerAdapter, positive_seconds

# How a job ended, as squeue shows it to the epilog (kasched_slurm.hooks passes it in KASCHED_SLURM_JOB_STATE).
END_REASONS = {"TIMEOUT": "walltime", "CANCELLED": "cancelled", "NODE_FAIL": "node failure", "FAILED": "failed"}
COMMENT_ENV_RE = re.compile(r"(?:^|[\s,;])(?:kasched:)?env=(?P<env>[^\s,;]+)")
MAX_ENV_REQUEST = 200  # the grant's environment_request column


def environment_request(value: str, job_id: str) -> str | None:
    """The comment's ``env=``, or None (one line on stderr) for one too long to store or not printable:
    the job keeps its grant, without the request (it is only recorded, never acted on)."""
    if len(value) <= MAX_ENV_REQUEST and value.isprintable():
        return value
    why = f"longer than {MAX_ENV_REQUEST} characters" if len(value) > MAX_ENV_REQUEST else "not printable"
    print(f"kasched: warning: job {job_id}: env= of the comment ignored ({why})", file=sys.stderr)
    return None


class SlurmAdapter(SchedulerAdapter):
    name = "slurm"

    def detect(self, environ: Mapping[str, str], argv: list[str]) -> bool:
        return "SLURM_JOB_ID" in environ and "SLURM_SCRIPT_CONTEXT" in environ

    def read_job_start(self, environ: Mapping[str, str], argv: list[str]) -> JobInfo:
        missing = [v for v in ("SLURM_JOB_ID", "SLURM_JOB_USER", "SLURM_JOB_NODELIST") if not environ.get(v)]
        if missing:
            raise InputError(f"Slurm did not set {', '.join(missing)}", field="slurm")
        comment = environ.get("SLURM_JOB_COMMENT", "")
        match = COMMENT_ENV_RE.search(comment)
        return JobInfo(
            scheduler=self.name,
            cluster=environ.get("SLURM_CLUSTER_NAME", "cluster"),
            job_id=environ["SLURM_JOB_ID"],
            user=environ["SLURM_JOB_USER"],
            nodes=tuple(expand(environ["SLURM_JOB_NODELIST"], field="SLURM_JOB_NODELIST")),
            environment=environment_request(match.group("env"), environ["SLURM_JOB_ID"]) if match else None,
            walltime=positive_seconds(environ.get("KASCHED_SLURM_TIME_LIMIT", "")),
            extra={
                "constraints": environ.get("SLURM_JOB_CONSTRAINTS", ""),
                "partition": environ.get("SLURM_JOB_PARTITION", ""),
            },
        )

    def read_job_end(self, environ: Mapping[str, str], argv: list[str]) -> JobEnd:
        if not environ.get("SLURM_JOB_ID"):
            raise InputError("Slurm did not set SLURM_JOB_ID", field="slurm")
        code = environ.get("SLURM_JOB_EXIT_CODE")
        reason = f"job ended (exit {code})" if code else "job ended"
        state, _, signal = environ.get("KASCHED_SLURM_JOB_STATE", "").upper().partition(" ")
        if state in END_REASONS:
            reason = f"{END_REASONS[state]} ({reason})"
        elif state == "SIGNALED" and signal.isdigit():
            reason = f"killed by signal {signal}, e.g. scancel ({reason})"
        return JobEnd(
            scheduler=self.name,
            cluster=environ.get("SLURM_CLUSTER_NAME", "cluster"),
            job_id=environ["SLURM_JOB_ID"],
            reason=reason,
        )

    def running_jobs(self, cluster: str) -> set[str] | None:
        """The jobs squeue lists as holding nodes, when ``cluster`` is this Slurm's ClusterName."""
        from kasched_slurm import slurmcli

        try:
            if slurmcli.config().get("ClusterName") != cluster:
                return None
            return slurmcli.active_job_ids()
        except KaschedError:
            return None

    def release(self, job_id: str | None, back: Sequence[str], failed: Mapping[str, str]) -> list[str]:
        """RESUME the nodes kasched drained at the job's end that are back; keep the failed ones drained with
        why (``sinfo -R``). While the epilog is still giving the job's stand-ins back, it is left to it
        (kasched_slurm.hold). Runs where kasched runs (kaschedd): needs KASCHED_SLURM_STATE_DIR as the
        hooks have it (``scheduler_settings``) and Slurm's commands (SLURM_CONF)."""
        from kasched_slurm import hold

        if shutil.which("scontrol") is None:  # no Slurm where kasched runs: none of these nodes is Slurm's
            return []
        try:
            return hold.release(hold.state_dir(os.environ), job_id, back, failed)
        except (KaschedError, OSError, ValueError) as error:
            return [f"release of job {job_id}: {error}"]

    def doctor(self) -> list[Check]:
        from kasched_slurm import doctor

        return doctor.checks()

    @staticmethod
    def is_deploy_job(job: JobInfo) -> bool:
        """A deploy job asks for the ``deploy`` feature (``salloc -C deploy``)."""
        return SlurmAdapter.wants_deploy(str(job.extra.get("constraints", "")))

    @staticmethod
    def wants_deploy(constraints: str) -> bool:
        """Whether a Slurm constraint expression (``deploy``, ``deploy&ib``...) names ``deploy``."""
        return "deploy" in re.split(r"[&|,\[\]*()\s]+", constraints)




@hookimpl
def kasched_scheduler_adapters() -> list[SchedulerAdapter]:
    return [SlurmAdapter()]
