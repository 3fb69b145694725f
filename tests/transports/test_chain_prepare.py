"""A node prepared in the SSH session that starts its agent (``prepare``): over real sshds on loopback,
real agents, a real image. The raw sink does not create directories, so an image found in a directory
only the preparation made shows that the preparation ran, and finished, before the stream."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sshd_nodes import SshdCluster
from test_chain import FAST, random_image, sha256_file

from kasched.results import GroupResult
from kasched.transports.chain import ChainNode
from kasched.transports.chain_ssh import broadcast_over_ssh, session_command
from kasched.transports.ssh_session import SshAuth


def chain_of(cluster: SshdCluster, names: list[str]) -> list[ChainNode]:
    return [ChainNode(name, f"{cluster.addresses[name].split(':')[0]}:0") for name in names]


def agents_named(name: str) -> list[str]:
    """The command lines of the chain agents still running for node ``name`` on this host."""
    done = subprocess.run(["pgrep", "-af", f"--name {name} --accept"], capture_output=True, text=True, check=False)
    return [line for line in done.stdout.splitlines() if "pgrep" not in line]


def prepared_broadcast(
    cluster: SshdCluster, names: list[str], prepare: Callable[[str], str], tmp_path: Path, timeout: float = 30
) -> tuple[GroupResult, str]:
    """A 2 MiB image through agents started with ``prepare`` on ``names``, each written to
    ``tmp_path/<node>/disk.img``: the result, and the image's sha256."""
    image = random_image(tmp_path / "disk.img", 2)
    auth = SshAuth.from_key_file("root", str(cluster.key_file))
    sink = {"kind": "raw", "dest": str(tmp_path / "{node}" / "disk.img")}
    result = broadcast_over_ssh(image, chain_of(cluster, names), sink, cluster.addresses, auth, options=FAST,
                                prepare=prepare, prepare_timeout=timeout)  # fmt: skip
    return result, sha256_file(image)


def assert_no_agent_left(node: str) -> None:
    """The node's shell stops its agent right after saying ``prepared``: give it a moment."""
    deadline = time.monotonic() + 5
    while agents_named(node) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agents_named(node) == []


@pytest.mark.slow
def test_each_node_is_prepared_while_its_agent_starts(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    names = sshd_cluster.nodes[:4]

    def prepare(node: str) -> str:  # slower than the agent's start: "ready" comes before "prepared"
        return f"sleep 0.5; mkdir {tmp_path / node} && echo made {node}"

    result, digest = prepared_broadcast(sshd_cluster, names, prepare, tmp_path)
    assert result.succeeded == names, {name: r.error for name, r in result.items()}
    for name in names:
        assert sha256_file(tmp_path / name / "disk.img") == digest


@pytest.mark.slow
def test_a_node_whose_preparation_fails_is_reported_and_its_agent_stopped(
    sshd_cluster: SshdCluster, tmp_path: Path
) -> None:
    names = sshd_cluster.nodes[4:8]
    bad = names[1]

    def prepare(node: str) -> str:
        if node == bad:
            return "echo 'mkfs.ext4: /dev/sda3 is apparently in use by the system' >&2; exit 7"
        return f"mkdir {tmp_path / node}"

    result, digest = prepared_broadcast(sshd_cluster, names, prepare, tmp_path)
    assert result.failed == [bad]
    assert result[bad].error == f"{bad}: preparation failed: exit 7: mkfs.ext4: /dev/sda3 is apparently in use by the system"
    for name in names:
        if name != bad:
            assert sha256_file(tmp_path / name / "disk.img") == digest
    assert_no_agent_left(bad)


@pytest.mark.slow
def test_a_preparation_that_outlasts_its_timeout_fails_its_node_only(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    names = sshd_cluster.nodes[8:11]
    slow = names[2]

    def prepare(node: str) -> str:
        return f"{'sleep 30; ' if node == slow else ''}mkdir {tmp_path / node}"

    result, _ = prepared_broadcast(sshd_cluster, names, prepare, tmp_path, timeout=2)
    assert result.failed == [slow]
    assert result[slow].error == f"{slow}: preparation timed out after 2 s"
    assert result.succeeded == names[:2]
    assert_no_agent_left(slow)  # the node ended the preparation and stopped the agent itself


def test_without_preparation_the_session_runs_the_agent_alone() -> None:
    node = ChainNode("n1", "10.0.0.1:7373")
    assert session_command(node, "python3", 120) == "python3 -I -S - --listen 10.0.0.1:7373 --name n1 --accept-timeout 120"
    prepared = session_command(node, "python3", 120, "mkfs.ext4 -q /dev/sda3", 120)
    assert "timeout -k 5 120 sh -c 'mkfs.ext4 -q /dev/sda3' </dev/null >&2" in prepared
    assert prepared.startswith("exec 3<&0; python3 -I -S - --listen 10.0.0.1:7373 --name n1 --accept-timeout 120 <&3")


def test_the_prepared_shell_is_valid_sh() -> None:
    prepared = session_command(ChainNode("n1", "10.0.0.1:7373"), "python3", 120, "true")
    for shell in ("sh", "bash"):
        assert subprocess.run([shell, "-n", "-c", prepared], capture_output=True, check=False).returncode == 0
