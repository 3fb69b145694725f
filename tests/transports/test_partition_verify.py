"""The reference partition checked and patched over real sshds on loopback (kasched.partition_verify):
each fake node's "partition" is a file of this host. The nodes' hashes are compared on the server; a
node is sent only its differing blocks, which read back as the image's; a node that cannot read its
partition fails alone, with the reason."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from sshd_nodes import SshdCluster

from kasched import partition_verify
from kasched.config import Config
from kasched.deploy.nodes import NodeShell
from kasched.partition_digest import BLOCK, expected_blocks
from kasched.partition_verify import PartitionCheck, patch_partitions, verify_partitions

pytestmark = pytest.mark.slow


def reference_image(tmp_path: Path) -> bytes:
    """A 24 MiB ext4 file system with a root account's authorized_keys, as a reference partition."""
    tree = tmp_path / "tree"
    (tree / "root" / ".ssh").mkdir(parents=True)
    (tree / "root" / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAAsite site@admin\n")
    (tree / "etc").mkdir()
    (tree / "etc" / "motd").write_text("the reference\n" * 1000)
    image = tmp_path / "reference.ext4"
    subprocess.run(["truncate", "-s", "24M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-U", "clear", "-d", str(tree), str(image)],
                   check=True, capture_output=True, env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"})  # fmt: skip
    return image.read_bytes()


def stored(image_dir: Path, raw: bytes) -> SimpleNamespace:
    """The image as kaschedd keeps it: zstd-compressed in the store."""
    content = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    sha256 = hashlib.sha256(content).hexdigest()
    (image_dir / "store").mkdir(parents=True, exist_ok=True)
    (image_dir / "store" / sha256).write_bytes(content)
    location = str(image_dir / "store" / sha256)
    return SimpleNamespace(image_kind="raw", compression="zst", image_location=location, sha256=sha256, label="ref")


def add_authorized_key(partition: Path, tmp_path: Path) -> None:
    """What a user who is root on the node does: append a key to root's authorized_keys on the partition."""
    keys = tmp_path / "keys"
    subprocess.run(["debugfs", "-R", f"dump /root/.ssh/authorized_keys {keys}", str(partition)],
                   check=True, capture_output=True)  # fmt: skip
    keys.write_bytes(keys.read_bytes() + b"ssh-ed25519 AAAAuser user@job\n")
    script = f"rm /root/.ssh/authorized_keys\nwrite {keys} /root/.ssh/authorized_keys\n"
    subprocess.run(["debugfs", "-w", "-f", "-", str(partition)], input=script.encode(), check=True, capture_output=True)


def differing(a: bytes, b: bytes) -> set[int]:
    return {
        offset // BLOCK
        for offset in range(0, len(a), BLOCK)
        if a[offset : offset + BLOCK] != b[offset : offset + BLOCK]
    }


@pytest.fixture
def site(sshd_cluster: SshdCluster, tmp_path: Path) -> SimpleNamespace:
    raw = reference_image(tmp_path)
    env = stored(tmp_path / "images", raw)
    blocks = expected_blocks(Config(image_dir=tmp_path / "images"), env)
    nodes = sshd_cluster.nodes[:4]
    devices = {node: tmp_path / f"{node}.sda2" for node in nodes}
    for device in devices.values():
        device.write_bytes(raw + os.urandom(1 << 20))  # the partition may be larger than the image
    shell = NodeShell(sshd_cluster.key_file, sshd_cluster.addresses, connect_timeout=5)
    host_key = " ".join((sshd_cluster.root / "host_ed25519.pub").read_text().split()[:2])
    shell.pins = {node: host_key for node in sshd_cluster.nodes}  # the sessions pin the nodes' key
    return SimpleNamespace(raw=raw, env=env, blocks=blocks, nodes=nodes, devices=devices, shell=shell)


def verify(site: SimpleNamespace) -> dict[str, PartitionCheck]:
    results = verify_partitions(site.shell, {n: str(d) for n, d in site.devices.items()}, site.blocks, 60)
    assert results.ok, {n: r.error for n, r in results.items()}
    return {node: result.value for node, result in results.items()}


def test_identical_partitions_are_reported_identical(site: SimpleNamespace) -> None:
    checks = verify(site)
    assert list(checks) == site.nodes
    assert all(check.identical for check in checks.values())
    assert len(site.blocks.hashes) == 6


def test_changed_blocks_are_found_and_only_they_are_rewritten(site: SimpleNamespace, tmp_path: Path) -> None:
    changed, keyed, intact = site.nodes[0], site.nodes[1], site.nodes[2]
    with open(site.devices[changed], "r+b") as device:  # one byte of block 3
        device.seek(3 * BLOCK + 777)
        device.write(bytes([device.read(1)[0] ^ 0xFF]))
    add_authorized_key(site.devices[keyed], tmp_path)
    keyed_blocks = differing(site.devices[keyed].read_bytes()[: len(site.raw)], site.raw)
    assert keyed_blocks and len(keyed_blocks) < len(site.blocks.hashes)
    tail = {node: device.read_bytes()[len(site.raw) :] for node, device in site.devices.items()}

    checks = verify(site)
    assert checks[changed].differing == (3,)
    assert set(checks[keyed].differing) == keyed_blocks
    assert checks[intact].identical

    patched = patch_partitions(site.shell, checks, site.env, site.blocks, 60)
    assert patched.ok, {n: r.error for n, r in patched.items()}
    assert patched[changed].value.written == (3,) and patched[changed].value.size == BLOCK
    assert set(patched[keyed].value.written) == keyed_blocks
    assert patched[intact].value.written == ()
    assert all(check.identical for check in verify(site).values())
    for node, device in site.devices.items():
        assert device.read_bytes() == site.raw + tail[node]  # nothing written past the image
    keys = subprocess.run(["debugfs", "-R", "cat /root/.ssh/authorized_keys", str(site.devices[keyed])],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert keys == "ssh-ed25519 AAAAsite site@admin\n"


def test_a_node_that_cannot_read_its_partition_fails_alone(site: SimpleNamespace) -> None:
    short, gone = site.nodes[0], site.nodes[1]
    os.truncate(site.devices[short], len(site.raw) - 1)
    site.devices[gone].unlink()
    results = verify_partitions(site.shell, {n: str(d) for n, d in site.devices.items()}, site.blocks, 60)
    assert results.succeeded == site.nodes[2:]
    assert f"fewer than the reference image's {len(site.raw)}" in (results[short].error or "")
    assert results[short].error.startswith("verifying the reference partition: exit 1: verify: ")
    assert "No such file or directory" in (results[gone].error or "")


def test_the_nodes_answer_is_checked_on_the_server(site: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that says nothing, or fewer hashes than blocks, fails: silence is not 'identical'."""
    hashes = " ".join(site.blocks.hashes)
    answers = {site.nodes[0]: "true", site.nodes[1]: f"echo {hashes[:-65]}", site.nodes[2]: f"echo {hashes}"}
    monkeypatch.setattr(partition_verify, "node_command", lambda mode, device, *numbers: answers[Path(device).stem])
    devices = {node: str(site.devices[node]) for node in answers}
    results = verify_partitions(site.shell, devices, site.blocks, 60)
    assert results.succeeded == [site.nodes[2]] and results[site.nodes[2]].value.identical
    assert results[site.nodes[0]].error == "verifying the reference partition: 0 block hashes answered, 6 expected"
    assert results[site.nodes[1]].error == "verifying the reference partition: 5 block hashes answered, 6 expected"


def test_a_store_copy_changed_since_env_add_is_not_sent(site: SimpleNamespace) -> None:
    node = site.nodes[0]
    with open(site.devices[node], "r+b") as device:
        device.write(b"\xff" * 16)
    checks = verify(site)
    assert checks[node].differing == (0,)
    broken = bytearray(site.raw)
    broken[-10] ^= 1  # in the last block: block 0 still matches its hash, the copy's sha256 does not
    Path(site.env.image_location).write_bytes(
        subprocess.run(["zstd", "-q", "-c"], input=bytes(broken), capture_output=True, check=True).stdout
    )
    patched = patch_partitions(site.shell, checks, site.env, site.blocks, 60)
    assert not patched[node].ok and "has sha256" in (patched[node].error or "")
    assert patched.succeeded == site.nodes[1:]  # the intact ones: nothing to send
    assert site.devices[node].read_bytes()[:16] == b"\xff" * 16  # nothing was written
