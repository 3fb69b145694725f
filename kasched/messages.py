"""The plugin bus's messages, as plain data: what a scheduler tells kasched about a job (:class:`JobInfo`,
:class:`JobEnd`), what an operation reports of each step on each node (:class:`StepEvent`), and what a
person should hear about (:class:`Notification`)."""

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
    """One attempt of one step (one variant of it) of an operation on one node, finished: what the live
    view shows, the plugin bus carries (``kasched_deploy_step``) and the statistics keep. The workflow
    fills the attempt; the operation running it adds who, what and which operation (``kind`` ...)."""

    node: str
    step: str  # e.g. "setup", "broadcast", "boot", "power_on"
    variant: str  # the way the step was tried (e.g. "pxe", "kexec"); "" for a step with one way
    attempt: int  # 1 for the first try of this variant on this node
    started_at: datetime
    duration: float
    ok: bool
    error: str | None = None
    final: bool = True  # False: a failed attempt after which the node gets another retry or variant
    kind: str = ""  # deploy, revert, reboot, power, reconcile
    user: str = ""
    environment: str | None = None
    deployment_id: str | None = None

    @property
    def label(self) -> str:
        """``step/variant`` (``step`` alone for a step with one way): the step as statistics name it."""
        return f"{self.step}/{self.variant}" if self.variant else self.step


@dataclass(frozen=True)
class Notification:
    """Something a person should hear about (a revert that failed, a grant of an unknown node)."""

    subject: str
    body: str
    severity: str = "info"  # info, warning, error
    user: str | None = None
