"""Operation records: which operation holds which nodes, its outcome per node, and its cancellation.

Nodes are taken atomically: an operation starts only if none of its nodes is busy (deploying or
reverting) in another one, and a user's operation only if every node is in an active grant of the user,
checked in the same transaction (the grant rows locked) and recorded on the operation: a grant revoked
a moment earlier refuses it, one revoked a moment later cancels it (:func:`kasched.grants.revoke`).

An operation whose process died (kill -9, a crash) is found by the next one, marked interrupted, and
its nodes are released in a known state (``deploy_failed``: to revert). Each process is an *instance*
(:data:`INSTANCE`: random per process start, with that process's start time): kaschedd is one, and so
is each ``kasched`` command run beside the database (KASCHED_DIRECT=1, the background revert of a job's
end). An operation of another instance is dead when no process with its PID runs, or the one that does
started at another time (a reused PID, kaschedd as PID 1 in a restarted container).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from kasched.errors import ConflictError, NodesBeingGivenBack, NotFoundError, PermissionDenied
from kasched.grants import node_ids_by_name
from kasched.models import (
    Grant,
    GrantNode,
    Node,
    NodeState,
    Operation,
    OperationNode,
    OperationState,
    StepRecord,
    utcnow,
)
from kasched.nodeset import fold
from kasched.processes import pid_alive

BUSY = (NodeState.DEPLOYING, NodeState.REVERTING)


def process_stamp(pid: int) -> str:
    """When process ``pid`` started: this boot's id and its start time in clock ticks ("" if unknown)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
        ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
    return f"{boot}.{ticks}"


# This process's instance id: random per process start, then where the start is recorded.
INSTANCE = f"{secrets.token_hex(8)}/{process_stamp(os.getpid())}"


@dataclass(frozen=True)
class DeploymentView:
    id: str
    kind: str
    user: str
    environment: str | None
    state: str
    nodes: dict[str, dict[str, object]]
    created_at: object
    ended_at: object
    # Every attempt, in order (the history). ``final`` false: a failed attempt after which the node had
    # another retry or variant (kexec failed, PXE comes next): the node did not fail there.
    steps: list[dict[str, object]] = field(default_factory=list)


def start(
    session: Session,
    kind: str,
    user: str,
    environment: str | None,
    nodes: Sequence[str],
    busy_state: NodeState,
    *,
    is_admin: bool = False,
    gives_back: bool = False,
) -> str:
    """Record a new operation and move its nodes to ``busy_state``; refuse if any node is busy, or
    (unless ``is_admin``) not in an active grant of ``user`` now. Busy only with the revert of an ended
    job (``gives_back`` operations): :class:`NodesBeingGivenBack`, which a deployment may wait out."""
    recover_interrupted(session)
    ids = node_ids_by_name(session, nodes)
    grant_id = None if is_admin else granted(session, user, ids)
    locked = session.execute(
        select(Node.name, Node.state).where(Node.id.in_(ids.values())).order_by(Node.id).with_for_update()
    ).all()
    busy = [(name, state) for name, state in locked if state in BUSY]
    if busy:
        _refuse_busy(session, [name for name, _ in busy], busy[0][1])
    deployment_id = f"{kind[:1]}{utcnow():%m%d%H%M%S}-{secrets.token_hex(3)}"
    session.add(
        Operation(
            id=deployment_id,
            kind=kind,
            user=user,
            environment=environment,
            host=socket.gethostname(),
            pid=os.getpid(),
            instance=INSTANCE,
            grant_id=grant_id,
            gives_back=gives_back,
            nodes=[OperationNode(node=name) for name in nodes],
        )
    )
    session.execute(update(Node).where(Node.id.in_(ids.values())).values(state=busy_state, state_changed_at=utcnow()))
    return deployment_id


@dataclass(frozen=True)
class Trust:
    """What kaschedd vouched for on an operation's nodes when it took them: each node's pinned host key
    (the key kaschedd gave its running system at boot) and the nodes that run the verified reference
    no user held since."""

    pins: dict[str, str]
    trusted: frozenset[str]


def take_trust(session: Session, nodes: Sequence[str]) -> Trust:
    """In the transaction that took the nodes (their rows locked by :func:`start`): what they were
    trusted for, and no longer trusted from now on (the operation may boot anything; its end says
    what the nodes run: :func:`finish`)."""
    rows = session.execute(select(Node.name, Node.host_key, Node.trusted).where(Node.name.in_(list(nodes)))).all()
    pins = {name: key for name, key, _ in rows if key}
    trusted = frozenset(name for name, key, trusted in rows if trusted and key)
    session.execute(update(Node).where(Node.name.in_(list(nodes))).values(trusted=False))
    return Trust(pins, trusted)


def distrust(session: Session, nodes: Sequence[str]) -> None:
    """A user acted on the nodes outside an operation (power): kasched vouches for nothing they run."""
    session.execute(update(Node).where(Node.name.in_(list(nodes))).values(trusted=False, host_key=None))


def granted(session: Session, user: str, ids: dict[str, int]) -> int:
    """The grant an operation of ``user`` on these nodes runs under; refuse a node in no active grant
    of the user. The grants are locked (SELECT ... FOR UPDATE; on SQLite the transaction holds the
    write lock already) until the caller commits: a revoke waits, then cancels what was recorded.

    Several grants may cover the nodes (an admin's grant by hand beside a job's, or nodes of two jobs
    in one operation): the one that covers the most of them, then ends last, then is newest."""
    cover = _cover(session, user, list(ids.values()), lock=True)
    missing = [name for name, node_id in ids.items() if not any(node_id in nodes for _, nodes in cover)]
    if missing:
        raise PermissionDenied(f"{user} may not deploy these nodes: {fold(missing)}: no active grant for {user}")
    best = max(cover, key=lambda item: (len(item[1]), item[0].expires_at, item[0].id))
    return best[0].id


def _cover(session: Session, user: str, node_ids: list[int], *, lock: bool = False) -> list[tuple[Grant, set[int]]]:
    """The active grants of ``user`` on any of ``node_ids``, each with those of the nodes it holds."""
    query = (
        select(Grant)
        .where(
            Grant.user == user,
            Grant.revoked_at.is_(None),
            Grant.expires_at > utcnow(),
            Grant.id.in_(select(GrantNode.grant_id).where(GrantNode.node_id.in_(node_ids))),
        )
        .order_by(Grant.id)
    )
    found = session.scalars(query.with_for_update() if lock else query).all()
    held: dict[int, set[int]] = {grant.id: set() for grant in found}
    rows = session.execute(
        select(GrantNode.grant_id, GrantNode.node_id).where(
            GrantNode.grant_id.in_(list(held)), GrantNode.node_id.in_(node_ids)
        )
    )
    for grant_id, node_id in rows:
        held[grant_id].add(node_id)
    return [(grant, held[grant.id]) for grant in found]


def releasable(session: Session, nodes: Sequence[str]) -> list[str]:
    """Those of ``nodes`` an admin may give back now: no active grant (of anyone) holds them and no
    operation has them. The grants, then the nodes, are locked (in :func:`start`'s order) until the
    caller commits, so call it in the transaction that takes them: a node granted to a new job, or
    taken by its deployment, is never taken for the revert."""
    ids = node_ids_by_name(session, nodes, missing_ok=True)
    if not ids:
        return []
    holding = session.scalars(
        select(Grant.id)
        .where(
            Grant.revoked_at.is_(None),
            Grant.expires_at > utcnow(),
            Grant.id.in_(select(GrantNode.grant_id).where(GrantNode.node_id.in_(ids.values()))),
        )
        .order_by(Grant.id)
        .with_for_update()
    ).all()
    held = set(
        session.scalars(
            select(GrantNode.node_id).where(GrantNode.grant_id.in_(holding), GrantNode.node_id.in_(ids.values()))
        )
    )
    free = session.execute(
        select(Node.name, Node.state).where(Node.id.in_(ids.values())).order_by(Node.id).with_for_update()
    ).all()
    return [name for name, state in free if state not in BUSY and ids[name] not in held]


def stop_reason(session: Session, deployment_id: str) -> str | None:
    """Why a running operation must stop now, if it must: a user's operation whose grant ended (revoked,
    or past its end), or one of whose nodes no active grant of the user holds any more. None: go on."""
    deployment = session.get(Operation, deployment_id)
    if deployment is None or deployment.grant_id is None:
        return None
    grant = session.get(Grant, deployment.grant_id)
    if grant is None or grant.revoked_at is not None or grant.expires_at <= utcnow():
        job = f"{grant.scheduler}:{grant.cluster}:{grant.job_id}" if grant else f"{deployment.grant_id}"
        return f"the grant of job {job} ended"
    ids = node_ids_by_name(session, [row.node for row in deployment.nodes], missing_ok=True)
    cover = _cover(session, deployment.user, list(ids.values()))
    lost = [name for name, node_id in ids.items() if not any(node_id in nodes for _, nodes in cover)]
    return f"{fold(lost)} no longer granted to {deployment.user}" if lost else None


def refuse_busy(session: Session, nodes: Sequence[str]) -> None:
    """Refuse, as :func:`start` would, nodes busy now: a cheap early look before slow work (a deployment's
    image checksum), so that a deployment waiting for its nodes to be given back does not hash its image
    at every try. Only :func:`start`'s look, with the nodes locked, decides."""
    busy = session.execute(select(Node.name, Node.state).where(Node.name.in_(list(nodes)), Node.state.in_(BUSY))).all()
    if busy:
        _refuse_busy(session, sorted(name for name, _ in busy), busy[0][1])


def _refuse_busy(session: Session, names: list[str], state: NodeState) -> None:
    """Raise the error for ``names`` busy in running operations: :class:`NodesBeingGivenBack` when every
    one is held only by the revert of an ended job, else :class:`ConflictError`."""
    rows = session.execute(
        select(Operation.id, Operation.user, Operation.gives_back, OperationNode.node)
        .join(OperationNode)
        .where(OperationNode.node.in_(names), Operation.state == OperationState.RUNNING)
    ).all()
    holders = ", ".join(sorted({f"{d} of {u}" for d, u, _, _ in rows})) or "an operation that left no record"
    giving_back = {node for _, _, gives_back, node in rows if gives_back}
    if rows and all(gives_back for _, _, gives_back, _ in rows) and giving_back >= set(names):
        ids = ", ".join(sorted({d for d, _, _, _ in rows}))
        raise NodesBeingGivenBack(f"{fold(names)}: still being given back after their previous job ({ids})")
    raise ConflictError(f"{fold(names)}: busy ({state.value}) in {holders}; wait for it or cancel it")


def record_node(
    session: Session, deployment_id: str, node: str, step: str, ok: bool | None, error: str | None, duration: float
) -> None:
    row = session.get(OperationNode, (deployment_id, node))
    if row is not None:
        row.step, row.ok, row.error, row.duration = step, ok, error, duration


NodeRow = tuple[str, str, bool | None, str | None, float]  # node, step, ok, error, duration


def record_nodes(session: Session, deployment_id: str, rows: Sequence[NodeRow]) -> None:
    """:func:`record_node` for many nodes ``(node, step, ok, error, duration)`` in one bulk UPDATE by
    primary key (a row per node looked up first cost 1.4 ms a node at 1,000 nodes, bench/scale.py)."""
    if rows:
        session.execute(
            update(OperationNode),
            [{"deployment_id": deployment_id, "node": node, "step": step, "ok": ok, "error": error,
              "duration": duration} for node, step, ok, error, duration in rows],
        )  # fmt: skip


def finish(
    session: Session,
    deployment_id: str,
    node_states: dict[str, NodeState],
    environment_id: int | None = None,
    *,
    cancelled: bool = False,
    trust: Trust | None = None,
) -> OperationState:
    """Release the nodes in their final states and close the record; ``trust``: each node's pinned
    key now, and those that end trusted (a verified revert)."""
    deployment = session.get(Operation, deployment_id)
    if deployment is None:
        raise NotFoundError(f"no deployment {deployment_id}")
    for node in session.scalars(select(Node).where(Node.name.in_(list(node_states)))):
        node.state, node.state_changed_at = node_states[node.name], utcnow()
        if trust is not None:
            node.host_key = trust.pins.get(node.name)
            node.trusted = node.name in trust.trusted and node.state is NodeState.REFERENCE
        if node.state in (NodeState.DEPLOYED, NodeState.REFERENCE):
            node.environment_id = environment_id
    results = [row.ok for row in deployment.nodes]
    if cancelled or stop_reason(session, deployment_id) is not None:
        deployment.state = OperationState.CANCELLED
    elif all(results):
        deployment.state = OperationState.DONE
    else:
        deployment.state = OperationState.PARTIAL if any(results) else OperationState.FAILED
    deployment.ended_at = utcnow()
    return deployment.state


def request_cancel(session: Session, deployment_id: str, user: str, is_admin: bool) -> None:
    deployment = session.get(Operation, deployment_id)
    if deployment is None:
        raise NotFoundError(f"no deployment {deployment_id}")
    if deployment.user != user and not is_admin:
        raise PermissionDenied(f"deployment {deployment_id} belongs to {deployment.user}")
    if deployment.state is not OperationState.RUNNING:
        raise ConflictError(f"deployment {deployment_id} is {deployment.state.value} already")
    deployment.cancel_requested = True


def cancel_requested(session: Session, deployment_id: str) -> bool:
    return bool(session.scalar(select(Operation.cancel_requested).where(Operation.id == deployment_id)))


def view(session: Session, deployment_id: str) -> DeploymentView:
    deployment = session.get(Operation, deployment_id)
    if deployment is None:
        raise NotFoundError(f"no deployment {deployment_id}")
    return _view(session, deployment, with_steps=True)


def recent(session: Session, user: str | None, *, running: bool = False, limit: int = 50) -> list[DeploymentView]:
    """The newest ``limit`` operations (of ``user``; None: anyone's), the running ones only with
    ``running``, without their step histories."""
    query = select(Operation).order_by(Operation.created_at.desc(), Operation.id.desc()).limit(limit)
    if user is not None:
        query = query.where(Operation.user == user)
    if running:
        query = query.where(Operation.state == OperationState.RUNNING)
    return [_view(session, deployment, with_steps=False) for deployment in session.scalars(query)]


def _view(session: Session, deployment: Operation, *, with_steps: bool) -> DeploymentView:
    deployment_id = deployment.id
    return DeploymentView(
        id=deployment.id,
        kind=deployment.kind,
        user=deployment.user,
        environment=deployment.environment,
        state=deployment.state.value,
        nodes={
            row.node: {"step": row.step, "ok": row.ok, "error": row.error, "duration": row.duration}
            for row in deployment.nodes
        },
        created_at=deployment.created_at,
        ended_at=deployment.ended_at,
        steps=[
            {
                "node": op.node,
                "step": op.step,
                "ok": op.ok,
                "error": op.error,
                "duration": op.duration,
                "final": op.final is not False,
            }
            for op in session.scalars(
                select(StepRecord).where(StepRecord.deployment_id == deployment_id).order_by(StepRecord.id)
            )
        ]
        if with_steps
        else [],
    )


def recover_interrupted(session: Session) -> list[str]:
    """Mark interrupted the running operations of this host whose instance is gone (another instance
    whose process died, or whose PID another process now has); their nodes go to revert."""
    host = socket.gethostname()
    recovered = []
    for deployment in session.scalars(
        select(Operation).where(Operation.state == OperationState.RUNNING, Operation.host == host)
    ):
        if instance_alive(deployment.instance, deployment.pid):
            continue
        deployment.state, deployment.ended_at = OperationState.INTERRUPTED, utcnow()
        names = [row.node for row in deployment.nodes]
        for row in deployment.nodes:
            if row.ok is None:
                row.ok, row.error = False, "interrupted: the process running it died"
        session.execute(
            update(Node)
            .where(Node.name.in_(names), Node.state.in_(BUSY))
            .values(state=NodeState.DEPLOY_FAILED, state_changed_at=utcnow())
        )
        recovered.append(deployment.id)
    return recovered


def instance_alive(instance: str, pid: int) -> bool:
    """Whether the instance that recorded (``instance``, ``pid``) on this host still runs: this process,
    or a live process with that PID that started when the instance's did. Records older than instance
    ids (empty) go by the PID alone, never this process's own."""
    if instance == INSTANCE:
        return True
    if pid == os.getpid() or not pid_alive(pid):
        return False
    stamp = instance.partition("/")[2]
    return not stamp or process_stamp(pid) == stamp  # no start time recorded: the PID is all there is
