"""The partition a deployment writes and boots is named from the node's disk (inventory's
``disk.device``): every step used to say /dev/sdaN whatever the disk, so on a node with an NVMe or
virtio disk the preparation would have formatted /dev/sdaN (another disk, if there is one)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from kasched.deploy.kexec import kexec_command
from kasched.deploy.steps import StepContext, per_partition, prepare_command, sink_for
from kasched.drivers.base import BootTarget, NodeTarget
from kasched.drivers.pxe import PxeBootDriver
from kasched.results import GroupResult, NodeResult
from tests.deploy.test_kexec import ENV, NODE, context


@pytest.mark.parametrize(
    ("disk", "device"),
    [
        ("/dev/sda", "/dev/sda3"),
        ("/dev/vdb", "/dev/vdb3"),
        ("/dev/nvme0n1", "/dev/nvme0n1p3"),
        ("/dev/mmcblk0", "/dev/mmcblk0p3"),
        ("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4", "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4-part3"),
        ("/dev/disk/by-path/pci-0000:00:1f.2-ata-1", "/dev/disk/by-path/pci-0000:00:1f.2-ata-1-part3"),
    ],
)
def test_partition_device_follows_the_kernels_naming(disk: str, device: str) -> None:
    assert replace(NODE, disk_device=disk).partition_device(3) == device


def nvme_context(env=ENV) -> tuple[StepContext, NodeTarget]:  # type: ignore[no-untyped-def]
    node = replace(NODE, disk_device="/dev/nvme0n1")
    ctx = context(env)
    ctx.targets = {node.name: node}
    return ctx, node


def test_preparation_and_sink_use_the_nodes_disk() -> None:
    ctx, node = nvme_context()
    command = prepare_command(ctx, node)
    assert "mkfs.ext4 -q -F -L kasched /dev/nvme0n1p3 " in command and "/dev/sda" not in command
    raw = replace(ENV, image_kind="raw", compression="none")
    ctx, node = nvme_context(raw)
    assert "test -b /dev/nvme0n1p3" in prepare_command(ctx, node)
    assert sink_for(ctx, node.partition_device(3)) == {"kind": "raw", "dest": "/dev/nvme0n1p3"}
    ctx, node = nvme_context(replace(ENV, image_kind="raw", compression="zst"))
    assert sink_for(ctx, "/dev/nvme0n1p3")["argv"][-1] == "zstd -dc > /dev/nvme0n1p3 && sync"


def test_boot_profile_and_kexec_name_the_nodes_partition(tmp_path: Path) -> None:
    driver = PxeBootDriver(tmp_path)
    _, node = nvme_context()
    profile = driver.profile(node, BootTarget.LOCAL, partition=3, cmdline="quiet")
    assert profile.cmdline == "root=/dev/nvme0n1p3 ro quiet"
    ctx, node = nvme_context()
    command = kexec_command(ctx, node, 3)
    assert subprocess.run(["sh", "-n", "-c", command], check=False).returncode == 0
    assert "mount -o ro /dev/nvme0n1p3 " in command and "--append='root=/dev/nvme0n1p3 ro " in command


def test_nodes_on_different_disks_get_one_group_per_partition_device() -> None:
    ctx = context(ENV)
    nodes = [
        replace(NODE, name="a", disk_device="/dev/sda"),
        replace(NODE, name="b", disk_device="/dev/nvme0n1"),
        replace(NODE, name="c", disk_device="/dev/sda"),
    ]
    ctx.targets = {node.name: node for node in nodes}
    seen: list[tuple[int, list[str]]] = []

    def run(partition: int, group: list[str]) -> GroupResult:
        seen.append((partition, group))
        results = GroupResult()
        for name in group:
            results.add(NodeResult(name, True, "test"))
        return results

    assert list(per_partition(ctx, ["a", "b", "c"], run)) == ["a", "b", "c"]
    assert sorted(seen) == [(3, ["a", "c"]), (3, ["b"])]
