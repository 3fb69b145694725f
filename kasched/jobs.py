"""What a scheduler tells kasched about a job, as plain data passed along the plugin bus."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class JobInfo:
    """A job allocated by a scheduler: who runs it, on which nodes, for how long."""

    scheduler: str  # "slurm", "oar", "pbs", or "admin" for grants made by hand
    cluster: str
    job_id: str
    user: str
    nodes: tuple[str, ...]
    environment: str | None = None  # the environment named in the request, if any
    walltime: float | None = None  # seconds; None: the site's max_grant_hours applies
    started_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class JobEnd:
    """A job that ended. Its node list is not needed: the grant remembers the nodes it covered."""

    scheduler: str
    cluster: str
    job_id: str
    reason: str = "job ended"  # e.g. "job ended (exit 0)", "walltime", "cancelled"


@dataclass(frozen=True)
class StepEvent:
    """One step of a deployment, reboot or power operation on one node, finished."""

    kind: str  # deploy, reboot, power, revert
    node: str
    user: str
    step: str  # e.g. "setup", "broadcast", "boot", "power_on"
    started_at: datetime
    duration: float
    ok: bool
    error: str | None = None
    environment: str | None = None
    deployment_id: str | None = None
    final: bool = True  # False: a failed attempt after which the node gets another retry or variant


@dataclass(frozen=True)
class Notification:
    """Something a person should hear about (a revert that failed, a grant of an unknown node)."""

    subject: str
    body: str
    severity: str = "info"  # info, warning, error
    user: str | None = None
