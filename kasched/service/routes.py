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
from kasched.service import access
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
    fields = _fields(body, {"user": str, "nodes": str}, {"hours": float, "job": str})
    hours = 1.0 if fields["hours"] is None else float(fields["hours"])
    return api.grant(fields["user"], fields["nodes"], hours, job_id=fields["job"])


def _rights_revoke(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    if not (params["id"].isascii() and params["id"].isdigit() and len(params["id"]) <= 18):
        raise InputError(f"{params['id']!r} is not a grant id", field="id")
    return api.revoke(int(params["id"]))


def _stats(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    limit = query.get("limit", "1000")
    if not (limit.isascii() and limit.isdigit()):
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
    from kasched.service.live import TRANSFERS

    with api.database.session() as session:
        shown = records.view(session, params["id"])
    access.require_own(api, shown.user, f"deployment {shown.id}")
    return {**to_json(shown), "transfer": TRANSFERS.latest(shown.id)}  # live, not stored


def _deployment_cancel(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from kasched.deploy import records

    with api.database.session() as session:
        records.request_cancel(session, params["id"], api.caller.user, api.caller.is_admin)
    return {"id": params["id"], "cancel_requested": True}


def _deployments_list(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from kasched.deploy import records

    limit = query.get("limit", "50")
    if not (limit.isascii() and limit.isdigit() and 0 < int(limit) <= 10_000):
        raise InputError(f"{limit!r} is not a whole number from 1 to 10000", field="limit")
    owner = None if api.caller.is_admin else api.caller.user
    with api.database.session() as session:
        return records.recent(session, owner, running=_flag(query, "running"), limit=int(limit))


def route_console(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return access.console_read(api, params["name"], query.get("offset"), query.get("lines"))


def route_token_issue(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    fields = _fields(body, {"user": str}, {"hours": float})
    return access.token_issue(api, fields["user"], 24.0 if fields["hours"] is None else float(fields["hours"]))


def route_token_revoke(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return access.token_revoke(api, params["id"])


_KIND_WORDS = {str: "a string", float: "a number", int: "a whole number", bool: "true or false", list: "a list"}


def _fields(body: Any, required: dict[str, type], optional: dict[str, type] | None = None) -> dict[str, Any]:
    """The body's fields, checked: every required one present, every one of its type, no other."""
    if not isinstance(body, dict):
        raise InputError("expected a JSON object", field="body")
    known = {**required, **(optional or {})}
    unknown = set(body) - set(known)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(sorted(unknown))}", field="body")
    for name, kind in known.items():
        if name not in body or body[name] is None:
            if name in required:
                raise InputError("required", field=name)
            continue
        value = body[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InputError(f"expected {_KIND_WORDS[kind]}", field=name)
    return {name: body.get(name) for name in known}


def _nodes_import(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    fields = _fields(body, {"path": str, "text": str})
    return api.import_nodes(fields["path"], text=fields["text"])


def _nodes_remove(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return {"removed": api.remove_nodes(_fields(body, {"nodes": str})["nodes"])}


def _nodes_state(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    fields = _fields(body, {"nodes": str, "state": str})
    return {"nodes": api.set_node_state(fields["nodes"], fields["state"]), "state": fields["state"]}


def _env_add(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    fields = _fields(body, {"path": str, "text": str}, {"owner": str})
    if not fields["path"].startswith("/"):
        raise InputError("must be the absolute path of the description file", field="path")
    return api.add_environment(fields["path"], fields["owner"], text=fields["text"], checked_reads=True)


def _env_check(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    return api.check_environment(params["reference"])


def _job_start(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from kasched.messages import JobInfo

    fields = _fields(
        body,
        {"scheduler": str, "cluster": str, "job_id": str, "user": str, "nodes": list},
        {"environment": str, "walltime": float},
    )
    if not all(isinstance(node, str) for node in fields["nodes"]):
        raise InputError("expected a list of node names", field="nodes")
    return api.record_job_start(
        JobInfo(
            fields["scheduler"],
            fields["cluster"],
            fields["job_id"],
            fields["user"],
            tuple(fields["nodes"]),
            fields["environment"],
            fields["walltime"],
        )
    )


def _job_end(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from kasched.messages import JobEnd

    fields = _fields(body, {"scheduler": str, "cluster": str, "job_id": str}, {"reason": str})
    return api.record_job_end(
        JobEnd(fields["scheduler"], fields["cluster"], fields["job_id"], fields["reason"] or "job ended")
    )


def _deployment_start(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    """Checks everything and takes the nodes now; the work goes on in the service (poll the id)."""
    import threading

    from kasched.deploy.operations import Operations
    from kasched.drivers.reboot import RebootLevel
    from kasched.service.live import LiveProgress

    fields = _fields(
        body,
        {"kind": str, "nodes": str},
        {"environment": str, "key": str, "stateless": bool, "level": str, "to": str, "fanout": int},
    )
    api.node_names(fields["nodes"])  # a range naming more nodes than the inventory: refused unexpanded
    live = LiveProgress()
    operations = Operations(api, progress=live, fanout=fields["fanout"] or 0)
    kind = fields["kind"]
    if kind == "deploy":
        if not fields["environment"]:
            raise InputError("required for a deployment", field="environment")
        pending = operations.prepare_deploy(
            fields["environment"], fields["nodes"], fields["key"], stateless=bool(fields["stateless"])
        )
    elif kind == "revert":
        pending = operations.prepare_revert(fields["nodes"])
    elif kind == "reboot":
        level = fields["level"] or "soft"
        if level not in {lv.value for lv in RebootLevel}:
            raise InputError(f"{level!r} is not one of soft, hard, very_hard", field="level")
        pending = operations.prepare_reboot(fields["nodes"], RebootLevel(level), fields["to"] or "reference")
    else:
        raise InputError(f"{kind!r} is not one of deploy, revert, reboot", field="kind")
    threading.Thread(target=live.run, args=(pending,), name=f"kasched-{pending.deployment_id}", daemon=True).start()
    return {"id": pending.deployment_id, "kind": kind, "nodes": pending.names}


def _power(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from kasched.deploy.operations import Operations

    fields = _fields(body, {"action": str, "nodes": str})
    api.node_names(fields["nodes"])
    results = Operations(api).power(fields["nodes"], fields["action"])
    return [result.as_dict() for result in results.values()]


def _reconcile_reach(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from kasched.reconcile import reach

    return [{"what": c.what, "ok": c.ok, "detail": c.detail} for c in reach(api)]


def _health(api: Kasched, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
    from sqlalchemy import text

    from kasched import __version__

    with api.database.session() as session:
        session.execute(text("SELECT 1"))
    return {"status": "ok", "version": __version__, "user": api.caller.user, "admin": api.caller.is_admin}


ARRAY = {"type": "array", "items": {"type": "object"}}


def _object(properties: dict[str, str], required: list[str] | None = None) -> dict[str, Any]:
    schema_properties: dict[str, Any] = {}
    for name, kind in properties.items():
        schema_properties[name] = {"type": kind, "items": {"type": "string"}} if kind == "array" else {"type": kind}
    return {
        "type": "object",
        "properties": schema_properties,
        "required": required or list(properties),
        "additionalProperties": False,
    }


DEPLOYMENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "kind": {"type": "string", "description": "deploy, revert or reboot"},
        "user": {"type": "string"},
        "environment": {"type": "string", "nullable": True},
        "created_at": {"type": "string"},
        "ended_at": {"type": "string", "nullable": True},
        "state": {"type": "string", "description": "running, done, partial, failed, cancelled or interrupted"},
        "nodes": {"type": "object", "description": "per node: its last step, ok (null while running), error, duration"},
        "steps": {
            "type": "array",
            "items": {"type": "object"},
            "description": "the history, every attempt in order: node, step (step/variant), ok, error, duration, "
            "final (false: the attempt failed and the node had another retry or variant left, so the node did "
            "not fail there; missing in older answers: true)",
        },
        "transfer": {
            "type": "object",
            "nullable": True,
            "description": "while the image streams (not stored): step, sent (bytes), elapsed (seconds), done, "
            "rate (bytes per second); null otherwise",
        },
    },
}

ROUTES = (
    Route("GET", "/v1/health", "Service health, and who you are", _health),
    Route(
        "GET",
        "/v1/reconcile/reach",
        "Whether kaschedd can list each scheduler's jobs (admins)",
        _reconcile_reach,
        response=ARRAY,
    ),
    Route("GET", "/v1/nodes", "List nodes", _nodes_list, query=("nodes", "state"), response=ARRAY),
    Route("GET", "/v1/nodes/{name}", "Show a node", _node_show),
    Route(
        "POST",
        "/v1/nodes/import",
        "Create or update nodes from an inventory (admins)",
        _nodes_import,
        body=_object({"path": "string", "text": "string"}, ["path", "text"]),
    ),
    Route("POST", "/v1/nodes/remove", "Remove nodes (admins)", _nodes_remove, body=_object({"nodes": "string"})),
    Route(
        "POST",
        "/v1/nodes/state",
        "Set the state of nodes (admins)",
        _nodes_state,
        body=_object({"nodes": "string", "state": "string"}),
    ),
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
        "POST",
        "/v1/environments",
        "Add an environment from its description",
        _env_add,
        status=201,
        body=_object({"path": "string", "text": "string", "owner": "string"}, ["path", "text"]),
    ),
    Route("GET", "/v1/environments/{reference}/check", "Re-check an environment's image checksum", _env_check),
    Route(
        "POST",
        "/v1/jobs/start",
        "A deploy job started: grant its nodes (scheduler hooks)",
        _job_start,
        body=_object(
            {
                "scheduler": "string",
                "cluster": "string",
                "job_id": "string",
                "user": "string",
                "nodes": "array",
                "environment": "string",
                "walltime": "number",
            },
            ["scheduler", "cluster", "job_id", "user", "nodes"],
        ),
    ),
    Route(
        "POST",
        "/v1/jobs/end",
        "A job ended: revoke its grant (scheduler hooks)",
        _job_end,
        body=_object(
            {"scheduler": "string", "cluster": "string", "job_id": "string", "reason": "string"},
            ["scheduler", "cluster", "job_id"],
        ),
    ),
    Route(
        "POST",
        "/v1/deployments",
        "Start a deploy, revert or reboot; returns its id at once",
        _deployment_start,
        status=202,
        body=_object(
            {
                "kind": "string",
                "nodes": "string",
                "environment": "string",
                "key": "string",
                "stateless": "boolean",
                "level": "string",
                "to": "string",
                "fanout": "integer",
            },
            ["kind", "nodes"],
        ),
    ),
    Route(
        "POST",
        "/v1/power",
        "Power nodes on or off, or read their state",
        _power,
        response=ARRAY,
        body=_object({"action": "string", "nodes": "string"}),
    ),
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
        "History of operations (an ordinary user's own; admins anyone's)",
        _stats,
        query=("user", "nodes", "environment", "kind", "failed", "since", "until", "by", "limit"),
        response=ARRAY,
    ),
    Route(
        "GET",
        "/v1/deployments",
        "Running and recent operations, newest first (your own; admins anyone's), without their step history",
        _deployments_list,
        query=("running", "limit"),
        response={"type": "array", "items": DEPLOYMENT},
    ),
    Route(
        "GET",
        "/v1/deployments/{id}",
        "A deployment, its nodes, its step history and its live broadcast progress",
        _deployment_show,
        response=DEPLOYMENT,
    ),
    Route("POST", "/v1/deployments/{id}/cancel", "Cancel a running deployment", _deployment_cancel),
    Route(
        "GET",
        "/v1/nodes/{name}/console",
        "A node's console: its last lines, or what follows a byte offset (your granted nodes, from where the "
        "console stood when your grant began; admins any, all of it)",
        route_console,
        query=("lines", "offset"),
    ),
    Route(
        "POST",
        "/v1/tokens",
        "Issue a signed token for a user, to use over TCP (admins)",
        route_token_issue,
        status=201,
        body={
            "type": "object",
            "required": ["user"],
            "properties": {"user": {"type": "string"}, "hours": {"type": "number"}},
        },
    ),
    Route("DELETE", "/v1/tokens/{id}", "Revoke a signed token (admins)", route_token_revoke),
)
