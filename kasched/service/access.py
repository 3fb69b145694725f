"""Calls of the front beyond the typed API: a node's console (for whoever holds a grant on it, or an
admin) and signed tokens (admins issue and revoke them). The local front
(:class:`kasched.local.LocalKasched`) and the REST routes call them; they import neither."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kasched.builtin.console_marks import read_mark
from kasched.config import is_set
from kasched.drivers.console import LogFileConsole
from kasched.errors import InputError, NotFoundError, PermissionDenied
from kasched.service import auth

if TYPE_CHECKING:
    from kasched.api import Kasched


def _whole(value: str | None, name: str, default: int | None) -> int | None:
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 15:
        raise InputError(f"{value!r} is not a whole number", field=name)
    return int(value)


def console_read(api: Kasched, name: str, offset: str | None = None, lines: str | None = None) -> dict[str, Any]:
    """The console of node ``name`` as ``{"node", "text", "offset"}``: its last ``lines`` lines, or
    what follows byte ``offset``. Only for a caller whose grant covers the node, or an admin; and a
    caller with a grant sees only what was written since the grant began (ConsoleMarks)."""
    start, count = _whole(offset, "offset", None), _whole(lines, "lines", 40)
    node = api.show_node(name)  # NotFoundError for an unknown node
    decision = api.check([node.name])
    if not decision.allowed:
        raise PermissionDenied(f"{api.caller.user} may not see the console of {node.name}: {decision.reason()}")
    directory = api.config.console_logs
    console = LogFileConsole(directory)
    if not is_set(directory) or not console.available(node.name):
        where = f"no {console.path(node.name)}" if is_set(directory) else "console_logs is not set"
        raise NotFoundError(
            f"{node.name}: no console kaschedd can serve ({where}; serial-over-LAN is `ipmitool sol activate` "
            "on the BMC, not through kaschedd yet)"
        )
    job = decision.grants.get(node.name, "admin")
    if job == "admin":
        text, next_offset = console.read(node.name, start, min(count or 0, 10_000))
    else:
        text, next_offset = _read_since(console.path(node.name), _floor(api, node.name, job), start, count or 0)
    return {"node": node.name, "text": text, "offset": next_offset}


def _floor(api: Kasched, node: str, job: str) -> int | None:
    """Where the console stood when the grant of ``job`` began; None when unknown (then only what is
    written from now on is served: never what the node printed for someone else)."""
    mark = read_mark(api.config, node)
    if mark is None or mark.get("job") != job or not isinstance(mark.get("offset"), int):
        return None
    return int(mark["offset"])


def _read_since(path: Path, floor: int | None, offset: int | None, lines: int) -> tuple[str, int]:
    """Like LogFileConsole.read, never before ``floor``. A file now shorter than the floor was started
    anew since the grant began: all of it is the grant's."""
    try:
        with open(path, "rb") as log:
            size = log.seek(0, os.SEEK_END)
            low = size if floor is None else (floor if floor <= size else 0)
            if offset is not None:
                log.seek(max(low, offset if offset <= size else 0))
                data = log.read(LogFileConsole.CHUNK)
                return data.decode(errors="replace"), log.tell()
            log.seek(max(low, size - 4 * LogFileConsole.CHUNK))
            tail = log.read().decode(errors="replace").splitlines()[-min(lines, 10_000) :] if lines else []
            return "".join(f"{line}\n" for line in tail), size
    except OSError as error:
        raise NotFoundError(f"console log {path}: {error.strerror}") from None


def _require_admin(api: Kasched, action: str) -> None:
    if not api.caller.is_admin:
        raise PermissionDenied(
            f"only admins may {action} (you are {api.caller.user}; admins are root "
            f"and the members of group {api.config.admin_group})"
        )


def require_own(api: Kasched, owner: str, what: str) -> None:
    """Refuse unless the caller is ``owner`` or an admin."""
    if owner != api.caller.user and not api.caller.is_admin:
        raise PermissionDenied(f"{what} belongs to {owner}")


def token_issue(api: Kasched, user: str, hours: float) -> dict[str, Any]:
    """A signed token for ``user`` (admins); the site's secret is created on first use (mode 600)."""
    _require_admin(api, "issue tokens")
    secret = auth.load_secret(api.config.token_secret, create=True)
    token, claims = auth.issue_token(secret, user, hours)
    return {"token": token, "user": claims.user, "expires": claims.expires, "id": claims.id}


def token_revoke(api: Kasched, token_id: str) -> dict[str, Any]:
    _require_admin(api, "revoke tokens")
    auth.revoke(api.config, token_id)
    return {"id": token_id, "revoked": True}
