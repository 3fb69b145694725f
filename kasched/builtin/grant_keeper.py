"""Built-in plugin: creates a grant when a deploy job starts and revokes it when the job ends."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from kasched import grants
from kasched.builtin.reclaimer import GiveBack
from kasched.bus import Bus
from kasched.config import Config
from kasched.db import Database
from kasched.errors import DatabaseError
from kasched.hookspecs import hookimpl
from kasched.messages import JobEnd, JobInfo
from kasched.views import GrantView

ATTEMPTS = 3


class GrantKeeper:
    """Stores grants for jobs. Idempotent: a prolog or epilog run twice leaves one grant."""

    def __init__(self, database: Database, config: Config, bus: Bus, give_back: GiveBack) -> None:
        self.give_back = give_back
        self.database = database
        self.config = config
        self.bus = bus

    @hookimpl
    def kasched_job_started(self, job: JobInfo) -> GrantView:
        for attempt in range(ATTEMPTS):
            try:
                with self.database.session() as session:
                    view, new = grants.create(
                        session, job, origin=f"{job.scheduler} job", max_hours=self.config.max_grant_hours
                    )
                break
            except SqlIntegrityError:
                # Two prologs of one job raced on a server database: the other one stored it; read it.
                if attempt == ATTEMPTS - 1:
                    raise DatabaseError(f"could not store the grant of job {job.job_id}") from None
        if new:
            self.bus.grant_created(view)
        return view

    @hookimpl
    def kasched_job_ended(self, job: JobEnd) -> GrantView:
        with self.database.session() as session:
            view, revoked_now = grants.revoke(session, job)
        if revoked_now:
            self.bus.grant_revoked(view, job.reason)
        elif not self.give_back.is_hand_made(view):  # revoked before (reconcile): the hook held the nodes
            self.give_back.release_as_they_are(view)  # again, and nothing else frees them
        return view
