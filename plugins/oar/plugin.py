"""OAR adapter. OAR's server prologue and epilogue get exactly one argument, the job id, and run as
user ``oar``; the job itself is read from OAR's REST API, or ``oarstat -fj ID -J``.

Registered on the bus now; reading jobs from OAR comes with the scheduler-integration issue, and
until then :meth:`job_started` refuses with a clear error rather than guessing.
"""

from __future__ import annotations

from collections.abc import Mapping

from kasched.errors import InputError
from kasched.hookspecs import hookimpl
from kasched.jobs import JobEnd, JobInfo
from kasched.schedulers import SchedulerAdapter


class OarAdapter(SchedulerAdapter):
    name = "oar"

    def detect(self, environ: Mapping[str, str], argv: list[str]) -> bool:
        # OAR passes the job id alone and sets no variable of Slurm or PBS.
        foreign = any(key.startswith(("SLURM_", "PBS_")) for key in environ)
        return len(argv) == 1 and argv[0].isdigit() and not foreign

    def job_started(self, environ: Mapping[str, str], argv: list[str]) -> JobInfo:
        raise InputError("reading OAR jobs is not built yet (scheduler-integration issue)", field="oar")

    def job_ended(self, environ: Mapping[str, str], argv: list[str]) -> JobEnd:
        if len(argv) != 1 or not argv[0].isdigit():
            raise InputError("OAR's epilogue passes one argument, the job id", field="oar")
        return JobEnd(scheduler=self.name, cluster=environ.get("OAR_CLUSTER", "oar"), job_id=argv[0])


@hookimpl
def kasched_scheduler_adapters() -> list[SchedulerAdapter]:
    return [OarAdapter()]
