"""The front door in this process (:class:`LocalKasched`): the typed API (:class:`~kasched.api.Kasched`),
the operations (:class:`~kasched.deploy.operations.Operations`), console and tokens
(:mod:`kasched.service.access`), composed over the site's database. Built by :func:`kasched.compose.open_local`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from kasched.api import ImportReport, Kasched
from kasched.config import Config
from kasched.deploy import records
from kasched.deploy.operations import OperationResult, Operations, PendingOperation
from kasched.drivers.reboot import RebootLevel
from kasched.front import ConsolePage, IssuedToken, Listener, Started, ignore, when_given_back
from kasched.identity import Caller
from kasched.messages import JobEnd, JobInfo
from kasched.results import NodeResult
from kasched.schedulers import SchedulerAdapter
from kasched.service import access
from kasched.stats import StatsFilter, StatsGroup
from kasched.views import Decision, EnvironmentView, GrantView, NodeView, StepView


class LocalKasched:
    """One caller's front on the site's database, in this process (see the module docstring)."""

    def __init__(self, api: Kasched) -> None:
        self.api = api
        self.config: Config = api.config

    @property
    def caller(self) -> Caller:
        return self.api.caller

    def close(self) -> None:
        self.api.close()

    def beside_database(self, why: str) -> Kasched:
        return self.api

    # Nodes
    def import_nodes(self, path: str | Path) -> ImportReport:
        return self.api.import_nodes(path)

    def list_nodes(self, pattern: str | None = None, state: str | None = None) -> list[NodeView]:
        return self.api.list_nodes(pattern, state)

    def show_node(self, name: str) -> NodeView:
        return self.api.show_node(name)

    def remove_nodes(self, pattern: str) -> list[str]:
        return self.api.remove_nodes(pattern)

    def set_node_state(self, pattern: str, state: str) -> list[str]:
        return self.api.set_node_state(pattern, state)

    # Environments
    def add_environment(self, path: str | Path, owner: str | None = None) -> EnvironmentView:
        return self.api.add_environment(path, owner)

    def list_environments(
        self, *, include_shared: bool = False, owner: str | None = None, name: str | None = None
    ) -> list[EnvironmentView]:
        return self.api.list_environments(include_shared=include_shared, owner=owner, name=name)

    def show_environment(self, reference: str) -> EnvironmentView:
        return self.api.show_environment(reference)

    def check_environment(self, reference: str) -> EnvironmentView:
        return self.api.check_environment(reference)

    def remove_environment(self, reference: str) -> EnvironmentView:
        return self.api.remove_environment(reference)

    # Rights and jobs
    def grant(self, user: str, nodes: str, hours: float, job_id: str | None = None) -> GrantView:
        return self.api.grant(user, nodes, hours, job_id)

    def revoke(self, grant_id: int, reason: str = "revoked by an admin") -> GrantView:
        return self.api.revoke(grant_id, reason)

    def rights(
        self, *, user: str | None = None, nodes: str | None = None, include_ended: bool = False
    ) -> list[GrantView]:
        return self.api.rights(user=user, nodes=nodes, include_ended=include_ended)

    def check(self, nodes: str | list[str], user: str | None = None) -> Decision:
        return self.api.check(nodes, user)

    def record_job_start(self, job: JobInfo) -> GrantView:
        return self.api.record_job_start(job)

    def record_job_end(self, end: JobEnd) -> GrantView:
        return self.api.record_job_end(end)

    def scheduler_adapters(self) -> list[SchedulerAdapter]:
        return cast(list[SchedulerAdapter], self.api.bus.scheduler_adapters())

    # Statistics
    def stats(self, selection: StatsFilter) -> list[StepView]:
        return self.api.stats(selection)

    def stats_summary(self, selection: StatsFilter, by: str) -> list[StatsGroup]:
        return self.api.stats_summary(selection, by)

    # Operations
    def deploy(
        self,
        environment: str,
        nodes: Sequence[str],
        key: str | None = None,
        *,
        stateless: bool = False,
        fanout: int = 0,
        listener: Listener = ignore,
        stop: threading.Event | None = None,
    ) -> OperationResult:
        return self._operate(
            lambda ops: ops.prepare_deploy(environment, nodes, key, stateless=stateless), fanout, listener, stop
        )

    def revert(
        self, nodes: Sequence[str], *, listener: Listener = ignore, stop: threading.Event | None = None
    ) -> OperationResult:
        return self._operate(lambda ops: ops.prepare_revert(nodes), 0, listener, stop)

    def reboot(
        self,
        nodes: Sequence[str],
        level: RebootLevel | None = None,
        to: str = "reference",
        *,
        listener: Listener = ignore,
        stop: threading.Event | None = None,
    ) -> OperationResult:
        return self._operate(lambda ops: ops.prepare_reboot(nodes, level or RebootLevel.SOFT, to), 0, listener, stop)

    def _operate(
        self,
        prepare: Callable[[Operations], PendingOperation],
        fanout: int,
        listener: Listener,
        stop: threading.Event | None,
    ) -> OperationResult:
        """Prepare (waiting while the nodes are being given back), say it started, run to the end."""
        stop = stop or threading.Event()
        operations = Operations(self.api, progress=listener, cancel=stop, fanout=fanout)
        pending = when_given_back(lambda: prepare(operations), self.config.revert_wait, listener, stop)
        listener(Started(pending.kind, pending.deployment_id))
        return pending.run()

    def power(self, nodes: Sequence[str], action: str) -> list[NodeResult]:
        return list(Operations(self.api).power(nodes, action).values())

    def status(self, operation_id: str) -> records.DeploymentView:
        with self.api.database.session() as session:
            shown = records.view(session, operation_id)
        access.require_own(self.api, shown.user, f"deployment {shown.id}")
        return shown

    def cancel(self, operation_id: str) -> None:
        caller = self.api.caller
        with self.api.database.session() as session:
            records.request_cancel(session, operation_id, caller.user, caller.is_admin)

    def operations(self, *, running: bool = False, limit: int = 50) -> list[records.DeploymentView]:
        caller = self.api.caller
        with self.api.database.session() as session:
            return records.recent(session, None if caller.is_admin else caller.user, running=running, limit=limit)

    # Console and tokens
    def console(self, node: str, offset: int | None = None, lines: int = 40) -> ConsolePage:
        page = access.console_read(self.api, node, None if offset is None else str(offset), str(lines))
        return ConsolePage(page["node"], page["text"], page["offset"])

    def issue_token(self, user: str, hours: float = 24.0) -> IssuedToken:
        issued = access.token_issue(self.api, user, hours)
        return IssuedToken(issued["token"], issued["user"], issued["expires"], issued["id"])

    def revoke_token(self, token_id: str) -> None:
        access.token_revoke(self.api, token_id)
