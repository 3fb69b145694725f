"""A client of kaschedd over its Unix socket (standard library only)."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from kasched.errors import DatabaseError, KaschedError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class ServiceClient:
    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def request(self, method: str, url: str, query: dict[str, Any] | None = None, body: Any = None) -> tuple[int, Any]:
        """The status and the decoded JSON answer; no exception for a 4xx (the caller decides)."""
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        connection = _UnixConnection(self.path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, url, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
            raise DatabaseError(f"kaschedd at {self.path}: {error}") from None
        finally:
            connection.close()

    def call(self, method: str, url: str, query: dict[str, Any] | None = None, body: Any = None) -> Any:
        """Like :meth:`request`, but a 4xx/5xx becomes a KaschedError with the service's message."""
        status, data = self.request(method, url, query, body)
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else str(data)
            raise KaschedError(f"kaschedd refused ({status}): {message}")
        return data
