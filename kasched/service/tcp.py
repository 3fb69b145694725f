"""kaschedd over TCP (``service_tcp``), HTTPS when ``service_tls_cert``/``service_tls_key`` are set.

Nobody's identity comes from the connection here: every request carries a MUNGE credential or a
signed token (:mod:`kasched.service.auth`); without a valid one, the answer is 401. The peer's address
only limits where an admin's MUNGE credential is taken from (``munge_admin_hosts``)."""

from __future__ import annotations

import http.server
import logging
import socket
import ssl
from typing import Any

from kasched.config import Config, is_set, parse_hostport
from kasched.errors import ConfigError
from kasched.identity import Caller
from kasched.service.auth import TcpAuthenticator
from kasched.service.limits import ConnectionLimits, LimitedThreadingMixIn
from kasched.service.server import Pending, RequestHandler, ServiceApp, log_connection_error

log = logging.getLogger("kaschedd")
HANDSHAKE_TIMEOUT = 30.0


def server_tls(config: Config) -> ssl.SSLContext | None:
    """The TLS context of the listener, or None when no certificate is configured."""
    if not is_set(config.service_tls_cert):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        key = config.service_tls_key if is_set(config.service_tls_key) else None
        context.load_cert_chain(config.service_tls_cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"service_tls_cert/service_tls_key: cannot load: {error}") from None
    return context


class BoundPending(Pending):
    """A MUNGE caller: the credential was valid, and its payload must name this very body."""

    def __init__(self, caller: Caller, check: Any) -> None:
        super().__init__(caller)
        self.check = check

    def confirm(self, body: bytes) -> Caller:
        self.check(body)
        return self.caller


class TcpRequestHandler(RequestHandler):
    def identify(self) -> Pending:
        """The Authorization header, checked before the body is read (an unauthenticated client
        never gets to send one); a MUNGE credential's binding to the body is checked after."""
        authorization = self.headers.get("Authorization")
        peer = str(self.client_address[0])
        caller, check = self.server.authenticator.identify(authorization, self.command, self.path, peer)
        return Pending(caller) if check is None else BoundPending(caller, check)

    def caller(self) -> Caller:  # never the connection's: see identify
        raise AssertionError("over TCP the caller comes from the Authorization header")

    def address_string(self) -> str:
        return str(self.client_address[0])


class TcpHttpServer(LimitedThreadingMixIn, http.server.HTTPServer):
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, config: Config, app: ServiceApp) -> None:
        self.app = app
        self.authenticator = TcpAuthenticator(config)
        self.tls = server_tls(config)
        self.plain_refusals = self.tls is None
        self.request_timeout = config.service_request_timeout
        self.limits = ConnectionLimits(config.service_max_connections, config.service_max_connections_per_user)
        host, port = parse_hostport(config.service_tcp)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), TcpRequestHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake (if any), then the request."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(min(HANDSHAKE_TIMEOUT, self.request_timeout))  # the whole handshake, not per read
        try:
            secure = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            log.info("%s: TLS handshake failed: %s", client_address[0], error)
            return
        try:
            super().finish_request(secure, client_address)
        finally:
            secure.close()

    def key_of(self, request: Any, client_address: Any) -> str:
        return str(client_address[0])

    def handle_error(self, request: Any, client_address: Any) -> None:
        log_connection_error(str(client_address[0]))

    @property
    def url(self) -> str:
        address, port = self.server_address[:2]
        host = address.decode() if isinstance(address, bytes) else str(address)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"
