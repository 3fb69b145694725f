"""Giving a job's nodes back at its end (Kadeploy's "back to the reference environment").

When a job's grant is revoked, the operations started under that grant are cancelled in the same
transaction (:func:`kasched.grants.revoke`), and the nodes that left the reference environment are
reverted by a separate process, ``kasched job reclaim GRANT``, started in the background: a scheduler's
epilog returns in a fraction of a second (OAR stops all its queues when an epilogue runs past 60 s),
while a revert takes a reboot or more.

Everything is scoped to the ending grant: the same user's next job may hold the same nodes a second
later. Its operations are not cancelled (they run under its own grant), and a node another active grant
holds is never reverted: the revert asks so in the transaction that takes the nodes
(:func:`kasched.deploy.records.releasable`). ``kasched job reclaim --orphans`` (reconcile starts it)
gives back every node left out of the reference environment that no grant and no operation holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kasched import grants
from kasched.config import Config
from kasched.deploy.records import BUSY
from kasched.errors import ConflictError, NotFoundError
from kasched.models import Grant, GrantNode, Node, NodeState, utcnow
from kasched.schedulers import HOLD_MARK
from kasched.sqlsets import members
from kasched.views import GrantView

HAND_MADE = "admin"  # the scheduler name of grants made with 'kasched rights grant': no scheduler holds their nodes

SETTLED = (NodeState.DOWN,)  # out of service: not given back. Every other node of an ending job is,
# whatever its recorded state: its user may have changed the reference partition, powered it off, or
# left it running a system that says it is the reference (kasched.deploy.revert checks what it can).


@dataclass(frozen=True)
class ReclaimPlan:
    """What a job's end leaves to do: operations cancelled, nodes to revert, nodes already back."""

    grant_id: int
    cancelled: tuple[str, ...]  # deployment ids whose cancellation was requested
    to_revert: tuple[str, ...]
    settled: tuple[str, ...]
    others: tuple[str, ...] = ()  # held by another active grant now: not this job's to give back


def cancel_operations(session: Session, grant_id: int) -> list[str]:
    """Ask every running operation started under grant ``grant_id`` to stop; their ids."""
    return grants.cancel_operations(session, grant_id)


def node_states(session: Session, nodes: Sequence[str]) -> dict[str, NodeState]:
    """The recorded state of each node that is still in the inventory."""
    states: dict[str, NodeState] = {}
    for condition in members(session, Node.name, list(nodes)):
        states.update(session.execute(select(Node.name, Node.state).where(condition)).all())
    return states


def held(session: Session, nodes: Sequence[str]) -> set[str]:
    """Those of ``nodes`` that an active grant (of anyone) holds now."""
    ids = grants.node_ids_by_name(session, nodes, missing_ok=True)
    holders = grants.active_holders(session, ids.values())
    return {name for name, node_id in ids.items() if holders.get(node_id)}


def plan(session: Session, grant_id: int, nodes: Sequence[str]) -> ReclaimPlan:
    """What the end of grant ``grant_id`` leaves to do (its operations were cancelled by the revoke).
    ``nodes`` are the grant's nodes; only the exceptions are read (the settled ones, those another
    active grant holds), not a row per node: 10,000 nodes cost two short answers."""
    cancelled = cancel_operations(session, grant_id)
    linked = select(GrantNode.node_id).where(GrantNode.grant_id == grant_id)
    settled = set(session.scalars(select(Node.name).where(Node.id.in_(linked), Node.state.in_(SETTLED))))
    others = held_by_others(session, grant_id)
    return ReclaimPlan(
        grant_id=grant_id,
        cancelled=tuple(cancelled),
        to_revert=tuple(n for n in nodes if n not in settled and n not in others),
        settled=tuple(n for n in nodes if n in settled),
        others=tuple(n for n in nodes if n in others),
    )


def held_by_others(session: Session, grant_id: int) -> set[str]:
    """The nodes of grant ``grant_id`` that another active grant (of anyone) holds now. Read from the
    active grants (a few) rather than from each node's history of grants (which only grows)."""
    active = session.scalars(
        select(Grant.id).where(Grant.id != grant_id, Grant.revoked_at.is_(None), Grant.expires_at > utcnow())
    ).all()
    if not active:
        return set()
    linked = select(GrantNode.node_id).where(GrantNode.grant_id == grant_id)
    rows = (
        select(Node.name)
        .join(GrantNode, GrantNode.node_id == Node.id)
        .where(GrantNode.grant_id.in_(active), GrantNode.node_id.in_(linked))
        .distinct()
    )
    return set(session.scalars(rows))


def settled_release(session: Session, grant: GrantView) -> tuple[list[str], dict[str, str]]:
    """For an epilog that comes after its grant was revoked already (reconcile was first): its hook held
    the nodes again, and no revert of this end will release them. The nodes of ``grant`` that are not
    busy, as they are now: those back in the reference environment, and the others with why (a busy
    node is left to the operation that has it: a revert releases its nodes when it ends)."""
    states, others = node_states(session, grant.nodes), held(session, grant.nodes)
    back = [n for n, state in states.items() if state == NodeState.REFERENCE and n not in others]
    failed = {
        n: f"{HOLD_MARK} {state.value} after job {grant.job_id}: not given back"
        for n, state in states.items()
        if state not in (NodeState.REFERENCE, *BUSY) and n not in others
    }
    failed |= {n: f"{HOLD_MARK} granted to another job meanwhile: not given back" for n in others}
    return back, failed


def orphans(session: Session, min_age: float = 0.0) -> list[str]:
    """Nodes that no active grant and no operation holds, unchanged for ``min_age`` seconds, and left
    by a user: out of the reference environment (not down), or recorded ``reference`` but not trusted
    since a grant that held them ended (a lost epilog, a failed revert, a deploy that outlived its
    grant). Nobody gives them back but reconcile."""
    since = utcnow() - timedelta(seconds=min_age)
    out = session.scalars(
        select(Node.name).where(
            Node.state.not_in([NodeState.REFERENCE, *SETTLED, *BUSY]), Node.state_changed_at <= since
        )
    ).all()
    ended = func.coalesce(Grant.revoked_at, Grant.expires_at)
    left = session.scalars(
        select(Node.name)
        .join(GrantNode, GrantNode.node_id == Node.id)
        .join(Grant, Grant.id == GrantNode.grant_id)
        .where(Node.state == NodeState.REFERENCE, Node.trusted.is_(False), Node.state_changed_at <= since)
        .where(ended <= utcnow(), ended >= Node.state_changed_at)
        .distinct()
    ).all()
    candidates = sorted({*out, *left})
    others = held(session, candidates)
    return [name for name in candidates if name not in others]


def revoked_grant(session: Session, grant_id: int) -> GrantView:
    """A grant that is no longer active (reclaiming an active one is refused)."""
    grant = session.get(Grant, grant_id)
    if grant is None:
        raise NotFoundError(f"no grant {grant_id}")
    view = grants.view_of(session, grant)
    if view.active:
        raise ConflictError(f"grant {grant_id} is active: its job still runs")
    return view


def wait_not_busy(session_factory: object, nodes: Sequence[str], timeout: float, step: float = 1.0) -> list[str]:
    """Wait until none of ``nodes`` is busy (cancelled operations take a moment to stop), but for nodes
    another active grant holds (its own operations: not ours to wait for); those still busy after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with session_factory() as session:  # type: ignore[operator]
            others = held(session, nodes)
            busy = [n for n, state in node_states(session, nodes).items() if state in BUSY and n not in others]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(step)


def log_path(config: Config, grant_id: int | None) -> Path:
    return config.state_dir / "reclaim" / (f"grant-{grant_id}.log" if grant_id is not None else "orphans.log")


def spawn(config: Config, grant_id: int | None) -> int:
    """Start ``kasched job reclaim GRANT`` (None: ``--orphans``) detached from the caller (own session,
    no stdin, output to its log file); return its pid. It talks to the database directly, whoever
    started it."""
    log = log_path(config, grant_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "kasched"]
    if config.path is not None:
        command += ["--config", str(config.path)]
    command += ["job", "reclaim", str(grant_id) if grant_id is not None else "--orphans"]
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
