"""Built-in plugin: gives a job's nodes back when its grant is revoked at the job's end.

The operations started under the grant were cancelled by the revoke itself; the nodes that left the
reference environment, and that no other active grant holds (the user's next job may have them
already), are reverted by ``kasched job reclaim GRANT``, started in the background, so that the
scheduler's epilog returns quickly (see :mod:`kasched.deploy.reclaim`). Grants made by hand by an
admin (``kasched rights grant``) are left alone: no job ended. ``revert_at_job_end: false`` turns it off.
"""

from __future__ import annotations

import logging

from kasched.bus import Bus
from kasched.config import Config
from kasched.db import Database
from kasched.deploy import reclaim
from kasched.deploy.release import release
from kasched.errors import KaschedError
from kasched.hookspecs import hookimpl
from kasched.messages import Notification
from kasched.nodeset import fold
from kasched.schedulers import HOLD_MARK
from kasched.views import GrantView

log = logging.getLogger("kasched")


class Reclaimer:
    def __init__(self, database: Database, config: Config, bus: Bus) -> None:
        self.database = database
        self.config = config
        self.bus = bus

    @hookimpl
    def kasched_grant_revoked(self, grant: GrantView, reason: str) -> None:
        if grant.scheduler == reclaim.HAND_MADE:
            return
        if not self.config.revert_at_job_end:  # the site gives nodes back as they are
            release(self.bus, grant.scheduler, grant.job_id, grant.nodes, {})
            return
        try:
            self._reclaim(grant)
        except (KaschedError, OSError) as error:  # never fail the epilog: the grant is revoked already
            # The nodes stay held by their scheduler: reconcile gives them back as orphans later.
            self._tell(grant, f"cannot start giving back {fold(grant.nodes)}: {error}", "error")

    def _reclaim(self, grant: GrantView) -> None:
        with self.database.session() as session:
            todo = reclaim.plan(session, grant.id, grant.nodes)
        if todo.cancelled:
            self._tell(grant, f"cancelling its running operations {', '.join(todo.cancelled)}")
        if todo.others:
            log.info("job %s ended: %s held by another grant already, left alone", grant.job, fold(todo.others))
        if not todo.to_revert:
            if todo.settled:
                log.info("job %s ended: %s out of service (down): not given back", grant.job, fold(todo.settled))
            kept = {node: f"{HOLD_MARK} set down in kasched" for node in todo.settled}
            kept |= {node: f"{HOLD_MARK} granted to another job meanwhile: not given back" for node in todo.others}
            release(self.bus, grant.scheduler, grant.job_id, [], kept)
            return
        pid = reclaim.spawn(self.config, grant.id)
        self._tell(
            grant,
            f"reverting {fold(todo.to_revert)} in the background (pid {pid}, "
            f"log {reclaim.log_path(self.config, grant.id)})",
        )

    def _tell(self, grant: GrantView, body: str, severity: str = "info") -> None:
        self.bus.notify(Notification(subject=f"job {grant.job} ended", body=body, severity=severity, user=grant.user))
