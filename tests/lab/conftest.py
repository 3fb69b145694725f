"""Lab fixtures: one 8-node lab on 2 switches for the whole session, and helpers that look at a node
from the node's side (SSH in with paramiko, read what booted)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kasched.drivers.base import NodeTarget
from kasched.drivers.ipmi import IpmiPowerDriver
from kasched.drivers.ssh import SshClient
from kasched.errors import KaschedError, LabError
from kasched.lab.lab import Lab
from kasched.lab.rootfs import build_rootfs
from kasched.lab.system import inside_netns, require
from kasched.lab.topology import LabPlan
from kasched.lab.vm import KEXEC_PACKAGES, Kernel, fetch_kernel, qemu_missing

LAB8 = LabPlan("kt8", nodes=8, switches=2, link="100mbit", uplink="200mbit")


def require_lab_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (network namespaces, loop devices): run them as root")
    try:
        require("ip", "tc", "ipmi_sim", "dnsmasq", "busybox", "sshd", "ssh-keygen", "mkfs.ext4", "sfdisk")
    except LabError as error:
        pytest.fail(f"{error} (scripts/packages/lab.txt lists the lab's Debian packages)")


@dataclass
class NodeView:
    """What a node says about itself over SSH."""

    hostname: str
    system: str  # the content of /etc/kasched-system: reference, deploy or stateless
    root_fstype: str
    cmdline: str
    marker: bool  # whether /run/kasched-test-marker exists (gone after any reboot)


class LabHandle:
    def __init__(self, lab: Lab, plan: LabPlan) -> None:
        self.lab = lab
        self.plan = plan
        self.targets = {t.name: t for t in lab.targets(plan)}
        self.ssh = SshClient(lab.service_key, timeout=10)
        self.ipmi = IpmiPowerDriver(timeout=8)

    def view(self, node: NodeTarget) -> NodeView:
        out = self.ssh.run(
            node,
            "hostname; cat /etc/kasched-system; awk '$2==\"/\"{print $3}' /proc/mounts | tail -1;"
            " cat /run/kasched/cmdline; test -e /run/kasched-test-marker && echo marked || echo clean",
        ).stdout.splitlines()
        return NodeView(out[0], out[1], out[2], out[3], out[4] == "marked")

    def mark(self, node: NodeTarget) -> None:
        """Leave a file in /run (a tmpfs): it disappears when the node reboots."""
        self.ssh.run(node, "touch /run/kasched-test-marker")

    def wait_view(self, node: NodeTarget, timeout: float = 60) -> NodeView:
        """The node's view as soon as it answers SSH (bounded wait)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self.view(node)
            except KaschedError as error:
                last = error
                time.sleep(0.3)
        raise AssertionError(f"{node.name} did not answer SSH in {timeout:.0f} s: {last}")


@pytest.fixture(scope="session")
def lab8(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """An 8-node lab on 2 switches, built once; removed (and checked removed) at the end."""
    require_lab_host()
    state_dir = tmp_path_factory.mktemp("lab") / LAB8.name
    lab = Lab(LAB8.name, state_dir=state_dir)
    lab.down()
    try:
        lab.up(LAB8, boot_timeout=120)
        yield LabHandle(lab, LAB8)
    finally:
        lab.down()
    assert not Path(f"/var/run/netns/{LAB8.netns}").exists()


@pytest.fixture
def in_lab(lab8: LabHandle) -> Iterator[LabHandle]:
    """Run the test inside the lab's namespace, where the nodes' and BMCs' addresses are."""
    with inside_netns(lab8.plan.netns):
        yield lab8


@pytest.fixture(scope="session")
def vm_kernel() -> Kernel:
    """Debian's cloud kernel for QEMU VMs (fetched once into the lab's cache)."""
    if os.geteuid() != 0:
        pytest.fail("VM tests need root (the lab's package cache, network namespaces): run them as root")
    if reason := qemu_missing():
        pytest.fail(reason)
    return fetch_kernel()


@pytest.fixture(scope="session")
def kexec_base() -> Path:
    """A lab system's base tree with kexec-tools (built once into the lab's cache)."""
    return build_rootfs(packages=KEXEC_PACKAGES)
