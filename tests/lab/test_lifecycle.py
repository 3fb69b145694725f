"""``lab down`` removes everything, also after ``kill -9`` of ``lab up`` and of every lab process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kasched.drivers.base import PowerState
from kasched.lab.disk import loops_of
from kasched.lab.system import inside_netns, netns_list, netns_pids
from tests.lab.conftest import LabHandle, require_lab_host

pytestmark = pytest.mark.lab
NAME = "ktkill"


def _cli(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    code = "import sys; from kasched.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def _leftovers(state_dir: Path) -> dict[str, object]:
    namespaces = netns_list(f"kl-{NAME}")
    return {
        "namespaces": namespaces,
        "processes": [pid for ns in namespaces for pid in netns_pids(ns)],
        "loops": sorted(loops_of(state_dir)) if state_dir.exists() else [],
        "state_dir": state_dir.exists(),
    }


def test_down_after_kill_9_of_everything(tmp_path: Path) -> None:
    require_lab_host()
    state_dir = tmp_path / NAME
    up = _cli("lab", "up", "--name", NAME, "--nodes", "4", "--switches", "2", "--state-dir", str(state_dir))
    try:
        deadline = time.monotonic() + 120
        nodes_dir = state_dir / "nodes"
        # kill -9 lab up once some nodes run (namespaces, BMCs, loop devices and firmware exist)
        while time.monotonic() < deadline and up.poll() is None:
            if nodes_dir.is_dir() and any(netns_pids(ns) for ns in netns_list(f"kl-{NAME}-")):
                break
            time.sleep(0.1)
        assert up.poll() is None, f"lab up ended too early: {up.communicate()}"
        os.killpg(up.pid, signal.SIGKILL)
        up.wait(10)
        made = _leftovers(state_dir)
        assert made["namespaces"] and made["loops"] and made["processes"]
        for pid in made["processes"]:  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)  # the BMCs, dnsmasq, the nodes' systems: everything
    finally:
        down = _cli("lab", "down", "--name", NAME, "--state-dir", str(state_dir))
        out, err = down.communicate(timeout=120)
    assert down.returncode == 0, err
    assert "removed" in out
    assert _leftovers(state_dir) == {"namespaces": [], "processes": [], "loops": [], "state_dir": False}
    again = _cli("lab", "down", "--name", NAME, "--state-dir", str(state_dir))
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0 and "nothing to remove" in out, err


def test_up_status_down_through_the_cli(tmp_path: Path) -> None:
    require_lab_host()
    state_dir = tmp_path / "ktcli"
    try:
        up = _cli("lab", "up", "--name", "ktcli", "--nodes", "2", "--state-dir", str(state_dir), "--json")
        out, err = up.communicate(timeout=180)
        assert up.returncode == 0, err
        assert json.loads(out)["status"] == "up"
        status = _cli("lab", "status", "--name", "ktcli", "--state-dir", str(state_dir), "--json")
        out, err = status.communicate(timeout=60)
        nodes = json.loads(out)["nodes"]
        assert [(n["node"], n["power"], n["ssh"]) for n in nodes] == [("node-1", "on", True), ("node-2", "on", True)]
        inventory = (state_dir / "inventory.yaml").read_text()
        assert "credentials: ktcli-bmc" in inventory and "02:4b:00:00:01:02" in inventory
        assert oct((state_dir / "credentials.yaml").stat().st_mode & 0o777) == "0o600"
        config = str(state_dir / "kasched.yaml")
        assert "broadcast_source_rate: 1gbit" in (state_dir / "kasched.yaml").read_text()  # the lab's link
        imported = _cli("--config", config, "nodes", "import", str(state_dir / "inventory.yaml"))
        out, err = imported.communicate(timeout=60)
        assert imported.returncode == 0, err
        assert "added: 2 node(s)" in out
        inside = _cli("lab", "exec", "--name", "ktcli", "--", "ip", "-br", "addr", "show", "sw1")
        out, err = inside.communicate(timeout=60)
        assert inside.returncode == 0 and "10.77.0.1/16" in out, err
        console = _cli("lab", "console", "--name", "ktcli", "node-2")
        out, err = console.communicate(timeout=60)
        assert "reference system up on node-2" in out, err
    finally:
        down = _cli("lab", "down", "--name", "ktcli", "--state-dir", str(state_dir))
        down.communicate(timeout=120)
    assert down.returncode == 0
    assert netns_list("kl-ktcli") == []


@pytest.mark.slow
def test_64_nodes_come_up_and_go_down(tmp_path: Path) -> None:
    from kasched.lab.lab import Lab
    from kasched.lab.topology import LabPlan

    require_lab_host()
    plan = LabPlan("kt64", nodes=64, switches=4, link="100mbit", uplink="200mbit")
    lab = Lab(plan.name, state_dir=tmp_path / plan.name)
    try:
        state = lab.up(plan, boot_timeout=240)  # returns once every node's sshd answers
        assert state["status"] == "up"
        status = lab.status()
        assert [n["node"] for n in status["nodes"] if not (n["ssh"] and n["power"] == "on")] == []
        assert len(netns_list("kl-kt64-")) == 64
    finally:
        lab.down()
    assert netns_list("kl-kt64") == []


def test_one_process_drives_two_labs(lab8: LabHandle, tmp_path: Path) -> None:
    """pyghmi pools its sockets process-wide; the IPMI driver must not reuse one lab's in another."""
    from kasched.lab.lab import Lab
    from kasched.lab.topology import LabPlan

    other = Lab("kttwo", state_dir=tmp_path / "kttwo")
    try:
        other.up(LabPlan("kttwo", nodes=2))
        for lab, targets in ((lab8.lab, list(lab8.targets.values())[:1]), (other, other.targets())) * 2:
            with inside_netns(f"kl-{lab.name}"):
                assert [lab8.ipmi.status(t) for t in targets] == [PowerState.ON] * len(targets)
    finally:
        other.down()


def test_links_are_reshaped_in_place(lab8: LabHandle) -> None:
    """bench/broadcast_lab.py --link 100,20 measures one lab at several rates: both ends of every
    node's cable must take the new rate, and take the lab's own back."""
    from kasched.lab.network import shape_node_links

    def rates() -> list[str]:
        """The shaped rate of each cable end: the switch port, then the node's eth0, node by node."""
        found = []
        for node in lab8.plan.nodes_list:
            for netns, device in ((lab8.plan.netns, node.lab_port), (node.netns, "eth0")):
                shown = subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "show", "dev", device],
                                       capture_output=True, text=True, check=True).stdout  # fmt: skip
                found.append(shown.split(" rate ")[1].split()[0])
        return found

    nodes = list(lab8.plan.nodes_list)
    try:
        shape_node_links(lab8.plan, nodes, "20mbit")
        assert rates() == ["20Mbit"] * 2 * len(nodes)
    finally:
        shape_node_links(lab8.plan, nodes, lab8.plan.link)
    assert rates() == ["100Mbit"] * 2 * len(nodes)  # LAB8's link


def test_uplinks_are_reshaped_in_place(lab8: LabHandle) -> None:
    """bench/topology_lab.py boots its nodes behind fast uplinks, then shapes them to the rate it
    measures: both ends of every uplink take the new rate, and the lab's own back."""
    from kasched.lab.network import shape_uplinks

    def rates() -> list[str]:
        found = []
        for device in ("up1a", "up1b"):  # LAB8: two switches, one uplink
            shown = subprocess.run(["ip", "netns", "exec", lab8.plan.netns, "tc", "qdisc", "show", "dev", device],
                                   capture_output=True, text=True, check=True).stdout  # fmt: skip
            found.append(shown.split(" rate ")[1].split()[0])
        return found

    assert rates() == ["200Mbit", "200Mbit"]  # LAB8's uplink, from the lab's creation
    try:
        shape_uplinks(lab8.plan, "10mbit")
        assert rates() == ["10Mbit", "10Mbit"]
    finally:
        shape_uplinks(lab8.plan, lab8.plan.uplink)
    assert rates() == ["200Mbit", "200Mbit"]
