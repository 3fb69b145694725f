"""Scheduler adapters read jobs from the hook environment each scheduler documents."""

from __future__ import annotations

import pytest
from kasched_oar.plugin import OarAdapter
from kasched_pbs.plugin import PbsAdapter
from kasched_slurm.plugin import SlurmAdapter

from kasched.errors import InputError, KaschedError

# What Slurm 22.05's slurmctld gave PrologSlurmctld for `salloc -C deploy -N 2 --comment env=debian12`.
SLURM_PROLOG = {
    "SLURM_JOB_ID": "17",
    "SLURM_JOB_USER": "alice",
    "SLURM_JOB_UID": "1001",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_CONSTRAINTS": "deploy",
    "SLURM_JOB_COMMENT": "env=debian12",
    "SLURM_JOB_PARTITION": "main",
    "SLURM_CLUSTER_NAME": "lab",
    "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld",
}


def test_slurm_job_from_prolog_environment() -> None:
    adapter = SlurmAdapter()
    assert adapter.detect(SLURM_PROLOG, [])
    job = adapter.read_job_start(SLURM_PROLOG, [])
    assert (job.scheduler, job.cluster, job.job_id, job.user) == ("slurm", "lab", "17", "alice")
    assert job.nodes == ("n1", "n2") and job.environment == "debian12"
    assert adapter.is_deploy_job(job)
    end = adapter.read_job_end({**SLURM_PROLOG, "SLURM_JOB_EXIT_CODE": "0"}, [])
    assert (end.job_id, end.reason) == ("17", "job ended (exit 0)")


def test_slurm_refuses_incomplete_environment() -> None:
    with pytest.raises(InputError, match="Slurm did not set SLURM_JOB_NODELIST"):
        SlurmAdapter().read_job_start({"SLURM_JOB_ID": "1", "SLURM_JOB_USER": "a"}, [])
    job = SlurmAdapter().read_job_start({**SLURM_PROLOG, "SLURM_JOB_CONSTRAINTS": "gpu&ib"}, [])
    assert not SlurmAdapter.is_deploy_job(job)


def test_detection_does_not_overlap() -> None:
    assert OarAdapter().detect({}, ["42"]) and not OarAdapter().detect(SLURM_PROLOG, ["42"])
    assert not PbsAdapter().detect(SLURM_PROLOG, [])
    ended = OarAdapter().read_job_end({"KASCHED_OAR_OARSTAT": "/nonexistent/oarstat"}, ["42"])
    assert ended.job_id == "42" and ended.reason.startswith("job ended (OAR not readable: ")
    with pytest.raises(KaschedError, match="oarstat"):  # no OAR here: a clear error, the hook logs it
        OarAdapter().read_job_start({"KASCHED_OAR_OARSTAT": "/nonexistent/oarstat"}, ["42"])
