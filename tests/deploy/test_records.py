"""Operation records: atomic node acquisition, final states, cancel requests, recovery after a crash."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any

import pytest
from sqlalchemy import update

from kasched import grants
from kasched.api import Kasched
from kasched.deploy import records
from kasched.errors import ConflictError, NodesBeingGivenBack, NotFoundError, PermissionDenied
from kasched.messages import JobEnd, JobInfo
from kasched.models import NodeState, Operation


def test_busy_nodes_are_refused_until_released(cluster: Kasched) -> None:
    with cluster.database.session() as session:
        first = records.start(
            session, "deploy", "alice", "tiny@alice:1", ["node-1", "node-2"], NodeState.DEPLOYING, is_admin=True
        )
    assert cluster.show_node("node-1").state == "deploying"
    with (
        pytest.raises(ConflictError, match=rf"node-2: busy \(deploying\) in {first} of alice"),
        cluster.database.session() as session,
    ):
        records.start(session, "deploy", "bob", None, ["node-2", "node-3"], NodeState.DEPLOYING, is_admin=True)
    assert cluster.show_node("node-3").state == "reference"  # nothing half-taken
    with cluster.database.session() as session:
        records.record_node(session, first, "node-1", "boot", True, None, 12.5)
        records.record_node(session, first, "node-2", "broadcast", False, "checksum mismatch", 7.0)
        state = records.finish(session, first, {"node-1": NodeState.DEPLOYED, "node-2": NodeState.DEPLOY_FAILED})
    assert state.value == "partial"
    assert [cluster.show_node(n).state for n in ("node-1", "node-2")] == ["deployed", "deploy_failed"]
    with cluster.database.session() as session:
        shown = records.view(session, first)
        records.start(session, "deploy", "bob", None, ["node-2", "node-3"], NodeState.DEPLOYING, is_admin=True)
    assert shown.nodes["node-2"] == {"step": "broadcast", "ok": False, "error": "checksum mismatch", "duration": 7.0}


def test_cancel_requests(cluster: Kasched) -> None:
    with cluster.database.session() as session:
        deployment = records.start(session, "deploy", "alice", None, ["node-1"], NodeState.DEPLOYING, is_admin=True)
    with pytest.raises(PermissionDenied, match="belongs to alice"), cluster.database.session() as session:
        records.request_cancel(session, deployment, "bob", is_admin=False)
    with cluster.database.session() as session:
        assert not records.cancel_requested(session, deployment)
        records.request_cancel(session, deployment, "alice", is_admin=False)
    with cluster.database.session() as session:
        assert records.cancel_requested(session, deployment)
        records.finish(session, deployment, {"node-1": NodeState.DEPLOY_FAILED}, cancelled=True)
    with pytest.raises(ConflictError, match="is cancelled already"), cluster.database.session() as session:
        records.request_cancel(session, deployment, "alice", is_admin=False)
    with pytest.raises(NotFoundError), cluster.database.session() as session:
        records.request_cancel(session, "nope", "alice", is_admin=True)


def test_a_dead_process_s_operation_is_recovered(cluster: Kasched) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    with cluster.database.session() as session:
        crashed = records.start(
            session, "deploy", "alice", None, ["node-1", "node-2"], NodeState.DEPLOYING, is_admin=True
        )
        session.execute(
            update(Operation)
            .where(Operation.id == crashed)
            .values(pid=dead.pid, instance=f"{'0' * 16}/{records.process_stamp(dead.pid)}")
        )
    with cluster.database.session() as session:
        records.start(session, "deploy", "bob", None, ["node-2"], NodeState.DEPLOYING, is_admin=True)  # recovers
    with cluster.database.session() as session:
        view = records.view(session, crashed)
    assert view.state == "interrupted"
    assert view.nodes["node-1"]["error"] == "interrupted: the process running it died"
    assert cluster.show_node("node-1").state == "deploy_failed"  # known state: to be reverted


@pytest.mark.parametrize("pid", [1, os.getpid()], ids=["pid-1", "own-pid"])
def test_a_dead_instance_is_recovered_though_its_pid_lives(cluster: Kasched, pid: int) -> None:
    """The PID of a dead kaschedd now belongs to a live process (kaschedd as PID 1 in a restarted
    container, a reused PID, this very process): its operation is still found interrupted. A live
    process of another instance keeps its operation."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        alive_stamp = records.process_stamp(sleeper.pid)
        with cluster.database.session() as session:
            dead = records.start(session, "deploy", "alice", None, ["node-1"], NodeState.DEPLOYING, is_admin=True)
            live = records.start(session, "deploy", "bob", None, ["node-3"], NodeState.DEPLOYING, is_admin=True)
            stamps = {dead: (pid, f"{'1' * 16}/0.0"), live: (sleeper.pid, f"{'2' * 16}/{alive_stamp}")}
            for deployment_id, (recorded_pid, instance) in stamps.items():
                session.execute(
                    update(Operation).where(Operation.id == deployment_id).values(pid=recorded_pid, instance=instance)
                )
        with cluster.database.session() as session:
            assert records.recover_interrupted(session) == [dead]
        with cluster.database.session() as session:
            assert records.view(session, dead).state == "interrupted"
            assert records.view(session, live).state == "running"
        assert cluster.show_node("node-1").state == "deploy_failed"
        assert cluster.show_node("node-3").state == "deploying"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_revoke_waits_for_an_operation_taking_its_nodes_then_cancels_it(
    cluster: Kasched, monkeypatch: pytest.MonkeyPatch
) -> None:
    """records.start checks the grant, then records the operation: the grant stays locked in between
    (FOR UPDATE; SQLite's write lock). A revoke arriving there waits, then cancels the operation; an
    operation starting after the revoke is refused."""
    cluster.record_job_start(JobInfo("slurm", "c", "7", "alice", ("node-1", "node-2"), walltime=3600))
    checked, release, started = threading.Event(), threading.Event(), []
    check = records.granted

    def granted_then_pause(session: Any, user: str, ids: dict[str, int]) -> int:
        grant_id = check(session, user, ids)
        checked.set()
        release.wait(10)  # between the check and the record: the window of audit F5
        return grant_id

    monkeypatch.setattr(records, "granted", granted_then_pause)

    def take() -> None:
        with cluster.database.session() as session:
            started.append(records.start(session, "deploy", "alice", None, ["node-1"], NodeState.DEPLOYING))

    def revoke() -> None:
        with cluster.database.session() as session:
            grants.revoke(session, JobEnd("slurm", "c", "7", "job ended"))

    taker = threading.Thread(target=take)
    taker.start()
    assert checked.wait(10)
    revoker = threading.Thread(target=revoke)
    revoker.start()
    time.sleep(0.5)
    waited = revoker.is_alive()
    release.set()
    taker.join(30)
    revoker.join(30)
    monkeypatch.setattr(records, "granted", check)
    with cluster.database.session() as session:
        assert records.cancel_requested(session, started[0]), "the revoke missed the operation"
        assert records.stop_reason(session, started[0]) == "the grant of job slurm:c:7 ended"
    assert waited, "the revoke did not wait for the operation taking the grant's nodes"
    with pytest.raises(PermissionDenied, match="node-2: no active grant for alice"), cluster.database.session() as s:
        records.start(s, "deploy", "alice", None, ["node-2"], NodeState.DEPLOYING)


def test_only_nodes_no_grant_and_no_operation_hold_are_releasable(cluster: Kasched) -> None:
    """What a revert at a job's end (or of orphans) may take, asked in the transaction that takes them."""
    cluster.record_job_start(JobInfo("slurm", "c", "8", "bob", ("node-1",), walltime=3600))  # bob's next job
    with cluster.database.session() as session:
        records.start(session, "revert", "root", None, ["node-4"], NodeState.REVERTING, is_admin=True)
        assert records.releasable(session, ["node-1", "node-2", "node-4", "nope"]) == ["node-2"]


def test_nodes_busy_only_giving_back_are_told_apart_from_busy_ones(cluster: Kasched) -> None:
    """A revert of an ended job's nodes (``gives_back``) refuses with NodesBeingGivenBack, which a
    deployment waits out; any other running operation on one of the nodes is a plain conflict."""
    with cluster.database.session() as session:
        back = records.start(
            session, "revert", "root", None, ["node-1", "node-2"], NodeState.REVERTING, is_admin=True, gives_back=True
        )
        own = records.start(session, "revert", "alice", None, ["node-3"], NodeState.REVERTING, is_admin=True)
    with (
        pytest.raises(
            NodesBeingGivenBack, match=rf"node-\[1-2\]: still being given back after their previous job \({back}\)"
        ),
        cluster.database.session() as session,
    ):
        records.start(session, "deploy", "bob", None, ["node-1", "node-2"], NodeState.DEPLOYING, is_admin=True)
    for nodes in (["node-2", "node-3"], ["node-3"]):
        with pytest.raises(ConflictError) as refused, cluster.database.session() as session:
            records.start(session, "deploy", "bob", None, nodes, NodeState.DEPLOYING, is_admin=True)
        assert not isinstance(refused.value, NodesBeingGivenBack)
        assert f"{own} of alice" in str(refused.value)
    with cluster.database.session() as session:
        records.finish(session, back, {"node-1": NodeState.REFERENCE, "node-2": NodeState.REFERENCE})
        records.start(session, "deploy", "bob", None, ["node-1", "node-2"], NodeState.DEPLOYING, is_admin=True)
