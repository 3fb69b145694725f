"""Faults and bad input: wrong BMC password, a silent BMC, lab up twice, bad CLI input."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyghmi.ipmi.private import session as ipmi_session

from kasched.drivers.base import NodeTarget, PowerState
from kasched.errors import DriverError, DriverTimeout
from kasched.lab.disk import loops_of
from kasched.lab.system import netns_list, netns_pids, read_pid
from kasched.results import GroupResult, run_on_node
from tests.lab.conftest import LabHandle

pytestmark = pytest.mark.lab


def test_wrong_bmc_password_names_the_node(in_lab: LabHandle) -> None:
    node = dataclasses.replace(in_lab.targets["node-1"], bmc_password="not-the-password")
    with pytest.raises(DriverError) as caught:
        in_lab.ipmi.status(node)
    assert not isinstance(caught.value, DriverTimeout)
    message = str(caught.value)
    assert message.startswith("node-1: ")
    assert "password" in message and node.bmc_address in message


def test_silent_bmc_times_out_and_fails_only_its_node(in_lab: LabHandle) -> None:
    silent = in_lab.targets["node-8"]
    pid = read_pid(in_lab.lab.state_dir / "nodes" / "node-8" / "bmc.pid")
    assert pid is not None
    for name in ("node-6", "node-7", "node-8"):  # earlier calls leave no session behind to reuse
        assert in_lab.ipmi.status(in_lab.targets[name]) is PowerState.ON
        assert not _cached_sessions(in_lab.targets[name])
    in_lab.ipmi.timeout = 4
    os.kill(pid, signal.SIGSTOP)
    try:
        results = GroupResult()
        for name in ("node-6", "node-7", "node-8"):
            node = in_lab.targets[name]
            results.add(run_on_node(name, "power status", lambda node=node: in_lab.ipmi.status(node)))
    finally:
        os.kill(pid, signal.SIGCONT)
        in_lab.ipmi.timeout = 8
    assert results.failed == ["node-8"]
    assert results["node-6"].value is PowerState.ON and results["node-7"].value is PowerState.ON
    assert (results["node-8"].error or "").startswith(f"node-8: BMC {silent.bmc_address}:623 did not answer")
    assert in_lab.ipmi.status(silent) is PowerState.ON  # answers again once resumed


def test_bmc_idle_past_its_session_timeout_still_answers(in_lab: LabHandle) -> None:
    """ipmi_sim drops a session idle for about 30 s and then ignores it: each call must log in anew."""
    node = in_lab.targets["node-5"]
    assert in_lab.ipmi.status(node) is PowerState.ON
    time.sleep(35)
    assert in_lab.ipmi.boot_device(node) in ("network", "hd", "default")
    assert in_lab.ipmi.status(node) is PowerState.ON


def _cached_sessions(node: NodeTarget) -> list[object]:
    """pyghmi's sessions kept for the node's BMC, logged in or logging in."""
    handlers = ipmi_session.Session.bmc_handlers
    kept = [
        session
        for sockaddr, by_port in list(handlers.items())
        if sockaddr[0] in (node.bmc_address, f"::ffff:{node.bmc_address}")
        for session in by_port.values()
    ]
    kept += [s for key, s in ipmi_session.Session.initting_sessions.items() if key[0] == node.bmc_address]
    return kept


def test_lab_up_twice_creates_no_duplicates(lab8: LabHandle) -> None:
    def inventory() -> tuple[list[str], list[str], str, list[str]]:
        loops = sorted(loops_of(lab8.lab.state_dir))
        services = sorted(  # the BMCs, dnsmasq and httpd (not the short-lived chassis programs)
            name
            for name in (_comm(pid) for pid in netns_pids(lab8.plan.netns))
            if name in ("ipmi_sim", "dnsmasq", "busybox")
        )
        return netns_list(f"kl-{lab8.plan.name}"), loops, lab8.lab.inventory_file.read_text(), services

    before = inventory()
    state = lab8.lab.up(lab8.plan)
    assert state.get("already_up") is True
    assert inventory() == before
    assert len(before[0]) == 1 + lab8.plan.nodes and len(before[1]) == lab8.plan.nodes
    assert before[3] == sorted(["ipmi_sim"] * lab8.plan.nodes + ["dnsmasq", "busybox"])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from kasched.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes must be between"),
        (["--link", "fast"], "--link 'fast'"),
        (["--name", "Bad_Name"], "lab name must be"),
    ],
)
def test_lab_up_refuses_bad_input_without_traceback(args: list[str], message: str) -> None:
    done = _cli("lab", "up", "--state-dir", "/nonexistent/kasched-lab-test", *args)
    assert done.returncode == 2
    assert done.stderr.startswith("kasched: error: ") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_lab_up_with_other_size_is_refused(lab8: LabHandle) -> None:
    done = _cli("lab", "up", "--name", lab8.plan.name, "--state-dir", str(lab8.lab.state_dir), "--nodes", "3")
    assert done.returncode == 9
    assert "already up" in done.stderr and "Traceback" not in done.stderr
