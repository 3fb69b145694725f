"""Power and boot on the 8-node lab, each step asserted from the node's side over SSH."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from kasched.drivers.base import BootDevice, BootTarget, NodeTarget, PowerState
from kasched.drivers.ipmi import IpmiPowerDriver
from kasched.drivers.reboot import Rebooter, RebootLevel
from kasched.drivers.ssh import SshClient, SshPowerDriver
from kasched.errors import DriverError
from tests.lab.conftest import LabHandle

pytestmark = pytest.mark.lab


def test_every_node_boots_its_reference_partition(in_lab: LabHandle) -> None:
    switches = set()
    for name, node in in_lab.targets.items():
        view = in_lab.view(node)
        assert view.hostname == name
        assert view.system == "reference"
        assert view.root_fstype == "ext4"
        assert "root=/dev/sda2" in view.cmdline
        switches.add(in_lab.plan.node(name).switch_name)
    assert switches == {"sw1", "sw2"}


def test_nodes_reach_each_other_across_the_switch_uplink(in_lab: LabHandle) -> None:
    first, last = in_lab.targets["node-1"], in_lab.targets["node-8"]
    assert in_lab.plan.node("node-1").switch != in_lab.plan.node("node-8").switch
    result = in_lab.ssh.run(first, f"ping -c 1 -W 2 {last.ip}")
    assert result.exit_status == 0, result.stdout + result.stderr


def test_ipmi_power_off_and_on(in_lab: LabHandle) -> None:
    node = in_lab.targets["node-2"]
    assert in_lab.ipmi.status(node) is PowerState.ON
    in_lab.ipmi.off(node)
    assert in_lab.ipmi.status(node) is PowerState.OFF
    with pytest.raises(DriverError, match="node-2"):
        SshClient(in_lab.lab.service_key, timeout=3).run(node, "true")
    in_lab.ipmi.on(node)
    assert in_lab.ipmi.status(node) is PowerState.ON
    view = in_lab.wait_view(node)
    assert (view.hostname, view.system, view.root_fstype) == ("node-2", "reference", "ext4")


def test_deploy_system_then_back_to_reference(in_lab: LabHandle) -> None:
    """Profile → deploy system, IPMI reset (hard); profile → partition 2, SSH reboot (soft)."""
    nodes = [in_lab.targets["node-3"], in_lab.targets["node-7"]]  # one per switch
    boot = in_lab.lab.boot_driver()
    for node in nodes:
        boot.set_profile(node, BootTarget.DEPLOY)
    hard = Rebooter(in_lab.ipmi, None, window=2, timeout=60, levels=[RebootLevel.HARD])
    results = hard.reboot(nodes)
    assert results.ok, {n: r.error for n, r in results.items()}
    for node in nodes:
        view = in_lab.wait_view(node)
        assert (view.hostname, view.system, view.root_fstype) == (node.name, "deploy", "tmpfs")
        assert "kasched.system=deploy" in view.cmdline
        tools = in_lab.ssh.run(node, "python3 -c 'import paramiko, kasched.transports.relay' && tar --version")
        assert tools.exit_status == 0 and "GNU tar" in tools.stdout, tools.stderr  # what the engine uses
        boot.set_profile(node, BootTarget.LOCAL, partition=2)
    soft = Rebooter(in_lab.ipmi, SshPowerDriver(in_lab.ssh), window=2, timeout=60, levels=[RebootLevel.SOFT])
    results = soft.reboot(nodes)
    assert results.ok, {n: r.error for n, r in results.items()}
    assert all(r.value == "soft" for r in results.values())
    for node in nodes:
        view = in_lab.wait_view(node)
        assert (view.hostname, view.system, view.root_fstype) == (node.name, "reference", "ext4")


def test_stateless_image_runs_in_ram(in_lab: LabHandle) -> None:
    node = in_lab.targets["node-4"]
    boot = in_lab.lab.boot_driver()
    boot.set_profile(node, BootTarget.STATELESS, kernel="stateless/vmlinuz", initrd="stateless/initrd.img")
    try:
        results = Rebooter(in_lab.ipmi, None, window=1, timeout=60, levels=[RebootLevel.VERY_HARD]).reboot([node])
        assert results.ok, results[node.name].error
        view = in_lab.wait_view(node)
        assert (view.system, view.root_fstype) == ("stateless", "tmpfs")
    finally:
        boot.set_profile(node, BootTarget.LOCAL, partition=2)
        in_lab.ipmi.reset(node)
    assert in_lab.wait_view(node).system == "reference"


def test_disk_boot_device_skips_the_network_profile(in_lab: LabHandle) -> None:
    """Boot device "disk" through IPMI: the deploy profile is ignored, the bootable partition boots."""
    node = in_lab.targets["node-5"]
    boot = in_lab.lab.boot_driver()
    boot.set_profile(node, BootTarget.DEPLOY)
    try:
        in_lab.mark(node)
        in_lab.ipmi.set_boot_device(node, BootDevice.DISK)
        in_lab.ipmi.reset(node)
        view = in_lab.wait_view(node)
        assert (view.system, view.root_fstype, view.marker) == ("reference", "ext4", False)
    finally:
        boot.set_profile(node, BootTarget.LOCAL, partition=2)
        in_lab.ipmi.set_boot_device(node, BootDevice.NETWORK)


def test_soft_reboot_escalates_to_hard_when_ssh_fails(in_lab: LabHandle) -> None:
    """A powered-off node cannot reboot itself: soft fails (SSH), hard (IPMI reset) brings it back."""
    node = in_lab.targets["node-6"]
    in_lab.ipmi.off(node)
    soft = SshPowerDriver(SshClient(in_lab.lab.service_key, timeout=3))
    result = Rebooter(in_lab.ipmi, soft, window=1, timeout=60).reboot([node])[node.name]
    assert result.ok, result.error
    assert result.value == "hard"
    view = in_lab.wait_view(node)
    assert (view.hostname, view.system) == ("node-6", "reference")


class _InFlight:
    """Counts the nodes a Rebooter is telling to reboot at once: from setting the boot device to the
    end of the BMC's reset (the window bounds these commands, not the wait for the node to be back)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = self.highest = 0

    def enter(self) -> None:
        with self.lock:
            self.current += 1
            self.highest = max(self.highest, self.current)

    def leave(self) -> None:
        with self.lock:
            self.current -= 1


class _CountingIpmi(IpmiPowerDriver):
    """The real IPMI driver; a node is counted from its boot device set until its reset returned, and
    each reset takes half a second more, so that the window's slots are all taken at some point."""

    def __init__(self, flight: _InFlight) -> None:
        super().__init__(timeout=8)
        self.flight = flight

    def set_boot_device(self, node: NodeTarget, device: BootDevice) -> None:
        self.flight.enter()
        super().set_boot_device(node, device)

    def reset(self, node: NodeTarget) -> None:
        try:
            super().reset(node)
            time.sleep(0.5)
        finally:
            self.flight.leave()


def test_hard_reboot_of_all_nodes_stays_within_the_window(in_lab: LabHandle) -> None:
    nodes = list(in_lab.targets.values())
    for node in nodes:
        in_lab.mark(node)
    flight = _InFlight()
    rebooter = Rebooter(_CountingIpmi(flight), None, window=3, timeout=60, levels=[RebootLevel.HARD])
    results = rebooter.reboot(nodes)
    assert results.ok, {n: r.error for n, r in results.items() if not r.ok}
    assert list(results) == [n.name for n in nodes]
    assert flight.highest == 3
    for node in nodes:
        view = in_lab.wait_view(node)
        assert (view.hostname, view.system, view.marker) == (node.name, "reference", False)


def test_nothing_routes_out_of_the_lab(in_lab: LabHandle) -> None:
    node = in_lab.targets["node-1"]
    routes = in_lab.ssh.run(node, "ip route").stdout.splitlines()
    assert [r.split()[:3] for r in routes] == [["10.77.0.0/16", "dev", "eth0"]]
    routes6 = in_lab.ssh.run(node, "ip -6 route").stdout
    assert "default" not in routes6 and "via" not in routes6
    lab_routes = subprocess.run(["ip", "-n", in_lab.plan.netns, "route"], capture_output=True, text=True, check=True)
    assert "default" not in lab_routes.stdout and "10.77.0.0/16 dev sw1" in lab_routes.stdout


def test_without_a_profile_the_node_boots_its_disk(in_lab: LabHandle) -> None:
    """No ipxe/<mac>.ipxe: boot.ipxe's chain fails over to ``exit``, the firmware boots the disk."""
    node = in_lab.targets["node-1"]
    profile = in_lab.lab.boot_dir / "ipxe" / f"{node.mac.replace(':', '-')}.ipxe"
    saved = profile.read_text()
    profile.unlink()
    try:
        in_lab.mark(node)
        in_lab.ipmi.reset(node)
        view = in_lab.wait_view(node)
        assert (view.system, view.root_fstype, view.marker) == ("reference", "ext4", False)
        console = (in_lab.lab.state_dir / "nodes" / "node-1" / "console.log").read_text()
        assert "trying the alternative" in console and "booting partition 2" in console
    finally:
        profile.write_text(saved)


def test_an_environment_written_to_partition_3_boots(in_lab: LabHandle) -> None:
    """A whole deployment by hand: deploy system, mkfs + untar on /dev/sda3, boot partition 3, back."""
    node = in_lab.targets["node-2"]
    boot = in_lab.lab.boot_driver()
    archive = in_lab.lab.make_environment(in_lab.lab.boot_dir / "envs" / "userenv.tgz", "userenv")
    assert archive.stat().st_size > 1_000_000
    boot.set_profile(node, BootTarget.DEPLOY)
    try:
        in_lab.ipmi.reset(node)
        assert in_lab.wait_view(node).system == "deploy"
        script = (
            "set -e; tftp -g -b 16384 -r envs/userenv.tgz -l /tmp/env.tgz 10.77.0.1;"
            " mkfs.ext4 -q -F /dev/sda3; mount /dev/sda3 /mnt; tar -xzf /tmp/env.tgz -C /mnt; umount /mnt"
        )
        done = in_lab.ssh.run(node, script, timeout=120)
        assert done.exit_status == 0, done.stdout + done.stderr
        boot.set_profile(node, BootTarget.LOCAL, partition=3)
        in_lab.ipmi.reset(node)
        view = in_lab.wait_view(node)
        assert (view.hostname, view.system, view.root_fstype) == ("node-2", "userenv", "ext4")
        assert "root=/dev/sda3" in view.cmdline
    finally:
        boot.set_profile(node, BootTarget.LOCAL, partition=2)
        in_lab.ipmi.reset(node)
    assert in_lab.wait_view(node).system == "reference"


def test_deploy_system_over_http(in_lab: LabHandle) -> None:
    node = in_lab.targets["node-4"]
    log = in_lab.lab.state_dir / "nodes" / "node-4" / "console.log"
    in_lab.lab.boot_driver(http=True).set_profile(node, BootTarget.DEPLOY)
    try:
        start = log.stat().st_size
        in_lab.ipmi.reset(node)
        view = in_lab.wait_view(node)
        assert (view.system, view.root_fstype) == ("deploy", "tmpfs")
        console = log.read_text()[start:]
        assert "loaded http://10.77.0.1/deploy/initrd.img" in console
    finally:
        in_lab.lab.boot_driver().set_profile(node, BootTarget.LOCAL, partition=2)
        in_lab.ipmi.reset(node)
    assert in_lab.wait_view(node).system == "reference"
