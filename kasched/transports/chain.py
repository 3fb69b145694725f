"""Chain broadcast, server side: the image leaves the server once, into a TCP pipeline of nodes
ordered by switch then rack then name (one crossing per switch uplink); each node writes it to its
sink while forwarding it (:mod:`kasched.transports.chain_agent`), checks its sha256 and reports here.

The agents must already listen on their nodes (started over SSH by the deployment workflow, e.g.
with :func:`kasched.transports.chain_ssh.start_agents`), each holding the broadcast's key. A node that
dies mid-stream is bypassed by its predecessor and reported failed; the others still get the whole
stream. Every chain connection, and every report to the server, opens with a handshake in which both
ends prove they hold the key (``chain_wire.connect_as``): a machine that took a node's address gets
nothing and its node is reported failed; a report not signed with the key is not recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shlex
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from kasched.errors import DriverError, DriverTimeout, InputError, IntegrityError
from kasched.results import GroupResult, NodeResult
from kasched.transports.chain_wire import (
    CHUNK,
    END_PAYLOAD,
    HEADER,
    KEY_BYTES,
    SERVER,
    DeadlinePassed,
    Forwarder,
    ProtocolError,
    Superseded,
    accept_as,
    no_delay,
    recv_frame,
    seal,
    send_frame,
    unseal,
)

STEP = "broadcast"
AGENT_MODULE = "kasched.transports.chain_agent"
LOG = logging.getLogger(__name__)


class Placed(Protocol):
    """Anything with a name and a place in the network (an inventory node, a :class:`ChainNode`)."""

    @property
    def name(self) -> str: ...
    @property
    def switch(self) -> str: ...
    @property
    def rack(self) -> str: ...


PlacedT = TypeVar("PlacedT", bound=Placed)


@dataclass(frozen=True)
class ChainNode:
    """A node of the chain: its name, the ``host:port`` its agent listens on, its place."""

    name: str
    address: str
    switch: str = ""
    rack: str = ""


@dataclass(frozen=True)
class ChainReport:
    """What a node reported, as stored in ``NodeResult.value``."""

    bytes: int
    sha256: str
    sink_status: int | None = None


def natural_key(text: str) -> list[tuple[int, int | str]]:
    """``node2`` before ``node10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part]


def order_chain(nodes: Iterable[PlacedT]) -> list[PlacedT]:
    """The order of the pipeline: grouped by switch, then rack, then name (natural sort), so the
    stream crosses each switch uplink once."""
    return sorted(nodes, key=lambda n: (natural_key(n.switch), natural_key(n.rack), natural_key(n.name)))


def agent_command(listen: str, name: str, python: str = "python3", accept_timeout: float = 120.0) -> str:
    """The shell command that starts an agent on a node (kasched importable there); the broadcast's
    key goes on its stdin, one line of hex (never on the command line: other users see that)."""
    return (
        f"{shlex.quote(python)} -m {AGENT_MODULE} --listen {shlex.quote(listen)} --name {shlex.quote(name)}"
        f" --accept-timeout {accept_timeout:g}"
    )


@dataclass
class BroadcastOptions:
    """Tunables of one broadcast."""

    timeout: float = 3600.0  # the whole broadcast
    stall_timeout: float = 30.0  # a connection without progress for this long is dead
    # what a node sent its successor not acknowledged by the successor's kernel for this long: the
    # successor is powered off or its cable pulled (no reset comes); 0: only the stall timeout
    ack_timeout: float = 3.0
    reconnect_timeout: float = 30.0  # how long a node whose upstream died waits to be resumed
    replay_bytes: int = 64 << 20  # bounded replay buffer per node
    lost_grace: float = 3.0  # how long to wait for a report from a node said lost by its predecessor
    lost_settle: float = 0.5  # ...but at most this long once all the other nodes have reported
    rate_limit: float | None = None  # bytes/s at the source (tests and benches)
    # bytes a node waits for before it wakes up to forward them: fewer wake-ups (CPU) for one such
    # delay more per hop; None: see low_water_for()
    low_water: int | None = None
    # a node lets at most this long of its stream (at the rate it arrives) gather before it wakes up
    # to forward it (the agent's Pacer; 16 KiB to low_water): longer, less CPU per byte, more delay
    batch_seconds: float = 0.01
    # kernel buffer for each chain connection, sending and receiving side (see chain_wire.set_buffer):
    # it absorbs a node's short delays instead of passing them up to the source; 0: kernel autotuning
    socket_buffer: int = 4 << 20
    # bytes/s the server's kernel sends the stream at, at most (chain_wire.cap_pacing): the nodes' link
    # rate, where the server's link is faster than theirs; None: as fast as its congestion control goes
    source_rate: float | None = None
    # the address nodes report to; None: listen on all addresses and tell each node the server's
    # address on its connection to the chain (right when the nodes sit on the server's network)
    report_host: str | None = None
    # seconds a node (or the server) goes on connecting to a successor that refuses connections, its
    # agent still starting, unless the server says that start failed (broadcast()'s start_state):
    # the stream leaves while the later agents start; 0: a refused successor is bypassed at once
    start_wait: float = 0.0


StartState = Callable[[str], "str | None"]  # a node's name -> STARTING, "ready", why it failed, or None


class ReportCollector:
    """Listens for the nodes' reports: one signed JSON frame per connection, after the handshake
    (``chain_wire.accept_as``: the node proves it holds the broadcast's ``key``, the server too). A
    ``start`` message is a question (is this node's agent still starting?), answered on the same
    connection from ``start_state``. A report without the key's proof, or about another node than
    the one that sent it, is not recorded: it is counted in ``refused`` and logged."""

    def __init__(self, host: str | None, session: str, key: bytes, start_state: StartState | None = None) -> None:
        self.session = session
        self.key = key
        self.start_state = start_state
        self.refused = 0
        self.listener = socket.create_server((host or "", 0), backlog=128)
        self.listener.settimeout(0.2)
        port = self.listener.getsockname()[1]
        self.address = f"{host}:{port}" if host else f":{port}"  # ":port": see Forwarder._handshake
        self.results: dict[str, dict[str, Any]] = {}
        self.lost: dict[str, tuple[float, str]] = {}
        self.changed = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="chain-reports", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5.0)
                    no_delay(conn)
                    peer, binding = accept_as(conn, self.key, SERVER)
                    kind, payload = recv_frame(conn)
                    if kind != HEADER:
                        raise ProtocolError(f"expected a report, got frame {kind!r}")
                    self._take(conn, peer, binding, unseal(self.key, binding, "report", payload))
                except (OSError, ProtocolError, ValueError) as error:
                    self._refuse(conn, error)

    def _refuse(self, conn: socket.socket, error: Exception) -> None:
        with self.changed:
            self.refused += 1
        where = "an unknown address"
        with contextlib.suppress(OSError):
            where = "{}:{}".format(*conn.getpeername()[:2])
        LOG.warning("chain broadcast %s: a report from %s not recorded: %s", self.session, where, error)

    def _take(self, conn: socket.socket, peer: str, binding: bytes, message: dict[str, Any]) -> None:
        sender = message.get("node") if message.get("type") == "result" else message.get("by")
        if sender != peer:  # every node holds the key: each speaks for itself only
            raise ProtocolError(f"{peer!r} sent a message as {sender!r}")
        if message.get("type") != "start":
            self.record(message)
            return
        state = None  # another session's node, or no start under way: not known here
        if self.start_state is not None and message.get("session") == self.session:
            state = self.start_state(str(message.get("node")))
        send_frame(conn, HEADER, seal(self.key, binding, "answer", {"state": state}))

    def record(self, message: dict[str, Any]) -> None:
        if message.get("session") != self.session:
            return
        with self.changed:
            if message.get("type") == "result":
                self.results[message["node"]] = message
            elif message.get("type") == "lost":
                self.lost.setdefault(message["node"], (time.monotonic(), f"{message['error']}"))
            self.changed.notify_all()

    def wait(self, nodes: Sequence[str], deadline: float, grace: float, settle: float) -> None:
        """Until every node reported, or was said lost ``grace`` seconds ago, or the deadline. Once
        every node not said lost has reported (the stream is over), a lost node is waited for at
        most ``settle`` seconds more: a node bypassed mid-stream has nothing left to say."""
        settled_at: float | None = None
        with self.changed:
            while (now := time.monotonic()) < deadline:
                pending = [n for n in nodes if n not in self.results]
                if settled_at is None and all(n in self.lost for n in pending):
                    settled_at = now
                settled = settled_at is not None and now >= settled_at + settle
                waiting = [n for n in pending if n not in self.lost or (not settled and self.lost[n][0] + grace > now)]
                if not waiting:
                    return
                self.changed.wait(min(0.2, deadline - now))

    def close(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() up at once
        self.thread.join(2.0)
        self.listener.close()


def broadcast(
    source: str | Path | BinaryIO,
    nodes: Sequence[ChainNode],
    sink: dict[str, Any],
    *,
    key: bytes,
    expected_sha256: str | None = None,
    options: BroadcastOptions | None = None,
    ordered: bool = True,
    start_state: StartState | None = None,
) -> GroupResult:
    """Send ``source`` (a path or a binary file object) once through the chain of ``nodes``, whose
    agents were given ``key`` (``chain_wire.KEY_BYTES`` random bytes, this broadcast's own) when they
    started: only the agent that proves it holds the key under a node's name receives the stream
    meant for that node.

    ``sink`` says where each node writes it (see :class:`~kasched.transports.chain_agent.Sink`).
    ``expected_sha256`` (the image catalogue's) is what nodes check against; by default the sha256
    the server computes while sending. Results are in the order of ``nodes``; a node is ok when it
    reported the whole stream with the right checksum and a clean sink.

    With ``options.start_wait``, agents may still be starting: ``start_state`` says how each one's
    start goes (``chain_wire.STARTING``, ``"ready"``, or why it failed), to the server and, through the
    report address, to the nodes waiting for a successor.
    """
    options = options or BroadcastOptions()
    check_options(options)
    if len(key) < KEY_BYTES:
        raise InputError(f"a key of {len(key)} bytes: expected {KEY_BYTES} random bytes", field="key")
    if expected_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256):
        raise InputError(f"not a sha256: {expected_sha256!r}", field="expected_sha256")
    chain = order_chain(nodes) if ordered else list(nodes)
    started = time.monotonic()
    deadline = started + options.timeout
    session = uuid.uuid4().hex
    collector = ReportCollector(options.report_host, session, key, start_state)
    try:
        low_water = options.low_water or low_water_for(_size_of(source), len(chain))
        config = _session_config(session, sink, options, collector.address) | {"low_water": low_water}
        successors = [[n.name, n.address] for n in chain]
        forwarder = Forwarder(config, successors, _server_note(collector), key, SERVER,
                              pacing_rate=options.source_rate or 0.0, start_state=start_state)  # fmt: skip
        forwarder.attach(0)
        sent = expected_sha256  # what the nodes must report having: the catalogue's, or what was sent
        if forwarder.sock is not None:  # else no node answered: all are reported lost already
            try:
                end = _send_stream(source, forwarder, expected_sha256, options.rate_limit)
                sent = END_PAYLOAD.unpack(end)[0].hex()
                forwarder.finish(end, deadline)
            except DeadlinePassed as error:  # the nodes not done are reported so
                forwarder.abort(str(error))
        collector.wait([n.name for n in chain], deadline, options.lost_grace, options.lost_settle)
    except (OSError, Superseded, ProtocolError) as error:
        raise DriverError(f"broadcast failed at the source: {error}") from error
    finally:
        collector.close()
    return _results(nodes, collector, time.monotonic() - started, sent)


def check_options(options: BroadcastOptions) -> None:
    """Refuse what the kernel would silently take for something else."""
    if options.socket_buffer < 0:
        raise InputError(f"{options.socket_buffer} bytes: expected 0 or more (0: the kernel's autotuning)",
                         field="socket_buffer")  # fmt: skip
    if options.source_rate is not None and not 0 < options.source_rate < float("inf"):
        raise InputError(f"{options.source_rate} bytes/s: expected more than 0 (None: no cap)", field="source_rate")
    if not 0 <= options.start_wait < float("inf"):
        raise InputError(f"{options.start_wait} s: expected 0 or more (0: no waiting)", field="start_wait")


def _send_stream(
    source: str | Path | BinaryIO, forwarder: Forwarder, expected_sha256: str | None, rate: float | None
) -> bytes:
    """Send the whole source; the end of stream's payload (the sha256 the nodes must find, the length)."""
    try:
        digest, total = _pump(source, forwarder, rate)
    except OSError as error:
        forwarder.abort(f"the server could not read the image: {error}")  # the agents stop now
        raise
    expected = bytes.fromhex(expected_sha256) if expected_sha256 else digest
    return END_PAYLOAD.pack(expected, total)


FILL_SHARE = 0.05  # the share of the stream's time that the per-hop delays may add up to
LOW_WATER_RANGE = (64 << 10, 256 << 10)


def low_water_for(size: int | None, hops: int) -> int:
    """The low-water mark for a stream of ``size`` bytes (None: unknown) through ``hops`` nodes:
    each node forwards a batch of that many bytes at once, so the last node starts that many bytes'
    time per hop late. Kept to ``FILL_SHARE`` of the stream, between 64 and 256 KiB: below that,
    wake-ups cost the nodes more CPU than the data; above, batches gain little more."""
    low, high = LOW_WATER_RANGE
    if size is None:
        return low
    return int(min(high, max(low, size * FILL_SHARE / max(1, hops))))


def _size_of(source: str | Path | BinaryIO) -> int | None:
    """The source's size when it is a file; None for a stream (an HTTP body)."""
    try:
        if isinstance(source, str | Path):
            return Path(source).stat().st_size
        mode = os.fstat(source.fileno())
    except (OSError, AttributeError, ValueError):
        return None
    return mode.st_size if stat.S_ISREG(mode.st_mode) else None


def _session_config(session: str, sink: dict[str, Any], options: BroadcastOptions, report: str) -> dict[str, Any]:
    return {
        "session": session,
        "sink": sink,
        "report": report,
        "timeout": options.timeout,
        "stall_timeout": options.stall_timeout,
        "ack_timeout": options.ack_timeout,
        "reconnect_timeout": options.reconnect_timeout,
        "replay_bytes": options.replay_bytes,
        "batch_seconds": options.batch_seconds,
        "socket_buffer": options.socket_buffer,
        "start_wait": options.start_wait,
    }


def _server_note(collector: ReportCollector) -> Any:
    def note_lost(node: str, error: str) -> None:
        collector.record({"type": "lost", "session": collector.session, "node": node, "by": "server", "error": error})

    return note_lost


def _pump(source: str | Path | BinaryIO, forwarder: Forwarder, rate_limit: float | None) -> tuple[bytes, int]:
    """Read the source once, hash it and feed it to the chain, at most ``rate_limit`` bytes/s."""
    hasher = hashlib.sha256()
    total = 0
    started = time.monotonic()
    handle = open(source, "rb") if isinstance(source, str | Path) else source  # noqa: SIM115
    try:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
            forwarder.send(chunk)
            total += len(chunk)
            if rate_limit:
                ahead = total / rate_limit - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        if handle is not source:
            handle.close()
    return hasher.digest(), total


def _results(nodes: Sequence[ChainNode], collector: ReportCollector, elapsed: float, sent: str | None) -> GroupResult:
    """One result per node. A node is ok only if it says so and the sha256 it reports is ``sent``'s:
    a machine relaying a chain connection could change the stream and the end of stream's sha256 to
    match, but not a node's report (signed with the key)."""
    group = GroupResult()
    for node in nodes:
        report = collector.results.get(node.name)
        if report is not None:
            value = ChainReport(int(report.get("bytes", 0)), str(report.get("sha256", "")), report.get("sink_status"))
            ok, error = bool(report.get("ok")), report.get("error")
            if ok and sent is not None and value.sha256.lower() != sent.lower():
                ok, error = False, f"sha256 mismatch: got {value.sha256}, the server sent {sent.lower()}"
            if error:
                mismatch = error.startswith("sha256 mismatch")
                error = str(IntegrityError(error, field=node.name) if mismatch else DriverError(error, node=node.name))
            group.add(NodeResult(node.name, ok, STEP, error, elapsed, value))
            continue
        if node.name in collector.lost:
            error = DriverError(f"lost: {collector.lost[node.name][1]}", node=node.name)
        else:
            error = DriverTimeout("no report before the deadline", node=node.name)
        group.add(NodeResult(node.name, False, STEP, str(error), elapsed))
    return group
