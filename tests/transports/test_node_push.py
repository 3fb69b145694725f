"""Files sent to nodes over SSH (``NodeShell.push``, and the kexec setup's ``send_boot_files`` built on
it), over real sshds on loopback: the bytes arrive whole, a node that cannot be reached or written
to is a failed result, and the others are not held back by it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sshd_nodes import SshdCluster, free_port

from kasched.deploy.kexec import send_boot_files
from kasched.deploy.nodes import NodeShell, checked
from kasched.deploy.steps import StepContext
from kasched.drivers.base import BootFiles, BootTarget, NodeTarget
from kasched.drivers.pxe import PxeBootDriver


def pins(cluster: SshdCluster, names: list[str]) -> dict[str, str]:
    """The nodes' host key pinned (the fake nodes share one)."""
    key = " ".join((cluster.root / "host_ed25519.pub").read_text().split()[:2])
    return {name: key for name in names}


@pytest.mark.slow
def test_files_arrive_whole_and_a_bad_node_fails_alone(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    names = sshd_cluster.nodes[11:14]
    files = {"kernel": os.urandom(3 << 20), "initrd": os.urandom(5 << 20) + b"\n"}
    addresses = dict(sshd_cluster.addresses, ghost=f"127.41.9.7:{free_port('127.41.9.7')}")
    shell = NodeShell(sshd_cluster.key_file, addresses, connect_timeout=5, pins=pins(sshd_cluster, [*names, "ghost"]))
    (tmp_path / "blocked").write_text("a file where the directory should be\n")
    targets = {name: tmp_path / name / "kexec" for name in names}
    targets[names[2]] = tmp_path / "blocked" / "kexec"  # mkdir -p fails under a file

    results = {}
    for name in [*names, "ghost"]:
        directory = str(targets.get(name, tmp_path / "ghost"))
        results.update(checked(shell.push([name], files, directory, 30), "sending"))
    for name in names[:2]:
        assert results[name].ok, results[name].error
        for label, content in files.items():
            assert (targets[name] / label).read_bytes() == content
    assert not results[names[2]].ok and "sending: exit 1: mkdir" in (results[names[2]].error or "")
    assert not results["ghost"].ok and "SSH connection failed" in (results["ghost"].error or "")


@pytest.mark.slow
def test_many_nodes_at_once(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    names = sshd_cluster.nodes[:8]
    shell = NodeShell(sshd_cluster.key_file, sshd_cluster.addresses, window=4, pins=pins(sshd_cluster, names))
    pushed = shell.push(names, {"kernel": b"k" * 1000}, str(tmp_path / "same"), 30)
    assert pushed.succeeded == names  # all to one directory here: each node rewrote the same file whole
    assert (tmp_path / "same" / "kernel").read_bytes() == b"k" * 1000


@pytest.mark.slow
def test_the_kexec_setup_sends_the_deployment_system_to_every_node(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    names = sshd_cluster.nodes[:3]
    boot = tmp_path / "boot"
    (boot / "deploy").mkdir(parents=True)
    kernel, initrd = os.urandom(1 << 20), os.urandom(2 << 20)
    (boot / "deploy" / "vmlinuz").write_bytes(kernel)
    (boot / "deploy" / "initrd.img").write_bytes(initrd)
    found = PxeBootDriver(boot).boot_files(NodeTarget(names[0], "02:00:00:00:00:01", "127.0.0.1"), BootTarget.DEPLOY)
    assert found is not None
    missing = BootFiles(boot / "deploy" / "gone", None, "kasched.system=deploy")
    files = {names[0]: found, names[1]: found, names[2]: missing}
    ctx = StepContext(
        targets={}, placement={}, power={}, soft=None, boot=None,  # type: ignore[arg-type]
        shell=NodeShell(sshd_cluster.key_file, sshd_cluster.addresses, pins=pins(sshd_cluster, names)), environment=None,
        partition=lambda node: node.deploy_partition,
    )  # fmt: skip
    sent = send_boot_files(ctx, names, files, str(tmp_path / "kexec"))
    assert list(sent) == names and sent.succeeded == names[:2]
    assert (tmp_path / "kexec" / "kernel").read_bytes() == kernel  # every node here shares this host's disk
    assert (tmp_path / "kexec" / "initrd").read_bytes() == initrd
    assert "kexec: cannot read the deployment system" in (sent[names[2]].error or "")
