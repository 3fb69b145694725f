"""The reference partition verified and patched on lab nodes booted into the deployment system
(real /dev/sda2 of each node's loop disk, python3 of the deployment system, SSH with the site key):
the partition a byte was changed in is found, patched block by block, found identical, and boots."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kasched.config import Config
from kasched.deploy.nodes import NodeShell
from kasched.drivers.base import BootTarget
from kasched.drivers.reboot import Rebooter, RebootLevel
from kasched.partition_digest import BLOCK, expected_blocks
from kasched.partition_verify import patch_partitions, verify_partitions
from tests.lab.conftest import LabHandle

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def reference_copy(golden: Path, image_dir: Path) -> SimpleNamespace:
    """The golden disk's partition 2 as a site's reference environment: zstd-compressed in the store."""
    partition = json.loads(subprocess.run(["sfdisk", "--json", str(golden)], capture_output=True, check=True,
                                          text=True).stdout)["partitiontable"]["partitions"][1]  # fmt: skip
    with golden.open("rb") as disk:
        disk.seek(partition["start"] * 512)
        raw = disk.read(partition["size"] * 512)
    content = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    sha256 = hashlib.sha256(content).hexdigest()
    (image_dir / "store").mkdir(parents=True)
    (image_dir / "store" / sha256).write_bytes(content)
    location = str(image_dir / "store" / sha256)
    return SimpleNamespace(image_kind="raw", compression="zst", image_location=location, sha256=sha256, label="ref")


def test_a_changed_reference_partition_is_patched_from_the_deployment_system(
    in_lab: LabHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = [in_lab.targets["node-5"], in_lab.targets["node-6"]]
    env = reference_copy(in_lab.lab.state_dir / "systems" / "golden.img", tmp_path / "images")
    blocks = expected_blocks(Config(image_dir=tmp_path / "images"), env)
    boot = in_lab.lab.boot_driver()
    hard = Rebooter(in_lab.ipmi, None, window=2, timeout=60, levels=[RebootLevel.HARD])
    for node in nodes:
        boot.set_profile(node, BootTarget.DEPLOY)
    assert hard.reboot(nodes).ok
    assert [in_lab.wait_view(node).system for node in nodes] == ["deploy", "deploy"]

    shell = NodeShell(in_lab.lab.service_key, {node.name: node.ip for node in nodes})
    host_key = in_lab.lab.state_dir / "ssh" / "ssh_host_ed25519_key.pub"  # booted without a per-boot key
    shell.pins = {node.name: " ".join(host_key.read_text().split()[:2]) for node in nodes}
    devices = {node.name: "/dev/sda2" for node in nodes}
    started = time.monotonic()
    booted = verify_partitions(shell, devices, blocks, 120)
    took = time.monotonic() - started
    assert booted.ok, {n: r.error for n, r in booted.items()}
    changed = nodes[0].name
    offset = 5 * BLOCK + 123
    done = shell.run(
        [changed], f"printf '\\377' | dd of=/dev/sda2 bs=1 seek={offset} conv=notrunc 2>/dev/null; sync", 30
    )
    assert done.ok, done[changed].error

    checks = {name: result.value for name, result in verify_partitions(shell, devices, blocks, 120).items()}
    assert 5 in checks[changed].differing
    patched = patch_partitions(shell, checks, env, blocks, 120)
    assert patched.ok, {n: r.error for n, r in patched.items()}
    again = verify_partitions(shell, devices, blocks, 120)
    assert again.ok and all(result.value.identical for result in again.values())
    with capsys.disabled():
        print(f"\nlab verify of {blocks.size >> 20} MiB on 2 nodes: {took:.2f} s; blocks differing after the "
              f"reference booted: {[list(r.value.differing) for r in booted.values()]}; patched: "
              f"{[list(r.value.written) for r in patched.values()]}")  # fmt: skip

    for node in nodes:
        boot.set_profile(node, BootTarget.LOCAL, partition=2)
    assert hard.reboot(nodes).ok
    assert [in_lab.wait_view(node).system for node in nodes] == ["reference", "reference"]
