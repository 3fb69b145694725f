"""PBS adapter. PBS runs server hooks inside its own Python with the ``pbs`` module; those hooks come
with the scheduler-integration issue. Registered on the bus now so that ``kasched`` lists it; until
then :meth:`job_started` refuses with a clear error rather than guessing."""

from __future__ import annotations

from collections.abc import Mapping

from kasched.errors import InputError
from kasched.hookspecs import hookimpl
from kasched.jobs import JobEnd, JobInfo
from kasched.schedulers import SchedulerAdapter


class PbsAdapter(SchedulerAdapter):
    name = "pbs"

    def detect(self, environ: Mapping[str, str], argv: list[str]) -> bool:
        return "PBS_HOOK_CONFIG_FILE" in environ or ("PBS_JOBID" in environ and "PBS_HOOK" in environ)

    def job_started(self, environ: Mapping[str, str], argv: list[str]) -> JobInfo:
        raise InputError("PBS hooks are not built yet (scheduler-integration issue)", field="pbs")

    def job_ended(self, environ: Mapping[str, str], argv: list[str]) -> JobEnd:
        raise InputError("PBS hooks are not built yet (scheduler-integration issue)", field="pbs")


@hookimpl
def kasched_scheduler_adapters() -> list[SchedulerAdapter]:
    return [PbsAdapter()]
