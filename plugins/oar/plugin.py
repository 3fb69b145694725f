"""OAR adapter. OAR's server prologue and epilogue get exactly one argument, the job id, and run as
user ``oar``; the job itself is read from OAR's REST API, or ``oarstat -fj ID -J`` (oarjobs.py).

kasched_oar.hooks reads the job once and passes it to ``kasched job start|end`` in
KASCHED_OAR_JOB_JSON; without it (``prolog/kasched-prolog`` called directly) the adapter reads it.
A deploy job is ``oarsub -t deploy``; ``-t env=NAME`` names the environment (docs/oar.md).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from kasched_oar import holds
from kasched_oar.oarjobs import OarError, OarJob, OarSettings, api_reachable, read_job, running_job_ids

from kasched.errors import InputError
from kasched.hookspecs import hookimpl
from kasched.messages import JobEnd, JobInfo
from kasched.schedulers import Check, SchedulerAdapter

OAR_CONF = Path("/etc/oar/oar.conf")
JOB_JSON = "KASCHED_OAR_JOB_JSON"  # the job as kasched_oar.hooks read it


class OarAdapter(SchedulerAdapter):
    name = "oar"

    def detect(self, environ: Mapping[str, str], argv: list[str]) -> bool:
        # OAR passes the job id alone and sets no variable of Slurm or PBS.
        foreign = any(key.startswith(("SLURM_", "PBS_")) for key in environ)
        return len(argv) == 1 and argv[0].isdigit() and not foreign

    def read_job_start(self, environ: Mapping[str, str], argv: list[str]) -> JobInfo:
        settings = OarSettings.from_environ(environ)
        job = self.job(environ, argv)
        if not job.user or not job.nodes:
            raise InputError(f"OAR job {job.job_id} has no owner or no nodes (state {job.state or '?'})", field="oar")
        return JobInfo(
            scheduler=self.name,
            cluster=settings.cluster,
            job_id=job.job_id,
            user=job.user,
            nodes=job.nodes,
            environment=job.environment,
            walltime=job.walltime,
            extra={"types": list(job.types), "name": job.name, "source": job.source},
        )

    def read_job_end(self, environ: Mapping[str, str], argv: list[str]) -> JobEnd:
        settings = OarSettings.from_environ(environ)
        job_id = _job_id(argv)
        try:
            reason = self.job(environ, argv).end_reason
        except OarError as error:  # the grant is revoked anyway: the reason only loses detail
            reason = f"job ended (OAR not readable: {error})"
        return JobEnd(scheduler=self.name, cluster=settings.cluster, job_id=job_id, reason=reason)

    def is_deploy_job(self, job: JobInfo) -> bool:
        """``oarsub -t deploy``: only those jobs get a grant."""
        return OarJob(job.job_id, job.user, "", job.nodes, None, tuple(job.extra.get("types", ()))).is_deploy

    def running_jobs(self, cluster: str) -> set[str] | None:
        try:
            settings = OarSettings.from_environ(_environ())
            if cluster != settings.cluster:
                return None
            return running_job_ids(settings)
        except OarError:
            return None

    def release(self, job_id: str | None, back: Sequence[str], failed: Mapping[str, str]) -> list[str]:
        """Resources held by the epilogue (drain on, ``kasched`` property starting with HOLD_MARK):
        ``back`` drain off and property cleared, ``failed`` stay drained with their reason. Runs
        where kaschedd runs: OAR's commands behind KASCHED_OAR_COMMAND_PREFIX."""
        try:
            settings = OarSettings.from_environ(_environ())
        except OarError as error:
            return [str(error)]
        return holds.release(back, failed, settings)

    def doctor(self) -> list[Check]:
        settings = OarSettings.from_environ(_environ())
        checks = [_oarstat_check(settings), _jobs_check(settings), _property_check(settings)]
        if settings.api_url:
            try:
                checks.append(Check("OAR REST API", True, f"{settings.api_url}: {api_reachable(settings)}"))
            except OarError as error:
                checks.append(Check("OAR REST API", False, f"{error} (jobs are read with oarstat)"))
        else:
            checks.append(Check("OAR REST API", True, "KASCHED_OAR_API_URL not set: jobs are read with oarstat"))
        checks += hook_checks(OAR_CONF)
        return checks

    @staticmethod
    def job(environ: Mapping[str, str], argv: list[str]) -> OarJob:
        """The hook's job: the one kasched_oar.hooks passed, or read from OAR now."""
        job_id = _job_id(argv)
        passed = environ.get(JOB_JSON)
        if passed:
            try:
                job = OarJob.from_dict(json.loads(passed))
            except (ValueError, TypeError, AttributeError):
                raise InputError(f"{JOB_JSON} is not a job as kasched_oar.hooks writes it", field="oar") from None
            if job.job_id == job_id:
                return job
        return read_job(job_id, OarSettings.from_environ(environ))


def hook_checks(conf: Path) -> list[Check]:
    """Whether oar.conf runs kasched as SERVER_PROLOGUE_EXEC_FILE and SERVER_EPILOGUE_EXEC_FILE."""
    try:
        text = conf.read_text()
    except OSError as error:
        return [Check("OAR server hooks", False, f"{conf}: {error.strerror}")]
    checks = []
    for key in ("SERVER_PROLOGUE_EXEC_FILE", "SERVER_EPILOGUE_EXEC_FILE"):
        match = re.search(rf'^\s*{key}\s*=\s*"?([^"\n]*)"?', text, re.MULTILINE)
        if not match:
            checks.append(Check(key, False, f"not set in {conf} (docs/oar.md)"))
            continue
        command = match.group(1).strip()
        checks.append(Check(key, _runs_kasched(command), command))
    return checks


def _runs_kasched(command: str) -> bool:
    """The hook is one of kasched's entry points, or a wrapper that runs one."""
    path = Path(command.split()[0]) if command else Path()
    if path.name in ("kasched-prolog", "kasched-epilog"):
        return True
    try:
        return "kasched" in path.read_text(errors="replace")
    except OSError:
        return False


def _jobs_check(settings: OarSettings) -> Check:
    """Whether OAR's jobs can be listed from here (what reconcile needs), tried for real."""
    where = f" behind '{' '.join(settings.command_prefix)}'" if settings.command_prefix else ""
    try:
        found = running_job_ids(settings)
    except OarError as error:
        detail = (
            f"cannot list them{where}: {error}; reconcile leaves OAR's grants alone and a lost epilogue is never "
            "repaired (set KASCHED_OAR_API_URL or KASCHED_OAR_COMMAND_PREFIX in scheduler_settings)"
        )
        return Check("OAR jobs from here", False, detail)
    return Check("OAR jobs from here", True, f"{len(found)} active job(s) listed{where}")


def _property_check(settings: OarSettings) -> Check:
    """Whether the resources have the property holding kasched's reason (the epilogue's hold needs it)."""
    what = f"resource property {holds.PROPERTY}"
    try:
        exists = holds.property_exists(settings)
    except OarError as error:
        return Check(what, False, f"cannot tell: {error}")
    if exists:
        return Check(what, True, "exists: held resources say why (oarnodes)")
    add = f"oarproperty -a {holds.PROPERTY} -c"
    return Check(what, False, f"missing: the epilogue cannot hold nodes while they are given back ({add})")


def _oarstat_check(settings: OarSettings) -> Check:
    found = shutil.which(settings.oarstat)
    return Check("oarstat", bool(found), found or f"{settings.oarstat} not found (Debian package oar-user)")


def _job_id(argv: list[str]) -> str:
    if len(argv) != 1 or not argv[0].isdigit():
        raise InputError("OAR's server prologue and epilogue pass one argument, the job id", field="oar")
    return argv[0]


def _environ() -> Mapping[str, str]:
    import os

    return os.environ


@hookimpl
def kasched_scheduler_adapters() -> list[SchedulerAdapter]:
    return [OarAdapter()]
