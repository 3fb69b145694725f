"""QEMU lab nodes: each node a VM (TCG) with a real kernel, network boot ROM and virtio disk.

What differs from :class:`~kasched.lab.nodekind.NamespaceNodeKind`, and what does not:

* the node's namespace and cable are the same (``eth0``, shaped, on its switch); inside it a bridge
  joins ``eth0`` to the VM's tap port, so the VM's card (the node's MAC) is on the switch;
* its BMC is the same ``ipmi_sim`` and chassis program; its power supply runs QEMU instead of the
  simulated firmware. QEMU's ROM (iPXE, package ``ipxe-qemu``) really boots from the network: DHCP
  and the boot script from the lab's dnsmasq, the kernel and initrd over HTTP from the lab's server.
  The VM always boots from the network, as the lab's profiles expect (its disk has no boot loader);
  a reboot inside the VM goes through the ROM again, a power off inside it ends QEMU (power off);
* its disk is a raw image file, the virtio disk ``/dev/vda`` (no loop device);
* the systems carry a real kernel's modules: the deployment and stateless initramfs load the virtio
  modules at boot (``/etc/kasched-modules``); a local partition boots the site's kernel with a small
  initramfs (``reference/initrd.img``) that loads them, mounts ``root=`` and switches to it. Systems
  on disk (the reference, the environments the lab makes) carry that kernel and initramfs in
  ``/boot``, so that kasched's kexec variants can boot them; the reference and deployment systems
  have kexec-tools.

Under TCG a node boots in tens of seconds and runs Python several times slower than the host: the
QEMU kind is for fidelity (kexec, a real kernel's network and disk), the namespace kind for numbers.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from kasched.errors import LabError
from kasched.lab import disk, systems
from kasched.lab.network import ip_batch
from kasched.lab.nodedir import NodeDir, NodeFacts
from kasched.lab.nodekind import NamespaceNodeKind, pythonpath
from kasched.lab.rootfs import BASE_PACKAGES, DEPLOY_PACKAGES
from kasched.lab.system import run
from kasched.lab.topology import NodePlan
from kasched.lab.vm import (
    KEXEC_TOOLS,
    QEMU,
    VIRTIO_DISK_MODULES,
    VIRTIO_NET_MODULES,
    Kernel,
    fetch_kernel,
    qemu_missing,
)

MEMORY_MIB = 1024  # the deployment system (python3 and its libraries) lives in RAM
LOCAL_INITRD = "reference/initrd.img"
KERNEL_ARGS = "console=ttyS0"
MODULE_LIST = "etc/kasched-modules"
_POWER = """#!/bin/sh
# Power supply of lab node {name}: a QEMU VM (TCG) booting from the network; console in console.log.
echo "kasched-lab: power on, booting {name}"
exec {qemu} -name {name} -accel tcg -m {memory} -nodefaults -no-user-config -display none -monitor none \\
  -chardev file,id=console,path='{console}',append=on -serial chardev:console \\
  -drive file='{disk}',format=raw,if=virtio \\
  -netdev tap,id=net0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=net0,mac={mac} \\
  -boot order=n
"""
_LOCAL_INIT = """#!/bin/sh
# kasched lab: the initramfs of a local partition's kernel: load the disk and network drivers, mount
# root= (read-write, as the lab's systems expect) and switch to its init.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t devtmpfs dev /dev
{modules}
root=""
for word in $(cat /proc/cmdline); do case "$word" in root=*) root="${{word#root=}}";; esac; done
for i in $(seq 50); do [ -b "$root" ] && break; sleep 0.1; done
mkdir -p /newroot
if ! mount -t ext4 "$root" /newroot; then echo "kasched-lab: cannot mount root=$root"; sleep 5; poweroff -f; fi
mount --move /dev /newroot/dev || umount /dev
# This boot's host key (an initrd kaschedd served for it, kasched.bootkeys), kept in RAM: the site's
# initramfs hook moves it to the booted system's /run (whose rcS keeps a /run already mounted).
if [ -d /kasched-boot ]; then
  mount -t tmpfs -o mode=755 run /newroot/run && mkdir -p /newroot/run/kasched &&
    mv /kasched-boot /newroot/run/kasched/boot
fi
umount /proc
exec switch_root /newroot /sbin/init
"""


class QemuNodeKind(NamespaceNodeKind):
    """Nodes as QEMU VMs that boot from the network for real; the rest is the namespace kind's."""

    name = "qemu"
    disk_device = "/dev/vda"

    def __init__(self) -> None:
        self._kernel: Kernel | None = None

    def kernel(self, cache_dir: Path) -> Kernel:
        if self._kernel is None:
            if reason := qemu_missing():
                raise LabError(reason)
            self._kernel = fetch_kernel(cache_dir)
        return self._kernel

    # -- systems ----------------------------------------------------------------------------------
    def packages(self, role: str) -> tuple[str, ...]:
        return (*DEPLOY_PACKAGES, *KEXEC_TOOLS) if role == systems.DEPLOY else (*BASE_PACKAGES, *KEXEC_TOOLS)

    def finish_tree(self, tree: Path, role: str, cache_dir: Path) -> None:
        kernel = self.kernel(cache_dir)
        if role in (systems.DEPLOY, systems.STATELESS):
            lines = kernel.add_modules(tree, [*VIRTIO_NET_MODULES, *VIRTIO_DISK_MODULES])
            (tree / MODULE_LIST).write_text("".join(line.removeprefix("insmod ") + "\n" for line in lines))
            return
        boot = tree / "boot"
        boot.mkdir(exist_ok=True)
        shutil.copyfile(kernel.image, boot / "vmlinuz")
        self._local_initrd(tree, boot / "initrd.img", cache_dir)

    def write_kernels(self, boot_dir: Path, base_tree: Path, cache_dir: Path) -> None:
        image = self.kernel(cache_dir).image
        for role in (systems.DEPLOY, systems.STATELESS, systems.REFERENCE):
            (boot_dir / role).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, boot_dir / role / "vmlinuz")
        self._local_initrd(base_tree, boot_dir / LOCAL_INITRD, cache_dir)

    def _local_initrd(self, base_tree: Path, image: Path, cache_dir: Path) -> None:
        """The local partition's initramfs at ``image``: built once per kernel and script into the
        cache (the lab's reference, its boot directory and each environment carry the same one)."""
        kernel = self.kernel(cache_dir)
        key = hashlib.sha256(f"{kernel.modules}\n{_LOCAL_INIT}".encode()).hexdigest()[:12]
        cached = cache_dir / f"local-initrd-{key}.img"
        if not cached.exists():
            tree = cached.with_name(cached.name + ".tree")
            shutil.rmtree(tree, ignore_errors=True)
            for directory in ("bin", "proc", "dev", "newroot"):
                (tree / directory).mkdir(parents=True)
            shutil.copy2(base_tree / "bin" / "busybox", tree / "bin" / "busybox")
            (tree / "bin" / "sh").symlink_to("busybox")
            modules = kernel.add_modules(tree, [*VIRTIO_DISK_MODULES, *VIRTIO_NET_MODULES])
            (tree / "init").write_text(_LOCAL_INIT.format(modules="\n".join(modules)))
            (tree / "init").chmod(0o755)
            systems.make_initramfs(tree, cached)  # written whole, then renamed
            shutil.rmtree(tree)
        shutil.copyfile(cached, image)

    def site_settings(self) -> dict[str, object]:
        return {
            "pxe_base_url": "http://${next-server}/",  # TFTP of a kernel under TCG takes 20 s
            "pxe_local_initrd": LOCAL_INITRD,
            "pxe_kernel_args": KERNEL_ARGS,
            "reboot_timeout": 150,  # a VM under TCG: ROM, HTTP, kernel, initramfs, sshd
        }

    # -- nodes ------------------------------------------------------------------------------------
    def make_node(self, node: NodePlan, node_dir: NodeDir, golden_disk: Path) -> None:
        """The VM's tap port on the node's cable, its disk image file, its facts and power supply."""
        _cable_vm(node)
        image = node_dir.path / "disk.img"
        disk.copy_disk(golden_disk, image)
        node_dir.write_facts(NodeFacts(node.name, node.netns, node.mac, str(image), self.disk_device, *pythonpath()))
        _write_power_supply(node_dir)


def _cable_vm(node: NodePlan) -> None:
    """Inside the node's namespace: a bridge joining the cable (``eth0``) and the VM's tap port. The
    cable's end takes another MAC: the node's own belongs to the VM's card."""
    first, rest = node.mac.split(":", 1)
    cable_mac = f"{int(first, 16) ^ 0x04:02x}:{rest}"  # still locally administered, unicast
    run(["ip", "-n", node.netns, "tuntap", "add", "dev", "tap0", "mode", "tap"])
    ip_batch(
        node.netns,
        [
            f"link set eth0 address {cable_mac}",
            "link add nb0 type bridge stp_state 0 forward_delay 0",
            "link set eth0 master nb0",
            "link set tap0 master nb0 up",
            "link set nb0 up",
        ],
    )


def _write_power_supply(node: NodeDir) -> None:
    facts = node.facts()
    script = _POWER.format(
        name=facts.name, qemu=QEMU, memory=MEMORY_MIB, console=node.console_log, disk=facts.disk_image, mac=facts.mac
    )
    node.power_script.write_text(script)
    node.power_script.chmod(0o755)
