"""kaschedd killed with kill -9 while an operation runs: on restart the operation is interrupted and
its nodes are in a known state (deploy_failed: to be reverted). The lab tests check the nodes' side."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import update

from kasched.compose import open_site
from kasched.config import Config
from kasched.deploy import records
from kasched.errors import KaschedError
from kasched.identity import Caller
from kasched.models import NodeState, Operation
from kasched.service.client import ServiceClient
from tests.conftest import EXAMPLES, ROOT


def start_service(config_file: Path, socket: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "kasched.service.main", "--config", str(config_file)], env=env, stderr=subprocess.PIPE
    )
    for _ in range(200):
        try:
            if ServiceClient(socket, timeout=2).request("GET", "/v1/health")[0] == 200:
                return process
        except KaschedError:
            pass  # not listening yet (or a stale socket of the killed service)
        time.sleep(0.05)
    process.kill()
    raise AssertionError("kaschedd did not start")


def test_kill_9_then_restart_leaves_a_known_state() -> None:
    base = Path(tempfile.mkdtemp(prefix="kaschedd-restart-"))
    try:
        config_file = base / "kasched.yaml"
        config_file.write_text(f"site: t\nstate_dir: {base / 'state'}\n")
        config = Config(site="t", state_dir=base / "state")
        api = open_site(config, Caller("root", True), load_entry_points=False)
        api.import_nodes(EXAMPLES / "cluster.yaml")
        first = start_service(config_file, config.service_socket)
        # An operation running inside this kaschedd (its threads carry the service's pid).
        with api.database.session() as session:
            running = records.start(
                session, "deploy", "alice", "tiny@alice:1", ["node-1", "node-2"], NodeState.DEPLOYING, is_admin=True
            )
            instance = f"{'0' * 16}/{records.process_stamp(first.pid)}"  # as the service records its own
            session.execute(update(Operation).where(Operation.id == running).values(pid=first.pid, instance=instance))
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = start_service(config_file, config.service_socket)
        try:
            with api.database.session() as session:
                shown = records.view(session, running)
            assert shown.state == "interrupted"
            assert {api.show_node(n).state for n in ("node-1", "node-2")} == {"deploy_failed"}
            assert api.show_node("node-3").state == "reference"
        finally:
            second.terminate()
            _, stderr = second.communicate(timeout=10)
        assert f"operation {running} was running when kaschedd stopped" in stderr.decode()
        api.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
