"""Grants: the right of one user to deploy a set of nodes for one job, until the job ends.

A grant is bound to (scheduler, cluster, job id) and stores its node list, so revoking never depends
on the node list a scheduler gives at the end of a job (Slurm removes failed nodes from a job).
Creating and revoking are idempotent: a prolog or epilog run twice does no harm. Revoking a grant
cancels the operations started under it, in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta

from sqlalchemy import insert, literal, select
from sqlalchemy.orm import Session

from kasched.errors import ConflictError, InputError, NotFoundError
from kasched.messages import JobEnd, JobInfo
from kasched.models import Grant, GrantNode, Node, Operation, OperationState, utcnow
from kasched.nodeset import fold
from kasched.sqlsets import members
from kasched.views import Decision, GrantView

JOB_ID_MAX = 64


def create(session: Session, job: JobInfo, *, origin: str, max_hours: float) -> tuple[GrantView, bool]:
    """Store a grant for ``job``; return it and whether it is new (False: this job had one already)."""
    _check_job(job)
    existing = _find(session, job.scheduler, job.cluster, job.job_id)
    if existing is not None and not _id_reused(existing, job):
        return _same_job_again(session, existing, job), False
    if existing is not None:  # a new job under an old id: the old grant keeps its history, renamed
        existing.job_id = _retired_id(existing)
        session.flush()
    start = job.started_at or utcnow()
    hours = min(job.walltime / 3600, max_hours) if job.walltime else max_hours
    grant = Grant(
        scheduler=job.scheduler,
        cluster=job.cluster,
        job_id=job.job_id,
        user=job.user,
        origin=origin,
        environment_request=job.environment,
        created_at=start,
        expires_at=start + timedelta(hours=hours),
    )
    session.add(grant)
    session.flush()
    _insert_nodes(session, grant.id, job.nodes)
    return _view(grant, tuple(job.nodes)), True


def _insert_nodes(session: Session, grant_id: int, names: Sequence[str]) -> None:
    """Link grant ``grant_id`` to the nodes ``names`` in the database itself (``INSERT ... SELECT``, no
    round trip per node); an unknown name is an error naming it, and the caller's transaction with the
    half-made grant is rolled back."""
    wanted = list(dict.fromkeys(names))
    stored = 0
    for condition in members(session, Node.name, wanted):
        rows = select(literal(grant_id), Node.id).where(condition)
        statement = insert(GrantNode).from_select(["grant_id", "node_id"], rows)
        stored += session.connection().execute(statement.execution_options(preserve_rowcount=True)).rowcount
    if stored != len(wanted):
        node_ids_by_name(session, wanted)  # raises NotFoundError naming the unknown nodes
        raise NotFoundError(f"some of the nodes {fold(wanted)} are unknown")


def _id_reused(grant: Grant, job: JobInfo) -> bool:
    """Whether ``job`` is a new job that reuses the id of the revoked ``grant``'s job: it starts after
    that grant was revoked. Slurm starts job ids again at 1 when its state is cleared (and wraps them
    at MaxJobId); a requeued job runs its prolog again under its id. A prolog of the old job that comes
    late (it started before the revocation) is no new job: refused."""
    if grant.revoked_at is None:
        return False
    return (job.started_at or utcnow()) >= grant.revoked_at


def _retired_id(grant: Grant) -> str:
    """The id an old grant keeps once its job id is reused: ``ID~YYYYmmddTHHMMSS.ffffff`` (its revocation)."""
    assert grant.revoked_at is not None
    suffix = f"~{grant.revoked_at:%Y%m%dT%H%M%S.%f}"
    return grant.job_id[: JOB_ID_MAX - len(suffix)] + suffix


def _same_job_again(session: Session, grant: Grant, job: JobInfo) -> GrantView:
    view = view_of(session, grant)
    if grant.revoked_at is not None:
        raise ConflictError(
            f"the grant of job {view.job} was revoked at {grant.revoked_at:%Y-%m-%d %H:%M:%S}Z "
            f"({grant.revoke_reason}); a job id is granted once"
        )
    if grant.user != job.user or set(view.nodes) != set(job.nodes):
        raise ConflictError(f"job {view.job} already has a grant for user {grant.user} on {fold(view.nodes)}")
    return view


def revoke(session: Session, end: JobEnd) -> tuple[GrantView, bool]:
    """Revoke the grant of a job; return it and whether this call revoked it (False: it was already)."""
    grant = _find(session, end.scheduler, end.cluster, end.job_id, lock=True)
    if grant is None:
        raise NotFoundError(f"no grant for job {end.scheduler}:{end.cluster}:{end.job_id}")
    return _revoke(session, grant, end.reason)


def revoke_by_id(session: Session, grant_id: int, reason: str) -> tuple[GrantView, bool]:
    grant = session.get(Grant, grant_id, with_for_update=True)
    if grant is None:
        raise NotFoundError(f"no grant with id {grant_id}")
    return _revoke(session, grant, reason)


def _revoke(session: Session, grant: Grant, reason: str) -> tuple[GrantView, bool]:
    """Revoke a locked grant and, in the same transaction, ask its running operations to stop. An
    operation starting under it waits for the lock and is then refused (kasched.deploy.records.start)."""
    if grant.revoked_at is not None:
        return view_of(session, grant), False
    grant.revoked_at = utcnow()
    grant.revoke_reason = reason[:255]
    cancel_operations(session, grant.id)
    return view_of(session, grant), True


def cancel_operations(session: Session, grant_id: int) -> list[str]:
    """Ask every running operation started under grant ``grant_id`` to stop; their ids. Operations of
    the same user on the same nodes under another grant (the user's next job) are left alone."""
    running = session.scalars(
        select(Operation)
        .where(Operation.grant_id == grant_id, Operation.state == OperationState.RUNNING)
        .order_by(Operation.id)
        .with_for_update()
    ).all()
    for deployment in running:
        deployment.cancel_requested = True
    return [d.id for d in running]


def check(session: Session, user: str, nodes: Sequence[str], *, is_admin: bool = False) -> Decision:
    """May ``user`` deploy ``nodes`` now? Every node must exist and be in an active grant of the user."""
    ids = node_ids_by_name(session, nodes, missing_ok=True)
    refused = {name: "no such node" for name in nodes if name not in ids}
    if is_admin:
        return Decision(user, not refused, refused, {n: "admin" for n in nodes if n in ids})
    holders = active_holders(session, ids.values())
    names = {node_id: name for name, node_id in ids.items()}
    allowed_by: dict[str, str] = {}
    for node_id, name in names.items():
        mine = [job for holder, job in holders.get(node_id, []) if holder == user]
        if mine:
            allowed_by[name] = mine[0]
        elif holders.get(node_id):
            others = ", ".join(sorted({f"{h} (job {j})" for h, j in holders[node_id]}))
            refused[name] = f"granted to {others}, not to {user}"
        else:
            refused[name] = f"no active grant for {user} (submit a deploy job first)"
    return Decision(user, not refused, refused, allowed_by)


def active_holders(session: Session, node_ids: Iterable[int]) -> dict[int, list[tuple[str, str]]]:
    now = utcnow()
    holders: dict[int, list[tuple[str, str]]] = {}
    for condition in members(session, GrantNode.node_id, list(node_ids)):
        rows = session.execute(
            select(GrantNode.node_id, Grant.user, Grant.scheduler, Grant.cluster, Grant.job_id)
            .join(Grant, Grant.id == GrantNode.grant_id)
            .where(condition, Grant.revoked_at.is_(None), Grant.expires_at > now)
        )
        for node_id, user, scheduler, cluster, job_id in rows:
            holders.setdefault(node_id, []).append((user, f"{scheduler}:{cluster}:{job_id}"))
    return holders


def list_grants(
    session: Session, *, user: str | None = None, nodes: Sequence[str] | None = None, include_ended: bool = False
) -> list[GrantView]:
    """Grants, newest first; only active ones unless ``include_ended``."""
    query = select(Grant).order_by(Grant.created_at.desc(), Grant.id.desc())
    if user:
        query = query.where(Grant.user == user)
    if not include_ended:
        query = query.where(Grant.revoked_at.is_(None), Grant.expires_at > utcnow())
    if nodes:
        ids = list(node_ids_by_name(session, nodes).values())
        query = query.where(Grant.id.in_(select(GrantNode.grant_id).where(GrantNode.node_id.in_(ids))))
    return [view_of(session, grant) for grant in session.scalars(query)]


def node_ids_by_name(session: Session, names: Iterable[str], *, missing_ok: bool = False) -> dict[str, int]:
    """Node ids by name; unknown names are an error naming them unless ``missing_ok``."""
    wanted = list(dict.fromkeys(names))
    found: dict[str, int] = {}
    for condition in members(session, Node.name, wanted):
        found.update(session.execute(select(Node.name, Node.id).where(condition)).all())
    missing = [name for name in wanted if name not in found]
    if missing and not missing_ok:
        raise NotFoundError(f"unknown node(s) {fold(missing)}")
    return found


def view_of(session: Session, grant: Grant) -> GrantView:
    names = session.scalars(
        select(Node.name).join(GrantNode, GrantNode.node_id == Node.id).where(GrantNode.grant_id == grant.id)
    ).all()
    return _view(grant, tuple(sorted(names)))


def _view(grant: Grant, nodes: tuple[str, ...]) -> GrantView:
    return GrantView(
        id=grant.id,
        scheduler=grant.scheduler,
        cluster=grant.cluster,
        job_id=grant.job_id,
        user=grant.user,
        origin=grant.origin,
        nodes=nodes,
        environment_request=grant.environment_request,
        created_at=grant.created_at,
        expires_at=grant.expires_at,
        revoked_at=grant.revoked_at,
        revoke_reason=grant.revoke_reason,
    )


def _find(session: Session, scheduler: str, cluster: str, job_id: str, *, lock: bool = False) -> Grant | None:
    query = select(Grant).where(Grant.scheduler == scheduler, Grant.cluster == cluster, Grant.job_id == job_id)
    return session.scalars(query.with_for_update() if lock else query).first()


def _check_job(job: JobInfo) -> None:
    for label, value in (
        ("scheduler", job.scheduler),
        ("cluster", job.cluster),
        ("job id", job.job_id),
        ("user", job.user),
    ):
        if not value or len(value) > JOB_ID_MAX or any(c.isspace() for c in value):
            raise InputError(f"{value!r} is not a valid {label}", field="job")
    if not job.nodes:
        raise InputError(f"job {job.job_id} has no nodes", field="job")
    if job.walltime is not None and job.walltime <= 0:
        raise InputError(f"walltime {job.walltime} is not positive", field="job")
