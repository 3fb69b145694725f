"""The Slurm plugin's reading of what Slurm says, without daemons: time limit and end reason from the
hooks' extra variables, squeue's JSON, deploy constraints."""

from __future__ import annotations

import pytest
from kasched_slurm import slurmcli
from kasched_slurm.hooks import main as hooks_main
from kasched_slurm.plugin import SlurmAdapter

PROLOG = {
    "SLURM_JOB_ID": "12",
    "SLURM_JOB_USER": "alice",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_CLUSTER_NAME": "lab",
    "SLURM_JOB_CONSTRAINTS": "deploy",
    "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld",
}


def test_walltime_comes_from_the_hooks_variable() -> None:
    assert SlurmAdapter().read_job_start({**PROLOG, "KASCHED_SLURM_TIME_LIMIT": "300"}, []).walltime == 300
    assert SlurmAdapter().read_job_start(PROLOG, []).walltime is None
    assert SlurmAdapter().read_job_start({**PROLOG, "KASCHED_SLURM_TIME_LIMIT": "junk"}, []).walltime is None


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ("TIMEOUT", "walltime (job ended (exit 0))"),
        ("SIGNALED 15", "killed by signal 15, e.g. scancel (job ended (exit 0))"),
        ("COMPLETING", "job ended (exit 0)"),
        ("", "job ended (exit 0)"),
    ],
)
def test_end_reason(state: str, reason: str) -> None:
    end = {**PROLOG, "SLURM_JOB_EXIT_CODE": "0", "KASCHED_SLURM_JOB_STATE": state}
    assert SlurmAdapter().read_job_end(end, []).reason == reason


def squeue_entry(**fields: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "job_id": 12, "user_name": "alice", "job_state": "COMPLETING", "nodes": "n[1-2]", "features": "deploy",
        "comment": "", "time_limit": 1, "restart_cnt": 0, "start_time": 1000, "end_time": 1060, "exit_code": 0,
    }  # fmt: skip
    entry.update(fields)
    return entry


def test_squeue_job_base_state() -> None:
    assert slurmcli._job(squeue_entry()).base_state == "TIMEOUT"
    assert slurmcli._job(squeue_entry(end_time=1010, exit_code=15)).base_state == "SIGNALED"
    shell = slurmcli._job(squeue_entry(end_time=1010, exit_code=143 << 8))  # sh whose child died of SIGTERM
    assert (shell.base_state, shell.signal) == ("SIGNALED", 15)
    assert slurmcli._job(squeue_entry(end_time=1010, exit_code=1 << 8)).base_state == "COMPLETING"
    assert slurmcli._job(squeue_entry(end_time=1010)).base_state == "COMPLETING"
    assert slurmcli._job(squeue_entry(job_state="CANCELLED")).base_state == "CANCELLED"
    assert slurmcli._job(squeue_entry(time_limit=0xFFFFFFFE)).time_limit is None


@pytest.mark.parametrize(
    ("constraints", "deploy"), [("deploy", True), ("deploy&ib", True), ("[deploy|gpu]", True), ("deployed", False)]
)
def test_deploy_constraint(constraints: str, deploy: bool) -> None:
    assert SlurmAdapter.wants_deploy(constraints) is deploy


def test_hooks_ignore_ordinary_jobs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**PROLOG, "SLURM_JOB_CONSTRAINTS": "gpu"}.items():
        monkeypatch.setenv(key, value)
    assert hooks_main(["prolog"]) == 0
    assert hooks_main(["epilog"]) == 0
    assert capsys.readouterr().out.count("job 12: not a deploy job") == 2
    assert hooks_main(["bogus"]) == 2


def test_the_epilog_revokes_the_grant_before_slurm_gets_the_nodes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the stand-ins stop and the nodes are resumed, Slurm may start the user's next job on them:
    the grant (and its operations) must be gone first (docs/slurm.md)."""
    from kasched_slurm import hooks, standin

    calls: list[str] = []
    monkeypatch.setattr(hooks, "job_state", lambda job_id: "COMPLETED")
    monkeypatch.setattr(hooks, "kasched", lambda action, environ: calls.append(f"kasched job {action}") or 0)
    monkeypatch.setattr(standin, "detach", lambda settings, job_id: calls.append("give the nodes back") or [])
    environ = {**PROLOG, "SLURM_SCRIPT_CONTEXT": "epilog_slurmctld", "KASCHED_SLURM_STANDIN_ADDR": "127.0.0.2"}
    assert hooks.epilog(environ) == 0
    assert calls == ["kasched job end", "give the nodes back"]
