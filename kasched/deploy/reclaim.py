"""Giving a job's nodes back at its end (Kadeploy's "back to the reference environment").

When a job's grant is revoked, its user's running operations on those nodes are cancelled at once,
and the nodes that left the reference environment are reverted by a separate process, ``kasched job
reclaim GRANT``, started in the background: a scheduler's epilog returns in a fraction of a second
(OAR stops all its queues when an epilogue runs past 60 s), while a revert takes a reboot or more.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from kasched import grants
from kasched.config import Config
from kasched.deploy.records import BUSY
from kasched.errors import ConflictError, NotFoundError
from kasched.models import Deployment, DeploymentNode, DeploymentState, Grant, Node, NodeState

SETTLED = (NodeState.REFERENCE, NodeState.DOWN)  # nothing to give back: already there, or out of service


@dataclass(frozen=True)
class ReclaimPlan:
    """What a job's end leaves to do: operations cancelled, nodes to revert, nodes already back."""

    grant_id: int
    cancelled: tuple[str, ...]  # deployment ids whose cancellation was requested
    to_revert: tuple[str, ...]
    settled: tuple[str, ...]


def cancel_operations(session: Session, user: str, nodes: Sequence[str]) -> list[str]:
    """Ask every running operation of ``user`` on any of ``nodes`` to stop; their ids."""
    running = session.scalars(
        select(Deployment)
        .join(DeploymentNode, DeploymentNode.deployment_id == Deployment.id)
        .where(
            Deployment.user == user,
            Deployment.state == DeploymentState.RUNNING,
            DeploymentNode.node.in_(list(nodes)),
        )
        .distinct()
    ).all()
    for deployment in running:
        deployment.cancel_requested = True
    return [d.id for d in running]


def node_states(session: Session, nodes: Sequence[str]) -> dict[str, NodeState]:
    """The recorded state of each node that is still in the inventory."""
    rows = session.execute(select(Node.name, Node.state).where(Node.name.in_(list(nodes))))
    return {name: state for name, state in rows}


def plan(session: Session, grant_id: int, user: str, nodes: Sequence[str]) -> ReclaimPlan:
    cancelled = cancel_operations(session, user, nodes)
    states = node_states(session, nodes)
    return ReclaimPlan(
        grant_id=grant_id,
        cancelled=tuple(cancelled),
        to_revert=tuple(n for n in nodes if n in states and states[n] not in SETTLED),
        settled=tuple(n for n in nodes if states.get(n) in SETTLED),
    )


def revoked_grant_nodes(session: Session, grant_id: int) -> tuple[str, list[str]]:
    """The user and nodes of a grant that is no longer active (reclaiming an active one is refused)."""
    grant = session.get(Grant, grant_id)
    if grant is None:
        raise NotFoundError(f"no grant {grant_id}")
    view = grants.view_of(session, grant)
    if view.active:
        raise ConflictError(f"grant {grant_id} is active: its job still runs")
    return view.user, list(view.nodes)


def wait_not_busy(session_factory: object, nodes: Sequence[str], timeout: float, step: float = 1.0) -> list[str]:
    """Wait until none of ``nodes`` is busy (cancelled operations take a moment to stop); those still
    busy after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with session_factory() as session:  # type: ignore[operator]
            busy = [name for name, state in node_states(session, nodes).items() if state in BUSY]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(step)


def log_path(config: Config, grant_id: int) -> Path:
    return config.state_dir / "reclaim" / f"grant-{grant_id}.log"


def spawn(config: Config, grant_id: int) -> int:
    """Start ``kasched job reclaim GRANT`` detached from the caller (own session, no stdin, output to
    its log file); return its pid. It talks to the database directly, whoever started it."""
    log = log_path(config, grant_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "kasched"]
    if config.path is not None:
        command += ["--config", str(config.path)]
    command += ["job", "reclaim", str(grant_id)]
    env = {**os.environ, "KASCHED_DIRECT": "1"}
    with open(log, "ab") as output:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    return child.pid
