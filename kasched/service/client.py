"""A client of kaschedd (standard library only): over its Unix socket, where the kernel tells the
service who we are, or over TCP (``service_url`` or ``$KASCHED_URL``), where every request carries a
MUNGE credential or a signed token (``$KASCHED_TOKEN``, or the file ``~/.config/kasched/token``)."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import ssl
import stat
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

from kasched import deadline
from kasched.config import Config, is_set, parse_url
from kasched.errors import AuthenticationError, DatabaseError, KaschedError
from kasched.service import auth


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class ClientAuth(Protocol):
    def headers(self, method: str, target: str, body: bytes) -> dict[str, str]: ...


class MungeAuth:
    """Each request gets a fresh MUNGE credential bound to it (one use, ``auth.MUNGE_TTL`` seconds)."""

    def __init__(self, site: str, socket_path: Path = Path()) -> None:
        self.site, self.socket_path = site, socket_path

    def headers(self, method: str, target: str, body: bytes) -> dict[str, str]:
        payload = auth.request_binding(self.site, method, target, body)
        return {"Authorization": f"MUNGE {auth.munge_encode(payload, self.socket_path)}"}


class TokenAuth:
    def __init__(self, token: str) -> None:
        self.token = token

    def headers(self, method: str, target: str, body: bytes) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class ServiceClient:
    """``ServiceClient(socket_path)``, or ``ServiceClient(url=..., auth=..., ca_file=...)`` for TCP."""

    def __init__(
        self,
        path: Path | None = None,
        timeout: float = 60.0,
        *,
        url: str = "",
        auth: ClientAuth | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.timeout = timeout
        self.url, self.auth, self.ca_file = url, auth, ca_file
        self.where = url or str(path)
        if url and isinstance(auth, TokenAuth):
            scheme, host, _ = parse_url(url)
            if scheme == "http" and not is_loopback(host):
                raise AuthenticationError(
                    f"refusing to send a token over plain http to {host}: anyone on the way could reuse it "
                    "(use https, see service_tls_cert; plain http is for loopback only)"
                )

    def _wait(self) -> float:
        """Seconds this request may take: until ``$KASCHED_DEADLINE`` (a hook's), else ``timeout``."""
        left = deadline.from_environ()
        if left is None:
            return self.timeout
        if left <= deadline.CLIENT_MARGIN:
            raise DatabaseError(f"kaschedd at {self.where}: no time left before the caller's deadline ({deadline.ENV})")
        return left

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if not self.url:
            assert self.path is not None
            return _UnixConnection(self.path, timeout)
        scheme, host, port = parse_url(self.url)
        if scheme == "http":
            return http.client.HTTPConnection(host, port, timeout=timeout)
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)

    def request(self, method: str, url: str, query: dict[str, Any] | None = None, body: Any = None) -> tuple[int, Any]:
        """The status and the decoded JSON answer; no exception for a 4xx (the caller decides)."""
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if self.auth is not None:
            headers.update(self.auth.headers(method, url, payload or b""))
        wait = self._wait()  # kaschedd answers within what we send, so before we give up
        headers[deadline.HEADER] = f"{wait - deadline.CLIENT_MARGIN:.3f}"
        connection = self._connection(wait)
        try:
            connection.request(method, url, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        except ssl.SSLCertVerificationError as error:
            raise AuthenticationError(
                f"kaschedd at {self.where}: its certificate is not trusted (certificate verify failed: "
                f"{error.verify_message}; check service_tls_ca)"
            ) from None
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
            raise DatabaseError(f"kaschedd at {self.where}: {error}") from None
        finally:
            connection.close()

    def call(self, method: str, url: str, query: dict[str, Any] | None = None, body: Any = None) -> Any:
        """Like :meth:`request`, but a 4xx/5xx becomes a KaschedError with the service's message."""
        status, data = self.request(method, url, query, body)
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else str(data)
            raise KaschedError(f"kaschedd refused ({status}): {message}")
        return data


def service_url(config: Config) -> str:
    """Where the CLI finds kaschedd over TCP (``$KASCHED_URL``, else ``service_url``), or ''."""
    return os.environ.get("KASCHED_URL") or config.service_url


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (127.0.0.0/8, ::1, localhost): traffic never leaves it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_auth(config: Config) -> ClientAuth:
    """A signed token if the user has one (``$KASCHED_TOKEN``, ``~/.config/kasched/token``), else MUNGE."""
    token = os.environ.get("KASCHED_TOKEN", "").strip()
    token_file = Path(os.environ.get("HOME", "/nonexistent")) / ".config" / "kasched" / "token"
    if not token and token_file.is_file():
        token = read_token_file(token_file)
    return TokenAuth(token) if token else MungeAuth(config.site, config.munge_socket)


def read_token_file(path: Path) -> str:
    """The token in ``path``, a file of this user that nobody else may read (else refused: it was
    seen, and is as good as anyone's)."""
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as source:
            status = os.fstat(source.fileno())
            if status.st_uid != os.getuid() or status.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise AuthenticationError(
                    f"{path}: readable by others or not yours (mode {stat.S_IMODE(status.st_mode):o}): the token "
                    "may have been copied; ask for a new one, and keep it mode 600"
                )
            return source.read(64 * 1024).decode(errors="replace").strip()
    except OSError as error:
        raise AuthenticationError(f"{path}: {error.strerror}") from None


def client_for(config: Config) -> ServiceClient:
    """The client the CLI uses: TCP when a URL is configured, else the Unix socket."""
    url = service_url(config)
    if not url:
        return ServiceClient(config.service_socket)
    parse_url(url)  # a ConfigError for a bad $KASCHED_URL
    ca_file = config.service_tls_ca if is_set(config.service_tls_ca) else None
    return ServiceClient(url=url, auth=client_auth(config), ca_file=ca_file)
