"""Files sent to nodes over SSH (``NodeShell.push``, what the kexec setup sends the deployment system
with), over real sshds on loopback: the bytes arrive whole, a node that cannot be reached or written
to is a failed result, and the others are not held back by it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sshd_nodes import SshdCluster, free_port

from kasched.deploy.nodes import NodeShell, checked


@pytest.mark.slow
def test_files_arrive_whole_and_a_bad_node_fails_alone(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    names = sshd_cluster.nodes[11:14]
    files = {"kernel": os.urandom(3 << 20), "initrd": os.urandom(5 << 20) + b"\n"}
    addresses = dict(sshd_cluster.addresses, ghost=f"127.41.9.7:{free_port('127.41.9.7')}")
    shell = NodeShell(sshd_cluster.key_file, addresses, connect_timeout=5)
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
    shell = NodeShell(sshd_cluster.key_file, sshd_cluster.addresses, window=4)
    pushed = shell.push(names, {"kernel": b"k" * 1000}, str(tmp_path / "same"), 30)
    assert pushed.succeeded == names  # all to one directory here: each node rewrote the same file whole
    assert (tmp_path / "same" / "kernel").read_bytes() == b"k" * 1000
