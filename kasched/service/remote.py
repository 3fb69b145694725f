"""The API as the CLI sees it when kaschedd runs: the same calls as :class:`kasched.api.Kasched`,
answered by the service over its Unix socket. The CLI holds no database credential, no BMC password."""

from __future__ import annotations

import dataclasses
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

from kasched import errors
from kasched.api import ImportReport
from kasched.bus import Bus
from kasched.config import Config
from kasched.errors import KaschedError
from kasched.identity import Caller
from kasched.messages import JobEnd, JobInfo
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


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
