"""The REST API: each route is declared once, with what the OpenAPI schema needs, and dispatched to
the typed API (:class:`kasched.api.Kasched`) seen as the calling user."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime
from typing import Any

from kasched.api import Kasched
from kasched.errors import InputError
from kasched.stats import StatsFilter, parse_time

Handler = Callable[[Kasched, dict[str, str], dict[str, str], Any], Any]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # with {name} parameters
    summary: str
    handler: Handler
    query: tuple[str, ...] = ()
    body: dict[str, Any] | None = None  # JSON schema of the request body
    response: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    status: int = 200

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


def to_json(value: Any) -> Any:
    """Views and results as JSON-ready data."""
    if is_dataclass(value) and not isinstance(value, type):
        value = {**asdict(value), **({"active": value.active} if hasattr(value, "active") else {})}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _flag(query: dict[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InputError(f"{value!r} is not true or false", field=name)
    return value in ("true", "1")


def _nodes_list(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return api.list_nodes(query.get("nodes"), query.get("state"))


def _node_show(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return api.show_node(params["name"])


def _envs_list(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return api.list_environments(include_shared=_flag(query, "all"), owner=query.get("owner"))


def _env_show(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return api.show_environment(params["reference"])


def _env_remove(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return api.remove_environment(params["reference"])


def _rights_list(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return api.rights(user=query.get("user"), nodes=query.get("nodes"), include_ended=_flag(query, "all"))


def _rights_check(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    if not query.get("nodes"):
        raise InputError("required", field="nodes")
    decision = api.check(query["nodes"], user=query.get("user"))
    return {
        "user": decision.user,
        "allowed": decision.allowed,
        "refused": decision.refused,
        "grants": decision.grants,
        "reason": decision.reason(),
    }


def _rights_grant(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InputError("expected a JSON object with user, nodes and hours", field="body")
    hours = body.get("hours", 1)
    if isinstance(hours, bool) or not isinstance(hours, int | float):
        raise InputError("expected a number", field="hours")
    for key in ("user", "nodes"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise InputError("required, a string", field=key)
    return api.grant(body["user"], body["nodes"], float(hours), job_id=body.get("job"))


def _rights_revoke(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    if not params["id"].isdigit():
        raise InputError(f"{params['id']!r} is not a grant id", field="id")
    return api.revoke(int(params["id"]))


def _stats(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    limit = query.get("limit", "1000")
    if not limit.isdigit():
        raise InputError(f"{limit!r} is not a whole number", field="limit")
    selection = StatsFilter(
        user=query.get("user"),
        nodes=tuple(filter(None, query.get("nodes", "").split(","))),
        environment=query.get("environment"),
        kind=query.get("kind"),
        failed_only=_flag(query, "failed"),
        since=parse_time(query["since"], field="since") if query.get("since") else None,
        until=parse_time(query["until"], field="until") if query.get("until") else None,
        limit=int(limit),
    )
    if query.get("by"):
        return api.stats_summary(selection, query["by"])
    return api.stats(selection)


def _deployment_show(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from kasched.deploy import records

    with api.database.session() as session:
        shown = records.view(session, params["id"])
    if shown.user != api.caller.user and not api.caller.is_admin:
        from kasched.errors import PermissionDenied

        raise PermissionDenied(f"deployment {shown.id} belongs to {shown.user}")
    return shown


def _deployment_cancel(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from kasched.deploy import records

    with api.database.session() as session:
        records.request_cancel(session, params["id"], api.caller.user, api.caller.is_admin)
    return {"id": params["id"], "cancel_requested": True}


def _health(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from sqlalchemy import text

    from kasched import __version__

    with api.database.session() as session:
        session.execute(text("SELECT 1"))
    return {"status": "ok", "version": __version__, "user": api.caller.user, "admin": api.caller.is_admin}


ARRAY = {"type": "array", "items": {"type": "object"}}
ROUTES = (
    Route("GET", "/v1/health", "Service health, and who you are", _health),
    Route("GET", "/v1/nodes", "List nodes", _nodes_list, query=("nodes", "state"), response=ARRAY),
    Route("GET", "/v1/nodes/{name}", "Show a node", _node_show),
    Route(
        "GET",
        "/v1/environments",
        "Your environments and public ones",
        _envs_list,
        query=("all", "owner"),
        response=ARRAY,
    ),
    Route("GET", "/v1/environments/{reference}", "Show an environment (NAME[@OWNER][:VERSION])", _env_show),
    Route("DELETE", "/v1/environments/{reference}", "Remove an environment", _env_remove),
    Route(
        "GET",
        "/v1/rights",
        "Grants: who may deploy which nodes",
        _rights_list,
        query=("user", "nodes", "all"),
        response=ARRAY,
    ),
    Route("GET", "/v1/rights/check", "May a user deploy these nodes now?", _rights_check, query=("nodes", "user")),
    Route(
        "POST",
        "/v1/rights",
        "Grant nodes to a user by hand (admins)",
        _rights_grant,
        status=201,
        body={
            "type": "object",
            "required": ["user", "nodes"],
            "properties": {
                "user": {"type": "string"},
                "nodes": {"type": "string"},
                "hours": {"type": "number"},
                "job": {"type": "string"},
            },
        },
    ),
    Route("DELETE", "/v1/rights/{id}", "Revoke a grant (admins)", _rights_revoke),
    Route(
        "GET",
        "/v1/stats",
        "History of operations",
        _stats,
        query=("user", "nodes", "environment", "kind", "failed", "since", "until", "by", "limit"),
        response=ARRAY,
    ),
    Route("GET", "/v1/deployments/{id}", "A deployment and its nodes", _deployment_show),
    Route("POST", "/v1/deployments/{id}/cancel", "Cancel a running deployment", _deployment_cancel),
)
