"""QEMU virtual machines: a real Linux kernel booted under software emulation (TCG), its console on
a file. What the lab's network-namespace nodes cannot do runs here: a namespace shares the host's
kernel, so ``kexec -e`` cannot replace it there (and ``kexec -l`` from a node would load into the
host's kernel). The kernel is Debian's cloud kernel (``linux-image-cloud-amd64``), extracted once from
its .deb into the lab's cache, as the lab's root file systems are built (:mod:`kasched.lab.rootfs`).

A VM has at most one raw disk and one network card (virtio), the card on a tap device of a network
namespace, QEMU running in that namespace (no network at all otherwise: ``-nic none``); it is always
stopped on exit from its context, also on failure. TCG, not KVM: a KVM guest hung on this machine kind
(LAB-NOTES.md); a kernel and a busybox initramfs boot to ``/init`` in about 3 s under TCG.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kasched.errors import LabError
from kasched.lab.rootfs import BASE_PACKAGES, DEFAULT_CACHE, fetch_deb, package_version
from kasched.lab.system import run

QEMU = "qemu-system-x86_64"  # Debian package qemu-system-x86
KERNEL_PACKAGE = "linux-image-cloud-amd64"  # a metapackage: it depends on the versioned image
# A lab system (busybox, sshd...) that can kexec: with kexec-tools, and the package of kexec's
# libxenctrl.so.4.17, which Debian 12 ships in libxenmisc4.17 (not under the name its soname
# suggests, so the rootfs builder's guess by soname cannot find it)
KEXEC_TOOLS = ("kexec-tools", "libxenmisc4.17")
KEXEC_PACKAGES = (*BASE_PACKAGES, *KEXEC_TOOLS)
# The modules a guest needs for virtio devices, in load order (``modinfo -F depends``), then for its
# disk (ext4 is built in) or its network card
VIRTIO_PCI_MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
)
VIRTIO_DISK_MODULES = (*VIRTIO_PCI_MODULES, "drivers/block/virtio_blk.ko")
VIRTIO_NET_MODULES = (*VIRTIO_PCI_MODULES, "net/core/failover.ko", "drivers/net/net_failover.ko",
                      "drivers/net/virtio_net.ko")  # fmt: skip


@dataclass(frozen=True)
class Kernel:
    """A kernel image and its modules' directory (``lib/modules/<release>``)."""

    image: Path
    modules: Path

    def add_modules(self, tree: Path, names: Sequence[str]) -> list[str]:
        """Copy the modules ``names`` (paths under ``kernel/``) into ``tree``; the ``insmod`` lines
        that load them, in the order given, each once (lists of several devices may share modules)."""
        lines = []
        for name in dict.fromkeys(names):
            source = self.modules / "kernel" / name
            if not source.is_file():
                raise LabError(f"kernel module {name} is not in {self.modules}")
            dest = tree / "lib" / "modules" / self.modules.name / "kernel" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
            lines.append(f"insmod /{dest.relative_to(tree)}")
        return lines


@dataclass(frozen=True)
class Tap:
    """A VM's network card: tap ``device`` (created by :func:`add_tap`) in network namespace
    ``netns``, and the card's MAC address."""

    netns: str
    device: str
    mac: str


def add_tap(netns: str, device: str, bridge: str, mac: str) -> Tap:
    """A tap device in ``netns``, a port of ``bridge`` there, for one VM."""
    run(["ip", "-n", netns, "tuntap", "add", "dev", device, "mode", "tap"])
    run(["ip", "-n", netns, "link", "set", device, "master", bridge, "up"])
    return Tap(netns, device, mac)


def image_package() -> str:
    """The versioned kernel package the metapackage depends on (``linux-image-6.1.0-N-cloud-amd64``)."""
    for line in run(["apt-cache", "depends", KERNEL_PACKAGE]).splitlines():
        name = line.split(":", 1)[1].strip() if line.strip().startswith("Depends:") else ""
        if name.startswith("linux-image-"):
            return name
    raise LabError(f"{KERNEL_PACKAGE} depends on no linux-image package (apt-cache depends)")


def fetch_kernel(cache_dir: Path = DEFAULT_CACHE) -> Kernel:
    """Debian's cloud kernel, extracted once per version into ``cache_dir``."""
    package = image_package()
    version = package_version(package)
    final = cache_dir / f"kernel-{package}-{version.replace(':', '_')}"
    if not (final / ".complete").exists():
        work = final.with_name(final.name + ".build")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        run(["dpkg-deb", "-x", str(fetch_deb(package, version, cache_dir / "debs")), str(work)], timeout=300)
        (work / ".complete").write_text(f"{package} {version}\n")
        shutil.rmtree(final, ignore_errors=True)
        work.replace(final)
    images = sorted((final / "boot").glob("vmlinuz-*"))
    modules = sorted((final / "lib" / "modules").glob("*"))
    if not images or not modules:
        raise LabError(f"{package} {version} has no /boot/vmlinuz-* or /lib/modules/* ({final})")
    return Kernel(images[-1], modules[-1])


def qemu_missing() -> str | None:
    """Why no VM can start here (None: QEMU is installed)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian package qemu-system-x86; scripts/packages/lab.txt)"
    return None


class Vm:
    """One QEMU VM booting ``kernel`` with ``initrd`` and ``append``; its serial console goes to
    ``console``. Use as a context manager: the VM is killed on exit if still running."""

    def __init__(
        self, kernel: Path, initrd: Path, append: str, console: Path, *, disk: Path | None = None,
        tap: Tap | None = None, memory_mib: int = 512,
    ) -> None:  # fmt: skip
        self.console = console
        self.argv = [
            QEMU, "-accel", "tcg", "-m", str(memory_mib), "-nodefaults", "-no-user-config",
            "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{console}", "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        ]  # fmt: skip
        if disk is not None:
            self.argv += ["-drive", f"file={disk},format=raw,if=virtio"]
        if tap is None:
            self.argv += ["-nic", "none"]
        else:
            self.argv = ["ip", "netns", "exec", tap.netns, *self.argv, "-netdev",
                         f"tap,id=net0,ifname={tap.device},script=no,downscript=no",
                         "-device", f"virtio-net-pci,netdev=net0,mac={tap.mac}"]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Vm:
        if reason := qemu_missing():
            raise LabError(reason)
        self.console.unlink(missing_ok=True)
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)  # fmt: skip
        return self

    def output(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str, timeout: float) -> str:
        """The console's output once it holds ``text``. LabError, with the console's last lines, if
        the VM stops or ``timeout`` seconds pass first."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in (seen := self.output()):
                return seen
            if self.process.poll() is not None:
                raise LabError(f"the VM stopped (exit {self.process.returncode}) before printing {text!r}: "
                               f"{self._tail()}")  # fmt: skip
            time.sleep(0.1)
        raise LabError(f"the VM did not print {text!r} within {timeout:g} s: {self._tail()}")

    def _tail(self) -> str:
        lines = self.output().strip().splitlines()[-6:]
        if not lines and self.process is not None and self.process.poll() is not None and self.process.stderr:
            lines = self.process.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
        return " | ".join(lines) or "no output"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
