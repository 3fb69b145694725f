"""End to end on QEMU nodes (``kasched lab up --kind qemu``): VMs under TCG that boot from the network
for real (QEMU's iPXE ROM, the lab's dnsmasq and HTTP server) into Debian's kernel, powered through
their ``ipmi_sim`` BMCs, on 2 switches.

* ``kasched revert``, the revert the node cannot refuse: a BMC reset into the deployment system
  (network boot, its per-boot host key as one more initrd), the reference partition checked, the
  reference booted (the site's kernel and local initramfs, which moves its own per-boot key into
  ``/run``), checked from inside and by the pinned key;
* then a whole ``kasched deploy`` picks kexec for the setup and for the boot (the verified reference
  and the deployment system have kexec-tools; the reference has no python3, so "nomini" falls
  through): no power cycle at all, two kernels started per node, checked from inside each node;
* the BMC powers a VM off (QEMU ends) and on (it boots from the network again).

KASCHED_E2E_QEMU_LAB names the lab (default ``ktq``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kasched.lab.system import netns_pids
from tests.conftest import ROOT
from tests.e2e.conftest import KASCHED, Site, _reference_environment, _run, fresh_work_dir, register
from tests.e2e.test_operations_lab import wait_ssh

pytestmark = [pytest.mark.lab, pytest.mark.slow]
LAB = os.environ.get("KASCHED_E2E_QEMU_LAB", "ktq")
ALL = "node-[1-2]"
BOOT_TIMEOUT = 300  # two VMs under TCG on 2 shared CPUs
VM_ENV = """name: vmenv
visibility: public
description: the lab's system with Debian's cloud kernel in /boot
image: {file: vmenv.tar.gz, kind: tar}
boot:
  kernel: /boot/vmlinuz
  initrd: /boot/initrd.img
  cmdline: console=ttyS0
"""


@pytest.fixture(scope="module")
def vm_site() -> Iterator[Site]:
    work = fresh_work_dir("kasched-e2e-qemu-", LAB)
    lab_dir = work / "lab"
    try:
        _run(*KASCHED, "lab", "up", "--name", LAB, "--kind", "qemu", "--state-dir", str(lab_dir), "--nodes", "2",
             "--switches", "2", "--link", "100mbit", "--uplink", "1gbit", "--boot-timeout", str(BOOT_TIMEOUT),
             timeout=1800)  # fmt: skip
        settings = yaml.safe_load((lab_dir / "kasched.yaml").read_text())  # what the lab says its site needs
        config = work / "kasched.yaml"
        config.write_text(yaml.safe_dump({**settings, "state_dir": str(work / "state")}))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@e2e", "-f", str(work / "alice"))
        site = Site(lab_dir, work, config, work / "alice", lab_dir / "ssh" / "id_ed25519", lab=LAB)
        _run(*KASCHED, "lab", "make-env", "--name", LAB, str(work / "vmenv.tar.gz"), "--system", "userenv")
        (work / "vmenv.yaml").write_text(VM_ENV)
        _reference_environment(site)
        register(site, "vmenv.yaml", "reference.yaml")
        yield site
    finally:
        subprocess.run([*KASCHED, "lab", "down", "--name", LAB], capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    assert not Path(f"/var/run/netns/kl-{LAB}-node-1").exists()  # the VMs and their namespaces are gone


def console(site: Site, node: str) -> str:
    return (site.lab_dir / "nodes" / node / "console.log").read_text(errors="replace")


def starts(site: Site, node: str) -> tuple[int, int]:
    """(power-ons of the node's VM, kernels started in it): a reboot through the firmware starts a
    kernel without a power-on, a kexec too, but without the firmware's ROM."""
    text = console(site, node)
    return text.count("kasched-lab: power on, booting"), text.count("Linux version ")


def inside(site: Site, node: str, key: Path | None = None) -> list[str]:
    done = site.ssh(site.ip(node), "hostname; cat /etc/kasched-system; cat /proc/cmdline; uname -r", key=key)
    assert done.returncode == 0, f"{node}: {done.stderr}"
    return done.stdout.split("\n")


def operation(site: Site, *args: str) -> object:
    done = site.kasched(*args, "--json", timeout=900)
    assert done.returncode == 0, f"{args}: {done.stderr.strip()[-1500:]}"
    return json.loads(done.stdout)


def assert_trusted_revert(site: Site, reverted: object, before: dict[str, tuple[int, int]]) -> None:
    """Each VM went through the revert the node cannot refuse (a BMC power cycle into the deployment
    system, its per-boot key, the reference partition checked, the reference booted with its own key):
    it runs the reference (from inside), recorded trusted with the key it answered with."""
    assert isinstance(reverted, dict) and reverted["state"] == "done", reverted
    listed = {n["name"]: n for n in json.loads(site.kasched("nodes", "list", "--json").stdout)}
    for name, outcome in reverted["nodes"].items():
        assert outcome["ok"] and outcome["step"] == "boot" and outcome["variant"] == "pxe", outcome
        hostname, system, cmdline, _ = inside(site, name)[:4]
        assert (hostname, system) == (name, "reference")
        assert cmdline == "root=/dev/vda2 ro console=ttyS0"  # the site's kernel, from the network
        power_ons, kernels = starts(site, name)
        # the BMC's reset (the lab's chassis may restart QEMU for it: a power-on), then a reboot
        assert power_ons - before[name][0] in (0, 1) and kernels == before[name][1] + 2, console(site, name)[-1500:]
        assert listed[name]["trusted"] and listed[name]["host_key"].startswith("ssh-ed25519 ")
        served = site.ssh(site.ip(name), "cut -d' ' -f1,2 /run/kasched/boot/ssh_host_ed25519_key.pub").stdout
        assert served.strip() == listed[name]["host_key"]  # the key kaschedd pinned is the one this boot got
        assert site.ssh(site.ip(name), "true", key=site.user_key).returncode != 0  # no user key


def test_trusted_revert_then_deploy_by_kexec_on_vms_then_revert(vm_site: Site) -> None:
    before = {node: starts(vm_site, node) for node in vm_site.nodes()}
    assert_trusted_revert(vm_site, operation(vm_site, "revert", "-m", ALL), before)

    before = {node: starts(vm_site, node) for node in vm_site.nodes()}
    result = operation(vm_site, "deploy", "-e", "vmenv", "-m", ALL, "-k", f"{vm_site.user_key}.pub")
    assert isinstance(result, dict) and result["state"] == "done", result
    for name, outcome in result["nodes"].items():
        assert outcome["ok"] and outcome["variant"] == "kexec" and outcome["error"] is None, outcome
        assert outcome["fallbacks"] == ["setup/nomini: running system: exit 3: missing python3"], outcome
        power_ons, kernels = starts(vm_site, name)
        # no power cycle and no firmware: from the verified reference (its pinned key), the deployment
        # system (and its own per-boot key, appended to its initrd) and the environment were kexec'd
        assert (power_ons, kernels) == (before[name][0], before[name][1] + 2), console(vm_site, name)[-1500:]
        hostname, system, cmdline, release = inside(vm_site, name, key=vm_site.user_key)[:4]
        assert (hostname, system) == (name, "userenv")
        assert cmdline == "root=/dev/vda3 ro console=ttyS0" and release.endswith("-cloud-amd64")
    listed = json.loads(vm_site.kasched("nodes", "list", "--json").stdout)
    assert {n["state"] for n in listed} == {"deployed"} and not any(n["trusted"] or n["host_key"] for n in listed)

    before = {node: starts(vm_site, node) for node in vm_site.nodes()}
    assert_trusted_revert(vm_site, operation(vm_site, "revert", "-m", ALL), before)


def test_the_bmc_powers_a_vm_off_and_on(vm_site: Site) -> None:
    power_ons, kernels = starts(vm_site, "node-2")
    off = operation(vm_site, "power", "off", "-m", "node-2")
    assert isinstance(off, list) and off[0]["ok"], off
    assert operation(vm_site, "power", "status", "-m", "node-2")[0]["value"] == "off"  # type: ignore[index]
    assert netns_pids(f"kl-{LAB}-node-2") == []  # QEMU has ended
    operation(vm_site, "power", "on", "-m", "node-2")
    assert operation(vm_site, "power", "status", "-m", "node-2")[0]["value"] == "on"  # type: ignore[index]
    wait_ssh(vm_site, "node-2", timeout=BOOT_TIMEOUT)
    assert starts(vm_site, "node-2") == (power_ons + 1, kernels + 1)
    assert inside(vm_site, "node-2")[1] == "reference"


def test_stateless_on_a_vm_runs_in_ram_and_leaves_the_disk(vm_site: Site) -> None:
    image = vm_site.work / "diskless.cpio.gz"  # the lab's stateless initramfs (virtio modules in it)
    shutil.copyfile(vm_site.lab_dir / "boot" / "stateless" / "initrd.img", image)
    (vm_site.work / "diskless.yaml").write_text(
        "name: diskless\nvisibility: public\nimage: {file: diskless.cpio.gz, kind: raw, compression: gz}\n"
    )
    assert vm_site.kasched("env", "add", str(vm_site.work / "diskless.yaml")).returncode == 0
    disk = "sha256sum /dev/vda3 | cut -c1-16"
    before = vm_site.ssh(vm_site.ip("node-1"), disk).stdout
    result = operation(vm_site, "deploy", "-e", "diskless", "--stateless", "-m", "node-1")
    assert isinstance(result, dict) and result["state"] == "done", result
    probe = "cat /etc/kasched-system; cat /proc/cmdline; awk '$2==\"/\"{print $3}' /proc/mounts | tail -1"
    done = vm_site.ssh(vm_site.ip("node-1"), f"{probe}; {disk}")
    system, cmdline, root, after = done.stdout.split("\n")[:4]
    assert system == "stateless" and cmdline.startswith("kasched.system=stateless") and "root=" not in cmdline
    assert root in ("rootfs", "tmpfs")  # the kernel's initramfs: in RAM
    assert after == before.strip()  # the deploy partition is untouched
    operation(vm_site, "revert", "-m", "node-1")
    assert inside(vm_site, "node-1")[1:3] == ["reference", "root=/dev/vda2 ro console=ttyS0"]
