"""The OpenAPI 3 schema of kaschedd, generated from the route table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from kasched import __version__

ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "kind": {"type": "string"}},
    "required": ["error"],
}


def schema(routes: Sequence[Any]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', route.path.lower()).strip('_')}",
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in re.findall(r"\{(\w+)\}", route.path)
            ]
            + [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}} for name in route.query],
            "responses": {
                str(route.status): {
                    "description": "success",
                    "content": {"application/json": {"schema": route.response}},
                },
                **{
                    str(code): {"description": text, "content": {"application/json": {"schema": ERROR}}}
                    for code, text in (
                        (400, "bad request"),
                        (401, "over TCP: no, bad, expired or replayed credential"),
                        (403, "refused: the message says why"),
                        (404, "not found"),
                        (409, "conflict"),
                    )
                },
            },
        }
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.body}}}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {"openapi": "3.0.3", "info": {"title": "kaschedd", "version": __version__}, "paths": paths}
