"""kaschedd over its Unix socket: identity from the kernel, refusals as 4xx with a reason, OpenAPI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kasched.config import Config
from kasched.service.client import ServiceClient
from kasched.service.routes import ROUTES
from tests.conftest import EXAMPLES, ROOT
from tests.test_cli import unix_user

CLIENT = """
import json, sys
from kasched.service.client import ServiceClient
method, url, body = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
print(json.dumps(ServiceClient(sys.argv[1]).request(method, url, body=body)))
"""


def as_user(user: str, config: Config, method: str, url: str, body: object = None) -> tuple[int, object]:
    entry = unix_user(user)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            CLIENT,
            str(config.service_socket),
            method,
            url,
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    status, data = json.loads(done.stdout)
    return status, data


def test_identity_comes_from_the_kernel(service: tuple[Config, ServiceClient]) -> None:
    config, root = service
    assert root.call("GET", "/v1/health")["admin"] is True
    status, health = as_user("kasched-alice", config, "GET", "/v1/health")
    assert status == 200 and (health["user"], health["admin"]) == ("kasched-alice", False)


def test_users_are_refused_with_a_reason(service: tuple[Config, ServiceClient]) -> None:
    config, root = service
    status, data = as_user("kasched-alice", config, "POST", "/v1/rights", {"user": "kasched-alice", "nodes": "node-1"})
    assert status == 403 and "only admins may grant nodes by hand (you are kasched-alice" in data["error"]
    grant = root.call("POST", "/v1/rights", body={"user": "kasched-bob", "nodes": "node-[1-2]", "hours": 1})
    assert grant["user"] == "kasched-bob" and grant["nodes"] == ["node-1", "node-2"]
    status, check = as_user("kasched-alice", config, "GET", "/v1/rights/check?nodes=node-1")
    assert status == 200 and check["allowed"] is False
    assert check["refused"]["node-1"].startswith("granted to kasched-bob")
    status, check = as_user("kasched-bob", config, "GET", "/v1/rights/check?nodes=node-%5B1-2%5D")
    assert check["allowed"] is True
    status, data = as_user("kasched-alice", config, "DELETE", f"/v1/rights/{grant['id']}")
    assert status == 403
    assert root.call("DELETE", f"/v1/rights/{grant['id']}")["revoked_at"] is not None


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "text"),
    [
        ("GET", "/v1/nope", None, 404, "no route"),
        ("PUT", "/v1/nodes", None, 405, "no route"),
        ("GET", "/v1/nodes/ghost", None, 404, "unknown node ghost"),
        ("GET", "/v1/nodes?colour=red", None, 400, "unknown query parameter(s) colour"),
        ("GET", "/v1/nodes?nodes=node-%5B1-", None, 400, "bad node range"),
        ("GET", "/v1/rights?all=maybe", None, 400, "'maybe' is not true or false"),
        ("GET", "/v1/rights/check", None, 400, "nodes: required"),
        ("POST", "/v1/rights", None, 400, "a JSON body is required"),
        ("POST", "/v1/rights", ["x"], 400, "expected a JSON object"),
        ("POST", "/v1/rights", {"user": "a", "nodes": "ghost"}, 404, "unknown node(s) ghost"),
        ("POST", "/v1/rights", {"user": "a", "nodes": "node-1", "hours": "two"}, 400, "hours: expected a number"),
        ("DELETE", "/v1/rights/abc", None, 400, "is not a grant id"),
        ("DELETE", "/v1/rights/%C2%B9", None, 400, "is not a grant id"),
        ("GET", "/v1/environments/tiny:%C2%B9", None, 400, "is not a whole number"),
        ("GET", "/v1/stats?limit=%C2%B9", None, 400, "is not a whole number"),
        ("GET", "/v1/stats?since=yesterday", None, 400, "is neither a date"),
        ("GET", "/v1/stats?by=colour", None, 400, "is not one of"),
        ("GET", "/v1/deployments/none", None, 404, "no deployment none"),
        ("GET", "/v1/environments/..%2F..%2Fetc", None, 400, "not a valid environment name"),
    ],
)
def test_malformed_requests_get_4xx_with_a_message(
    service: tuple[Config, ServiceClient], method: str, url: str, body: object, status: int, text: str
) -> None:
    _, root = service
    got, data = root.request(method, url, body=body)
    assert got == status, data
    assert text in data["error"]


def test_openapi_schema_lists_every_route(service: tuple[Config, ServiceClient]) -> None:
    _, root = service
    document = root.call("GET", "/openapi.json")
    assert document["openapi"].startswith("3.")
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        assert operation["summary"] and "403" in operation["responses"]


def test_kaschedd_reconciles_on_its_own(tmp_path: Path) -> None:
    """With reconcile_interval set, kaschedd revokes a grant past its end (and the walltime grace) that no
    epilog revoked."""
    import threading

    from kasched.compose import open_site
    from kasched.identity import Caller
    from kasched.messages import JobInfo
    from kasched.service.main import serve

    config = Config(site="t", state_dir=tmp_path / "state", reconcile_interval=0.5, reconcile_walltime_grace=0)
    admin = open_site(config, Caller("root", is_admin=True))
    admin.import_nodes(EXAMPLES / "cluster.yaml")
    job = JobInfo(scheduler="slurm", cluster="c", job_id="5", user="alice", nodes=("node-1",), walltime=1)
    admin.record_job_start(job)
    time.sleep(1.2)  # its walltime passes; no epilog comes
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(config, config.service_socket, ready, stop), daemon=True)
    thread.start()
    try:
        assert ready.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not admin.rights(include_ended=True)[0].revoked_at:
            time.sleep(0.2)
        grant = admin.rights(include_ended=True)[0]
        assert grant.revoke_reason == "reconcile: past its end, no epilog revoked it", grant
    finally:
        stop.set()
        thread.join(10)
        admin.close()
