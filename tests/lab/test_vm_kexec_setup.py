"""The kexec variants of the setup and boot steps, whole, on a QEMU VM reached over SSH.

* setup: kasched checks that kexec is there, sends the deployment system's kernel and initrd (the
  PXE driver's files), sets the boot profile, leaves the reboot token, loads and jumps, sees the node
  go down and come back, and checks from the node that the deployment system runs
  (``kasched.system=deploy``, no token);
* boot: the environment's kernel and initrd, read from partition 3 of the VM's virtio disk, booted
  with ``root=/dev/vda3`` and the environment's command line; the profile says partition 3.

The VM runs a lab system (BusyBox init, sshd with the service's key) with kexec-tools, on a tap port
of a bridge in its own network namespace; the test talks to it from that namespace. The deployment
system it jumps into is the same initramfs, booted with the PXE profile's command line."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_vm_kexec import disk_with_partition_3, put_boot_files, vm_environment

from kasched.bootkeys import BootKeys
from kasched.deploy.kexec import boot_environment_kexec, setup_deploy_system_kexec
from kasched.deploy.nodes import NodeShell
from kasched.deploy.steps import StepContext
from kasched.drivers.base import NodeTarget
from kasched.drivers.pxe import PxeBootDriver
from kasched.lab.system import inside_netns
from kasched.lab.systems import SystemKeys, make_initramfs, make_keys, make_tree
from kasched.lab.vm import VIRTIO_DISK_MODULES, VIRTIO_NET_MODULES, Kernel, Tap, Vm, add_tap
from kasched.views import EnvironmentView

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SUBNET = "10.213.78"
NODE = NodeTarget("vm-1", "52:54:00:4b:53:01", f"{SUBNET}.1", disk_device="/dev/vda")
RCS = """#!/bin/sh
# A VM's lab system: what the lab's firmware does for a namespace node, then the network by hand.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
{modules}
mkdir -p /run/sshd && chmod 755 /run/sshd
if [ -d /kasched-boot ]; then mkdir -p /run/kasched && mv /kasched-boot /run/kasched/boot; fi
ip link set lo up; ip addr add {address}/24 dev eth0; ip link set eth0 up
echo "kasched-vm: up, cmdline [$(cat /proc/cmdline)]"
"""


@pytest.fixture
def network() -> Iterator[Tap]:
    netns = f"kvm{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        for args in (
            ["link", "add", "br0", "type", "bridge"],
            ["addr", "add", f"{SUBNET}.254/24", "dev", "br0"],
            ["link", "set", "br0", "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "-n", netns, *args], check=True)
        yield add_tap(netns, "tap0", "br0", NODE.mac)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def vm_system(kernel: Kernel, base: Path, work: Path) -> tuple[Path, Path]:
    """The VM's initramfs and the service's private key."""
    service_key, host_key = make_keys(work / "keys")
    keys = SystemKeys(host_key, service_key.with_suffix(".pub").read_text())
    tree = make_tree(base, work / "system", "deploy", keys)
    modules = "\n".join(kernel.add_modules(tree, [*VIRTIO_NET_MODULES, *VIRTIO_DISK_MODULES]))
    (tree / "etc" / "init.d" / "rcS").write_text(RCS.format(modules=modules, address=NODE.ip))
    return make_initramfs(tree, work / "system.img"), service_key


def system_key(work: Path) -> str:
    """The VM system's own host key (the one ``vm_system`` baked in), as a pin."""
    return " ".join((work / "keys" / "ssh_host_ed25519_key.pub").read_text().split()[:2])


def wait_for_ssh(shell: NodeShell, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if shell.run([NODE.name], "true", 30)[NODE.name].ok:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the VM's sshd did not answer within {timeout:g} s")
        time.sleep(1)


def step_context(driver: PxeBootDriver, shell: NodeShell, env: EnvironmentView | None) -> StepContext:
    return StepContext(
        targets={NODE.name: NODE}, placement={NODE.name: ("sw1", "r1")}, power={},
        soft=None, boot=driver, shell=shell, environment=env,  # type: ignore[arg-type]
        partition=lambda node: node.deploy_partition, reboot_timeout=180.0, command_timeout=120.0,
    )  # fmt: skip


def test_setup_by_kexec_over_ssh_boots_the_deployment_system(
    vm_kernel: Kernel, kexec_base: Path, network: Tap, tmp_path: Path
) -> None:
    initrd, service_key = vm_system(vm_kernel, kexec_base, tmp_path)
    boot_dir = tmp_path / "boot"
    put_boot_files(boot_dir / "deploy", vm_kernel.image, initrd)  # where the PXE driver looks
    driver = PxeBootDriver(boot_dir)
    shell = NodeShell(service_key, {NODE.name: NODE.ip}, pins={NODE.name: system_key(tmp_path)})
    ctx = step_context(driver, shell, None)
    ctx.trusted, ctx.keys = {NODE.name}, BootKeys(boot_dir)  # the verified reference, its key pinned
    append = "console=ttyS0 panic=-1 kasched.system=reference"
    with Vm(vm_kernel.image, initrd, append, tmp_path / "console.log", tap=network) as vm, inside_netns(network.netns):
        vm.wait_for("kasched-vm: up", 120)
        wait_for_ssh(shell, 120)
        before = shell.run([NODE.name], "cat /proc/cmdline", 30)[NODE.name]
        result = setup_deploy_system_kexec(ctx, [NODE.name], time.monotonic() + 600, threading.Event())
        after = shell.run([NODE.name], "cat /proc/cmdline; ls /run; cat /run/kasched/boot/*.pub", 30)[NODE.name]
    outcome = result[NODE.name]
    assert outcome.ok, f"{outcome.error}; console: {vm.output()[-1500:]}"
    assert "kasched.system=reference" in before.value.stdout
    assert after.ok and "kasched.system=deploy" in after.value.stdout, after  # answered with the new pin
    assert shell.pins[NODE.name] in after.value.stdout  # the key appended to the initrd it kexec'd
    assert "kasched-reboot-token" not in after.value.stdout and "kasched-kexec" not in after.value.stdout
    assert driver.current_label(NODE) == "deploy system"


def test_boot_by_kexec_over_ssh_boots_the_environment_of_partition_3(
    vm_kernel: Kernel, kexec_base: Path, network: Tap, tmp_path: Path
) -> None:
    initrd, service_key = vm_system(vm_kernel, kexec_base, tmp_path)
    environment = tmp_path / "environment"
    put_boot_files(environment / "boot", vm_kernel.image, initrd)
    disk = disk_with_partition_3(environment, tmp_path)
    env = vm_environment("kasched.env=vm-env")
    driver = PxeBootDriver(tmp_path / "boot")
    shell = NodeShell(service_key, {NODE.name: NODE.ip}, pins={NODE.name: system_key(tmp_path)})
    ctx = step_context(driver, shell, env)
    append = "console=ttyS0 panic=-1 kasched.system=deploy"
    with Vm(vm_kernel.image, initrd, append, tmp_path / "console.log", tap=network, disk=disk) as vm, \
            inside_netns(network.netns):  # fmt: skip
        vm.wait_for("kasched-vm: up", 120)
        wait_for_ssh(shell, 120)
        result = boot_environment_kexec(ctx, [NODE.name], time.monotonic() + 600, threading.Event())
        assert NODE.name not in shell.pins  # the environment is the user's: nothing pinned for it
        after = shell.run([NODE.name], "cat /proc/cmdline", 30, trust_any=True)[NODE.name]
    outcome = result[NODE.name]
    assert outcome.ok, f"{outcome.error}; console: {vm.output()[-1500:]}"
    assert after.ok and after.value.stdout.split() == ["root=/dev/vda3", "ro", "kasched.env=vm-env"], after
    assert driver.current_label(NODE) == "local partition 3"
