"""Writes docs/api.md from kaschedd's OpenAPI schema: ``python -m kasched.service.apidoc > docs/api.md``."""

from __future__ import annotations

import sys
from typing import Any

from kasched.service.openapi import schema
from kasched.service.routes import ROUTES


def markdown(document: dict[str, Any]) -> str:
    lines = [
        "# kaschedd API reference",
        "",
        "Generated from the service's OpenAPI schema (`GET /openapi.json`) by "
        "`python -m kasched.service.apidoc`; a test checks that this file is current.",
        "",
        'Every answer is JSON. An error is `{"error": "one line saying why", "kind": "..."}` with '
        "status 400 (bad input), 401 (over TCP: no valid MUNGE credential or token), 403 (refused: the "
        "message says why), 404 (not found), 409 (conflict), "
        "422 (checksum mismatch), 429 (too many connections of yours open at once), or 503 (database "
        "unavailable or busy past the request's deadline, or too many connections in all).",
        "",
        "A client may send `X-Kasched-Deadline: SECONDS`, the seconds it will wait for the answer: "
        "kaschedd answers within them (it keeps one to send the answer back), its database waits end "
        "before, and nothing is stored once they are over (then 503). The `kasched` command always sends "
        "it. A whole request (headers and body) must arrive within `service_request_timeout`; over TCP, "
        "the `Authorization` header is checked before any body is read.",
        "",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            lines += [f"## `{method.upper()} {path}`", "", operation["summary"], ""]
            query = [p["name"] for p in operation["parameters"] if p["in"] == "query"]
            if query:
                lines += ["Query parameters: " + ", ".join(f"`{name}`" for name in query), ""]
            body = operation.get("requestBody")
            if body:
                body_schema = body["content"]["application/json"]["schema"]
                fields = ", ".join(
                    f"`{name}` ({spec['type']}{', required' if name in body_schema['required'] else ''})"
                    for name, spec in body_schema["properties"].items()
                )
                lines += [f"Body (JSON object): {fields}", ""]
            success = next(code for code in operation["responses"] if code.startswith("2"))
            lines += [f"Success: {success}", ""]
            lines += _answer(operation["responses"][success]["content"]["application/json"]["schema"])
    return "\n".join(lines)


def _answer(answer_schema: dict[str, Any]) -> list[str]:
    """The fields of a JSON object answer, one item each, when its schema lists them."""
    fields = answer_schema.get("properties") or {}
    if not fields:
        return []
    lines = ["Answer (JSON object):", ""]
    for name, spec in fields.items():
        kind = spec["type"] + (" or null" if spec.get("nullable") else "")
        lines.append(f"- `{name}` ({kind})" + (f": {spec['description']}" if spec.get("description") else ""))
    return [*lines, ""]


if __name__ == "__main__":
    sys.stdout.write(markdown(schema(ROUTES)))
