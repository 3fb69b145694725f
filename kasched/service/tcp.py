"""kaschedd over TCP (``service_tcp``), HTTPS when ``service_tls_cert``/``service_tls_key`` are set.

Nobody's identity comes from the connection here: every request carries a MUNGE credential or a
signed token (:mod:`kasched.service.auth`); without a valid one, the answer is 401."""

from __future__ import annotations

import http.server
import logging
import socket
import socketserver
import ssl
from typing import Any

from kasched.config import Config, is_set, parse_hostport
from kasched.errors import ConfigError
from kasched.identity import Caller
from kasched.service.auth import TcpAuthenticator
from kasched.service.server import RequestHandler, ServiceApp

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


class TcpRequestHandler(RequestHandler):
    timeout = 120  # an idle or stalled connection does not hold a thread for ever

    def caller_for(self, body: bytes) -> Caller:
        authorization = self.headers.get("Authorization")
        return self.server.authenticator.caller(authorization, self.command, self.path, body)

    def caller(self) -> Caller:  # never the connection's: see caller_for
        raise AssertionError("over TCP the caller comes from the Authorization header")

    def address_string(self) -> str:
        return str(self.client_address[0])


class TcpHttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, config: Config, app: ServiceApp) -> None:
        self.app = app
        self.authenticator = TcpAuthenticator(config)
        self.tls = server_tls(config)
        host, port = parse_hostport(config.service_tcp)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), TcpRequestHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake (if any), then the request."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            secure = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            log.info("%s: TLS handshake failed: %s", client_address[0], error)
            return
        try:
            super().finish_request(secure, client_address)
        finally:
            secure.close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"
