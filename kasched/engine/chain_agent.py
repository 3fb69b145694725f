"""The node side of the chain broadcast: receive an image stream from the predecessor, write it to a
sink (untar into a directory, or raw into a file/device), forward it to the successor, check its
sha256 and report to the server. Standalone, standard library only: run it as
``python3 -m kasched.engine.chain_agent --listen HOST:PORT --name NODE`` or ship this file over SSH
(``python3 - --listen ... < chain_agent.py``). The server side is :mod:`kasched.engine.chain`, which
also uses :class:`Forwarder` and the framing below. The protocol is described in
``docs/engine-transports.md``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: every node starts this program
if TYPE_CHECKING:
    import subprocess
    from typing import Any

FRAME = struct.Struct("!BI")  # kind, payload length
OFFSET = struct.Struct("!Q")
END_PAYLOAD = struct.Struct("!32sQ")  # sha256 digest of the whole stream, its length in bytes
CHUNK = 1 << 20
MAX_CONTROL = 1 << 20
MAX_LOW_WATER = CHUNK  # a node waits for at most this many bytes before it wakes up to forward them
SINK_PIPE = 1 << 20  # bytes a tar or command sink's pipe holds: it absorbs the sink's jitter
BATCH_SECONDS = 0.01  # a batch is at most this long at the rate the stream arrives (see Pacer)
BATCH_RANGE = (16 << 10, MAX_LOW_WATER)  # bytes; the session's low_water caps it too
RATE_WINDOW = 0.25  # seconds over which the arrival rate is measured
SOCKET_BUFFER = 4 << 20  # bytes asked of the kernel for each chain connection's buffers (see set_buffer)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # linux/socket.h: past net.core.[rw]mem_max, with CAP_NET_ADMIN

HEADER, DATA, END, ABORT = b"H"[0], b"D"[0], b"E"[0], b"A"[0]  # downstream direction
OFFSET_REPLY, ACK, SUPERSEDED, KEEPALIVE = b"O"[0], b"K"[0], b"S"[0], b"L"[0]  # upstream direction
TAR_FLAGS = {"gz": ["--gzip"], "xz": ["--xz"], "zst": ["--zstd"], "none": []}


class ProtocolError(Exception):
    """The peer did not speak the protocol, or the stream cannot continue."""


class Superseded(Exception):
    """Our successor was taken over by our predecessor: we were bypassed and must stop."""


class UpstreamLost(Exception):
    """The connection from the predecessor closed before the end of the stream."""


class NewUpstream(Exception):
    """A predecessor resumed the stream on a new connection; restart the frame parser."""


class DeadlinePassed(Exception):
    """The broadcast's deadline passed while a send waited for a live but blocked successor."""


# --- framing ---------------------------------------------------------------------------------------


def send_frame(sock: socket.socket, kind: int, payload: bytes = b"") -> None:
    header = FRAME.pack(kind, len(payload))
    sent = sock.sendmsg([header, payload]) if payload else sock.send(header)
    if sent < len(header) + len(payload):
        sock.sendall((header + payload)[sent:])


def recv_exact(sock: socket.socket, size: int) -> bytes:
    parts, left = [], size
    while left:
        part = sock.recv(left)
        if not part:
            raise ProtocolError("connection closed")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    kind, size = FRAME.unpack(recv_exact(sock, FRAME.size))
    if size > MAX_CONTROL:
        raise ProtocolError(f"control frame of {size} bytes")
    return kind, recv_exact(sock, size)


def no_delay(sock: socket.socket) -> None:
    """Small frames (the end of stream, acks, keepalives) leave at once. With Nagle's algorithm each
    waited for the peer's delayed ack of the previous one, up to ~0.4 s per hop: on a 64-node chain
    the acks of the end of stream took 27 s to come back from the tail."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_buffer(sock: socket.socket, option: int, size: int) -> None:
    """Give a chain connection ``size`` bytes of kernel buffer (``SO_SNDBUF`` on the sending side,
    ``SO_RCVBUF`` on the receiving side; the kernel doubles it for its bookkeeping). A node that falls
    behind for a moment (not scheduled, its sink busy) leaves the stream in its receive buffer, and its
    predecessor goes on at the link's rate: with the kernel's autotuning, sized for the round trip,
    such a moment held the whole chain back, down to the source (64 lab nodes at 10 Mbit/s: the
    first node received at E 0.89-0.91 instead of 0.94). As root, past ``net.core.[rw]mem_max``;
    otherwise up to it. 0: the kernel's autotuning."""
    if size <= 0:
        return
    force = SO_SNDBUFFORCE if option == socket.SO_SNDBUF else SO_RCVBUFFORCE
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:  # not root: what net.core.[rw]mem_max allows
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)


def probe_when_idle(sock: socket.socket, seconds: float) -> None:
    """Let the kernel probe an idle connection every second and end it (ETIMEDOUT) after ``seconds``
    of unanswered probes: a successor powered off or behind a pulled cable sends no reset. A live
    one's kernel answers, however busy the node is. (Not TCP_USER_TIMEOUT: since Linux 5.11 it also
    ends a connection whose window stays closed that long, i.e. a live successor whose sink stalls.)"""
    if seconds <= 0 or not hasattr(socket, "TCP_KEEPIDLE"):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, round(seconds)))


TCP_INFO_HEAD = struct.Struct("=8B13I")  # struct tcp_info up to tcpi_last_ack_recv (linux/tcp.h)


def unanswered_for(sock: socket.socket) -> float:
    """Seconds the kernel has been retransmitting data the peer never acknowledged (0 when nothing
    sent is waiting for an ack, or no retransmission timer has fired yet). A closed window is not
    counted: the peer acknowledged everything and answers the window probes."""
    if not hasattr(socket, "TCP_INFO"):
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size)
    except OSError:
        return 0.0
    fields = TCP_INFO_HEAD.unpack_from(info.ljust(TCP_INFO_HEAD.size, b"\0"))
    retransmits, unacked, last_ack_recv_ms = fields[2], fields[12], fields[20]
    return last_ack_recv_ms / 1000 if retransmits and unacked else 0.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# --- downstream side: forwarding with a bounded replay buffer ---------------------------------------


class ReplayBuffer:
    """The last ``capacity`` bytes sent (whole chunks kept by reference, no copy)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: collections.deque[bytes] = collections.deque()
        self.start = 0  # stream offset of the first byte kept
        self.end = 0  # stream offset after the last byte kept
        self.size = 0

    def append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.end += len(chunk)
        self.size += len(chunk)
        while len(self.chunks) > 1 and self.size - len(self.chunks[0]) >= self.capacity:
            dropped = self.chunks.popleft()
            self.start += len(dropped)
            self.size -= len(dropped)

    def since(self, offset: int) -> Iterator[memoryview]:
        if not self.start <= offset <= self.end:
            raise ProtocolError(f"cannot resume at byte {offset}: replay buffer holds {self.start}-{self.end}")
        position = self.start
        for chunk in list(self.chunks):
            if position + len(chunk) > offset:
                yield memoryview(chunk)[max(0, offset - position) :]
            position += len(chunk)


class Forwarder:
    """Send the stream to the first live successor; when it dies, bypass it: connect to the next one,
    learn how many bytes it has and resend from there out of the replay buffer."""

    def __init__(
        self, config: dict[str, Any], successors: list[list[str]], note_lost: Callable[[str, str], None]
    ) -> None:
        self.config = config
        self.successors = successors
        self.note_lost = note_lost
        self.stall = float(config["stall_timeout"])
        self.ack_timeout = min(self.stall, float(config.get("ack_timeout", 0)))
        self.ring = ReplayBuffer(int(config["replay_bytes"]))
        # how often a blocked send checks the successor is alive
        self.poll = min(1.0, self.stall / 4, max(0.1, self.ack_timeout / 4) if self.ack_timeout else 1.0)
        self.buffer = int(config.get("socket_buffer", SOCKET_BUFFER))
        self.sock: socket.socket | None = None
        self.index = -1
        self.alive_at = time.monotonic()
        self.check_at = 0.0  # when send() next looks at the successor (its buffer may hide a death)
        self.deadline = self.alive_at + float(config["timeout"])

    @property
    def current(self) -> str:
        return self.successors[self.index][0] if self.sock else ""

    def attach(self, start: int) -> None:
        """Connect to the first successor from ``start`` on that answers and can be resumed, and
        resend it what it lacks from the replay buffer."""
        for index in range(start, len(self.successors)):
            name, address = self.successors[index]
            try:
                self.sock, offset = self._handshake(index, address)
                self.index, self.alive_at = index, time.monotonic()
                try:
                    pieces = list(self.ring.since(offset))
                except ProtocolError as error:
                    self.abort(str(error))
                    raise
                for piece in pieces:
                    self._send(DATA, piece)
                return
            except (OSError, ProtocolError) as error:
                self.note_lost(name, f"cannot reach {name} at {address}: {error or type(error).__name__}")
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
        self.sock, self.index = None, len(self.successors)

    def _handshake(self, index: int, address: str) -> tuple[socket.socket, int]:
        # a SYN unanswered for the ack timeout: that successor is gone too (it would cost the stall)
        sock = socket.create_connection(split_address(address), timeout=self.ack_timeout or self.stall)
        try:
            no_delay(sock)
            probe_when_idle(sock, self.ack_timeout)
            set_buffer(sock, socket.SO_SNDBUF, self.buffer)
            sock.settimeout(self.stall)
            header = dict(self.config, chain=self.successors[index + 1 :])
            if header["report"].startswith(":"):  # the server's address as this node reaches it
                header["report"] = f"{sock.getsockname()[0]}{header['report']}"
            send_frame(sock, HEADER, json.dumps(header).encode())
            kind, payload = recv_frame(sock)
            if kind != OFFSET_REPLY:
                raise ProtocolError(f"expected an offset, got frame {kind!r}")
            sock.settimeout(self.poll)
        except BaseException:
            sock.close()
            raise
        return sock, OFFSET.unpack(payload)[0]

    def _send(self, kind: int, payload: bytes | memoryview = b"") -> None:
        """Send one frame (header and payload in one call: with TCP_NODELAY, no packet of 5 bytes);
        while the successor does not take it, check that it is still alive."""
        assert self.sock is not None
        views = [memoryview(FRAME.pack(kind, len(payload))), memoryview(payload)]
        while views := [view for view in views if view]:
            try:
                sent = self.sock.sendmsg(views)
            except TimeoutError as error:
                if error.errno == errno.ETIMEDOUT:  # the kernel's verdict (probe_when_idle), not our poll
                    raise
                self._poll_successor()
                continue
            for index, view in enumerate(views):
                taken = min(sent, len(view))
                views[index], sent = view[taken:], sent - taken

    def _poll_successor(self) -> bool:
        """Read what the successor sent upstream (keepalives, an ack, being superseded) without
        blocking; True on an ack. Raises TimeoutError if it has been silent for the stall timeout."""
        assert self.sock is not None
        while select.select([self.sock], [], [], 0)[0]:
            kind, _ = recv_frame(self.sock)
            if kind == SUPERSEDED:
                raise Superseded(f"{self.current} was taken over by our predecessor")
            self.alive_at = time.monotonic()
            if kind == ACK:  # the successor closes right after it: reading on would see that as a loss
                return True
        now = time.monotonic()
        if now > self.deadline:  # not an OSError: no successor is bypassed for it
            raise DeadlinePassed("the stream did not end before the deadline")
        if now - self.alive_at > self.stall:
            raise TimeoutError(f"no sign of life for {self.stall:g}s")
        if self.ack_timeout and unanswered_for(self.sock) > self.ack_timeout:
            raise TimeoutError(errno.ETIMEDOUT, "unacknowledged")  # told apart in _bypass
        return False

    def send(self, chunk: bytes) -> None:
        """Forward a chunk. Every ``poll`` seconds, also look at the successor when the send did not
        block: a send buffer of seconds of the stream would take that long to fill and block after
        the successor died."""
        self.ring.append(chunk)
        if self.sock is not None:
            try:
                self._send(DATA, chunk)
                if (now := time.monotonic()) >= self.check_at:
                    self.check_at = now + self.poll
                    self._poll_successor()
            except (OSError, ProtocolError) as error:
                self._bypass(error)  # attach() resends the chunk from the replay buffer

    def _bypass(self, error: BaseException) -> None:
        assert self.sock is not None
        if _was_superseded(self.sock):
            raise Superseded(f"{self.current} was taken over by our predecessor")
        if isinstance(error, OSError) and error.errno == errno.ETIMEDOUT:
            why = f"nothing acknowledged for {self.ack_timeout:g}s (powered off, or its link is down)"
        else:
            why = str(error) or type(error).__name__
        self.note_lost(self.current, f"connection to {self.current} lost: {why}")
        self.sock.close()
        self.sock = None
        self.attach(self.index + 1)

    def finish(self, end_payload: bytes, deadline: float) -> None:
        """Send the end of stream and wait until the successor acknowledges that it and everything
        after it have the whole stream; bypass successors that die meanwhile."""
        while self.sock is not None:
            try:
                self._send(END, end_payload)
                while not self._poll_successor():
                    if time.monotonic() >= deadline:
                        raise ProtocolError("no acknowledgement before the deadline")
                    select.select([self.sock], [], [], self.poll)
                self.sock.close()
                self.sock = None
            except (OSError, ProtocolError) as error:
                self._bypass(error)

    def abort(self, reason: str) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.settimeout(1.0)
                send_frame(self.sock, ABORT, reason.encode()[:MAX_CONTROL])
            self.sock.close()
            self.sock = None


def _was_superseded(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            return sock.recv(FRAME.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)[:1] == bytes([SUPERSEDED])
    except OSError:
        pass
    return False


# --- sinks ------------------------------------------------------------------------------------------


class Sink:
    """Where a node writes the stream; it also hashes the stream. ``spec``: {"kind": "tar", "dest":
    dir, "compression": "gz|xz|zst|none"}, {"kind": "raw", "dest": file or device}, {"kind":
    "command", "argv": [...]} or {"kind": "discard"}. ``{node}`` in ``dest`` is replaced by the node's
    name.

    Written inline, right after the chunk is forwarded: a sink thread fed through a queue cost each
    node 1.3x the CPU per byte (24-26 against 18.5-19 ms per MiB, 16 KiB batches, bench in
    docs/benchmarks.md), in lock hand-offs and thread switches. A sink slower than the stream slows the
    chain to its pace, as the bounded queue did once full; a tar or command sink's pipe holds
    ``SINK_PIPE`` bytes to absorb its jitter."""

    def __init__(self, spec: dict[str, Any], node: str) -> None:
        self.spec = spec
        self.node = node
        self.hasher = hashlib.sha256()
        self.error: str | None = None
        self.status: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.fd: int | None = None
        try:
            self.fd = self._open()
        except (OSError, ProtocolError, KeyError) as error:  # keep forwarding for the others anyway
            self.error = f"cannot open sink: {error}"

    def _open(self) -> int | None:
        kind = self.spec.get("kind", "discard")
        dest = str(self.spec.get("dest", "")).replace("{node}", self.node)
        if kind == "discard":
            return None
        if kind == "raw":
            flags = os.O_WRONLY | os.O_CREAT
            if not os.path.exists(dest) or stat.S_ISREG(os.stat(dest).st_mode):
                flags |= os.O_TRUNC
            return os.open(dest, flags, 0o644)
        if kind == "tar":
            os.makedirs(dest, exist_ok=True)
            argv = ["tar", "-x", "-f", "-", "-C", dest, *TAR_FLAGS[self.spec.get("compression", "none")]]
        elif kind == "command":
            argv = [str(arg).replace("{node}", self.node) for arg in self.spec["argv"]]
        else:
            raise ProtocolError(f"unknown sink kind {kind!r}")
        import fcntl
        import subprocess  # only for these sinks

        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):  # then the default 64 KiB: right, with less slack
            fcntl.fcntl(self.process.stdin.fileno(), fcntl.F_SETPIPE_SZ, SINK_PIPE)
        return self.process.stdin.fileno()

    def put(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        if self.fd is not None and self.error is None:
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.fd, view) :]
            except OSError as error:
                self.error = f"sink write failed: {error.strerror}"

    def close(self, timeout: float) -> str:
        """Wait for the sink to finish; the hex sha256 of what went through it."""
        if self.process is not None:
            self._close_process(self.process, timeout)
        elif self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError as error:
                self.error = self.error or f"sink sync failed: {error.strerror}"
            os.close(self.fd)
        return self.hasher.hexdigest()

    def _close_process(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        import subprocess  # already loaded by _open

        assert process.stdin is not None and process.stderr is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            self.status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            self.status = process.wait()
        message = process.stderr.read().decode(errors="replace").strip()
        if self.status != 0 and self.error is None:
            self.error = f"sink exited with status {self.status}: {message[-400:]}"
        elif self.status != 0:
            self.error = f"{self.error}; sink exited with status {self.status}: {message[-400:]}"


# --- upstream side: the agent -----------------------------------------------------------------------


class Reporter:
    """Send one JSON message per connection to the server's report address (best effort)."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout

    def send(self, message: dict[str, Any]) -> None:
        try:
            with socket.create_connection(split_address(self.address), timeout=self.timeout) as sock:
                send_frame(sock, HEADER, json.dumps(message).encode())
        except OSError as error:
            print(f"chain agent: cannot report to {self.address}: {error}", file=sys.stderr)


class Pacer:
    """How many bytes a node lets arrive before it wakes up to forward them: ``seconds`` of the
    stream (``BATCH_SECONDS`` unless the session says) at the rate it arrives, measured over
    ``RATE_WINDOW``. Batches cut the CPU a node spends per byte, but a batch long against the link's
    round trip stalls the sender, which waits for window while the batch sits unread: on 8 lab nodes
    at 20 Mbit/s, 256 KiB batches (100 ms) brought the stream's E from 0.91 to 0.77, 32 KiB (13 ms)
    kept 0.90-0.91 for 40 % of the CPU."""

    def __init__(self, seconds: float = BATCH_SECONDS) -> None:
        self.seconds = seconds
        self.batch = BATCH_RANGE[0]
        self.since = 0.0  # when the current measuring window started (0: no data yet)
        self.count = 0

    def arrived(self, count: int, now: float) -> None:
        if not self.since:
            self.since = now
            return
        self.count += count
        if (elapsed := now - self.since) >= RATE_WINDOW:
            low, high = BATCH_RANGE
            self.batch = int(min(high, max(low, self.count / elapsed * self.seconds)))
            self.since, self.count = now, 0


class Agent:
    """One node of the chain: accepts the stream, sinks it, forwards it, reports. A thread sends
    keepalives upstream so that a predecessor blocked by backpressure knows we are alive."""

    def __init__(self, listener: socket.socket, name: str) -> None:
        self.listener = listener
        self.name = name
        self.upstream: socket.socket | None = None
        self.upstream_lock = threading.Lock()
        self.abandoned: list[socket.socket] = []
        self.config: dict[str, Any] = {}
        self.have = 0
        self.low_water = 1  # the upstream socket's SO_RCVLOWAT now
        self.pacer = Pacer()
        self.stall = 30.0
        self.deadline = 0.0
        self.done = threading.Event()

    def accept_first(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.upstream is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.listener], [], [], remaining)[0]:
                raise ProtocolError(f"nobody connected within {timeout:g}s")
            header = self._accept_header()
            if header is not None:
                self.config = header
                self.stall = float(header["stall_timeout"])
                self.pacer.seconds = float(header.get("batch_seconds", BATCH_SECONDS))
                self.deadline = time.monotonic() + float(header["timeout"])
        threading.Thread(target=self._keepalive, name="keepalive", daemon=True).start()

    def _keepalive(self) -> None:
        while not self.done.wait(self.stall / 4):
            self.send_upstream(KEEPALIVE)

    def send_upstream(self, kind: int) -> None:
        """A small frame to the predecessor, never blocking (the other direction is the stream)."""
        with self.upstream_lock, contextlib.suppress(OSError):
            if self.upstream is not None:
                self.upstream.send(FRAME.pack(kind, 0), socket.MSG_DONTWAIT)

    def _accept_header(self) -> dict[str, Any] | None:
        """Accept a connection; if it opens our session (or a first one), make it the upstream."""
        conn, _ = self.listener.accept()
        try:
            no_delay(conn)
            conn.settimeout(self.stall)
            kind, payload = recv_frame(conn)
            header = json.loads(payload)
            if kind != HEADER or (self.config and header.get("session") != self.config["session"]):
                raise ProtocolError("not our session")
            set_buffer(conn, socket.SO_RCVBUF, int(header.get("socket_buffer", SOCKET_BUFFER)))
            send_frame(conn, OFFSET_REPLY, OFFSET.pack(self.have))
        except (OSError, ProtocolError, ValueError):
            conn.close()
            return None
        if self.upstream is not None:  # an earlier node resumed us: the old predecessor is out
            self.send_upstream(SUPERSEDED)
            self.abandoned.append(self.upstream)
        with self.upstream_lock:
            self.upstream = conn
            self.low_water = 1  # a new socket's
        return header

    def read_some(self, size: int) -> bytes:
        """Some bytes from the predecessor. No stall timeout here: a stalled predecessor is detected
        and bypassed by its own predecessor, which then connects to our listener.

        The agent wakes up only once a batch has arrived (the :class:`Pacer`'s, at most the session's
        ``low_water`` and ``size``: never more than the predecessor is bound to send): on a slow
        link, waking up for every few packets costs far more CPU than the data, at the price of that
        much delay per hop."""
        assert self.upstream is not None
        self._set_low_water(min(size, int(self.config.get("low_water", 1)), self.pacer.batch))
        remaining = self.deadline - time.monotonic()
        readable, _, _ = select.select([self.upstream, self.listener], [], [], max(0.0, remaining))
        if not readable:
            raise ProtocolError("the stream did not end before the deadline")
        if self.listener in readable and self._accept_header() is not None:
            raise NewUpstream()
        if self.upstream not in readable:
            return b""
        try:
            data = self.upstream.recv(size)
        except OSError as error:
            raise UpstreamLost(str(error)) from error
        if not data:
            raise UpstreamLost("connection closed before the end of the stream")
        self.pacer.arrived(len(data), time.monotonic())
        return data

    def _set_low_water(self, low_water: int) -> None:
        assert self.upstream is not None
        if low_water != self.low_water:
            with contextlib.suppress(OSError):  # then select() wakes up for any byte: slower, still right
                self.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, low_water))
            self.low_water = low_water

    def read_exact(self, size: int) -> bytes:
        parts, left = [], size
        while left:
            part = self.read_some(left)
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def await_resume(self, reason: str) -> None:
        """The upstream is gone: wait for an earlier node to resume the stream on a new connection."""
        deadline = time.monotonic() + float(self.config["reconnect_timeout"])
        while (remaining := deadline - time.monotonic()) > 0:
            if select.select([self.listener], [], [], remaining)[0] and self._accept_header() is not None:
                return
        raise ProtocolError(f"upstream lost ({reason}) and not resumed")

    def receive(self, consume: Callable[[bytes], None]) -> bytes:
        """Parse frames until the end of stream, whoever sends them; return the END payload."""
        while True:
            try:
                kind, size = FRAME.unpack(self.read_exact(FRAME.size))
                if kind == END:
                    return self.read_exact(size)
                if kind == ABORT:
                    raise ProtocolError(f"aborted upstream: {self.read_exact(size).decode(errors='replace')}")
                if kind != DATA:
                    raise ProtocolError(f"unexpected frame {kind!r}")
                while size:
                    chunk = self.read_some(min(size, CHUNK))
                    if chunk:
                        self.have += len(chunk)
                        size -= len(chunk)
                        consume(chunk)
            except NewUpstream:
                continue
            except UpstreamLost as lost:
                self.await_resume(str(lost))

    def acknowledge(self) -> None:
        self.send_upstream(ACK)

    def close(self) -> None:
        self.done.set()
        for sock in [*self.abandoned, self.upstream, self.listener]:
            if sock is not None:
                sock.close()


def serve(agent: Agent, accept_timeout: float) -> dict[str, Any]:
    """Take part in one broadcast; return the report sent to the server."""
    agent.accept_first(accept_timeout)
    config = agent.config
    deadline = time.monotonic() + float(config["timeout"])
    reporter = Reporter(config["report"], agent.stall)
    session = config["session"]
    result: dict[str, Any] = {"type": "result", "session": session, "node": agent.name, "error": None, "lost": []}

    def note_lost(node: str, error: str) -> None:
        result["lost"].append(node)
        reporter.send({"type": "lost", "session": session, "node": node, "by": agent.name, "error": error})

    forwarder = Forwarder(config, config["chain"], note_lost)
    forwarder.attach(0)
    sink = Sink(config["sink"], agent.name)
    end = b""

    def consume(chunk: bytes) -> None:
        forwarder.send(chunk)
        sink.put(chunk)

    try:
        end = agent.receive(consume)
        forwarder.finish(end, deadline)
        agent.acknowledge()
    except (ProtocolError, OSError, DeadlinePassed) as error:
        forwarder.abort(str(error))
        result["error"] = str(error)
    except Superseded as error:
        result["error"] = f"bypassed by an earlier node: {error}"
    finally:
        sha256 = sink.close(max(1.0, deadline - time.monotonic()))
        agent.close()
    if result["error"] is None:
        result["error"] = _verify(END_PAYLOAD.unpack(end), agent.have, sha256, sink)
    result.update(ok=result["error"] is None, bytes=agent.have, sha256=sha256, sink_status=sink.status)
    reporter.send(result)
    return result


def _verify(end: tuple[bytes, int], have: int, sha256: str, sink: Sink) -> str | None:
    expected, total = end
    if have != total:
        return f"received {have} bytes, the stream has {total}"
    if sha256 != expected.hex():
        return f"sha256 mismatch: got {sha256}, expected {expected.hex()}"
    return sink.error


USAGE = "usage: chain_agent --listen HOST:PORT --name NODE [--accept-timeout SECONDS]"


def _parse_args(argv: list[str]) -> dict[str, str]:
    """``--option value`` pairs. Not argparse: every node of a chain starts this program, and
    argparse, typing and subprocess at start cost 178 ms of CPU per start against 164 without them
    (bench/agent_start.py's way of measuring, on this project's test machine)."""
    options = {"--accept-timeout": "120"}
    if len(argv) % 2 or any(key not in ("--listen", "--name", "--accept-timeout") for key in argv[::2]):
        raise ValueError(USAGE)
    options.update(zip(argv[::2], argv[1::2], strict=True))
    if "--listen" not in options or "--name" not in options:
        raise ValueError(USAGE)
    return options


def _listen_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r} is not HOST:PORT (port 0: any free one)\n{USAGE}")
    return split_address(text)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--accept-timeout {text!r} is not a number of seconds\n{USAGE}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        options = _parse_args(sys.argv[1:] if argv is None else argv)
        accept_timeout = _seconds(options["--accept-timeout"])
        listen, name = _listen_address(options["--listen"]), options["--name"]
    except ValueError as error:
        print(f"chain agent: {error}", file=sys.stderr)
        return 2
    try:
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        listener = socket.create_server(listen, family=family, backlog=16)
    except OSError as error:
        print(f"chain agent {name}: cannot listen on {options['--listen']}: {error.strerror or error}", file=sys.stderr)
        return 2
    host, port = listener.getsockname()[:2]
    print(f"ready {host}:{port}", flush=True)
    try:
        result = serve(Agent(listener, name), accept_timeout)
    except ProtocolError as error:
        print(f"chain agent {name}: {error}", file=sys.stderr)
        return 2
    if not result["ok"]:
        print(f"chain agent {name}: {result['error']}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
