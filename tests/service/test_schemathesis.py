"""Property-based requests generated from kaschedd's own OpenAPI schema: none may get a 5xx.

schemathesis speaks HTTP over TCP, so the same ServiceApp is served here on 127.0.0.1 by
``FixedIdentityTcpServer``, a test stand-in that gives every request a fixed caller (the real service
takes the caller from SO_PEERCRED on its Unix socket, tested in test_service.py)."""

from __future__ import annotations

import http.server
import shutil
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from kasched.compose import open_site
from kasched.config import Config
from kasched.identity import Caller
from kasched.service.openapi import schema as openapi_schema
from kasched.service.routes import ROUTES
from kasched.service.server import RequestHandler, ServiceApp
from tests.conftest import EXAMPLES

SCHEMA = schemathesis.openapi.from_dict(openapi_schema(ROUTES))


class FixedIdentityTcpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Test stand-in: ServiceApp over TCP on loopback, every request made by ``caller``."""

    daemon_threads = True
    request_timeout = 30.0

    def __init__(self, app: ServiceApp, caller: Caller) -> None:
        self.app, self.fixed_caller = app, caller
        handler = type("FixedIdentityHandler", (RequestHandler,), {"caller": lambda h: h.server.fixed_caller})
        super().__init__(("127.0.0.1", 0), handler)


@pytest.fixture(scope="module", params=[Caller("root", True), Caller("kasched-alice", False)], ids=["admin", "user"])
def base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    directory = Path(tempfile.mkdtemp(prefix="kaschedd-fuzz-"))
    config = Config(site="t", state_dir=directory / "state")
    api = open_site(config, Caller("root", True), load_entry_points=False)
    api.import_nodes(EXAMPLES / "cluster.yaml")
    api.grant("kasched-alice", "node-[1-2]", hours=1)
    server = FixedIdentityTcpServer(ServiceApp(api), request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        api.close()
        shutil.rmtree(directory, ignore_errors=True)


@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case: schemathesis.Case, base_url: str) -> None:
    response = case.call(base_url=base_url)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
