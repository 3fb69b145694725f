"""The simulated site through kaschedd and the CLI (the CLI a process of its own, kaschedd serving in
this process, where the simulated nodes live), and a job's end through the grant keeper and the
reclaimer, whose revert runs in a process of its own on the same simulated nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from kasched.messages import JobEnd, JobInfo
from kasched.models import NodeState
from tests.conftest import ROOT
from tests.service.conftest import kaschedd
from tests.simulated.conftest import Sim

pytestmark = pytest.mark.simulated


def cli(sim: Sim, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KASCHED_CONFIG": str(sim.files.config_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}  # fmt: skip
    env.pop("KASCHED_DIRECT", None)
    return subprocess.run([sys.executable, "-m", "kasched", *args], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip


def test_deploy_status_reboot_power_and_revert_through_kaschedd_and_the_cli(sim: Sim) -> None:
    with kaschedd(sim.config):
        deployed = cli(sim, "deploy", "-e", "userenv", "-m", "node-[1-4]", "--json")
        assert deployed.returncode == 0, deployed.stderr
        data = json.loads(deployed.stdout)
        assert data["state"] == "done" and sorted(data["nodes"]) == [f"node-{i}" for i in range(1, 5)]
        status = cli(sim, "deploy", "--status", data["id"], "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["state"] == "done", status.stderr
        rebooted = cli(sim, "reboot", "-m", "node-1", "--to", "deploy", "--json")
        assert rebooted.returncode == 0, rebooted.stderr
        assert sim.node("node-1").system.startswith("kasched.system=deploy")
        off = cli(sim, "power", "off", "-m", "node-2", "--json")
        assert off.returncode == 0 and not sim.node("node-2").powered, off.stderr
        reverted = cli(sim, "revert", "-m", "node-[1-4]", "--json")
        assert reverted.returncode == 0, reverted.stderr
    assert all(sim.node(f"node-{i}").system.startswith("root=/dev/sda2") for i in range(1, 5))
    assert {sim.states()[f"node-{i}"] for i in range(1, 5)} == {NodeState.REFERENCE.value}


def test_a_jobs_end_gives_its_nodes_back_through_the_reclaimer_in_a_process_of_its_own(sim: Sim) -> None:
    sim.admin.revoke(1)  # the fixture's hand-made grant of every node: no other grant holds them now
    job = JobInfo("simulated", "sim", "42", "bob", ("node-7", "node-8"))
    sim.admin.record_job_start(job)
    bob = sim.admin.as_caller(sim.user.caller.__class__("bob", is_admin=False))
    from kasched.deploy.operations import Operations

    assert Operations(bob).deploy("userenv", "node-[7-8]").state == "done"
    assert sim.node("node-7").system.startswith("root=/dev/sda3")
    sim.admin.record_job_end(JobEnd("simulated", "sim", "42"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = sim.states()
        if states["node-7"] == states["node-8"] == NodeState.REFERENCE.value:
            break
        time.sleep(0.2)
    log = next((sim.config.state_dir).rglob("*.log"), None)
    assert states["node-7"] == NodeState.REFERENCE.value, log.read_text() if log else states
    time.sleep(1)  # the reclaim process saved its nodes on exit
    assert sim.node("node-8").system.startswith("root=/dev/sda2")  # as the other process left it
