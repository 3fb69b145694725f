"""Streaming while the agents still start (``broadcast_over_ssh(overlap=True)``, agents on known ports): over
real sshds on loopback, real agents, a real image. A node's preparation that waits, then looks at
another node's disk, shows where the stream was while that node's agent had not started yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sshd_nodes import SshdCluster, free_port
from test_chain import FAST, random_image, sha256_file
from test_chain_prepare import assert_no_agent_left

from kasched.errors import DriverError
from kasched.results import GroupResult
from kasched.transports.chain import BroadcastOptions, ChainNode, broadcast
from kasched.transports.chain_ssh import (
    AGENT_FLAGS,
    StartStates,
    agent_program,
    broadcast_over_ssh,
    new_key,
    session_command,
    start_agents,
)
from kasched.transports.chain_wire import STARTING
from kasched.transports.ssh_session import SshAuth

IMAGE_MIB = 2


def fixed_chain(cluster: SshdCluster, names: list[str]) -> list[ChainNode]:
    """Each agent on a free port of its node's address, known before it starts (as a deployment's)."""
    hosts = [cluster.addresses[name].split(":")[0] for name in names]
    return [ChainNode(name, f"{host}:{free_port(host)}") for name, host in zip(names, hosts, strict=True)]


def overlapped(
    cluster: SshdCluster, nodes: list[ChainNode], prepare: dict[str, str], tmp_path: Path, **kwargs: object
) -> tuple[GroupResult, str]:
    """A 2 MiB image to ``nodes``, each first prepared by ``mkdir`` of its directory after the
    command ``prepare`` gives it (if any), and written raw to ``tmp_path/<node>/disk.img``."""
    image = random_image(tmp_path / "disk.img", IMAGE_MIB)
    auth = SshAuth.from_key_file("root", str(cluster.key_file))
    sink = {"kind": "raw", "dest": str(tmp_path / "{node}" / "disk.img")}
    addresses = dict(cluster.addresses) | dict(kwargs.pop("addresses", {}))  # type: ignore[call-overload]

    def preparation(node: str) -> str:
        return f"{prepare.get(node, 'true')} && mkdir {tmp_path / node}"

    kwargs.setdefault("overlap", True)
    result = broadcast_over_ssh(image, nodes, sink, addresses, auth, options=FAST, prepare=preparation,
                                prepare_timeout=30, **kwargs)  # type: ignore[arg-type]  # fmt: skip
    return result, sha256_file(image)


@pytest.mark.slow
def test_the_stream_reaches_the_first_nodes_while_a_later_agent_still_starts(
    sshd_cluster: SshdCluster, tmp_path: Path
) -> None:
    names = sshd_cluster.nodes[:4]
    late = names[2]
    witness = tmp_path / "first-node-had"
    # the third node's agent starts 2 s late; by then the first node has had the whole image
    prepare = {late: f"sleep 2 && stat -c %s {tmp_path / names[0] / 'disk.img'} > {witness}"}
    result, digest = overlapped(sshd_cluster, fixed_chain(sshd_cluster, names), prepare, tmp_path)
    assert result.succeeded == names, {name: r.error for name, r in result.items()}
    for name in names:
        assert sha256_file(tmp_path / name / "disk.img") == digest
    assert witness.read_text().strip() == str(IMAGE_MIB << 20)


@pytest.mark.slow
def test_without_overlap_the_stream_waits_for_every_agent(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    """The same late node without the overlap (the default): the first node has nothing yet (the
    witness shows the test above would fail if the stream did not leave early)."""
    names = sshd_cluster.nodes[4:7]
    witness = tmp_path / "first-node-had"
    prepare = {names[2]: f"sleep 1 && (stat -c %s {tmp_path / names[0] / 'disk.img'} || echo none) > {witness}"}
    result, _ = overlapped(sshd_cluster, fixed_chain(sshd_cluster, names), prepare, tmp_path, overlap=False)
    assert result.succeeded == names, {name: r.error for name, r in result.items()}
    assert witness.read_text().strip() == "none"


@pytest.mark.slow
@pytest.mark.parametrize("position", [0, 1, 3])
@pytest.mark.parametrize("failure", ["preparation", "ssh"])
def test_a_node_whose_start_fails_is_bypassed_as_soon_as_the_server_knows(
    sshd_cluster: SshdCluster, tmp_path: Path, position: int, failure: str
) -> None:
    """First node (the server waits for it), middle (a node does), last. Were the predecessor not
    told, it would wait ``start_wait`` (65 s here) and the broadcast's deadline (60 s) fail them all."""
    names = sshd_cluster.nodes[8:12]
    bad = names[position]
    prepare, addresses = {}, {}
    if failure == "preparation":
        prepare = {bad: "echo 'mkfs.ext4: /dev/sda3 is apparently in use' >&2; exit 7"}
    else:  # nothing listens on that node's SSH port: its session is refused
        host = sshd_cluster.addresses[bad].split(":")[0]
        addresses = {bad: f"{host}:{free_port(host)}"}
    result, digest = overlapped(sshd_cluster, fixed_chain(sshd_cluster, names), prepare, tmp_path,
                                addresses=addresses)  # fmt: skip
    assert result.failed == [bad], {name: r.error for name, r in result.items()}
    if failure == "preparation":
        assert result[bad].error == f"{bad}: preparation failed: exit 7: mkfs.ext4: /dev/sda3 is apparently in use"
    else:
        assert (result[bad].error or "").startswith(f"{bad}: SSH connection failed: ")
    for name in names:
        if name != bad:
            assert sha256_file(tmp_path / name / "disk.img") == digest


@pytest.mark.slow
def test_an_agent_ends_with_its_session_so_a_retry_can_listen_there(sshd_cluster: SshdCluster) -> None:
    """A node bypassed while its agent was ready: its session is closed, not waited for. The agent
    left behind kept the port (the retry: 'Address already in use') and, with the stream leaving
    early, took the retry's stream while its preparation formatted the partition again (the lab's
    8-node deployment: 'mkfs.ext4: /dev/sda3 is mounted')."""
    name = sshd_cluster.nodes[12]
    nodes = fixed_chain(sshd_cluster, [name])
    auth = SshAuth.from_key_file("root", str(sshd_cluster.key_file))
    first = start_agents(nodes, sshd_cluster.addresses, auth)
    assert [node.name for node in first.ready] == [name], first.failed
    first.close(failed={name})
    again = start_agents(nodes, sshd_cluster.addresses, auth)
    try:
        assert [node.name for node in again.ready] == [name], again.failed
    finally:
        again.close(failed={name})
    assert_no_agent_left(name)


def test_the_server_bypasses_a_first_node_whose_start_failed(tmp_path: Path) -> None:
    """No agent at all: the server's own wait for its successor, told by ``start_state``."""
    image = random_image(tmp_path / "disk.img", 1)
    nodes = [ChainNode("ghost1", "127.42.9.9:9"), ChainNode("ghost2", "127.42.9.8:9")]
    states = {"ghost1": "ssh: connection refused", "ghost2": STARTING}
    options = BroadcastOptions(start_wait=0.5, lost_grace=0.1)
    result = broadcast(image, nodes, {"kind": "discard"}, key=new_key(), options=options, start_state=states.get)
    assert result["ghost1"].error == (
        "ghost1: lost: cannot reach ghost1 at 127.42.9.9:9: its agent did not start: ssh: connection refused"
    )
    # still starting when start_wait ran out: refused like any node that does not listen
    assert "cannot reach ghost2 at 127.42.9.8:9: [Errno 111] Connection refused" in (result["ghost2"].error or "")


def test_an_agent_that_started_after_it_refused_is_connected_to(tmp_path: Path) -> None:
    """The race the lab's 8-node deployment hit: the sender's connection is refused, then, by the
    time it asks, the agent has started and the server says ready. That is no reason to bypass it."""
    image = random_image(tmp_path / "disk.img", 1)
    host = "127.42.7.1"
    node = ChainNode("late", f"{host}:{free_port(host)}")
    started: list[subprocess.Popen[bytes]] = []
    key = new_key()

    def start_state(name: str) -> str:  # the agent starts as the server is asked: it refused before
        if not started:
            argv = [sys.executable, *AGENT_FLAGS.split(), "-", "--listen", node.address, "--name", name]
            started.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            started[0].stdin.write(agent_program(key))  # type: ignore[union-attr]
            started[0].stdin.close()  # type: ignore[union-attr]
            assert started[0].stdout.readline().startswith(b"ready ")  # type: ignore[union-attr]
        return "ready"

    try:
        options = BroadcastOptions(start_wait=30, lost_grace=0.1, timeout=30)
        result = broadcast(image, [node], {"kind": "discard"}, key=key, options=options, start_state=start_state)
        assert result.succeeded == ["late"], result["late"].error
        assert started[0].wait(10) == 0
    finally:
        for process in started:
            process.kill()
            process.wait()
            process.stdout.close()  # type: ignore[union-attr]


def test_an_agent_that_started_then_stopped_listening_is_not_waited_for(tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 1)
    options = BroadcastOptions(start_wait=600, lost_grace=0.1, timeout=30)
    result = broadcast(image, [ChainNode("gone", "127.42.9.9:9")], {"kind": "discard"}, key=new_key(), options=options,
                       start_state=lambda node: "ready")  # fmt: skip
    assert result["gone"].error == "gone: lost: cannot reach gone at 127.42.9.9:9: its agent started, then stopped listening"


def test_a_launcher_that_fails_ends_the_wait_for_every_start_not_done() -> None:
    states = StartStates(["n1", "n2", "n3"])
    states.set("n1", "ready")
    states.set("n2", "SSH connection failed: refused")
    states.fail_starting("unusable SSH private key")
    assert [states.get(name) for name in ("n1", "n2", "n3")] == [
        "ready", "SSH connection failed: refused", "unusable SSH private key"
    ]  # fmt: skip
    assert states.get("n9") == "not a node of this broadcast"


def test_an_unusable_key_is_one_error_before_any_node_is_touched(tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 1)
    nodes = [ChainNode("n1", "127.42.9.9:7373"), ChainNode("n2", "127.42.9.8:7373")]
    auth = SshAuth("root", "not a key")
    for overlap in (True, False):
        with pytest.raises(DriverError, match="unusable SSH private key"):
            broadcast_over_ssh(image, nodes, {"kind": "discard"}, {}, auth, options=FAST, overlap=overlap)


def test_the_agent_listens_only_after_its_preparation_when_the_stream_may_come_early() -> None:
    node = ChainNode("n1", "10.0.0.1:7373")
    command = session_command(node, "python3", 120, "mkfs.ext4 -q /dev/sda3", 120, agent_after=True)
    assert command.startswith("timeout -k 5 120 sh -c 'mkfs.ext4 -q /dev/sda3' </dev/null >&2; status=$?")
    assert command.endswith("exit 3; fi; exec python3 -I -S - --listen 10.0.0.1:7373 --name n1 --accept-timeout 120")
    for shell in ("sh", "bash"):
        assert subprocess.run([shell, "-n", "-c", command], capture_output=True, check=False).returncode == 0
