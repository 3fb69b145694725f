"""Boot profiles, dnsmasq configuration, the lab's address plan and the firmware's reading of a
profile: pure functions and files, no root needed (they run in the fast test loop too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasched.drivers.base import BootTarget, NodeTarget
from kasched.drivers.ipmi import IpmiPowerDriver
from kasched.drivers.pxe import PxeBootDriver, dnsmasq_config
from kasched.drivers.reboot import Rebooter
from kasched.errors import DriverError, InputError
from kasched.lab.firmware import BootSpec
from kasched.lab.rootfs import package_for_soname
from kasched.lab.topology import LabPlan

NODE = NodeTarget(name="node-1", mac="02:4B:00:00:01:01", ip="10.77.1.11")


def test_deploy_profile_is_written_for_the_three_loaders(tmp_path: Path) -> None:
    driver = PxeBootDriver(tmp_path)
    driver.set_profile(NODE, BootTarget.DEPLOY)
    ipxe = (tmp_path / "ipxe" / "02-4b-00-00-01-01.ipxe").read_text()
    assert ipxe.splitlines() == [
        "#!ipxe",
        "# kasched: deploy system",
        "kernel deploy/vmlinuz kasched.system=deploy",
        "initrd deploy/initrd.img",
        "boot",
    ]
    pxelinux = (tmp_path / "pxelinux.cfg" / "01-02-4b-00-00-01-01").read_text()
    assert "KERNEL deploy/vmlinuz" in pxelinux and "APPEND initrd=deploy/initrd.img kasched.system=deploy" in pxelinux
    grub = (tmp_path / "grub" / "grub.cfg-01-02-4b-00-00-01-01").read_text()
    assert "linux /deploy/vmlinuz kasched.system=deploy" in grub and "initrd /deploy/initrd.img" in grub
    assert "${net0/mac:hexhyp}" in (tmp_path / "boot.ipxe").read_text()
    assert driver.current_label(NODE) == "deploy system"
    assert not list(tmp_path.rglob(".*.tmp"))  # written through temporary files, none left


def test_local_profile_names_the_partition(tmp_path: Path) -> None:
    driver = PxeBootDriver(tmp_path)
    driver.set_profile(NODE, BootTarget.LOCAL, partition=3, kernel="envs/debian/vmlinuz")
    ipxe = (tmp_path / "ipxe" / "02-4b-00-00-01-01.ipxe").read_text()
    assert "kernel envs/debian/vmlinuz root=/dev/sda3 ro" in ipxe
    assert "initrd" not in ipxe
    assert driver.current_label(NODE) == "local partition 3"
    spec = BootSpec(kernel="k", cmdline="root=/dev/sda3 ro")
    assert spec.root_partition == 3
    assert BootSpec(kernel="k", cmdline="kasched.system=deploy").root_partition is None


def test_site_kernel_arguments_and_local_initrd_go_into_every_profile(tmp_path: Path) -> None:
    driver = PxeBootDriver(tmp_path, local_initrd="reference/initrd.img", kernel_args="console=ttyS0")
    vm = NodeTarget(name="node-1", mac="02:4B:00:00:01:01", ip="10.77.1.11", disk_device="/dev/vda")
    driver.set_profile(vm, BootTarget.LOCAL, partition=2)
    ipxe = (tmp_path / "ipxe" / "02-4b-00-00-01-01.ipxe").read_text().splitlines()
    assert ipxe[2:4] == ["kernel reference/vmlinuz root=/dev/vda2 ro console=ttyS0", "initrd reference/initrd.img"]
    # an environment's own initrd wins over the site's; the deployment system keeps its own
    local = driver.profile(vm, BootTarget.LOCAL, partition=3, initrd="envs/e/initrd.img", cmdline="quiet")
    assert (local.initrd, local.cmdline) == ("envs/e/initrd.img", "root=/dev/vda3 ro quiet console=ttyS0")
    deploy = driver.profile(vm, BootTarget.DEPLOY)
    assert (deploy.initrd, deploy.cmdline) == ("deploy/initrd.img", "kasched.system=deploy console=ttyS0")
    files = driver.boot_files(vm, BootTarget.DEPLOY)  # what the kexec setup sends: the same command line
    assert files is not None and files.cmdline == "kasched.system=deploy console=ttyS0"


def test_stateless_profile_needs_an_image(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match=r"^node-1: a stateless boot needs"):
        PxeBootDriver(tmp_path).set_profile(NODE, BootTarget.STATELESS)


def test_a_bad_mac_is_refused_with_the_node_name(tmp_path: Path) -> None:
    bad = NodeTarget(name="node-9", mac="02:4b", ip="10.77.1.19")
    with pytest.raises(DriverError, match=r"^node-9: no valid MAC"):
        PxeBootDriver(tmp_path).set_profile(bad, BootTarget.DEPLOY)


def test_dnsmasq_serves_exactly_the_inventory(tmp_path: Path) -> None:
    other = NodeTarget(name="node-2", mac="02:4b:00:00:02:01", ip="10.77.2.11")
    text = dnsmasq_config(
        [NODE, other], interface="sw1", network="10.77.0.1/16", tftp_root=tmp_path,
        lease_file=tmp_path / "leases", pid_file=tmp_path / "pid",
    )  # fmt: skip
    lines = text.splitlines()
    assert "port=0" in lines and "enable-tftp" in lines and f"tftp-root={tmp_path}" in lines
    assert "dhcp-range=10.77.0.0,static,255.255.0.0,12h" in lines
    assert "dhcp-host=02:4b:00:00:01:01,10.77.1.11,node-1" in lines
    assert "dhcp-host=02:4b:00:00:02:01,10.77.2.11,node-2" in lines
    assert "dhcp-boot=tag:ipxe,boot.ipxe" in lines


def test_lab_plan_spreads_nodes_over_switches() -> None:
    plan = LabPlan("t", nodes=5, switches=2)
    assert [(n.name, n.switch_name, n.ip, n.bmc_address, n.mac) for n in plan.nodes_list] == [
        ("node-1", "sw1", "10.77.1.11", "10.77.101.11", "02:4b:00:00:01:01"),
        ("node-2", "sw1", "10.77.1.12", "10.77.101.12", "02:4b:00:00:01:02"),
        ("node-3", "sw1", "10.77.1.13", "10.77.101.13", "02:4b:00:00:01:03"),
        ("node-4", "sw2", "10.77.2.11", "10.77.102.11", "02:4b:00:00:02:01"),
        ("node-5", "sw2", "10.77.2.12", "10.77.102.12", "02:4b:00:00:02:02"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "--nodes must be between 1 and 240"),
        ({"nodes": 300}, "--nodes must be between 1 and 240"),
        ({"switches": 0}, "--switches must be between"),
        ({"link": "10 mbit"}, "--link '10 mbit'"),
        ({"name": "UPPER"}, "lab name must be"),
    ],
)
def test_lab_plan_refuses_bad_sizes(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        LabPlan(**kwargs)  # type: ignore[arg-type]


def test_reboot_window_must_be_positive() -> None:
    with pytest.raises(DriverError, match="window must be at least 1"):
        Rebooter(IpmiPowerDriver(), window=0).reboot([NODE])


def test_ipmi_driver_refuses_a_node_without_bmc_credentials() -> None:
    with pytest.raises(DriverError, match=r"^node-1: IPMI needs a bmc address, BMC user, BMC password"):
        IpmiPowerDriver().status(NODE)


@pytest.mark.parametrize(
    ("soname", "package"),
    [("libsodium.so.23", "libsodium23"), ("libssl.so.3", "libssl3"), ("libgssapi_krb5.so.2", "libgssapi-krb5-2")],
)
def test_library_package_names_follow_debian_policy(soname: str, package: str) -> None:
    assert package_for_soname(soname) == package


def test_atomic_writes_from_many_threads_at_once(tmp_path: Path) -> None:
    """kaschedd's deployments run in threads of one process and rewrite the shared boot.ipxe together:
    each write has its own temporary file (a pid-named one was renamed away under another thread)."""
    import threading

    from kasched.drivers.pxe import write_atomic
    from kasched.files import write_atomic as file_write_atomic

    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            for round_ in range(50):
                write_atomic(tmp_path / "boot.ipxe", f"writer {index} round {round_}\n")
                file_write_atomic(tmp_path / "state.json", f"{index}\n")
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert (tmp_path / "boot.ipxe").read_text().startswith("writer ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boot.ipxe", "state.json"], "no temporary file left"


def test_a_lab_keeps_the_node_kind_it_was_built_with(tmp_path: Path) -> None:
    import json

    from kasched.errors import LabError
    from kasched.lab.lab import Lab

    (tmp_path / "lab.json").write_text(json.dumps({"name": "vms", "kind": "qemu", "status": "up"}))
    lab = Lab("vms", state_dir=tmp_path)
    assert lab.kind.name == "qemu" and lab.kind.disk_device == "/dev/vda"
    driver = lab.boot_driver()  # the profiles the lab writes match the settings its site gets
    assert (driver.local_initrd, driver.kernel_args) == ("reference/initrd.img", "console=ttyS0")
    assert driver.base_url == lab.kind.site_settings()["pxe_base_url"] == "http://${next-server}/"
    fresh = Lab("other", state_dir=tmp_path / "other")
    assert fresh.kind.name == "namespace" and fresh.kind.disk_device == "/dev/sda"
    assert fresh.boot_driver().local_initrd == "" and fresh.boot_driver(http=True).base_url.startswith("http://")
    with pytest.raises(LabError, match=r"unknown node kind 'vm' \(known: namespace, qemu\)"):
        Lab("bad", state_dir=tmp_path / "bad", kind="vm")
