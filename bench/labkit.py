"""What the lab benches share: a lab that is always torn down, its nodes booted into the deployment
system, and the other tools (TakTuk, udpcast) put into the nodes' running systems.

The lab's node systems are built from Debian packages (``kasched.lab.rootfs``) and run in their own
mount namespace (a tmpfs root, ``chroot``): host binaries are *not* visible there. The deployment
system has python3, paramiko, tar, xz and zstd, but neither Perl (TakTuk) nor udpcast. ``install_extras``
builds a small tree of those Debian packages plus the packages of the libraries they load (with the
lab's own rootfs helpers), caches it as a tarball under the lab cache, and unpacks it into each running
node with ``nsenter`` into the node's mount namespace and root (the node's own GNU tar does the work;
nothing on the host file system is written through a node's symlinks). It lasts until the node reboots.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

import yaml  # noqa: E402

from kasched.drivers.base import BootTarget  # noqa: E402
from kasched.lab import rootfs  # noqa: E402
from kasched.lab.lab import Lab  # noqa: E402
from kasched.lab.system import inside_netns, netns_pids  # noqa: E402
from kasched.lab.topology import LabPlan  # noqa: E402
from kasched.transports import tree  # noqa: E402

KASCHED = [sys.executable, "-m", "kasched"]
EXTRA_PACKAGES = ("perl-base", "taktuk", "udpcast", "openssh-client")
BOOT_WAVE = 16  # nodes rebooted at once: more made TFTP time out on the loaded machine
SSH_OPTIONS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"


@dataclass
class LabRun:
    """A lab that is up: where its files are, its nodes (inventory entries) and the service key."""

    lab: Lab
    plan: LabPlan
    work: Path
    nodes: list[dict[str, Any]]

    @property
    def netns(self) -> str:
        return f"kl-{self.lab.name}"

    @property
    def key(self) -> Path:
        return self.lab.service_key

    @property
    def addresses(self) -> dict[str, str]:
        return {n["name"]: n["ip"] for n in self.nodes}

    def pins(self) -> dict[str, str]:
        """Each node's host key as kasched pins it: booted without a per-boot key, the lab's systems
        present the lab's own host key."""
        key = " ".join((self.lab.state_dir / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        return {node["name"]: key for node in self.nodes}

    def ssh_connector(self) -> str:
        """An OpenSSH command line with the service key (TakTuk's connector, ClusterShell's ssh)."""
        return f"ssh -i {self.key} {SSH_OPTIONS} -l root"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:6])}: {(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


@contextlib.contextmanager
def lab_up(plan: LabPlan, *, deploy: bool = True, extras: bool = False) -> Iterator[LabRun]:
    """Bring the lab up (removing leftovers of an earlier run), boot its nodes into the deployment
    system if ``deploy``, install TakTuk/udpcast there if ``extras``; always tear it down."""
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix=f"kasched-bench-{plan.name}-"))
    lab = Lab(plan.name, state_dir=work / "lab")
    lab.down()
    try:
        lab.up(plan, boot_timeout=max(120, 2 * plan.nodes))
        inventory = yaml.safe_load(lab.inventory_file.read_text())["clusters"][0]["nodes"]
        labrun = LabRun(lab, plan, work, inventory)
        if deploy:
            boot_deploy_system(labrun)
        if extras:
            install_extras(labrun)
        yield labrun
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM (timeout(1) sends one) must not stop this
        try:
            lab.down()
        except OSError:  # a file vanished under rmtree (a node still shutting down): once more
            time.sleep(2)
            lab.down()
        shutil.rmtree(work, ignore_errors=True)


def boot_deploy_system(labrun: LabRun, timeout: float = 900) -> None:
    """Every node into the deployment system: its boot profile set to it (kasched's PXE driver),
    then ``reboot`` from inside (the lab's power supply boots it again, from the network).

    Not ``kasched reboot`` (IPMI): with 64 nodes on 2 cores shared with other work, the BMCs timed
    out (``did not answer ... in 15 s``); the benches measure the engine, not the power path.
    """
    driver = labrun.lab.boot_driver()
    for target in labrun.lab.targets(labrun.plan):
        driver.set_profile(target, BootTarget.DEPLOY)
    names = [n["name"] for n in labrun.nodes]
    deadline = time.monotonic() + timeout
    with inside_netns(labrun.netns):
        for start in range(0, len(names), BOOT_WAVE):
            _reboot_until_deploy(labrun, names[start : start + BOOT_WAVE], deadline)


def _reboot_until_deploy(labrun: LabRun, names: list[str], deadline: float) -> None:
    """Reboot ``names`` and wait; reboot again those that fell back to the disk (a TFTP timeout
    under load makes the firmware boot the reference system)."""
    ssh = {"key_file": str(labrun.key), "addresses": labrun.addresses, "window": 16}
    reboot, waiting = list(names), list(names)
    while waiting and time.monotonic() < deadline:
        if reboot:
            tree.run(reboot, "(sleep 0.2; reboot) >/dev/null 2>&1 &", connect_timeout=30, command_timeout=30, **ssh)
            time.sleep(3)
        seen = tree.run(waiting, "cat /etc/kasched-system", connect_timeout=5, command_timeout=10, **ssh)
        systems = {n: r.value.stdout.strip() if r.ok and r.value else "" for n, r in seen.items()}
        waiting = [n for n, system in systems.items() if system != "deploy"]
        reboot = [n for n, system in systems.items() if system and system != "deploy"]
        if waiting and not reboot:
            time.sleep(2)
    if waiting:
        raise SystemExit(f"not in the deployment system in time: {waiting[:8]}")


def extras_tarball(cache_dir: Path = rootfs.DEFAULT_CACHE) -> Path:
    """Perl, TakTuk and udpcast with the libraries they load, as a tarball (built once, cached)."""
    key = rootfs.cache_key(EXTRA_PACKAGES)
    tarball = cache_dir / f"bench-extras-{key}.tar"
    if tarball.exists():
        return tarball
    tree = cache_dir / f".bench-extras.build{os.getpid()}"
    shutil.rmtree(tree, ignore_errors=True)
    debs = cache_dir / "debs"
    extracted = set(EXTRA_PACKAGES)
    for package in EXTRA_PACKAGES:
        rootfs._extract(rootfs.fetch_deb(package, rootfs.package_version(package), debs), tree)
    for _ in range(3):
        needed = rootfs.library_packages(tree) - extracted - {"libc6"}
        if not needed:
            break
        for package in sorted(needed):
            rootfs._extract(rootfs.fetch_deb(package, rootfs.package_version(package), debs), tree)
        extracted |= needed
    for unwanted in ("usr/share/doc", "usr/share/man", "usr/share/lintian", "etc"):
        shutil.rmtree(tree / unwanted, ignore_errors=True)
    partial = tarball.with_suffix(f".part{os.getpid()}")
    run("tar", "-C", str(tree), "--numeric-owner", "-cf", str(partial), ".")
    os.replace(partial, tarball)
    shutil.rmtree(tree, ignore_errors=True)
    return tarball


def node_root_pid(netns: str) -> int:
    """A process of the node's running system (its sshd), to enter its mount namespace and root."""
    for pid in netns_pids(netns):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sshd":
                return pid
    raise SystemExit(f"no sshd in {netns}")


def install_extras(labrun: LabRun) -> None:
    """Unpack the extras tarball into every node's running system (its own tar, in its own root)."""
    tarball = extras_tarball()

    def install(node: dict[str, Any]) -> None:
        pid = node_root_pid(f"{labrun.netns}-{node['name']}")
        with open(tarball, "rb") as data:
            subprocess.run(["nsenter", "-t", str(pid), "-m", "-r", "-w", "--", "/bin/tar", "-x", "-f", "-",
                            "-C", "/", "--keep-directory-symlink", "--no-overwrite-dir"],
                           stdin=data, check=True, capture_output=True, timeout=120)  # fmt: skip

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(install, labrun.nodes))
    # TakTuk's inner nodes connect to their children with the same connector, so the service key is
    # also put on each node, at the same path as on the host.
    key = labrun.key.read_bytes()

    def install_key(node: dict[str, Any]) -> None:
        pid = node_root_pid(f"{labrun.netns}-{node['name']}")
        script = f"mkdir -p {labrun.key.parent} && cat > {labrun.key} && chmod 600 {labrun.key}"
        subprocess.run(["nsenter", "-t", str(pid), "-m", "-r", "-w", "--", "/bin/sh", "-c", script], input=key,
                       check=True, capture_output=True, timeout=60)  # fmt: skip

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(install_key, labrun.nodes))


def in_lab(labrun: LabRun, *argv: str) -> list[str]:
    """A command line run in the lab's namespace (where the nodes are reachable), with the host's files."""
    return ["ip", "netns", "exec", labrun.netns, *argv]


def ratio_line(label: str, value: float) -> str:
    """The lines the smoke tests look for: ``RATIO <label> = <value>``."""
    return f"RATIO {label} = {value:.2f}"


class CpuMeter:
    """How busy the host's CPUs were between ``start()`` and ``busy()``, from /proc/stat: the lab's
    nodes all share them, so a share near 1.0 means the lab, not the method, set the pace."""

    def __init__(self) -> None:
        self.first = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    def start(self) -> None:
        self.first = self._sample()

    def busy(self) -> float:
        """The busy share of all CPUs since ``start()``, 0..1."""
        busy, total = self._sample()
        return (busy - self.first[0]) / max(1, total - self.first[1])
