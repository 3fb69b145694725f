"""Membership tests over long node lists: one statement on SQLite and PostgreSQL, chunks elsewhere."""

from __future__ import annotations

import pytest
from sqlalchemy import event, insert, select

from kasched import grants
from kasched.api import Kasched
from kasched.errors import NotFoundError
from kasched.models import Cluster, Node
from kasched.sqlsets import CHUNK, members

COUNT = 2 * CHUNK + 7  # more than two chunks of an IN list


def _populate(api: Kasched) -> list[str]:
    with api.database.session() as session:
        cluster = Cluster(name="big", site="test")
        session.add(cluster)
        session.flush()
        rows = [
            {
                "name": f"b-{i}",
                "cluster_id": cluster.id,
                "mac": f"0a:00:00:00:{i >> 8 & 255:02x}:{i & 255:02x}",
                "ip": f"10.1.{i >> 8 & 255}.{i & 255}",
                "bmc_driver": "ssh",
            }
            for i in range(COUNT)
        ]
        session.execute(insert(Node), rows)
    return [row["name"] for row in rows]


def test_node_ids_of_a_long_list_in_one_statement_where_the_backend_takes_a_list(admin: Kasched) -> None:
    names = _populate(admin)
    statements: list[str] = []
    event.listen(admin.database.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with admin.database.session() as session:
        found = grants.node_ids_by_name(session, [*names, "ghost-1"], missing_ok=True)
        expected = dict(session.execute(select(Node.name, Node.id)).all())
        dialect = session.get_bind().dialect.name
        with pytest.raises(NotFoundError, match=r"unknown node\(s\) ghost-\[1-2\]"):
            grants.node_ids_by_name(session, ["ghost-2", names[5], "ghost-1"])
        conditions = len(list(members(session, Node.name, names)))
    assert found == expected and len(found) == COUNT
    selects = [s for s in statements if s.startswith("SELECT nodes.name, nodes.id") and "WHERE" in s]
    assert conditions == (1 if dialect in ("sqlite", "postgresql") else 3)
    assert len(selects) == conditions + 1  # the long list, then the three names


def test_a_job_of_many_nodes_is_granted_checked_and_revoked(admin: Kasched) -> None:
    from kasched.messages import JobEnd, JobInfo

    names = _populate(admin)
    grant = admin.record_job_start(JobInfo("slurm", "big", "7", "alice", tuple(names), walltime=3600))
    assert sorted(grant.nodes) == sorted(names)
    assert sorted(admin.rights()[0].nodes) == sorted(names)
    decision = admin.check([*names[:10], "b-999999"], user="alice")
    assert not decision.allowed and list(decision.refused) == ["b-999999"] and len(decision.grants) == 10
    revoked = admin.record_job_end(JobEnd("slurm", "big", "7"))
    assert revoked.revoked_at is not None and not admin.check(names[:3], user="alice").allowed


def test_the_reclaim_plan_reads_the_settled_nodes_and_those_of_other_active_grants(cluster: Kasched) -> None:
    """The epilog's plan reads only the exceptions: node-3 down (settled), node-2 in the user's next
    job (another active grant), node-1 in an old revoked grant (not a holder): node-1 and node-4 go back."""
    from kasched.deploy import reclaim
    from kasched.messages import JobEnd, JobInfo
    from kasched.models import NodeState

    def job(job_id: str, nodes: tuple[str, ...]) -> JobInfo:
        return JobInfo("slurm", "c1", job_id, "alice", nodes, walltime=3600)

    cluster.record_job_start(job("1", ("node-1",)))
    cluster.record_job_end(JobEnd("slurm", "c1", "1"))
    ending = cluster.record_job_start(job("2", ("node-1", "node-2", "node-3", "node-4")))
    cluster.record_job_start(job("3", ("node-2", "node-5")))
    with cluster.database.session() as session:
        session.get(Node, grants.node_ids_by_name(session, ["node-3"])["node-3"]).state = NodeState.DOWN  # type: ignore[union-attr]
    with cluster.database.session() as session:
        grants.revoke(session, JobEnd("slurm", "c1", "2"))
        todo = reclaim.plan(session, ending.id, ending.nodes)
    assert (todo.to_revert, todo.settled, todo.others) == (("node-1", "node-4"), ("node-3",), ("node-2",))
