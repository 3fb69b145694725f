"""Kinds of lab nodes. The lab builds what all kinds share (switches, DHCP/TFTP, keys, the systems'
images); a :class:`NodeKind` builds, powers and removes the nodes themselves.

:class:`NamespaceNodeKind` (the light kind) makes each node a network namespace with a loop-device
disk, an ``ipmi_sim`` BMC and the :mod:`simulated firmware <kasched.lab.firmware>`. A QEMU kind
(:mod:`kasched.lab.qemu`: VMs that boot from the network for real) plugs in here.

A kind also says what its systems need: their packages, what goes into each system's tree (a real
kernel's modules), the kernels in the boot directory, and the site settings its boot profiles need.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from kasched.lab import disk, power, systems
from kasched.lab.bmc import BmcCredentials, LabBmc
from kasched.lab.network import create_node_namespaces, delete_namespace
from kasched.lab.nodedir import BOOT_NETWORK, NodeDir, NodeFacts
from kasched.lab.rootfs import BASE_PACKAGES, DEPLOY_PACKAGES
from kasched.lab.system import kill_and_wait, netns_list, netns_pids
from kasched.lab.topology import LabPlan, NodePlan


@dataclass(frozen=True)
class LabContext:
    """What a node kind gets from the lab."""

    plan: LabPlan
    state_dir: Path
    golden_disk: Path
    credentials: BmcCredentials

    def node_dir(self, node: NodePlan) -> NodeDir:
        return NodeDir(self.state_dir / "nodes" / node.name)


PLACEHOLDER_KERNEL = "kasched lab: namespace nodes run the host's kernel; this file stands for a kernel image.\n"


class NodeKind(ABC):
    """How one kind of lab node is made, powered and removed, and what its systems need."""

    name: str = ""
    disk_device: str = "/dev/sda"  # the node's disk, as its systems (and the inventory) name it

    def packages(self, role: str) -> tuple[str, ...]:
        """The Debian packages of system ``role`` (:mod:`kasched.lab.systems`; ``environment``:
        the environments the lab makes)."""
        return DEPLOY_PACKAGES if role == systems.DEPLOY else BASE_PACKAGES

    def finish_tree(self, tree: Path, role: str, cache_dir: Path) -> None:
        """Add what this kind's nodes need to system ``role``'s tree, before it is packed (namespace
        nodes need nothing: they run the host's kernel)."""
        return None

    def write_kernels(self, boot_dir: Path, base_tree: Path, cache_dir: Path) -> None:
        """The kernel files the boot profiles name (``deploy/``, ``stateless/``, ``reference/``)."""
        for role in (systems.DEPLOY, systems.STATELESS, systems.REFERENCE):
            (boot_dir / role).mkdir(parents=True, exist_ok=True)
            (boot_dir / role / "vmlinuz").write_text(PLACEHOLDER_KERNEL)

    def site_settings(self) -> dict[str, object]:
        """Settings of the site configuration (``kasched.yaml``) the lab writes for these nodes."""
        return {"reboot_timeout": 30}  # namespace nodes boot in seconds

    @abstractmethod
    def create(self, ctx: LabContext, nodes: list[NodePlan]) -> None:
        """Build the nodes (cabling, disk, BMC), powered off, their BMCs answering."""

    @abstractmethod
    def power_on(self, ctx: LabContext, node: NodePlan) -> None:
        """Power ``node`` on with the network as boot device (what ``lab up`` does at the end)."""

    @abstractmethod
    def node_status(self, ctx: LabContext, node: NodePlan) -> dict[str, object]: ...

    @abstractmethod
    def destroy(self, lab_name: str, state_dir: Path) -> list[str]:
        """Remove every node of the lab, from names and files alone (works after kill -9); returns
        what was removed."""


class NamespaceNodeKind(NodeKind):
    """Nodes as network namespaces: real BMC, DHCP, TFTP, disk and sshd; simulated firmware."""

    name = "namespace"

    def create(self, ctx: LabContext, nodes: list[NodePlan]) -> None:
        create_node_namespaces(ctx.plan, nodes)
        bmcs = []
        for node in nodes:
            node_dir = ctx.node_dir(node)
            node_dir.path.mkdir(parents=True, exist_ok=True)
            self.make_node(node, node_dir, ctx.golden_disk)
            node_dir.set_bootdev(BOOT_NETWORK)
            bmc = LabBmc(node_dir, node.bmc_address, ctx.credentials)
            bmc.configure(node.index)
            bmc.start(ctx.plan.netns)
            bmcs.append(bmc)
        for bmc in bmcs:
            bmc.wait_ready()

    def make_node(self, node: NodePlan, node_dir: NodeDir, golden_disk: Path) -> None:
        """The node's disk, facts and power supply (here: a loop device, the simulated firmware)."""
        image = node_dir.path / "disk.img"
        disk.copy_disk(golden_disk, image)
        python, path = pythonpath()
        node_dir.write_facts(NodeFacts(node.name, node.netns, node.mac, str(image), disk.attach(image), python, path))
        node_dir.root_mount.mkdir(exist_ok=True)
        power.write_supervisor(node_dir)

    def power_on(self, ctx: LabContext, node: NodePlan) -> None:
        node_dir = ctx.node_dir(node)
        node_dir.set_bootdev(BOOT_NETWORK)
        power.power_on(node_dir)

    def node_status(self, ctx: LabContext, node: NodePlan) -> dict[str, object]:
        node_dir = ctx.node_dir(node)
        bmc = LabBmc(node_dir, node.bmc_address, ctx.credentials)
        facts = node_dir.facts() if node_dir.facts_file.exists() else None
        return {
            "node": node.name,
            "switch": node.switch_name,
            "ip": node.ip,
            "bmc": node.bmc_address,
            "bmc_running": bmc.running(),
            "power": "on" if netns_pids(node.netns) else "off",
            "bootdev": node_dir.bootdev(),
            "disk": facts.disk_device if facts else "",
        }

    def destroy(self, lab_name: str, state_dir: Path) -> list[str]:
        namespaces = netns_list(f"kl-{lab_name}-")
        for _ in range(3):  # supervisors may fork once more while being killed
            pids = [pid for ns in namespaces for pid in netns_pids(ns)]
            if not pids:
                break
            kill_and_wait(pids)
        for ns in namespaces:
            delete_namespace(ns)
        loops = disk.detach_all(state_dir / "nodes")
        return [f"{len(namespaces)} node namespace(s)"] * bool(namespaces) + [f"loop device {d}" for d in loops]


def pythonpath() -> tuple[str, str]:
    """The interpreter and path that run kasched's lab programs (chassis, firmware)."""
    import kasched

    return sys.executable, str(Path(kasched.__file__).resolve().parent.parent)
