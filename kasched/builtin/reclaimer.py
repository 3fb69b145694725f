"""Built-in plugin: gives a job's nodes back when its grant is revoked at the job's end.

The operations started under the grant were cancelled by the revoke itself; the nodes that left the
reference environment, and that no other active grant holds (the user's next job may have them
already), are reverted by ``kasched job reclaim GRANT``, started in the background, so that the
scheduler's epilog returns quickly (see :mod:`kasched.deploy.reclaim`). Grants made by hand by an
admin (``kasched rights grant``) are left alone: no job ended. ``revert_at_job_end: false`` turns it off.

The plan, the background start and the release to the scheduler belong to the deploy layer above:
they come in as a :class:`GiveBack` (the composition root, :mod:`kasched.compose`, gives it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from kasched.bus import Bus
from kasched.config import Config
from kasched.errors import KaschedError
from kasched.hookspecs import hookimpl
from kasched.messages import Notification
from kasched.nodeset import fold
from kasched.schedulers import HOLD_MARK
from kasched.views import GrantView

log = logging.getLogger("kasched")


class GiveBackPlan(Protocol):
    """What giving a grant's nodes back takes: the operations cancelled, the nodes to revert, those
    set down (kept out), those another grant holds already."""

    @property
    def cancelled(self) -> Sequence[str]: ...
    @property
    def to_revert(self) -> Sequence[str]: ...
    @property
    def settled(self) -> Sequence[str]: ...
    @property
    def others(self) -> Sequence[str]: ...


class GiveBack(Protocol):
    """The deploy layer's part of giving nodes back (:mod:`kasched.deploy.reclaim`, :mod:`kasched.deploy.release`)."""

    def is_hand_made(self, grant: GrantView) -> bool:
        """A grant made by hand by an admin: no scheduler holds its nodes."""
        ...

    def plan(self, grant: GrantView) -> GiveBackPlan:
        """Cancel the grant's operations and say what to do with each of its nodes."""
        ...

    def start(self, grant: GrantView) -> tuple[int, Path]:
        """Start reverting the grant's nodes in the background: the process id and its log."""
        ...

    def release(self, grant: GrantView, back: Sequence[str], kept: Mapping[str, str]) -> None:
        """Tell the grant's scheduler which nodes are back, and which stay out and why."""

    def release_as_they_are(self, grant: GrantView) -> None:
        """For an epilog that comes after its grant was revoked already (reconcile was first): release
        the grant's nodes that are not busy, as they are now (no revert of this end will)."""


class Reclaimer:
    def __init__(self, config: Config, bus: Bus, give_back: GiveBack) -> None:
        self.config = config
        self.bus = bus
        self.give_back = give_back

    @hookimpl
    def kasched_grant_revoked(self, grant: GrantView, reason: str) -> None:
        if self.give_back.is_hand_made(grant):
            return
        if not self.config.revert_at_job_end:  # the site gives nodes back as they are
            self.give_back.release(grant, grant.nodes, {})
            return
        try:
            self._reclaim(grant)
        except (KaschedError, OSError) as error:  # never fail the epilog: the grant is revoked already
            # The nodes stay held by their scheduler: reconcile gives them back as orphans later.
            self._tell(grant, f"cannot start giving back {fold(grant.nodes)}: {error}", "error")

    def _reclaim(self, grant: GrantView) -> None:
        todo = self.give_back.plan(grant)
        if todo.cancelled:
            self._tell(grant, f"cancelling its running operations {', '.join(todo.cancelled)}")
        if todo.others:
            log.info("job %s ended: %s held by another grant already, left alone", grant.job, fold(todo.others))
        if not todo.to_revert:
            if todo.settled:
                log.info("job %s ended: %s out of service (down): not given back", grant.job, fold(todo.settled))
            kept = {node: f"{HOLD_MARK} set down in kasched" for node in todo.settled}
            kept |= {node: f"{HOLD_MARK} granted to another job meanwhile: not given back" for node in todo.others}
            self.give_back.release(grant, [], kept)
            return
        pid, log_file = self.give_back.start(grant)
        self._tell(grant, f"reverting {fold(todo.to_revert)} in the background (pid {pid}, log {log_file})")

    def _tell(self, grant: GrantView, body: str, severity: str = "info") -> None:
        self.bus.notify(Notification(subject=f"job {grant.job} ended", body=body, severity=severity, user=grant.user))
