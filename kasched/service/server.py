"""kaschedd's HTTP server on a Unix socket. The caller's identity comes from the kernel
(``SO_PEERCRED``): no password, and no way to claim to be someone else."""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import socket
import socketserver
import struct
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from kasched import deadline
from kasched.api import Kasched
from kasched.errors import (
    AuthenticationError,
    ConflictError,
    DatabaseError,
    InputError,
    IntegrityError,
    KaschedError,
    NotFoundError,
    PermissionDenied,
)
from kasched.identity import Caller
from kasched.service.limits import ConnectionLimits, DeadlineSocket, LimitedThreadingMixIn
from kasched.service.openapi import schema
from kasched.service.routes import ROUTES, Route, to_json
from kasched.text import printable

log = logging.getLogger("kaschedd")
MAX_BODY = 1 << 20
LINGER = 2.0  # seconds a refused request's unread body is waited for (and dropped) before closing
STATUS = {
    InputError: 400,
    AuthenticationError: 401,
    PermissionDenied: 403,
    NotFoundError: 404,
    ConflictError: 409,
    IntegrityError: 422,
    DatabaseError: 503,
}


class Reply:
    def __init__(self, status: int, data: Any) -> None:
        self.status, self.data = status, data


class ServiceApp:
    """Routes a request to the API as its caller; every error becomes a 4xx (or 503) with a message."""

    def __init__(self, api: Kasched) -> None:
        self.api = api

    def handle(self, method: str, target: str, body: bytes, caller: Caller) -> Reply:
        parts = urlsplit(target)
        if parts.path == "/openapi.json" and method == "GET":
            return Reply(200, schema(ROUTES))
        route, params = self._match(method, parts.path)
        if route is None:
            return Reply(405 if params else 404, {"error": f"no route {method} {parts.path}"})
        try:
            query = dict(parse_qsl(parts.query, keep_blank_values=True))
            unknown = set(query) - set(route.query)
            if unknown:
                raise InputError(f"unknown query parameter(s) {', '.join(sorted(unknown))}", field="query")
            payload = self._body(body) if route.body is not None else None
            result = route.handler(self.api.as_caller(caller), params, query, payload)
            return Reply(route.status, to_json(result))
        except KaschedError as error:
            status = next((code for kind, code in STATUS.items() if isinstance(error, kind)), 400)
            return Reply(status, {"error": str(error), "kind": type(error).__name__})
        except Exception as error:  # never a traceback to the client; the log keeps it
            log.exception("internal error on %s %s", method, parts.path)
            return Reply(500, {"error": f"internal error: {type(error).__name__}"})

    @staticmethod
    def _match(method: str, path: str) -> tuple[Route | None, dict[str, str]]:
        other_method: dict[str, str] = {}
        for route in ROUTES:
            match = route.pattern.match(path)
            if match and route.method == method:
                return route, {key: unquote(value) for key, value in match.groupdict().items()}
            if match:
                other_method = {"allowed": route.method}
        return None, other_method

    @staticmethod
    def _body(body: bytes) -> Any:
        if not body:
            raise InputError("a JSON body is required", field="body")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"not JSON: {error}", field="body") from None
        except RecursionError:
            raise InputError("not JSON kaschedd accepts: nested too deeply", field="body") from None


def peer_uid(connection: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel knows it."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


class Pending:
    """A caller known from the request's headers; :meth:`confirm` checks what needs the body too."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller

    def confirm(self, body: bytes) -> Caller:
        return self.caller


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection: its requests are read within ``service_request_timeout`` each (in all, not per
    read), the caller is known from the headers before any body is read, and the request runs within
    the deadline the client sent (X-Kasched-Deadline)."""

    protocol_version = "HTTP/1.1"
    server: Any
    clock: DeadlineSocket

    def setup(self) -> None:
        self.connection = self.request
        self.clock = DeadlineSocket(self.connection, self.server.request_timeout)
        self.rfile = io.BufferedReader(socket.SocketIO(self.clock, "rb"))  # type: ignore[arg-type]
        self.wfile = socketserver._SocketWriter(self.clock)  # type: ignore[attr-defined]

    def handle_one_request(self) -> None:
        self.clock.restart(self.server.request_timeout)
        try:
            super().handle_one_request()
        except TimeoutError as error:  # while answering: the client reads too slowly
            self.log_message("%s: %s", self._what(), error)
            self.close_connection = True
        except OSError as error:  # the client hung up (reset, broken pipe...): one line, no traceback
            self.log_message("connection ended during %s: %s", self._what(), error.strerror or error)
            self.close_connection = True

    def _what(self) -> str:
        return f"{self.command} {urlsplit(self.path).path}" if getattr(self, "command", None) else "the request"

    def _serve(self) -> None:
        length = self.headers.get("Content-Length", "0")
        digits = length.isascii() and length.isdigit()
        if not digits or int(length) > MAX_BODY:
            self.close_connection = True  # the body, if any, is not read
            self._send(Reply(413 if digits else 400, {"error": "bad or too large Content-Length"}))
            self._linger(min(int(length), MAX_BODY) if digits else 0)
            return
        try:
            pending = self.identify()
            seconds = self._deadline()
        except KaschedError as error:
            self.close_connection = True
            self._refuse(error)
            self._linger(int(length))
            return
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            self.log_message("client hung up during %s, %d of %s body bytes sent", self._what(), len(body), length)
            self.close_connection = True
            return
        try:
            caller = pending.confirm(body)
        except AuthenticationError as error:
            self._refuse(error)
            return
        with deadline.within(seconds):
            reply = self.server.app.handle(self.command, self.path, body, caller)
        self._send(reply)

    def _linger(self, length: int) -> None:
        """After answering without reading the body: drop what the client still sends, for LINGER
        seconds at most, so that closing with unread data (a TCP reset) does not destroy the answer on
        its way. Dropped a chunk at a time: nothing of it is kept."""
        self.clock.restart(LINGER)
        try:
            while length > 0:
                chunk = self.rfile.read1(min(length, 1 << 16))
                if not chunk:
                    return
                length -= len(chunk)
        except OSError:
            return

    def _deadline(self) -> float | None:
        """Seconds the request may run: those the client waits (X-Kasched-Deadline) but ANSWER_MARGIN."""
        value = self.headers.get(deadline.HEADER)
        if value is None:
            return None
        return deadline.parse_header(value) - deadline.ANSWER_MARGIN

    def _refuse(self, error: KaschedError) -> None:
        if isinstance(error, AuthenticationError):
            reply = Reply(401, {"error": str(error), "kind": "AuthenticationError"})
            self._send(reply, headers={"WWW-Authenticate": 'MUNGE, Bearer realm="kaschedd"'})
        else:
            self._send(Reply(400, {"error": str(error), "kind": type(error).__name__}))

    def identify(self) -> Pending:
        """Who sent this request, from its headers (before its body is read); the TCP handler checks its
        Authorization header."""
        return Pending(self.caller())

    def caller(self) -> Caller:
        """Who is asking: the uid of the peer process, from the kernel."""
        return Caller.from_uid(peer_uid(self.connection), self.server.app.api.config.admin_group)

    def __getattr__(self, name: str) -> Any:
        # Any method (GET, POST, ... or one nobody uses) goes to the router, which answers 404 or 405.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def do_HEAD(self) -> None:
        self._send(Reply(405, {"error": "HEAD is not supported"}), body=False)

    def _send(self, reply: Reply, body: bool = True, headers: dict[str, str] | None = None) -> None:
        self.clock.restart(self.server.request_timeout)  # the client has that long to read the answer
        data = json.dumps(reply.data, sort_keys=True).encode()
        self.send_response(reply.status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_error(self, format: str, *args: Any) -> None:
        if args and isinstance(args[-1], TimeoutError):  # the standard library's "Request timed out: %r"
            self.log_message("%s", args[-1])
            return
        self.log_message(format, *args)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), printable(format % args))

    def address_string(self) -> str:
        return "unix"


def log_connection_error(who: str) -> None:
    """socketserver's handle_error, as one log line for a connection that failed (a traceback for a bug)."""
    error = sys.exc_info()[1]
    if isinstance(error, OSError):
        log.info("%s connection ended: %s", who, printable(str(error.strerror or error)))
    else:
        log.exception("%s: internal error on a connection", who)


class UnixHttpServer(LimitedThreadingMixIn, socketserver.UnixStreamServer):
    request_queue_size = 1024  # many clients connect at once (prologs of a big job, a busy login node)
    allow_reuse_address = True

    def __init__(self, path: Path, app: ServiceApp) -> None:
        self.app = app
        config = app.api.config
        self.request_timeout = config.service_request_timeout
        self.limits = ConnectionLimits(config.service_max_connections, config.service_max_connections_per_user)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_socket():
            path.unlink()
        super().__init__(str(path), RequestHandler)
        os.chmod(path, 0o666)  # anyone may connect; the kernel tells who they are

    def key_of(self, request: Any, client_address: Any) -> int:
        return peer_uid(request)

    def who(self, key: Any) -> str:
        return f"unix uid {key}"

    def exempt(self, key: Any) -> bool:
        """Admins (the scheduler hooks among them) are not held to the per-user cap."""
        return Caller.from_uid(int(key), self.app.api.config.admin_group).is_admin

    def handle_error(self, request: Any, client_address: Any) -> None:
        log_connection_error("unix")
