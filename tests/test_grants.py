"""Grants: created and revoked through the plugin bus, one check for "may U deploy N now?"."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta

import pytest

from kasched.api import Kasched
from kasched.errors import ConflictError, InputError, NotFoundError, PermissionDenied
from kasched.messages import JobEnd, JobInfo
from kasched.models import utcnow


def job(
    job_id: str = "42",
    user: str = "alice",
    nodes: tuple[str, ...] = ("node-1", "node-2"),
    walltime: float | None = 3600,
    scheduler: str = "slurm",
) -> JobInfo:
    return JobInfo(
        scheduler=scheduler,
        cluster="c1",
        job_id=job_id,
        user=user,
        nodes=nodes,
        walltime=walltime,
        environment="debian12",
    )


def test_job_start_grants_and_job_end_revokes(cluster: Kasched) -> None:
    grant = cluster.record_job_start(job())
    assert (grant.user, grant.nodes, grant.environment_request) == ("alice", ("node-1", "node-2"), "debian12")
    assert abs((grant.expires_at - grant.created_at) - timedelta(hours=1)) < timedelta(seconds=1)
    assert cluster.check("node-[1-2]", user="alice").allowed
    ended = cluster.record_job_end(JobEnd("slurm", "c1", "42", reason="walltime"))
    assert ended.revoked_at is not None and ended.revoke_reason == "walltime"
    decision = cluster.check("node-1", user="alice")
    assert not decision.allowed
    assert decision.refused == {"node-1": "no active grant for alice (submit a deploy job first)"}


def test_start_and_end_are_idempotent(cluster: Kasched) -> None:
    first = cluster.record_job_start(job())
    assert cluster.record_job_start(job()).id == first.id
    assert len(cluster.rights()) == 1
    cluster.record_job_end(JobEnd("slurm", "c1", "42"))
    again = cluster.record_job_end(JobEnd("slurm", "c1", "42", reason="second epilog"))
    assert again.revoke_reason == "job ended"  # the first revocation stands
    late = dataclasses.replace(job(), started_at=first.created_at - timedelta(minutes=1))  # the old job, late
    with pytest.raises(ConflictError, match=r"was revoked .* a job id is granted once"):
        cluster.record_job_start(late)


def test_a_reused_job_id_is_a_new_job(cluster: Kasched) -> None:
    """Slurm numbers jobs from 1 again after its state is cleared: job 42 today is not last week's."""
    old = cluster.record_job_start(job())
    cluster.record_job_end(JobEnd("slurm", "c1", "42"))
    new = cluster.record_job_start(job(user="bob", nodes=("node-3",)))
    assert new.id != old.id and new.active and new.user == "bob" and new.job_id == "42"
    ended = {g.id: g for g in cluster.rights(include_ended=True)}
    assert ended[old.id].job_id.startswith("42~") and ended[old.id].revoke_reason == "job ended"
    assert cluster.record_job_end(JobEnd("slurm", "c1", "42")).id == new.id
    assert cluster.check("node-3", user="bob").allowed is False


def test_revoke_uses_the_stored_nodes(cluster: Kasched) -> None:
    cluster.record_job_start(job(nodes=("node-1", "node-2", "node-3")))
    # A scheduler may drop failed nodes from the job before its end: the grant remembers all three.
    revoked = cluster.record_job_end(JobEnd("slurm", "c1", "42"))
    assert revoked.nodes == ("node-1", "node-2", "node-3")


def test_same_job_with_other_nodes_or_user_is_a_conflict(cluster: Kasched) -> None:
    cluster.record_job_start(job())
    with pytest.raises(ConflictError, match="already has a grant for user alice"):
        cluster.record_job_start(job(user="bob"))
    with pytest.raises(ConflictError):
        cluster.record_job_start(job(nodes=("node-1",)))


def test_check_says_why_per_node(cluster: Kasched, as_user: Callable[[str], Kasched]) -> None:
    cluster.record_job_start(job(nodes=("node-1", "node-2")))
    cluster.record_job_start(job("43", user="bob", nodes=("node-3",)))
    decision = as_user("alice").check("node-[1-4],ghost")
    assert not decision.allowed
    assert decision.grants == {"node-1": "slurm:c1:42", "node-2": "slurm:c1:42"}
    assert decision.refused["node-3"] == "granted to bob (job slurm:c1:43), not to alice"
    assert decision.refused["node-4"].startswith("no active grant")
    assert decision.refused["ghost"] == "no such node"
    assert "node-3: granted to bob" in decision.reason()
    assert cluster.check("node-[1-8]").allowed  # admins may deploy any known node
    with pytest.raises(PermissionDenied):
        as_user("alice").check("node-1", user="bob")


def test_expired_grants_allow_nothing(cluster: Kasched) -> None:
    cluster.record_job_start(
        JobInfo("oar", "c1", "7", "alice", ("node-1",), walltime=3600, started_at=utcnow() - timedelta(hours=2))
    )
    assert not cluster.check("node-1", user="alice").allowed
    assert cluster.rights() == [] and len(cluster.rights(include_ended=True)) == 1


def test_walltime_is_capped_by_the_site(cluster: Kasched) -> None:
    grant = cluster.record_job_start(job(walltime=None))
    assert grant.expires_at - grant.created_at == timedelta(hours=cluster.config.max_grant_hours)


def test_refusals(cluster: Kasched, as_user: Callable[[str], Kasched]) -> None:
    with pytest.raises(NotFoundError, match=r"unknown node\(s\) ghost-\[1-2\]"):
        cluster.record_job_start(job(nodes=("node-1", "ghost-1", "ghost-2")))
    assert cluster.rights(include_ended=True) == []  # nothing half-written
    with pytest.raises(InputError, match="has no nodes"):
        cluster.record_job_start(job(nodes=()))
    with pytest.raises(InputError, match="is not a valid job id"):
        cluster.record_job_start(job(job_id="4 2"))
    with pytest.raises(InputError, match="walltime"):
        cluster.record_job_start(job(walltime=-5))
    with pytest.raises(PermissionDenied, match="only admins may record a job start"):
        as_user("alice").record_job_start(job())
    with pytest.raises(PermissionDenied):
        as_user("alice").grant("alice", "node-1", hours=1)
    with pytest.raises(NotFoundError, match="no grant for job slurm:c1:999"):
        cluster.record_job_end(JobEnd("slurm", "c1", "999"))
    with pytest.raises(NotFoundError, match="no grant with id 12345"):
        cluster.revoke(12345)


def test_admin_grant_and_revoke_and_listing_filters(cluster: Kasched) -> None:
    grant = cluster.grant("carol", "node-[5-6]", hours=2)
    assert grant.scheduler == "admin" and grant.job_id.startswith("manual-")
    cluster.record_job_start(job())
    assert {g.user for g in cluster.rights()} == {"alice", "carol"}
    assert [g.user for g in cluster.rights(user="carol")] == ["carol"]
    assert [g.user for g in cluster.rights(nodes="node-1")] == ["alice"]
    cluster.revoke(grant.id, "maintenance")
    assert [g.user for g in cluster.rights()] == ["alice"]
    assert cluster.rights(include_ended=True)[-1].revoke_reason == "maintenance (root)"
    with pytest.raises(InputError, match="positive number of hours"):
        cluster.grant("carol", "node-1", hours=0)


def test_large_job(cluster: Kasched, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import write

    # 3000 nodes with unique MACs and IPs, written out one per line.
    lines = ["site: s", "clusters:", "  - name: big", "    defaults: {bmc: {driver: ssh}}", "    nodes:"]
    for i in range(3000):
        lines += [
            f"      - {{name: big-{i}, mac: '0a:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}', "
            f"ip: 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}}}"
        ]
    cluster.import_nodes(write(tmp_path / "big.yaml", "\n".join(lines)))
    names = tuple(f"big-{i}" for i in range(3000))
    grant = cluster.record_job_start(job("big", nodes=names))
    assert len(grant.nodes) == 3000
    assert cluster.check(list(names), user="alice").allowed
    assert len(cluster.record_job_end(JobEnd("slurm", "c1", "big")).nodes) == 3000
