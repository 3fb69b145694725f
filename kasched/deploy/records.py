"""Deployment records: which operation holds which nodes, its outcome per node, and its cancellation.

Nodes are taken atomically: an operation starts only if none of its nodes is busy (deploying or
reverting) in another one. An operation whose process died (kill -9, a crash) is found by the next
one, marked interrupted, and its nodes are released in a known state (``deploy_failed``: to revert).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from kasched.errors import ConflictError, NotFoundError, PermissionDenied
from kasched.grants import node_ids_by_name
from kasched.models import Deployment, DeploymentNode, DeploymentState, Node, NodeState, Operation, utcnow
from kasched.nodeset import fold
from kasched.processes import pid_alive

BUSY = (NodeState.DEPLOYING, NodeState.REVERTING)


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
    session: Session, kind: str, user: str, environment: str | None, nodes: Sequence[str], busy_state: NodeState
) -> str:
    """Record a new operation and move its nodes to ``busy_state``; refuse if any node is busy."""
    recover_interrupted(session)
    ids = node_ids_by_name(session, nodes)
    busy = session.execute(select(Node.name, Node.state).where(Node.id.in_(ids.values()), Node.state.in_(BUSY))).all()
    if busy:
        names = [name for name, _ in busy]
        holders = _holders(session, names)
        raise ConflictError(f"{fold(names)}: busy ({busy[0][1].value}) in {holders}; wait for it or cancel it")
    deployment_id = f"{kind[:1]}{utcnow():%m%d%H%M%S}-{secrets.token_hex(3)}"
    session.add(
        Deployment(
            id=deployment_id,
            kind=kind,
            user=user,
            environment=environment,
            host=socket.gethostname(),
            pid=os.getpid(),
            nodes=[DeploymentNode(node=name) for name in nodes],
        )
    )
    session.execute(update(Node).where(Node.id.in_(ids.values())).values(state=busy_state, state_changed_at=utcnow()))
    return deployment_id


def _holders(session: Session, names: Sequence[str]) -> str:
    rows = session.execute(
        select(Deployment.id, Deployment.user)
        .join(DeploymentNode)
        .where(DeploymentNode.node.in_(names), Deployment.state == DeploymentState.RUNNING)
    ).all()
    return ", ".join(sorted({f"{d} of {u}" for d, u in rows})) or "an operation that left no record"


def record_node(
    session: Session, deployment_id: str, node: str, step: str, ok: bool | None, error: str | None, duration: float
) -> None:
    row = session.get(DeploymentNode, (deployment_id, node))
    if row is not None:
        row.step, row.ok, row.error, row.duration = step, ok, error, duration


def finish(
    session: Session,
    deployment_id: str,
    node_states: dict[str, NodeState],
    environment_id: int | None = None,
    *,
    cancelled: bool = False,
) -> DeploymentState:
    """Release the nodes in their final states and close the record."""
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFoundError(f"no deployment {deployment_id}")
    for node in session.scalars(select(Node).where(Node.name.in_(list(node_states)))):
        node.state, node.state_changed_at = node_states[node.name], utcnow()
        if node.state in (NodeState.DEPLOYED, NodeState.REFERENCE):
            node.environment_id = environment_id
    results = [row.ok for row in deployment.nodes]
    if cancelled:
        deployment.state = DeploymentState.CANCELLED
    elif all(results):
        deployment.state = DeploymentState.DONE
    else:
        deployment.state = DeploymentState.PARTIAL if any(results) else DeploymentState.FAILED
    deployment.ended_at = utcnow()
    return deployment.state


def request_cancel(session: Session, deployment_id: str, user: str, is_admin: bool) -> None:
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFoundError(f"no deployment {deployment_id}")
    if deployment.user != user and not is_admin:
        raise PermissionDenied(f"deployment {deployment_id} belongs to {deployment.user}")
    if deployment.state is not DeploymentState.RUNNING:
        raise ConflictError(f"deployment {deployment_id} is {deployment.state.value} already")
    deployment.cancel_requested = True


def cancel_requested(session: Session, deployment_id: str) -> bool:
    return bool(session.scalar(select(Deployment.cancel_requested).where(Deployment.id == deployment_id)))


def view(session: Session, deployment_id: str) -> DeploymentView:
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFoundError(f"no deployment {deployment_id}")
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
                select(Operation).where(Operation.deployment_id == deployment_id).order_by(Operation.id)
            )
        ],
    )


def recover_interrupted(session: Session) -> list[str]:
    """Mark running operations of dead processes (on this host) interrupted; their nodes go to revert."""
    host = socket.gethostname()
    recovered = []
    for deployment in session.scalars(
        select(Deployment).where(Deployment.state == DeploymentState.RUNNING, Deployment.host == host)
    ):
        if pid_alive(deployment.pid):
            continue
        deployment.state, deployment.ended_at = DeploymentState.INTERRUPTED, utcnow()
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
