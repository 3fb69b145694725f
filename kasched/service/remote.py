"""The front door over kaschedd (:class:`RemoteKasched`): every call of :class:`kasched.front.KaschedFront`,
answered by the service over its Unix socket or TCP. The CLI holds no database credential, no BMC
password. An operation is started, then followed by polling its record (:mod:`kasched.service.follow`)."""

from __future__ import annotations

import dataclasses
import threading
import typing
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from kasched import errors
from kasched.api import ImportReport, Kasched
from kasched.bus import Bus
from kasched.config import Config
from kasched.deploy.operations import OperationResult
from kasched.deploy.records import DeploymentView
from kasched.drivers.reboot import RebootLevel
from kasched.errors import InputError, KaschedError
from kasched.front import ConsolePage, IssuedToken, Listener, Started, ignore, when_given_back
from kasched.identity import Caller
from kasched.messages import JobEnd, JobInfo
from kasched.results import NodeResult
from kasched.schedulers import SchedulerAdapter
from kasched.service import follow
from kasched.service.client import ServiceClient, client_for
from kasched.stats import StatsFilter, StatsGroup
from kasched.views import Decision, EnvironmentView, GrantView, NodeView, StepView
from kasched.yamlfile import read_text

T = typing.TypeVar("T")


def view(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a view dataclass from its JSON form (datetimes and tuples restored, extras dropped)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = data.get(field.name)
        hint = str(hints[field.name])
        if isinstance(value, str) and "datetime" in hint:
            value = datetime.fromisoformat(value)
        elif isinstance(value, list) and "tuple" in hint:
            value = tuple(value)
        values[field.name] = value
    return cls(**values)


class RemoteKasched:
    """See the module docstring. Errors come back as the same KaschedError kinds, with the same exit codes."""

    def __init__(self, config: Config, client: ServiceClient | None = None) -> None:
        self.config = config
        self.client = client or client_for(config)
        self.bus = Bus()  # for the scheduler adapters the hooks need on this side
        self._caller: Caller | None = None

    @property
    def caller(self) -> Caller:
        if self._caller is None:
            health = self.call("GET", "/v1/health")
            self._caller = Caller(health["user"], health["admin"])
        return self._caller

    def close(self) -> None:
        """Nothing to release: every call is its own connection."""

    def beside_database(self, why: str) -> Kasched:
        raise InputError(why, field="service")

    def call(self, method: str, url: str, query: dict[str, Any] | None = None, body: Any = None) -> Any:
        status, data = self.client.request(method, url, query, body)
        if status < 400:
            return data
        message = data.get("error", str(data)) if isinstance(data, dict) else str(data)
        kind = getattr(errors, data.get("kind", "") if isinstance(data, dict) else "", None)
        if isinstance(kind, type) and issubclass(kind, KaschedError):
            raise kind(message)  # the same kind, so the same exit code as without the service
        raise KaschedError(f"kaschedd answered {status}: {message}")

    # Nodes
    def import_nodes(self, path: str | Path) -> ImportReport:
        report = self.call("POST", "/v1/nodes/import", body={"path": str(path), "text": read_text(path)})
        return ImportReport(**report)

    def list_nodes(self, pattern: str | None = None, state: str | None = None) -> list[NodeView]:
        return [view(NodeView, n) for n in self.call("GET", "/v1/nodes", {"nodes": pattern, "state": state})]

    def show_node(self, name: str) -> NodeView:
        return view(NodeView, self.call("GET", f"/v1/nodes/{_quote(name)}"))

    def remove_nodes(self, pattern: str) -> list[str]:
        removed: list[str] = self.call("POST", "/v1/nodes/remove", body={"nodes": pattern})["removed"]
        return removed

    def set_node_state(self, pattern: str, state: str) -> list[str]:
        changed: list[str] = self.call("POST", "/v1/nodes/state", body={"nodes": pattern, "state": state})["nodes"]
        return changed

    # Environments
    def add_environment(self, path: str | Path, owner: str | None = None) -> EnvironmentView:
        body = {"path": str(Path(path).resolve()), "text": read_text(path), "owner": owner}
        return view(EnvironmentView, self.call("POST", "/v1/environments", body=body))

    def list_environments(
        self, *, include_shared: bool = False, owner: str | None = None, name: str | None = None
    ) -> list[EnvironmentView]:
        found = self.call("GET", "/v1/environments", {"all": str(include_shared).lower(), "owner": owner})
        return [view(EnvironmentView, e) for e in found if name is None or e["name"] == name]

    def show_environment(self, reference: str) -> EnvironmentView:
        return view(EnvironmentView, self.call("GET", f"/v1/environments/{_quote(reference)}"))

    def check_environment(self, reference: str) -> EnvironmentView:
        return view(EnvironmentView, self.call("GET", f"/v1/environments/{_quote(reference)}/check"))

    def remove_environment(self, reference: str) -> EnvironmentView:
        return view(EnvironmentView, self.call("DELETE", f"/v1/environments/{_quote(reference)}"))

    # Rights and jobs
    def grant(self, user: str, nodes: str, hours: float, job_id: str | None = None) -> GrantView:
        body = {"user": user, "nodes": nodes, "hours": hours, "job": job_id}
        return view(GrantView, self.call("POST", "/v1/rights", body=body))

    def revoke(self, grant_id: int, reason: str = "revoked by an admin") -> GrantView:
        return view(GrantView, self.call("DELETE", f"/v1/rights/{grant_id}"))

    def rights(
        self, *, user: str | None = None, nodes: str | None = None, include_ended: bool = False
    ) -> list[GrantView]:
        query = {"user": user, "nodes": nodes, "all": str(include_ended).lower()}
        return [view(GrantView, g) for g in self.call("GET", "/v1/rights", query)]

    def check(self, nodes: str | list[str], user: str | None = None) -> Decision:
        names = nodes if isinstance(nodes, str) else ",".join(nodes)
        data = self.call("GET", "/v1/rights/check", {"nodes": names, "user": user})
        return Decision(data["user"], data["allowed"], data["refused"], data["grants"])

    def record_job_start(self, job: JobInfo) -> GrantView:
        body = {
            "scheduler": job.scheduler,
            "cluster": job.cluster,
            "job_id": job.job_id,
            "user": job.user,
            "nodes": list(job.nodes),
            "environment": job.environment,
            "walltime": job.walltime,
        }
        return view(GrantView, self.call("POST", "/v1/jobs/start", body=body))

    def record_job_end(self, end: JobEnd) -> GrantView:
        body = {"scheduler": end.scheduler, "cluster": end.cluster, "job_id": end.job_id, "reason": end.reason}
        return view(GrantView, self.call("POST", "/v1/jobs/end", body=body))

    def scheduler_adapters(self) -> list[SchedulerAdapter]:
        return typing.cast(list[SchedulerAdapter], self.bus.scheduler_adapters())

    # Statistics
    def _stats_query(self, selection: StatsFilter) -> dict[str, Any]:
        return {
            "user": selection.user,
            "nodes": ",".join(selection.nodes) or None,
            "environment": selection.environment,
            "kind": selection.kind,
            "failed": str(selection.failed_only).lower(),
            "since": selection.since.isoformat() if selection.since else None,
            "until": selection.until.isoformat() if selection.until else None,
            "limit": selection.limit,
        }

    def stats(self, selection: StatsFilter) -> list[StepView]:
        return [view(StepView, op) for op in self.call("GET", "/v1/stats", self._stats_query(selection))]

    def stats_summary(self, selection: StatsFilter, by: str) -> list[StatsGroup]:
        groups = self.call("GET", "/v1/stats", {**self._stats_query(selection), "by": by})
        return [StatsGroup(**g) for g in groups]

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
        body = {"kind": "deploy", "nodes": ",".join(nodes), "environment": environment, "key": key,
                "stateless": stateless, "fanout": fanout}  # fmt: skip
        return self._operate(body, listener, stop)

    def revert(
        self, nodes: Sequence[str], *, listener: Listener = ignore, stop: threading.Event | None = None
    ) -> OperationResult:
        return self._operate({"kind": "revert", "nodes": ",".join(nodes)}, listener, stop)

    def reboot(
        self,
        nodes: Sequence[str],
        level: RebootLevel | None = None,
        to: str = "reference",
        *,
        listener: Listener = ignore,
        stop: threading.Event | None = None,
    ) -> OperationResult:
        body = {"kind": "reboot", "nodes": ",".join(nodes), "level": (level or RebootLevel.SOFT).value, "to": to}
        return self._operate(body, listener, stop)

    def _operate(self, body: dict[str, Any], listener: Listener, stop: threading.Event | None) -> OperationResult:
        """Start the operation in kaschedd (waiting while the nodes are being given back), then follow it."""
        stop = stop or threading.Event()
        start = lambda: self.call("POST", "/v1/deployments", body=body)  # noqa: E731
        operation_id = str(when_given_back(start, self.config.revert_wait, listener, stop)["id"])
        listener(Started(str(body["kind"]), operation_id, "in kaschedd"))
        return follow.result(follow.follow(self.call, operation_id, listener, stop))

    def power(self, nodes: Sequence[str], action: str) -> list[NodeResult]:
        answers = self.call("POST", "/v1/power", body={"action": action, "nodes": ",".join(nodes)})
        return [NodeResult(**answer) for answer in answers]

    def status(self, operation_id: str) -> DeploymentView:
        return _deployment(self.call("GET", f"/v1/deployments/{_quote(operation_id)}"))

    def cancel(self, operation_id: str) -> None:
        self.call("POST", f"/v1/deployments/{_quote(operation_id)}/cancel")

    def operations(self, *, running: bool = False, limit: int = 50) -> list[DeploymentView]:
        found = self.call("GET", "/v1/deployments", {"running": str(running).lower(), "limit": limit})
        return [_deployment(d) for d in found]

    # Console and tokens
    def console(self, node: str, offset: int | None = None, lines: int = 40) -> ConsolePage:
        query = {"lines": str(lines), "offset": None if offset is None else str(offset)}
        return view(ConsolePage, self.call("GET", f"/v1/nodes/{_quote(node)}/console", query))

    def issue_token(self, user: str, hours: float = 24.0) -> IssuedToken:
        return view(IssuedToken, self.call("POST", "/v1/tokens", body={"user": user, "hours": hours}))

    def revoke_token(self, token_id: str) -> None:
        self.call("DELETE", f"/v1/tokens/{_quote(token_id)}")


def _deployment(data: dict[str, Any]) -> DeploymentView:
    """An operation's record from its JSON form (its times restored)."""
    shown = view(DeploymentView, data)
    times = {name: datetime.fromisoformat(value) for name in ("created_at", "ended_at")
             if isinstance(value := data.get(name), str)}  # fmt: skip
    return dataclasses.replace(shown, **times)  # type: ignore[arg-type]


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
