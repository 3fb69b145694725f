"""Chain broadcast over real loopback sockets to real agent processes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chain_agents import AgentGroup
from sshd_nodes import SshdCluster, free_port

from kasched.errors import InputError
from kasched.transports.chain import BroadcastOptions, ChainNode, ReportCollector, broadcast, order_chain
from kasched.transports.chain_agent import SINK_PIPE
from kasched.transports.chain_ssh import broadcast_over_ssh, new_key
from kasched.transports.chain_wire import (
    DATA,
    END,
    END_PAYLOAD,
    FRAME,
    ProtocolError,
    ReplayBuffer,
    recv_exact,
    split_address,
)
from kasched.transports.ssh_session import SshAuth

FAST = BroadcastOptions(timeout=60.0, stall_timeout=5.0, reconnect_timeout=5.0, lost_grace=1.0)


@pytest.fixture
def agents() -> Iterator[AgentGroup]:
    group = AgentGroup(8, accept_timeout=60.0).start()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def tree_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image") / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("deployed\n")
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz").write_bytes(os.urandom(3 << 20))
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "big.bin").write_bytes(b"kasched" * (300 << 10))
    return root


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def random_image(path: Path, mebibytes: int) -> Path:
    with open(path, "wb") as handle:
        for _ in range(mebibytes):
            handle.write(os.urandom(1 << 20))
    return path


def test_order_chain_groups_by_switch_then_rack_then_natural_name() -> None:
    nodes = [
        ChainNode("node10", "", "sw2", "r1"), ChainNode("node2", "", "sw10", "r1"),
        ChainNode("node9", "", "sw2", "r1"), ChainNode("node1", "", "sw2", "r0"),
        ChainNode("node3", "", "sw1", "r9"),
    ]  # fmt: skip
    assert [n.name for n in order_chain(nodes)] == ["node3", "node1", "node9", "node10", "node2"]


def test_replay_buffer_keeps_a_bounded_tail() -> None:
    ring = ReplayBuffer(10)
    for chunk in [b"aaaa", b"bbbb", b"cccc", b"dddd"]:
        ring.append(chunk)
    assert ring.start == 4 and ring.end == 16
    assert b"".join(ring.since(6)) == b"bbccccdddd"
    assert b"".join(ring.since(16)) == b""
    with pytest.raises(ProtocolError):
        list(ring.since(2))


@pytest.mark.slow
@pytest.mark.parametrize(("compression", "tar_flag"), [("gz", "-z"), ("xz", "-J"), ("zst", "--zstd")])
def test_tarball_reaches_every_node_with_the_same_checksum(
    agents: AgentGroup, tree_dir: Path, tmp_path: Path, compression: str, tar_flag: str
) -> None:
    image = tmp_path / f"image.tar.{compression}"
    subprocess.run(["tar", "-c", tar_flag, "-f", str(image), "-C", str(tree_dir), "."], check=True, timeout=60)
    sink = {"kind": "tar", "dest": str(tmp_path / "nodes" / "{node}"), "compression": compression}
    result = broadcast(image, agents.nodes, sink, key=agents.key, options=FAST)
    assert result.ok, {n: r.error for n, r in result.items()}
    assert {r.value.sha256 for r in result.values()} == {sha256_file(image)}
    for node in agents.nodes:
        dest = tmp_path / "nodes" / node.name
        assert (dest / "etc" / "hostname").read_text() == "deployed\n"
        assert sha256_file(dest / "boot" / "vmlinuz") == sha256_file(tree_dir / "boot" / "vmlinuz")
    assert set(agents.wait(10).values()) == {0}


def test_a_clean_broadcast_says_no_node_lost(agents: AgentGroup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node closes its upstream right after its ack: a predecessor that went on reading took the
    close for a loss and tried every later node (N^2 connections and reports on a 64-node chain)."""
    messages: list[dict] = []
    record = ReportCollector.record

    def keep(collector: ReportCollector, message: dict) -> None:
        messages.append(message)
        record(collector, message)

    monkeypatch.setattr(ReportCollector, "record", keep)
    result = broadcast(random_image(tmp_path / "image.raw", 2), agents.nodes, {"kind": "discard"}, key=agents.key,
                       options=FAST)  # fmt: skip
    assert result.ok, {n: r.error for n, r in result.items()}
    assert [m for m in messages if m.get("type") == "lost"] == []
    assert sorted(m["node"] for m in messages if m.get("type") == "result") == sorted(n.name for n in agents.nodes)


@pytest.mark.slow
def test_raw_image_is_written_identically_on_every_node(agents: AgentGroup, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 12)
    result = broadcast(image, agents.nodes, {"kind": "raw", "dest": str(tmp_path / "{node}.img")}, key=agents.key,
                       options=FAST)  # fmt: skip
    assert result.ok
    assert list(result) == [n.name for n in agents.nodes]
    for node in agents.nodes:
        assert sha256_file(tmp_path / f"{node.name}.img") == sha256_file(image)
        assert result[node.name].value.bytes == image.stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["a01", "a04", "a08"])
def test_a_node_killed_mid_stream_is_bypassed(agents: AgentGroup, tmp_path: Path, victim: str) -> None:
    image = random_image(tmp_path / "disk.img", 32)
    options = BroadcastOptions(
        timeout=60.0, stall_timeout=5.0, reconnect_timeout=5.0, lost_grace=1.0, rate_limit=12 << 20
    )
    killer = _kill_when_written(agents, tmp_path / f"{victim}.img", victim)
    result = broadcast(image, agents.nodes, {"kind": "raw", "dest": str(tmp_path / "{node}.img")}, key=agents.key,
                       options=options)  # fmt: skip
    assert killer()  # it was killed mid-stream, not after
    assert result.failed == [victim]
    assert "lost" in (result[victim].error or "")
    for node in agents.nodes:
        if node.name != victim:
            assert result[node.name].value.sha256 == sha256_file(image)
            assert sha256_file(tmp_path / f"{node.name}.img") == sha256_file(image)


def _kill_when_written(agents: AgentGroup, output: Path, victim: str) -> Callable[[], bool]:
    """Start a watcher that SIGKILLs the victim once it wrote 4 MiB; returns a join() → killed."""
    state = {"killed": False}

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if output.exists() and output.stat().st_size >= 4 << 20:
                agents.processes[victim].send_signal(signal.SIGKILL)
                state["killed"] = True
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def join() -> bool:
        thread.join(35)
        return state["killed"]

    return join


@pytest.mark.slow
def test_a_wrong_checksum_is_reported_by_every_node(agents: AgentGroup, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 2)
    result = broadcast(
        image, agents.nodes[:3], {"kind": "discard"}, key=agents.key, expected_sha256="00" * 32, options=FAST
    )  # fmt: skip
    assert result.failed == ["a01", "a02", "a03"]
    for node_result in result.values():
        assert "sha256 mismatch" in (node_result.error or "")
        assert node_result.value.sha256 == sha256_file(image)


@pytest.mark.slow
def test_unreachable_node_and_failing_sink_do_not_stop_the_others(agents: AgentGroup, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 4)
    nodes = list(agents.nodes[:6])
    nodes.insert(2, ChainNode("ghost", "127.42.9.9:9", "sw0", "r1"))  # nobody listens there
    sink = {"kind": "command", "argv": ["sh", "-c", 'test {node} != a04 || exit 7; exec cat > "$0"', "x"]}
    sink["argv"][-1] = str(tmp_path / "{node}.img")
    result = broadcast(image, nodes, sink, key=agents.key, options=FAST, ordered=False)
    assert sorted(result.failed) == ["a04", "ghost"]
    assert "status 7" in (result["a04"].error or "")
    assert "cannot reach ghost" in (result["ghost"].error or "")
    for name in ["a01", "a02", "a03", "a05", "a06"]:
        assert sha256_file(tmp_path / f"{name}.img") == sha256_file(image)


def test_a_command_sinks_pipe_holds_a_mebibyte(agents: AgentGroup, tmp_path: Path) -> None:
    """The sink is written inline: its pipe, not a queue, absorbs a tar's or a command's jitter."""
    image = random_image(tmp_path / "disk.img", 2)
    report = 'python3 -c "import fcntl; print(fcntl.fcntl(0, fcntl.F_GETPIPE_SZ))" > "$0"; exec cat > /dev/null'
    sink = {"kind": "command", "argv": ["sh", "-c", report, str(tmp_path / "{node}.pipe")]}
    result = broadcast(image, agents.nodes[:2], sink, key=agents.key, options=FAST)
    assert result.ok, result.failed
    for node in agents.nodes[:2]:
        assert int((tmp_path / f"{node.name}.pipe").read_text()) == SINK_PIPE == 1 << 20


def chain_socket_buffers(port: int, stop: threading.Event) -> dict[str, int]:
    """The largest receive buffer of the connection accepted on ``port`` and send buffer of the one
    made to it (``ss -tm``, the kernel's own figures), sampled until ``stop``."""
    seen = {"rb": 0, "tb": 0}
    while not stop.wait(0.05):
        shown = subprocess.run(["ss", "-Htmn", "state", "established"], capture_output=True, text=True).stdout
        for local, peer, memory in re.findall(r"^\S+\s+\S+\s+(\S+)\s+(\S+).*\n\s+skmem:\((.*)\)", shown, re.M):
            side = "rb" if local.endswith(f":{port}") else "tb" if peer.endswith(f":{port}") else ""
            if side and (match := re.search(rf"\b{side}(\d+)", memory)):
                seen[side] = max(seen[side], int(match.group(1)))
    return seen


@pytest.mark.parametrize("asked", [5 << 20, 0])
def test_each_chain_connection_gets_the_socket_buffer_asked_for(agents: AgentGroup, tmp_path: Path, asked: int) -> None:
    """5 MiB (the kernel doubles it) is past what its autotuning may reach (net.ipv4.tcp_rmem and
    tcp_wmem's maximum, 6 and 4 MiB): only asking gets it. 0 leaves the kernel's autotuning."""
    image = random_image(tmp_path / "disk.img", 4)
    options = BroadcastOptions(timeout=60.0, stall_timeout=5.0, rate_limit=2 << 20, socket_buffer=asked)
    port = int(agents.nodes[1].address.rpartition(":")[2])
    stop, seen = threading.Event(), {}
    sampler = threading.Thread(target=lambda: seen.update(chain_socket_buffers(port, stop)), daemon=True)
    sampler.start()
    try:
        result = broadcast(image, agents.nodes[:3], {"kind": "discard"}, key=agents.key, options=options)
    finally:
        stop.set()
        sampler.join(10)
    assert result.ok, result.failed
    autotuned = {"rb": int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2]),
                 "tb": int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])}  # fmt: skip
    for side in ("rb", "tb"):
        assert seen[side] == 2 * asked if asked else 0 < seen[side] <= autotuned[side], (side, seen)


def chain_pacing_caps(port: int, stop: threading.Event) -> set[str]:
    """The kernel's pacing cap (``pacing_rate NOW/CAP`` in ``ss -tin``, bits/s; "none" without a cap)
    of each connection made to ``port``, sampled until ``stop``."""
    seen: set[str] = set()
    while not stop.wait(0.05):
        shown = subprocess.run(["ss", "-Htin", "state", "established"], capture_output=True, text=True).stdout
        for peer, info in re.findall(r"^\S+\s+\S+\s+\S+\s+(\S+).*\n(.*)", shown, re.M):
            if peer.endswith(f":{port}") and (match := re.search(r"pacing_rate \d+bps(?:/(\d+)bps)?", info)):
                seen.add(match.group(1) or "none")
    return seen


@pytest.mark.parametrize("first_node_dead", [False, True])
def test_the_source_alone_is_paced_to_the_rate_asked_for(
    agents: AgentGroup, tmp_path: Path, first_node_dead: bool
) -> None:
    """``source_rate`` caps the server's connection to the first node (the kernel's own figure), also
    the one it makes past a first node that does not answer; the nodes' own connections are not
    capped: their links pace them."""
    image = random_image(tmp_path / "disk.img", 4)
    options = BroadcastOptions(timeout=60.0, stall_timeout=5.0, source_rate=3 << 20, lost_grace=0.5)
    ghost = [ChainNode("ghost", "127.42.9.9:9")] if first_node_dead else []
    ports = [int(node.address.rpartition(":")[2]) for node in agents.nodes[:2]]
    stop, seen = threading.Event(), [set(), set()]
    samplers = [threading.Thread(target=lambda i=i: seen[i].update(chain_pacing_caps(ports[i], stop)), daemon=True)
                for i in range(2)]  # fmt: skip
    for sampler in samplers:
        sampler.start()
    try:
        result = broadcast(image, [*ghost, *agents.nodes[:2]], {"kind": "discard"}, key=agents.key, options=options,
                           ordered=False)  # fmt: skip
    finally:
        stop.set()
        for sampler in samplers:
            sampler.join(10)
    assert result.failed == (["ghost"] if first_node_dead else []), {name: result[name].error for name in result}
    assert seen == [{str(8 * (3 << 20))}, {"none"}]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (BroadcastOptions(socket_buffer=-1), "socket_buffer: -1 bytes: expected 0 or more"),
        (BroadcastOptions(source_rate=0), "source_rate: 0 bytes/s: expected more than 0"),
        (BroadcastOptions(source_rate=float("nan")), "source_rate: nan bytes/s: expected more than 0"),
        (BroadcastOptions(start_wait=-1), "start_wait: -1 s: expected 0 or more"),
    ],
)
def test_options_the_kernel_would_misread_are_refused(tmp_path: Path, options: BroadcastOptions, message: str) -> None:
    image = random_image(tmp_path / "disk.img", 1)
    with pytest.raises(InputError, match=message):
        broadcast(image, [ChainNode("ghost1", "127.42.9.9:9")], {"kind": "discard"}, key=new_key(), options=options)


@pytest.mark.slow
def test_backpressure_keeps_memory_bounded_and_nodes_in_the_chain(agents: AgentGroup, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 96)
    # the sink stalls twice as long as the stall timeout: keepalives must keep the node in the chain
    options = BroadcastOptions(timeout=60.0, stall_timeout=2.0, reconnect_timeout=5.0, replay_bytes=4 << 20)
    slow_sink = {"kind": "command", "argv": ["sh", "-c", "sleep 4; exec cat > /dev/null"]}
    nodes = agents.nodes[:3]
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            for node in nodes:
                peaks[node.name] = _peak_rss(agents.processes[node.name].pid) or peaks.get(node.name, 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = broadcast(image, nodes, slow_sink, key=agents.key, options=options)
    finally:
        done.set()
        sampler.join(5)
    assert result.ok
    assert 0 < max(peaks.values()) < 64 << 20, peaks  # far less than the 96 MiB image


def _peak_rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def freeze_once_written(victim: subprocess.Popen[bytes], output: Path, size: int) -> threading.Thread:
    """A started thread that stops ``victim`` (SIGSTOP: it hangs) once ``output`` holds ``size`` bytes
    (30 s at most); the caller joins it and sends SIGCONT."""

    def freeze() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (output.exists() and output.stat().st_size >= size):
            time.sleep(0.02)
        victim.send_signal(signal.SIGSTOP)

    freezer = threading.Thread(target=freeze, daemon=True)
    freezer.start()
    return freezer


@pytest.mark.slow
def test_a_hung_node_is_bypassed_after_the_stall_timeout(agents: AgentGroup, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 24)
    options = BroadcastOptions(
        timeout=60.0, stall_timeout=2.0, reconnect_timeout=5.0, lost_grace=1.0, rate_limit=12 << 20
    )
    victim = agents.processes["a04"]
    freezer = freeze_once_written(victim, tmp_path / "a04.img", 4 << 20)
    try:
        result = broadcast(image, agents.nodes, {"kind": "raw", "dest": str(tmp_path / "{node}.img")}, key=agents.key,
                       options=options)  # fmt: skip
    finally:
        freezer.join(35)
        victim.send_signal(signal.SIGCONT)
    assert result.failed == ["a04"]
    for name in ["a01", "a02", "a03", "a05", "a06", "a07", "a08"]:
        assert sha256_file(tmp_path / f"{name}.img") == sha256_file(image)


class CorruptingProxy:
    """Forwards one chain connection, frame by frame (the handshake too: it cannot make one, it
    relays it), flipping one byte of the stream's payload; with ``forge_end``, it also puts the sha256
    of what it sent on into the end of stream, so the nodes behind it find what they got right."""

    def __init__(self, target: str, flip_at: int, forge_end: bool = False) -> None:
        self.target = split_address(target)
        self.flip_at = flip_at
        self.forge_end = forge_end
        self.listener = socket.create_server(("127.42.8.1", 0))
        self.address = "{}:{}".format(*self.listener.getsockname()[:2])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        upstream, _ = self.listener.accept()
        downstream = socket.create_connection(self.target, timeout=30)
        upstream.settimeout(30)
        threading.Thread(target=self._backward, args=(downstream, upstream), daemon=True).start()
        seen, hasher = 0, hashlib.sha256()
        with contextlib.suppress(OSError, ProtocolError):
            while True:
                header = recv_exact(upstream, FRAME.size)
                kind, size = FRAME.unpack(header)
                payload = bytearray(recv_exact(upstream, size))
                if kind == DATA and seen <= self.flip_at < seen + size:
                    payload[self.flip_at - seen] ^= 0xFF
                if kind == DATA:
                    seen += size
                    hasher.update(payload)
                if kind == END and self.forge_end:
                    payload = bytearray(END_PAYLOAD.pack(hasher.digest(), seen))
                downstream.sendall(header + payload)

    @staticmethod
    def _backward(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)


@pytest.mark.slow
def test_a_byte_corrupted_between_two_nodes_is_reported_downstream(agents: AgentGroup, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 4)
    nodes = list(agents.nodes[:5])
    proxy = CorruptingProxy(nodes[2].address, flip_at=3 << 20)
    nodes[2] = ChainNode(nodes[2].name, proxy.address)
    result = broadcast(image, nodes, {"kind": "discard"}, key=agents.key, options=FAST, ordered=False)
    assert result.succeeded == ["a01", "a02"]
    for name in ["a03", "a04", "a05"]:
        assert "sha256 mismatch" in (result[name].error or "")
        assert result[name].value.sha256 != sha256_file(image)


@pytest.mark.slow
def test_a_stream_changed_on_the_way_with_its_end_of_stream_is_caught_by_the_server(
    agents: AgentGroup, tmp_path: Path
) -> None:
    """A machine relaying a chain connection (it passes the handshake on: it holds no key) changes a
    byte and the end of stream's sha256 to match: the nodes behind it find nothing wrong, but their
    signed reports give the sha256 of what they got, and the server fails them."""
    image = random_image(tmp_path / "disk.img", 4)
    nodes = list(agents.nodes[:5])
    proxy = CorruptingProxy(nodes[2].address, flip_at=3 << 20, forge_end=True)
    nodes[2] = ChainNode(nodes[2].name, proxy.address)
    result = broadcast(image, nodes, {"kind": "discard"}, key=agents.key, options=FAST, ordered=False)
    assert result.succeeded == ["a01", "a02"]
    for name in ["a03", "a04", "a05"]:
        assert f"sha256 mismatch: got {result[name].value.sha256}, the server sent {sha256_file(image)}" in (
            result[name].error or ""
        )  # fmt: skip


@pytest.mark.slow
def test_agents_shipped_over_ssh_receive_the_image(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 4)
    names = sshd_cluster.nodes[:4]
    nodes = [ChainNode(name, f"{sshd_cluster.addresses[name].split(':')[0]}:0") for name in names]
    nodes.append(ChainNode("ghost", "127.41.9.7:0"))
    addresses = dict(sshd_cluster.addresses, ghost=f"127.41.9.7:{free_port('127.41.9.7')}")
    auth = SshAuth.from_key_file("root", str(sshd_cluster.key_file))
    sink = {"kind": "raw", "dest": str(tmp_path / "{node}.img")}
    result = broadcast_over_ssh(image, nodes, sink, addresses, auth, options=FAST, python="python3")
    assert list(result) == [*names, "ghost"]
    assert result.failed == ["ghost"]
    for name in names:
        assert sha256_file(tmp_path / f"{name}.img") == sha256_file(image)


def test_no_reachable_node_and_a_bad_expected_checksum(tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 1)
    nodes = [ChainNode("ghost1", "127.42.9.9:9"), ChainNode("ghost2", "127.42.9.8:9")]
    result = broadcast(image, nodes, {"kind": "discard"}, key=new_key(), options=BroadcastOptions(lost_grace=0.1))
    assert result.failed == ["ghost1", "ghost2"]
    assert "cannot reach ghost2" in (result["ghost2"].error or "")
    with pytest.raises(InputError):
        broadcast(image, nodes, {"kind": "discard"}, key=new_key(), expected_sha256="abc")


@pytest.mark.slow
def test_the_deadline_holds_while_a_hung_node_blocks_the_chain(agents: AgentGroup, tmp_path: Path) -> None:
    """A hung node (its kernel still acknowledges, then closes the window) is found only after the
    stall timeout; a deadline shorter than that still ends the broadcast, the nodes not done say so."""
    image = random_image(tmp_path / "disk.img", 24)
    options = BroadcastOptions(timeout=6.0, stall_timeout=120.0, reconnect_timeout=5.0, rate_limit=12 << 20)
    nodes = agents.nodes[:4]
    victim = agents.processes["a02"]
    freezer = freeze_once_written(victim, tmp_path / "a02.img", 2 << 20)
    started = time.monotonic()
    try:
        result = broadcast(image, nodes, {"kind": "raw", "dest": str(tmp_path / "{node}.img")}, key=agents.key,
                           options=options)  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        freezer.join(35)
        victim.send_signal(signal.SIGCONT)
    assert elapsed < 60, elapsed  # without the deadline in blocked sends: the stall timeout, 120 s
    assert not result.ok and set(result.failed) >= {"a02", "a03", "a04"}
    assert "deadline" in (result["a03"].error or ""), result["a03"].error
