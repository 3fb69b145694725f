"""Built-in plugin: writes grants and notifications to the ``kasched`` log."""

from __future__ import annotations

import logging

from kasched.hookspecs import hookimpl
from kasched.messages import Notification
from kasched.nodeset import fold
from kasched.views import GrantView

log = logging.getLogger("kasched")
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class Journal:
    @hookimpl
    def kasched_grant_created(self, grant: GrantView) -> None:
        log.info(
            "grant %d created: %s may deploy %s for job %s until %s",
            grant.id,
            grant.user,
            fold(grant.nodes),
            grant.job,
            grant.expires_at.isoformat(timespec="seconds"),
        )

    @hookimpl
    def kasched_grant_revoked(self, grant: GrantView, reason: str) -> None:
        log.info("grant %d revoked (%s): %s on %s", grant.id, reason, grant.user, fold(grant.nodes))

    @hookimpl
    def kasched_notify(self, notification: Notification) -> None:
        log.log(LEVELS.get(notification.severity, logging.INFO), "%s: %s", notification.subject, notification.body)
