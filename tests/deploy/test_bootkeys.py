"""Per-boot host keys: the archive a kernel unpacks (read back by a real cpio), the profile that loads
it, withdrawing it, and the pinned SSH check against a real sshd presenting another key."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from kasched.bootkeys import ARCHIVE_ROOT, KEY_NAME, BootKeys, key_archive, make_key
from kasched.drivers.base import BootTarget, NodeTarget
from kasched.drivers.pxe import PxeBootDriver

NODE = NodeTarget("node-1", "02:00:00:00:00:01", "10.0.0.1")


def test_the_key_archive_unpacks_with_a_real_cpio_into_a_private_key_and_its_public_half(tmp_path: Path) -> None:
    private, public = make_key()
    archive = tmp_path / "key.cpio"
    archive.write_bytes(gzip.decompress(key_archive(private, public)))
    out = tmp_path / "root"
    out.mkdir()
    done = subprocess.run(
        f"busybox cpio -i -d < {archive}", shell=True, cwd=out, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    key = out / ARCHIVE_ROOT / KEY_NAME
    assert key.read_bytes() == private and (key.stat().st_mode & 0o777) == 0o600
    assert (out / ARCHIVE_ROOT / f"{KEY_NAME}.pub").read_text().strip() == public
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == public.split()[:2]  # a real OpenSSH key, and its public half


def test_each_boot_gets_a_new_key_under_an_unguessable_name_and_withdrawing_removes_it(tmp_path: Path) -> None:
    keys = BootKeys(tmp_path)
    first = keys.issue(NODE.name, NODE.mac)
    second = keys.issue(NODE.name, NODE.mac)
    assert first.public != second.public and first.initrd != second.initrd
    assert not (tmp_path / first.initrd).exists(), "the earlier boot's key is withdrawn"
    assert (tmp_path / second.initrd).exists()
    assert len(Path(second.initrd).name) > 32  # a random name, not only the node's MAC
    keys.withdraw(NODE.mac)
    assert not (tmp_path / second.initrd).exists()


@pytest.mark.parametrize("target", [BootTarget.DEPLOY, BootTarget.LOCAL])
def test_the_profile_loads_the_key_after_the_systems_own_initrd(tmp_path: Path, target: BootTarget) -> None:
    driver = PxeBootDriver(tmp_path, local_initrd="reference/initrd.img")
    key = BootKeys(tmp_path).issue(NODE.name, NODE.mac)
    driver.set_profile(NODE, target, partition=2, extra_initrds=[key.initrd])
    mac = "02-00-00-00-00-01"
    ipxe = (tmp_path / "ipxe" / f"{mac}.ipxe").read_text().splitlines()
    initrds = [line.split()[1] for line in ipxe if line.startswith("initrd ")]
    assert initrds[-1] == key.initrd and len(initrds) == 2
    assert f",{key.initrd} " in (tmp_path / "pxelinux.cfg" / f"01-{mac}").read_text()
    assert f" /{key.initrd}" in (tmp_path / "grub" / f"grub.cfg-01-{mac}").read_text()
    driver.set_profile(NODE, target, partition=2)  # after the boot: the profile names no key any more
    assert key.initrd not in (tmp_path / "ipxe" / f"{mac}.ipxe").read_text()


def test_a_node_answering_with_another_key_fails_with_the_host_key_reason_and_gets_no_command(
    tmp_path: Path,
) -> None:
    """Real sshds on loopback: the node whose pinned key is its sshd's runs the command; the node
    pinned to another key (a machine that took its address) fails with that reason and never sees the
    command (its marker file is not written); a node with no pinned key is not contacted at all."""
    from kasched.deploy.nodes import NO_PIN, NodeShell
    from tests.transports.sshd_nodes import SshdCluster

    cluster = SshdCluster(tmp_path / "sshd", 3, subnet=47).start()
    try:
        genuine = (cluster.root / "host_ed25519.pub").read_text().split()
        _, other = make_key()
        shell = NodeShell(cluster.key_file, cluster.addresses)
        first, second, third = cluster.nodes
        shell.pins = {first: " ".join(genuine[:2]), second: other}
        marker = tmp_path / "ran"
        results = shell.run(cluster.nodes, f"echo $SSH_CONNECTION >> {marker}", 20)
        assert results[first].ok, results[first].error
        assert not results[second].ok and "host key mismatch" in (results[second].error or "")
        assert results[third].error == NO_PIN
        assert len(marker.read_text().splitlines()) == 1  # only the genuine node ran it
        pushed = shell.push([second, third], {"secret": b"x"}, str(tmp_path / "pushed"), 20)
        assert not pushed[second].ok and not pushed[third].ok and not (tmp_path / "pushed").exists()
    finally:
        cluster.stop()
