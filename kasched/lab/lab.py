"""``kasched lab up|status|down``: a virtual cluster kasched manages like real hardware.

Everything a lab creates is found again from its name and state directory alone (namespaces
``kl-<name>``/``kl-<name>-*``, loop devices backed by files under the state directory, the state
directory itself), so :meth:`Lab.down` cleans up after a crash or ``kill -9`` and is harmless twice.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from kasched.drivers.base import BootTarget, NodeTarget
from kasched.drivers.pxe import PxeBootDriver
from kasched.errors import LabError
from kasched.lab import disk, rootfs, systems
from kasched.lab.bmc import BMC_PORT, BmcCredentials
from kasched.lab.dhcp import LabDnsmasq
from kasched.lab.http import LabHttp
from kasched.lab.network import create_lab_namespace, delete_namespace
from kasched.lab.nodekind import LabContext, NamespaceNodeKind, NodeKind
from kasched.lab.qemu import QemuNodeKind
from kasched.lab.system import inside_netns, kill_and_wait, netns_exists, netns_pids, require, run
from kasched.lab.topology import LabPlan, NodePlan

DEFAULT_STATE_ROOT = Path("/var/lib/kasched-lab")
# Where each lab's state directory is noted while it exists (on tmpfs: gone at reboot, like the lab),
# so ``lab status``/``lab down`` without --state-dir find a lab made with one.
POINTER_DIR = Path("/run/kasched-lab")
BMC_USER = "admin"
NODE_KINDS: dict[str, type[NodeKind]] = {kind.name: kind for kind in (NamespaceNodeKind, QemuNodeKind)}
_TOOLS = ("ip", "tc", "ipmi_sim", "dnsmasq", "busybox", "sshd", "ssh-keygen", "mkfs.ext4", "sfdisk",
          "partx", "unshare", "apt-get", "dpkg-deb")  # fmt: skip


class Lab:
    def __init__(
        self,
        name: str = "lab",
        state_dir: Path | None = None,
        cache_dir: Path = rootfs.DEFAULT_CACHE,
        kind: str | None = None,
    ) -> None:
        """``kind``: the node kind of a lab to build (default: the kind of the lab in ``state_dir``,
        else ``namespace``)."""
        self.name = name
        self.state_dir = Path(state_dir or _noted_state_dir(name) or DEFAULT_STATE_ROOT / name).resolve()
        self.cache_dir = cache_dir
        kind = kind or (self.read_state() or {}).get("kind") or NamespaceNodeKind.name
        if kind not in NODE_KINDS:
            raise LabError(f"unknown node kind {kind!r} (known: {', '.join(NODE_KINDS)})")
        self.kind: NodeKind = NODE_KINDS[kind]()

    # -- files ------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "lab.json"

    @property
    def boot_dir(self) -> Path:
        return self.state_dir / "boot"

    @property
    def inventory_file(self) -> Path:
        return self.state_dir / "inventory.yaml"

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / "credentials.yaml"

    @property
    def service_key(self) -> Path:
        return self.state_dir / "ssh" / "id_ed25519"

    def read_state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
            return state
        except (OSError, ValueError):
            return None

    def plan(self) -> LabPlan:
        state = self.read_state()
        if state is None:
            raise LabError(f"no lab {self.name} in {self.state_dir} (run kasched lab up)")
        return LabPlan(**state["plan"])

    def credentials(self) -> BmcCredentials:
        data = yaml.safe_load(self.credentials_file.read_text())
        entry = data[f"{self.name}-bmc"]
        return BmcCredentials(entry["user"], entry["password"])

    def context(self, plan: LabPlan) -> LabContext:
        return LabContext(plan, self.state_dir, self.state_dir / "systems" / "golden.img", self.credentials())

    # -- up ---------------------------------------------------------------------------------------
    def up(self, plan: LabPlan, *, boot_timeout: float = 120) -> dict[str, Any]:
        """Build the lab and boot every node into its reference environment; idempotent."""
        require(*_TOOLS)
        state = self.read_state()
        if state and state.get("status") == "up" and netns_exists(f"kl-{self.name}"):
            if LabPlan(**state["plan"]) != plan:
                raise LabError(f"lab {self.name} is already up with {state['plan']}; run kasched lab down first")
            return {**state, "already_up": True}
        noted = _noted_state_dir(self.name)
        if noted is not None and noted != self.state_dir:
            Lab(self.name, noted, self.cache_dir, self.kind.name).down()  # same name, older directory
        self.down()  # leftovers of a crashed or killed lab up
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)
        self._write_state(plan, "building")
        POINTER_DIR.mkdir(parents=True, exist_ok=True)
        (POINTER_DIR / self.name).write_text(f"{self.state_dir}\n")
        self._write_credentials()
        self._build_systems()
        create_lab_namespace(plan)
        ctx = self.context(plan)
        self.kind.create(ctx, list(plan.nodes_list))
        self._start_boot_services(plan)
        for node in plan.nodes_list:
            self.kind.power_on(ctx, node)
        waiting = self.wait_for_ssh(plan.nodes_list, timeout=boot_timeout)
        if waiting:
            raise LabError(
                f"nodes did not boot in {boot_timeout:.0f} s: {', '.join(waiting)} (see their console.log;"
                f" kasched lab down --name {self.name} removes what was built)"
            )
        self._write_inventory(plan)
        self._write_config(plan)
        elapsed = round(time.monotonic() - started, 2)
        self._write_state(plan, "up", up_seconds=elapsed)
        return self.read_state() or {}

    def _write_state(self, plan: LabPlan, status: str, **extra: Any) -> None:
        data = {"name": self.name, "kind": self.kind.name, "plan": plan.as_dict(), "status": status}
        data.update(extra)
        self.state_file.write_text(json.dumps(data, indent=1) + "\n")

    def _write_credentials(self) -> None:
        data = {f"{self.name}-bmc": {"user": BMC_USER, "password": secrets.token_hex(8)}}
        self.credentials_file.write_text(yaml.safe_dump(data))
        self.credentials_file.chmod(0o600)

    def _build_systems(self) -> None:
        """The reference ext4 image, the golden disk, the deploy and stateless initramfs images."""
        kind, cache = self.kind, self.cache_dir
        service_key, host_key = systems.make_keys(self.state_dir / "ssh")
        keys = systems.SystemKeys(host_key, service_key.with_suffix(".pub").read_text())
        work = self.state_dir / "systems"
        work.mkdir(exist_ok=True)
        base = rootfs.build_rootfs(cache, kind.packages(systems.REFERENCE))
        tree = systems.make_tree(base, work / "tree", systems.REFERENCE, keys)
        kind.finish_tree(tree, systems.REFERENCE, cache)
        reference = systems.make_ext4_image(tree, work / "reference.ext4", disk.REFERENCE_MIB)
        disk.make_golden_disk(work / "golden.img", reference)
        reference.unlink()
        for role in (systems.DEPLOY, systems.STATELESS):
            systems.make_tree(rootfs.build_rootfs(cache, kind.packages(role)), tree, role, keys)
            if role == systems.DEPLOY:
                systems.add_kasched_package(tree)
            kind.finish_tree(tree, role, cache)
            (self.boot_dir / role).mkdir(parents=True, exist_ok=True)
            systems.make_initramfs(tree, self.boot_dir / role / "initrd.img")
        shutil.rmtree(tree)
        kind.write_kernels(self.boot_dir, base, cache)
        for directory in (self.boot_dir, *self.boot_dir.iterdir()):
            directory.chmod(0o755)

    def _start_boot_services(self, plan: LabPlan) -> None:
        targets = self.targets(plan)
        driver = self.boot_driver()
        for target in targets:
            driver.set_profile(target, BootTarget.LOCAL, partition=target.reference_partition)
        dnsmasq = LabDnsmasq(self.state_dir, plan.netns)
        dnsmasq.configure(targets, self.boot_dir)
        dnsmasq.start()
        LabHttp(self.state_dir, plan.netns, self.boot_dir).start()

    def boot_driver(self, *, http: bool = False) -> PxeBootDriver:
        """The boot-profile driver for this lab's TFTP root, as the lab's site configuration sets it
        up; ``http``: profiles load kernels and images from the lab's HTTP server (not TFTP)."""
        settings = self.kind.site_settings()
        return PxeBootDriver(
            self.boot_dir,
            local_initrd=str(settings.get("pxe_local_initrd", "")),
            kernel_args=str(settings.get("pxe_kernel_args", "")),
            base_url="http://${next-server}/" if http else str(settings.get("pxe_base_url", "")),
        )

    def wait_for_ssh(self, nodes: tuple[NodePlan, ...] | list[NodePlan], timeout: float) -> list[str]:
        """Wait (bounded) until each node's sshd accepts TCP; returns the nodes still silent."""
        waiting = {node.name: node.ip for node in nodes}
        deadline = time.monotonic() + timeout
        with inside_netns(f"kl-{self.name}"):
            while waiting and time.monotonic() < deadline:
                for name, ip in list(waiting.items()):
                    if _port_open(ip, 22):
                        del waiting[name]
                if waiting:
                    time.sleep(0.2)
        return sorted(waiting)

    def make_environment(self, archive: Path, system: str = "userenv") -> Path:
        """A bootable environment as a tar.gz, for deployments on this lab: the reference tree with
        ``/etc/kasched-system`` = ``system``, the service's key and the lab's host key."""
        base = rootfs.build_rootfs(self.cache_dir, self.kind.packages("environment"))
        service_key, host_key = systems.make_keys(self.state_dir / "ssh")
        keys = systems.SystemKeys(host_key, service_key.with_suffix(".pub").read_text())
        tree = systems.make_tree(base, self.state_dir / "systems" / f"env-{os.getpid()}", system, keys)
        try:
            self.kind.finish_tree(tree, "environment", self.cache_dir)
            archive = Path(archive).resolve()
            archive.parent.mkdir(parents=True, exist_ok=True)
            run(["tar", "-C", str(tree), "--numeric-owner", "-czf", str(archive), "."], timeout=300)
        finally:
            shutil.rmtree(tree, ignore_errors=True)
        return archive

    # -- what the core imports --------------------------------------------------------------------
    def targets(self, plan: LabPlan | None = None) -> list[NodeTarget]:
        """The nodes as drivers see them, credentials resolved."""
        plan = plan or self.plan()
        creds = self.credentials()
        return [
            NodeTarget(
                name=node.name,
                mac=node.mac,
                ip=node.ip,
                bmc_address=node.bmc_address,
                bmc_port=BMC_PORT,
                bmc_user=creds.user,
                bmc_password=creds.password,
                disk_device=self.kind.disk_device,
                reference_partition=disk.REFERENCE_PARTITION,
                deploy_partition=disk.DEPLOY_PARTITION,
            )
            for node in plan.nodes_list
        ]

    def _write_inventory(self, plan: LabPlan) -> None:
        entries = [
            {"name": n.name, "mac": n.mac, "ip": n.ip, "bmc": {"address": n.bmc_address},
             "switch": n.switch_name, "rack": f"r{n.switch}"}
            for n in plan.nodes_list
        ]  # fmt: skip
        inventory = {
            "site": "lab",
            "clusters": [
                {
                    "name": self.name,
                    "defaults": {
                        "bmc": {"driver": "ipmi", "port": BMC_PORT, "credentials": f"{self.name}-bmc"},
                        "disk": {
                            "device": self.kind.disk_device,
                            "reference_partition": disk.REFERENCE_PARTITION,
                            "deploy_partition": disk.DEPLOY_PARTITION,
                        },
                    },
                    "nodes": entries,
                }
            ],
        }
        header = (
            f"# Lab {self.name}, written by kasched lab up. Import with: kasched nodes import {self.inventory_file}\n"
            f"# BMC credentials: {self.credentials_file}\n"
        )
        self.inventory_file.write_text(header + yaml.safe_dump(inventory, sort_keys=False))

    def _write_config(self, plan: LabPlan) -> None:
        config = {
            "site": "lab",
            "state_dir": str(self.state_dir / "kasched"),
            "boot_dir": str(self.boot_dir),
            "credentials_file": str(self.credentials_file),
            "service_key": str(self.state_dir / "ssh" / "id_ed25519"),
            "console_logs": str(self.state_dir / "nodes"),  # kasched console -m NODE: nodes/<node>/console.log
            # the lab's server sits on a switch, with no link of its own: faster than the nodes'
            "broadcast_source_rate": plan.link,
            **self.kind.site_settings(),
        }
        (self.state_dir / "kasched.yaml").write_text(yaml.safe_dump(config))

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        state = self.read_state()
        if state is None:
            return {"name": self.name, "status": "absent", "state_dir": str(self.state_dir), "nodes": []}
        plan = LabPlan(**state["plan"])
        ctx = self.context(plan)
        nodes = [self.kind.node_status(ctx, node) for node in plan.nodes_list]
        with inside_netns(plan.netns):
            for entry, node in zip(nodes, plan.nodes_list, strict=True):
                entry["ssh"] = _port_open(node.ip, 22)
        dnsmasq = LabDnsmasq(self.state_dir, plan.netns)
        return {
            **state,
            "state_dir": str(self.state_dir),
            "inventory": str(self.inventory_file),
            "credentials": str(self.credentials_file),
            "dnsmasq_running": dnsmasq.running(),
            "nodes": nodes,
        }

    # -- down -------------------------------------------------------------------------------------
    def down(self) -> list[str]:
        """Remove everything of the lab; returns what was removed. Harmless when nothing is left."""
        removed = self.kind.destroy(self.name, self.state_dir)
        lab_ns = f"kl-{self.name}"
        if netns_exists(lab_ns):
            for _ in range(3):
                pids = [pid for pid in netns_pids(lab_ns) if pid != os.getpid()]
                if not pids:
                    break
                kill_and_wait(pids)
            delete_namespace(lab_ns)
            removed.append(f"namespace {lab_ns}")
        for device in disk.detach_all(self.state_dir):
            removed.append(f"loop device {device}")
        _unmount_below(self.state_dir)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
            removed.append(f"directory {self.state_dir}")
        if _noted_state_dir(self.name) == self.state_dir:
            (POINTER_DIR / self.name).unlink(missing_ok=True)
        return removed


def _noted_state_dir(name: str) -> Path | None:
    try:
        return Path((POINTER_DIR / name).read_text().strip())
    except OSError:
        return None


def _port_open(ip: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unmount_below(directory: Path) -> None:
    prefix = str(directory) + os.sep
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = sorted((line.split()[4] for line in lines if line.split()[4].startswith(prefix)), reverse=True)
    for point in points:
        run(["umount", "-l", point], check=False)
