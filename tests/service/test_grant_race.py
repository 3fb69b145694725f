"""A grant check is atomic with what it guards (audit F5): a deploy requested by an ordinary user just
before the epilog's revoke either starts before the revoke, and is then cancelled by it, or is refused.

A real kaschedd (the ``service`` fixture, in this process) and a real Unix user whose client talks to its
socket from its own process; the step bodies are stand-ins that take a moment (no lab), everything
around them is the real code. The race is run again and again for at least 5 s, the revoke coming at a
random moment after the request, while kaschedd hashes the image (the slow part between the check at the
request and the taking of the nodes)."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from kasched.api import Kasched
from kasched.compose import open_site
from kasched.config import Config
from kasched.deploy import kexec, steps
from kasched.identity import Caller
from kasched.models import Node, NodeState, Operation, OperationState, StepRecord
from kasched.results import GroupResult, NodeResult
from kasched.service.client import ServiceClient
from tests.conftest import write
from tests.test_cli import unix_user

pytestmark = pytest.mark.slow
USER = "kasched-racer"
PAIRS = [("node-1", "node-2"), ("node-3", "node-4"), ("node-5", "node-6"), ("node-7", "node-8")]
RACE_SECONDS = 6.0
STEP_SECONDS = 0.3
# The user's client: Debian's python3 (the venv's interpreter may live where users cannot run it), the
# standard library only. One JSON request body a line on stdin, one answer a line on stdout.
CLIENT = r"""
import json, socket, sys
for line in sys.stdin:
    data = line.strip().encode()
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b"POST /v1/deployments HTTP/1.1\r\nHost: kaschedd\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)
    chunks = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    print(json.dumps({"code": int(head.split()[1]), "body": body.decode()}), flush=True)
"""


def slow_step(names: Sequence[str], cancel: threading.Event) -> GroupResult:
    cancel.wait(STEP_SECONDS)
    return GroupResult({n: NodeResult(n, not cancel.is_set(), "", "cancelled" if cancel.is_set() else None, 0.1)
                        for n in names})  # fmt: skip


def stand_in(*_: Any) -> Any:
    return lambda ctx, names, deadline, cancel: slow_step(names, cancel)


@pytest.fixture
def race_site(
    service: tuple[Config, ServiceClient], monkeypatch: pytest.MonkeyPatch
) -> tuple[Config, ServiceClient, Path]:
    """The service's site with a public 64 MiB raw image, a config file the background reverts use,
    and stand-in step bodies."""
    config, root = service
    monkeypatch.setenv(
        "KASCHED_CONFIG",
        str(write(config.state_dir.parent / "kasched.yaml", f"site: t\nstate_dir: {config.state_dir}\n"
                  f"credentials_file: {config.credentials_file}\nadmin_group: kasched-test-admins\n")),
    )  # fmt: skip
    image = config.state_dir.parent / "big.img"
    with image.open("wb") as out:
        out.truncate(64 << 20)
    environment = write(config.state_dir.parent / "big.yaml", "name: big\nvisibility: public\n"
                        "image: {file: big.img, kind: raw}\n")  # fmt: skip
    status, _ = root.request(
        "POST", "/v1/environments", body={"path": str(environment), "text": environment.read_text()}
    )
    assert status == 201
    for name in ("use_running_reference", "broadcast_chain", "configure"):
        monkeypatch.setattr(steps, name, stand_in())
    for name in ("setup_deploy_system", "boot_environment"):
        monkeypatch.setattr(steps, name, stand_in)
    for name in ("setup_deploy_system_kexec", "boot_environment_kexec"):
        monkeypatch.setattr(kexec, name, stand_in())
    client = config.state_dir.parent / "client.py"
    client.write_text(CLIENT)
    client.chmod(0o644)
    return config, root, client


def test_a_deploy_racing_the_epilog_never_outlives_the_grant(race_site: tuple[Config, ServiceClient, Path]) -> None:
    config, root, client = race_site
    entry = unix_user(USER)
    user = subprocess.Popen(
        ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "/usr/bin/python3",
         str(client), str(config.service_socket)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert user.stdin is not None and user.stdout is not None
    admin = open_site(config, Caller("root", is_admin=True), load_entry_points=False)
    rounds: list[dict[str, Any]] = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < RACE_SECONDS or len(rounds) < 12:
            pair = PAIRS[len(rounds) % len(PAIRS)]
            _wait_free(admin, pair)
            job = {"scheduler": "slurm", "cluster": "c1", "job_id": f"race-{len(rounds)}"}
            status, grant = root.request("POST", "/v1/jobs/start", body={**job, "user": USER, "nodes": list(pair),
                                                                          "walltime": 3600})  # fmt: skip
            assert status == 200, grant
            user.stdin.write(json.dumps({"kind": "deploy", "nodes": ",".join(pair), "environment": "big"}) + "\n")
            user.stdin.flush()
            time.sleep(random.uniform(0.0, 0.35))
            status, ended = root.request("POST", "/v1/jobs/end", body={**job, "reason": "job ended (epilog)"})
            assert status == 200, ended
            answer = json.loads(user.stdout.readline())
            rounds.append({"pair": pair, "grant": ended["id"], "revoked_at": ended["revoked_at"], **answer})
        _wait_all_ended(admin)
        _check(admin, config, rounds)
    finally:
        user.stdin.close()
        user.wait(10)
        admin.close()


def _wait_free(admin: Kasched, pair: Sequence[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with admin.database.session() as session:
            states = session.scalars(select(Node.state).where(Node.name.in_(pair))).all()
        if not any(state.value in ("deploying", "reverting") for state in states):
            return
        time.sleep(0.05)
    pytest.fail(f"{pair} still busy after {timeout} s")


def _wait_all_ended(admin: Kasched, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with admin.database.session() as session:
            if not session.scalars(select(Operation.id).where(Operation.state == OperationState.RUNNING)).all():
                return
        time.sleep(0.1)
    pytest.fail("deployments still running")


def _check(admin: Kasched, config: Config, rounds: list[dict[str, Any]]) -> None:
    accepted = [r for r in rounds if r["code"] == 202]
    refused = [r for r in rounds if r["code"] != 202]
    print(f"{len(rounds)} rounds: {len(accepted)} deploys started before the revoke, {len(refused)} refused")
    with admin.database.session() as session:
        for answer in accepted:
            deployment = session.get(Operation, json.loads(answer["body"])["id"])
            assert deployment is not None
            revoked_at = datetime.fromisoformat(answer["revoked_at"])
            assert deployment.created_at < revoked_at, f"{deployment.id} was created after the revoke"
            assert deployment.cancel_requested and deployment.state.value == "cancelled", deployment.state
            # Before each attempt the operation asks whether its grant is active: nothing starts after
            # the revoke but for the attempt in flight when it came.
            late = session.scalars(
                select(StepRecord.step).where(
                    StepRecord.deployment_id == deployment.id,
                    StepRecord.started_at > revoked_at + timedelta(seconds=0.1),
                )
            ).all()
            assert late == [], f"{deployment.id} ran {late} after its grant was revoked"
        out_of_reference = set(session.scalars(select(Node.name).where(Node.state != NodeState.REFERENCE)))
    reclaimed = {node for r in accepted if (config.state_dir / "reclaim" / f"grant-{r['grant']}.log").exists()
                 for node in r["pair"]}  # fmt: skip
    assert out_of_reference <= reclaimed, f"{out_of_reference - reclaimed} left out of reference, nobody reverts them"
    for answer in refused:
        assert answer["code"] == 403 and "no active grant" in answer["body"], answer
    assert accepted and refused, "the race was not exercised: vary the delay"
