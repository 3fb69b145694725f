"""Deploy jobs on a real OAR 2.5.9 (Almighty, PostgreSQL, the REST API, kasched's server prologue and
epilogue run by OAR as user oar): a grant at start, revoked at every kind of end, nothing for other
jobs, and OAR's queues never stopped, even when kasched's database is unreadable."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from kasched_oar import holds
from kasched_oar.oarjobs import OarSettings, read_job
from kasched_oar.plugin import OarAdapter
from oar_cluster import OAR_DIR, USER, OarCluster, oar_cluster
from slurm_cluster import wait_for

pytestmark = [pytest.mark.oar, pytest.mark.slow]


@pytest.fixture(scope="module")
def oar() -> Iterator[OarCluster]:
    with oar_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ended_three_ways(oar: OarCluster) -> dict[str, str]:
    """Three deploy jobs at once on the four nodes: one ends by itself, one at its walltime, one by oardel."""
    jobs = {
        "normal": oar.submit("-t", "deploy", "-t", "env=debian12", "-l", "nodes=2,walltime=0:05:00", "sleep 8"),
        "walltime": oar.submit("-t", "deploy", "-l", "nodes=1,walltime=0:00:05", "sleep 300"),
        "cancel": oar.submit("-t", "deploy", "-l", "nodes=1,walltime=0:05:00", "sleep 300"),
    }
    for job_id in jobs.values():
        oar.wait_state(job_id, {"Running"})
    return jobs


def test_deploy_job_grant_has_user_nodes_walltime_environment(oar: OarCluster, ended_three_ways: dict[str, str]) -> None:
    job_id = ended_three_ways["normal"]
    job = oar.job(job_id)
    grant = oar.grant(job_id)
    assert grant["user"] == USER and grant["cluster"] == "oar" and grant["environment_request"] == "debian12"
    assert sorted(grant["nodes"]) == sorted(job["assigned_network_address"])  # type: ignore[arg-type]
    lasts = datetime.fromisoformat(str(grant["expires_at"])) - datetime.fromisoformat(str(grant["created_at"]))
    assert lasts.total_seconds() == 300
    assert oar.kasched("rights", "check", "-u", USER, "-m", ",".join(grant["nodes"])).returncode == 0  # type: ignore[arg-type]


def test_running_jobs_lists_what_oar_runs(oar: OarCluster, ended_three_ways: dict[str, str]) -> None:
    adapter = OarAdapter()
    with pytest.MonkeyPatch.context() as patch:  # the adapter reads its settings from the environment
        patch.setenv("KASCHED_OAR_API_URL", oar.env["KASCHED_OAR_API_URL"])
        running = adapter.running_jobs("oar")
        assert adapter.running_jobs("another-cluster") is None
        checks = {check.what: check for check in adapter.doctor()}
    assert running is not None and ended_three_ways["cancel"] in running
    assert all(check.ok for check in checks.values()), checks
    assert set(checks) == {
        "oarstat", "OAR jobs from here", "resource property kasched", "OAR REST API",
        "SERVER_PROLOGUE_EXEC_FILE", "SERVER_EPILOGUE_EXEC_FILE",
    }  # fmt: skip


def test_job_is_read_with_oarstat_when_the_api_is_down(oar: OarCluster, ended_three_ways: dict[str, str]) -> None:
    job_id = ended_three_ways["cancel"]
    job = read_job(job_id, OarSettings(api_url="http://127.0.0.1:9/oarapi", timeout=5))
    from_api = read_job(job_id, OarSettings(api_url=oar.env["KASCHED_OAR_API_URL"]))
    assert job.source == "oarstat" and from_api.source == "api"
    assert (job.user, job.nodes, job.walltime, job.types) == (from_api.user, from_api.nodes, 300.0, ("deploy",))


@pytest.mark.parametrize(("end", "reason"), [("normal", "job ended (exit 0)"), ("walltime", "walltime"), ("cancel", "cancelled")])
def test_every_end_revokes_the_grant_with_its_reason(
    oar: OarCluster, ended_three_ways: dict[str, str], end: str, reason: str
) -> None:
    job_id = ended_three_ways[end]
    if end == "cancel":
        done = oar.run("oardel", job_id, user=USER)
        assert done.returncode == 0, done.stderr
    grant = oar.wait_revoked(job_id)
    assert not grant["active"] and str(grant["revoke_reason"]).startswith(reason), grant
    oar.wait_state(job_id, {"Terminated", "Error"})
    wait_for(lambda: set(oar.node_states().values()) == {"Alive"}, 30, f"nodes Alive ({oar.node_states()})")
    assert f"job {job_id}: node-" in oar.log("epilogue.log")  # held before kasched job end...
    wait_for(lambda: set(oar.resources().values()) == {("NO", "")}, 30, f"released ({oar.resources()})")  # ...released
    assert oar.queues_active()


def test_holds_leave_an_admins_drain_alone_and_store_safe_reasons(oar: OarCluster) -> None:
    """On real OAR: kasched holds and releases only resources it marked; a reason cannot inject SQL."""
    settings = OarSettings()
    assert oar.run("oarnodesetting", "--drain", "on", "-h", "node-4").returncode == 0  # the admin's own drain
    try:
        assert holds.hold(["node-3", "node-4"], "99", settings)
        assert oar.resources()["node-3"] == ("YES", holds.hold_reason("99"))
        assert oar.resources()["node-4"] == ("YES", "")  # not marked: not kasched's
        failed = {"node-3": "kasched: revert 5 failed: x'); UPDATE resources SET drain='NO'; --"}
        assert holds.release(["node-4"], failed, settings) == []  # node-4: nothing of kasched's, skipped
        assert oar.resources()["node-3"] == ("YES", "kasched: revert 5 failed: x ); UPDATE resources SET drain NO ; --")
        assert oar.resources()["node-4"] == ("YES", "")
        assert holds.release(["node-3", "node-4"], {}, settings) == []
        assert oar.resources()["node-3"] == ("NO", "") and oar.resources()["node-4"] == ("YES", "")
    finally:
        oar.run("oarnodesetting", "--drain", "off", "-h", "node-4")
        oar.run("oarnodesetting", "--drain", "off", "-p", "kasched=", "-h", "node-3")


def test_non_deploy_job_gets_no_grant(oar: OarCluster, ended_three_ways: dict[str, str]) -> None:
    job_id = oar.submit("-t", "cosystem", "-l", "nodes=1,walltime=0:01:00", "sleep 1")
    oar.wait_state(job_id, {"Terminated", "Error"})
    wait_for(lambda: f"job {job_id}: epilogue done" in oar.log("epilogue.log"), 30, "the epilogue")
    assert oar.grants(job_id) == []
    assert f"job {job_id}: not a deploy job" in oar.log("prologue.log")
    assert oar.queues_active()


def test_unreadable_database_cancels_the_deploy_job_and_keeps_queues_up(
    oar: OarCluster, ended_three_ways: dict[str, str]
) -> None:
    state = OAR_DIR / "kasched" / "state"
    modes = {path: path.stat().st_mode for path in [state, *state.iterdir()]}
    state.chmod(0)  # the hooks run as oar: kasched cannot open its database
    try:
        job_id = oar.submit("-t", "deploy", "-l", "nodes=1,walltime=0:01:00", "sleep 60")
        oar.wait_state(job_id, {"Terminated", "Error"})
    finally:
        for path, mode in modes.items():
            Path(path).chmod(mode)
    assert f"job {job_id}: no grant: cancelled with oardel" in oar.log("prologue.log"), oar.logs()
    assert oar.grants(job_id) == []
    assert oar.queues_active()
    wait_for(lambda: set(oar.node_states().values()) == {"Alive"}, 30, f"nodes Alive ({oar.node_states()})")
