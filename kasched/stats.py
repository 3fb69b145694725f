"""The operations history behind ``kasched stats`` (like Kadeploy's kastat): every deployment, reboot
and power step on every node, with its duration and error."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Case, Select, case, func, select
from sqlalchemy.orm import Session

from kasched.errors import InputError, PermissionDenied
from kasched.identity import Caller
from kasched.messages import StepEvent
from kasched.models import StepRecord, utcnow
from kasched.views import StepView

SelectT = TypeVar("SelectT", bound=Select[Any])
RELATIVE_RE = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
GROUPS = {
    "node": StepRecord.node,
    "step": StepRecord.step,
    "user": StepRecord.user,
    "environment": StepRecord.environment,
    "kind": StepRecord.kind,
}


@dataclass(frozen=True)
class StatsFilter:
    """What to select; every field is optional. ``nodes`` are names, already expanded."""

    user: str | None = None
    nodes: tuple[str, ...] = ()
    environment: str | None = None
    kind: str | None = None
    failed_only: bool = False
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000


@dataclass(frozen=True)
class StatsGroup:
    """Aggregates of the selected operations for one value of the grouping key."""

    key: str
    count: int
    failures: int
    mean_duration: float
    max_duration: float


def own(selection: StatsFilter, caller: Caller) -> StatsFilter:
    """What ``caller`` may select: anything for an admin; an ordinary user, only their own operations
    (others' name private environments, nodes and error messages)."""
    if caller.is_admin:
        return selection
    if selection.user not in (None, caller.user):
        raise PermissionDenied(f"only admins may see another user's operations (you are {caller.user})")
    return replace(selection, user=caller.user)


def record(session: Session, event: StepEvent) -> None:
    session.add(
        StepRecord(
            kind=event.kind,
            node=event.node,
            user=event.user,
            environment=event.environment,
            deployment_id=event.deployment_id,
            step=event.label,
            started_at=event.started_at,
            duration=event.duration,
            ok=event.ok,
            error=event.error,
            final=event.final,
        )
    )


def select_operations(session: Session, selection: StatsFilter) -> list[StepView]:
    query = _filtered(select(StepRecord), selection).order_by(StepRecord.started_at.desc(), StepRecord.id.desc())
    return [StepView.of(op) for op in session.scalars(query.limit(selection.limit))]


def summarise(session: Session, selection: StatsFilter, by: str) -> list[StatsGroup]:
    if by not in GROUPS:
        raise InputError(f"{by!r} is not one of {', '.join(GROUPS)}", field="by")
    column = GROUPS[by]
    query = (
        _filtered(
            select(
                column,
                func.count(),
                func.sum(_failed_as_int()),
                func.avg(StepRecord.duration),
                func.max(StepRecord.duration),
            ),
            selection,
        )
        .group_by(column)
        .order_by(column)
    )
    return [
        StatsGroup(str(key), count, int(failed or 0), float(mean or 0), float(longest or 0))
        for key, count, failed, mean, longest in session.execute(query)
    ]


def _failed_as_int() -> Case[int]:
    return case((StepRecord.ok.is_(False), 1), else_=0)


def _filtered(query: SelectT, selection: StatsFilter) -> SelectT:
    if selection.user:
        query = query.where(StepRecord.user == selection.user)
    if selection.nodes:
        query = query.where(StepRecord.node.in_(selection.nodes))
    if selection.environment:
        query = query.where(StepRecord.environment.like(f"{selection.environment}%"))
    if selection.kind:
        query = query.where(StepRecord.kind == selection.kind)
    if selection.failed_only:
        query = query.where(StepRecord.ok.is_(False))
    if selection.since:
        query = query.where(StepRecord.started_at >= selection.since)
    if selection.until:
        query = query.where(StepRecord.started_at < selection.until)
    return query


def parse_time(text: str, *, field: str, now: datetime | None = None) -> datetime:
    """``2026-11-20``, ``2026-11-20T10:00`` (UTC unless an offset is given), or ``3h``/``2d`` ago."""
    match = RELATIVE_RE.match(text.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        return (now or utcnow()) - timedelta(**{UNITS[unit]: amount})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"{text!r} is neither a date (2026-11-20T10:00) nor a duration ago (3h, 2d)", field=field
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
