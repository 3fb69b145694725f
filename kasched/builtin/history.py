"""Built-in plugin: stores every finished step of an operation for ``kasched stats``."""

from __future__ import annotations

from kasched import stats
from kasched.db import Database
from kasched.hookspecs import hookimpl
from kasched.messages import StepEvent


class History:
    def __init__(self, database: Database) -> None:
        self.database = database

    @hookimpl
    def kasched_deploy_step(self, event: StepEvent) -> None:
        with self.database.session() as session:
            stats.record(session, event)
