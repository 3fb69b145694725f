"""kasched's kexec commands on a real kernel: a QEMU VM (Debian's cloud kernel, TCG) runs the exact
shell that the kexec variants send a node over SSH, and the second kernel says what it booted.

The lab's nodes are network namespaces: kexec cannot replace their (the host's) kernel, so the
deployment tests only see kexec refused (docs/deployment.md, "kexec: what runs where"). Here the
jump itself is real:

* setup: the deployment system's kernel and initrd, where ``send_boot_files`` puts them
  (``/run/kasched-kexec``), loaded with the boot profile's command line and jumped to;
* boot: the environment's kernel and initrd read from partition 3 of the VM's disk, booted with
  ``root=<partition> ro`` and the environment's command line.

Needs root (the lab's cache), QEMU and Debian's packages (scripts/packages/lab.txt).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from kasched.deploy.kexec import KEXEC_FILES, kexec_command, kexec_setup_command
from kasched.deploy.steps import StepContext
from kasched.drivers.base import BootFiles, NodeTarget
from kasched.lab.systems import make_ext4_image, make_initramfs
from kasched.lab.vm import VIRTIO_DISK_MODULES, Kernel, Vm
from kasched.views import EnvironmentView
from tests.deploy.test_kexec import ENV

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BOOT_TIMEOUT = 120.0  # two kernels under TCG: about 10 s here; generous for a loaded CI machine
SECOND = "KASCHED-SECOND-KERNEL"
# The second system says what it booted, then powers the VM off (QEMU exits: -no-reboot)
SECOND_INIT = f"""#!/bin/sh
mount -t proc proc /proc
echo "{SECOND} cmdline=[$(cat /proc/cmdline)] root_fs=$(stat -f -c %T /)"
poweroff -f
"""


def vm_environment(cmdline: str) -> EnvironmentView:
    """An environment whose kernel and initrd are /boot/vmlinuz and /boot/initrd.img in its image."""
    return replace(ENV, name="vm-env", kernel="/boot/vmlinuz", initrd="/boot/initrd.img", cmdline=cmdline)


def put_boot_files(directory: Path, kernel: Path, initrd: Path) -> None:
    """``kernel`` and ``initrd`` as ``directory``/vmlinuz and initrd.img."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel, directory / "vmlinuz")
    shutil.copyfile(initrd, directory / "initrd.img")


def system_tree(base: Path, dest: Path, init: str) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    for directory in ("proc", "sys", "dev", "run", "tmp", "mnt"):
        (dest / directory).mkdir(exist_ok=True)
    (dest / "init").write_text(init)
    (dest / "init").chmod(0o755)
    return dest


def first_init(modules: list[str]) -> str:
    """The first system loads ``modules``, runs /kasched-command.sh as a node's SSH session would (sh,
    its own process) and says how it ended; then it waits for the jump, or powers off at once if the
    command failed."""
    return "\n".join(
        [
            "#!/bin/sh",
            "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev",
            *modules,
            "for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /dev/vda3 ] && break; sleep 0.5; done",
            "sh /kasched-command.sh; status=$?; echo KASCHED-COMMAND-EXIT $status",
            "[ $status -eq 0 ] && sleep 120 && echo KASCHED-NO-JUMP; poweroff -f",
            "",
        ]
    )


def disk_with_partition_3(tree: Path, work: Path) -> Path:
    """A disk image whose partition 3 is an ext4 file system holding ``tree`` (1 and 2 are empty)."""
    disk = work / "disk.img"
    with open(disk, "wb") as handle:
        handle.truncate(80 << 20)
    layout = "label: dos\nstart=2048, size=2048\nstart=4096, size=2048\nstart=8192, size=131072\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout, text=True, check=True)
    filesystem = make_ext4_image(tree, work / "p3.img", 64)
    subprocess.run(
        ["dd", f"if={filesystem}", f"of={disk}", "bs=512", "seek=8192", "conv=notrunc", "status=none"], check=True
    )
    return disk


def test_setup_by_kexec_jumps_into_the_deployment_system(vm_kernel: Kernel, kexec_base: Path, tmp_path: Path) -> None:
    second = make_initramfs(system_tree(kexec_base, tmp_path / "second", SECOND_INIT), tmp_path / "second.img")
    first = system_tree(kexec_base, tmp_path / "first", first_init([]))
    sent = first / KEXEC_FILES.lstrip("/")  # where send_boot_files pushes them
    sent.mkdir(parents=True)
    shutil.copyfile(vm_kernel.image, sent / "kernel")
    shutil.copyfile(second, sent / "initrd")
    cmdline = "console=ttyS0 panic=-1 kasched.system=deploy kasched.note='two words'"
    (first / "kasched-command.sh").write_text(kexec_setup_command(BootFiles(vm_kernel.image, second, cmdline)))
    initrd = make_initramfs(first, tmp_path / "first.img")
    with Vm(vm_kernel.image, initrd, "console=ttyS0 panic=-1", tmp_path / "console.log") as vm:
        seen = vm.wait_for(SECOND, BOOT_TIMEOUT)
    assert "KASCHED-COMMAND-EXIT 0" in seen
    assert f"{SECOND} cmdline=[{cmdline}]" in seen, seen[-2000:]


def test_boot_by_kexec_jumps_into_the_environment_of_partition_3(vm_kernel: Kernel, kexec_base: Path, tmp_path: Path) -> None:
    env = vm_environment("console=ttyS0 panic=-1 quiet")
    environment = system_tree(kexec_base, tmp_path / "environment", SECOND_INIT)
    (environment / "boot").mkdir()
    shutil.copyfile(vm_kernel.image, environment / "boot" / "vmlinuz")
    make_initramfs(system_tree(kexec_base, tmp_path / "env-initrd", SECOND_INIT), environment / "boot" / "initrd.img")
    disk = disk_with_partition_3(environment, tmp_path)
    node = NodeTarget("vm-1", "02:00:00:00:00:01", "10.0.0.1", disk_device="/dev/vda")
    first = system_tree(kexec_base, tmp_path / "first", "")
    (first / "init").write_text(first_init(vm_kernel.add_modules(first, VIRTIO_DISK_MODULES)))
    ctx = StepContext(
        targets={node.name: node}, placement={node.name: ("sw1", "r1")}, power={},
        soft=None, boot=None, shell=None, environment=env, partition=lambda target: 3,
    )  # type: ignore[arg-type]  # fmt: skip  (the command needs the environment only)
    (first / "kasched-command.sh").write_text(kexec_command(ctx, node, 3))
    initrd = make_initramfs(first, tmp_path / "first.img")
    with Vm(vm_kernel.image, initrd, "console=ttyS0 panic=-1", tmp_path / "console.log", disk=disk) as vm:
        seen = vm.wait_for(SECOND, BOOT_TIMEOUT)
    assert "KASCHED-COMMAND-EXIT 0" in seen, seen[-2000:]
    assert f"{SECOND} cmdline=[root=/dev/vda3 ro console=ttyS0 panic=-1 quiet]" in seen, seen[-2000:]
