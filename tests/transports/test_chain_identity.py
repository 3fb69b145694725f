"""The chain talks only to the agents kaschedd started: a machine that took a node's address during the
broadcast (here a real TCP server bound to that node's address once its agent is gone, recording every
byte it receives) gets no byte of the stream or of the session, whatever it answers; that node fails
with a reason about its key; every other node gets the whole image. Over real loopback sockets, with
real agent processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chain_agents import AgentGroup
from sshd_nodes import SshdCluster

from kasched.transports import chain
from kasched.transports.chain import BroadcastOptions, ChainNode, ReportCollector, broadcast
from kasched.transports.chain_ssh import new_key, start_agents
from kasched.transports.chain_wire import (
    CHALLENGE,
    DATA,
    END,
    END_PAYLOAD,
    FRAME,
    HEADER,
    NONCE_BYTES,
    OFFSET,
    OFFSET_REPLY,
    PROOF,
    SERVER,
    recv_frame,
    send_frame,
    sign,
    split_address,
)
from kasched.transports.ssh_session import SshAuth

FAST = BroadcastOptions(timeout=60.0, stall_timeout=5.0, reconnect_timeout=5.0, lost_grace=1.0)
IDENTITY = "did not prove it is {} (wrong key: another machine may hold its address)"


def frames_in(data: bytes) -> list[int]:
    """The kinds of the frames in ``data`` (a byte stream recorded from one connection)."""
    kinds = []
    while len(data) >= FRAME.size:
        kind, size = FRAME.unpack_from(data)
        kinds.append(kind)
        data = data[FRAME.size + size :]
    return kinds


class Impostor:
    """A TCP server on a node's address that records every byte it is sent and answers the first
    frame with ``answer(first frame's payload)`` (raw bytes); it also sends the server a forged report
    (``forge``) as soon as someone connects."""

    def __init__(self, address: str, answer: Callable[[bytes], bytes], forge: Callable[[], None]) -> None:
        self.listener = socket.create_server(split_address(address))
        self.answer, self.forge = answer, forge
        self.received: list[bytearray] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.forge, daemon=True).start()
            with conn:
                conn.settimeout(10)
                record = bytearray()
                self.received.append(record)
                try:
                    head = conn.recv(FRAME.size + NONCE_BYTES + 64)
                    record += head
                    conn.sendall(self.answer(head[FRAME.size :]))
                    while data := conn.recv(1 << 16):  # take whatever it goes on sending
                        record += data
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def old_agent(_: bytes) -> bytes:
    """Answers as an agent did before the handshake: 'send from byte 0'."""
    return FRAME.pack(OFFSET_REPLY, OFFSET.size) + OFFSET.pack(0)


def wrong_key(victim: str) -> Callable[[bytes], bytes]:
    """Answers the handshake well-formed, under a key of its own, as the victim."""

    def answer(challenge: bytes) -> bytes:
        nonce, peer = challenge[:NONCE_BYTES], challenge[NONCE_BYTES:].decode()
        ours = os.urandom(NONCE_BYTES)
        payload = ours + sign(os.urandom(32), "listener", peer, victim, nonce, ours)
        return FRAME.pack(PROOF, len(payload)) + payload

    return answer


def replayed(proof: bytes) -> Callable[[bytes], bytes]:
    """Plays back a proof the genuine agent gave on an earlier connection (captured on the wire)."""
    return lambda _: FRAME.pack(PROOF, len(proof)) + proof


def relayed(to: str) -> Callable[[bytes], bytes]:
    """Passes the challenge on to another node's genuine agent and hands back that agent's proof."""

    def answer(challenge: bytes) -> bytes:
        with socket.create_connection(split_address(to), timeout=5) as other:
            send_frame(other, CHALLENGE, challenge)
            kind, payload = recv_frame(other)
            return FRAME.pack(kind, len(payload)) + payload

    return answer


def capture_proof(address: str, client: str) -> bytes:
    """What the genuine agent at ``address`` answers a challenge from ``client`` with."""
    with socket.create_connection(split_address(address), timeout=5) as sock:
        send_frame(sock, CHALLENGE, os.urandom(NONCE_BYTES) + client.encode())
        kind, payload = recv_frame(sock)
    assert kind == PROOF
    return payload


@pytest.fixture
def agents() -> Iterator[AgentGroup]:
    group = AgentGroup(6, subnet=44, accept_timeout=60.0).start()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def collectors(monkeypatch: pytest.MonkeyPatch) -> list[ReportCollector]:
    """Every ReportCollector the broadcast makes (its address and session: what a forger aims at)."""
    made: list[ReportCollector] = []

    class Recorded(ReportCollector):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(chain, "ReportCollector", Recorded)
    return made


def forged_ok(collectors: list[ReportCollector], victim: str, digest: str, size: int) -> Callable[[], None]:
    """A report for ``victim``, right session, ok, the image's sha256, sent as reports were sent
    before they were signed (no handshake)."""

    def forge() -> None:
        collector = collectors[0]
        message = {"type": "result", "session": collector.session, "node": victim, "ok": True, "error": None,
                   "bytes": size, "sha256": digest, "sink_status": None, "lost": []}  # fmt: skip
        host, port = split_address(collector.address)
        with socket.create_connection((host or "127.0.0.1", port), timeout=5) as sock:
            send_frame(sock, HEADER, json.dumps(message).encode())

    return forge


MODES = {
    "answers like an agent of before": lambda agents, index: old_agent,
    "answers the handshake under a key of its own": lambda agents, index: wrong_key(agents.nodes[index].name),
    "replays a proof the genuine agent gave": lambda agents, index: replayed(
        capture_proof(agents.nodes[index].address, agents.nodes[index - 1].name if index else SERVER)
    ),
    "relays the handshake to another node's agent": lambda agents, index: relayed(agents.nodes[index + 1].address),
}


CASES = [*((mode, 3) for mode in MODES), ("answers the handshake under a key of its own", 0)]  # 0: the server's successor


@pytest.mark.parametrize(("mode", "index"), CASES)
def test_a_machine_holding_a_nodes_address_gets_nothing_and_that_node_fails(
    agents: AgentGroup, collectors: list[ReportCollector], tmp_path: Path, mode: str, index: int
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(3 << 20))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    victim = agents.nodes[index]
    answer = MODES[mode](agents, index)  # before the genuine agent goes: a replay needs its proof
    agents.processes[victim.name].kill()  # the genuine agent is gone from that address...
    agents.processes[victim.name].wait(5)
    impostor = Impostor(victim.address, answer, forged_ok(collectors, victim.name, digest, 3 << 20))  # ...and taken
    try:
        sink = {"kind": "raw", "dest": str(tmp_path / "{node}.img")}
        result = broadcast(image, agents.nodes, sink, key=agents.key, options=FAST)
    finally:
        impostor.close()
    assert result.failed == [victim.name], {name: r.error for name, r in result.items()}
    assert IDENTITY.format(victim.name) in (result[victim.name].error or "")
    for node in agents.nodes:
        if node is not victim:
            assert hashlib.sha256((tmp_path / f"{node.name}.img").read_bytes()).hexdigest() == digest, node.name
    received = b"".join(impostor.received)
    assert impostor.received and all(set(frames_in(bytes(one))) == {CHALLENGE} for one in impostor.received)
    assert collectors[0].session.encode() not in received and image.read_bytes()[:4096] not in received
    assert victim.name not in collectors[0].results and collectors[0].refused >= 1  # the forged "ok"


@pytest.mark.parametrize("key", [None, os.urandom(32)], ids=["no handshake", "a key of its own"])
def test_a_machine_without_the_key_cannot_feed_a_node_a_stream(agents: AgentGroup, tmp_path: Path, key: bytes | None) -> None:
    """The other way round: a machine that connects to an agent first, as if it were its predecessor,
    and sends a session of its own and a tiny image, is hung up on, never taken for its upstream."""
    node = agents.nodes[0]
    fake = b"not the image"
    header = {"session": "s-forged", "sink": {"kind": "raw", "dest": str(tmp_path / "{node}.img")}, "report": ":9",
              "timeout": 30, "stall_timeout": 5, "reconnect_timeout": 5, "replay_bytes": 1 << 20, "chain": []}  # fmt: skip
    with socket.create_connection(split_address(node.address), timeout=5) as sock:
        if key is not None:  # the handshake, its side of it signed with another key
            nonce = os.urandom(NONCE_BYTES)
            send_frame(sock, CHALLENGE, nonce)
            kind, payload = recv_frame(sock)
            assert kind == PROOF
            send_frame(sock, PROOF, sign(key, "connector", SERVER, node.name, nonce, payload[:NONCE_BYTES]))
        with contextlib.suppress(OSError):  # the agent may have hung up already
            send_frame(sock, HEADER, json.dumps(header).encode())
            send_frame(sock, DATA, fake)
            send_frame(sock, END, END_PAYLOAD.pack(hashlib.sha256(fake).digest(), len(fake)))
        answered = b""
        with contextlib.suppress(OSError):
            while data := sock.recv(64):
                answered += data
    assert answered == b""  # no offset: not taken for an upstream
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    result = broadcast(image, agents.nodes[:2], {"kind": "raw", "dest": str(tmp_path / "{node}.img")},
                       key=agents.key, options=FAST)  # fmt: skip
    assert result.ok, {name: r.error for name, r in result.items()}
    assert (tmp_path / f"{node.name}.img").read_bytes() == image.read_bytes()


@pytest.mark.slow
def test_the_key_reaches_a_node_only_inside_its_ssh_session(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    """While the agents run (each under the shell of its preparation, as in a deployment), no process
    of the host has the broadcast's key on its command line or in its environment; the agents hold it
    all the same: a broadcast with it reaches them."""
    names = sshd_cluster.nodes[:2]
    nodes = [ChainNode(name, "{}:0".format(sshd_cluster.addresses[name].split(":")[0])) for name in names]
    auth = SshAuth.from_key_file("root", str(sshd_cluster.key_file))
    key = new_key()
    with start_agents(nodes, sshd_cluster.addresses, auth, key=key, prepare=lambda node: "true") as launch:
        assert [node.name for node in launch.ready] == names, launch.failed
        shown = []
        for proc in Path("/proc").iterdir():
            for part in ("cmdline", "environ"):
                with contextlib.suppress(OSError):
                    if key.hex().encode() in (proc / part).read_bytes():
                        shown.append(f"{proc.name}/{part}")
        assert shown == []
        image = tmp_path / "disk.img"
        image.write_bytes(os.urandom(1 << 20))
        result = broadcast(image, launch.ready, {"kind": "discard"}, key=launch.key, options=FAST)
        launch.close(failed=set(result.failed))
    assert launch.key == key and result.ok, {name: r.error for name, r in result.items()}
