"""The wire side of the chain broadcast, shared by the server (:mod:`kasched.transports.chain`) and the
node agents (:mod:`kasched.transports.chain_agent`): the framing, the handshake that opens every chain
connection (both ends prove they hold the broadcast's key, each under its own name), the chain
connections' socket options, and the :class:`Forwarder`, which sends the stream to the first live
successor out of a bounded replay buffer and bypasses successors that die. Standard library only: it
is shipped to the nodes ahead of the agent's own source, as one program (``chain_ssh.AGENT_SOURCE``).
The protocol is described in ``docs/transports.md``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hmac
import json
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: every node starts this program
if TYPE_CHECKING:
    from typing import Any

FRAME = struct.Struct("!BI")  # kind, payload length
OFFSET = struct.Struct("!Q")
END_PAYLOAD = struct.Struct("!32sQ")  # sha256 digest of the whole stream, its length in bytes
CHUNK = 1 << 20
MAX_CONTROL = 1 << 20
SOCKET_BUFFER = 4 << 20  # bytes asked of the kernel for each chain connection's buffers (see set_buffer)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # linux/socket.h: past net.core.[rw]mem_max, with CAP_NET_ADMIN
SO_MAX_PACING_RATE = 47  # linux/socket.h (not in Python's socket module)
STARTING = "starting"  # a successor's agent is still starting (see Forwarder._connect)
START_RETRY = 0.01  # seconds between two connections to a successor whose agent is still starting
START_ASK_EVERY = 0.25  # seconds between two questions to the server about that successor's start

HEADER, DATA, END, ABORT = b"H"[0], b"D"[0], b"E"[0], b"A"[0]  # downstream direction
OFFSET_REPLY, ACK, SUPERSEDED, KEEPALIVE = b"O"[0], b"K"[0], b"S"[0], b"L"[0]  # upstream direction
CHALLENGE, PROOF = b"C"[0], b"P"[0]  # the handshake (see connect_as)

KEY_BYTES = 32  # the broadcast's key: random, made by the server for each broadcast
NONCE_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256
PROTOCOL = b"kasched-chain-1"
SERVER = ""  # the name the server goes by in handshakes (no node is named "")
HANDSHAKE_TIMEOUT = 5.0  # seconds a listener gives a connecting peer to prove itself


class ProtocolError(Exception):
    """The peer did not speak the protocol, or the stream cannot continue."""


class IdentityError(ProtocolError):
    """The peer did not prove it holds the broadcast's key under the name expected of it."""


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


def cap_pacing(sock: socket.socket, rate: float) -> None:
    """Have the kernel send on ``sock`` at most ``rate`` bytes/s (``SO_MAX_PACING_RATE``; 0: no cap).
    The source uses it when its link is faster than the nodes': BBR, probing for more bandwidth,
    sends a quarter above the first node's link every few round trips and queues there; capped at that
    link's rate, the stream of a 64-node lab at 10 Mbit/s took 43.27 s on average instead of 43.93
    (docs/transports.md, "Pacing the source")."""
    if rate <= 0:
        return
    value = min(int(rate), (1 << 64) - 2)  # past a C int (2 GB/s, 17 Gbit/s): as the kernel's u64
    sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, value if value < 1 << 31 else struct.pack("=Q", value))


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


# --- the handshake: both ends prove they hold the broadcast's key ------------------------------------


def sign(key: bytes, *parts: bytes | str) -> bytes:
    """HMAC-SHA256 under ``key`` of ``parts``, each length-prefixed (no two lists sign alike)."""
    message = [PROTOCOL]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        message += [OFFSET.pack(len(data)), data]
    return hmac.digest(key, b"".join(message), "sha256")


def not_proven(address: str, name: str) -> IdentityError:
    who = "the server" if name == SERVER else name
    return IdentityError(f"chain: the agent at {address} did not prove it is {who}"
                         " (wrong key: another machine may hold its address)")  # fmt: skip


def connect_as(sock: socket.socket, key: bytes, me: str, expected: str, address: str) -> bytes:
    """The connecting side of the handshake, before anything else on a chain connection: send a
    nonce and our name; the listener answers its nonce and its proof, an HMAC under the key of both
    names and both nonces (so it holds only for this connection, from ``me`` to ``expected``); we
    check it, then send ours (another label: neither proof can be played back as the other). Returns
    the connection's binding (both nonces), which later messages on it are signed with. Raises
    :class:`IdentityError` if the listener's proof is not ``expected``'s; nothing else was sent."""
    nonce = os.urandom(NONCE_BYTES)
    send_frame(sock, CHALLENGE, nonce + me.encode())
    kind, payload = recv_frame(sock)
    theirs, proof = payload[:NONCE_BYTES], payload[NONCE_BYTES:]
    if kind != PROOF or len(payload) != NONCE_BYTES + MAC_BYTES:
        raise not_proven(address, expected)
    if not hmac.compare_digest(proof, sign(key, "listener", me, expected, nonce, theirs)):
        raise not_proven(address, expected)
    send_frame(sock, PROOF, sign(key, "connector", me, expected, nonce, theirs))
    return nonce + theirs


def accept_as(sock: socket.socket, key: bytes, me: str) -> tuple[str, bytes]:
    """The listening side of the handshake (see :func:`connect_as`): the peer's name and the
    connection's binding. Raises :class:`IdentityError` if the peer's proof is wrong; it was sent
    nothing but our nonce and proof."""
    kind, payload = recv_frame(sock)
    if kind != CHALLENGE or len(payload) < NONCE_BYTES:
        raise IdentityError("the peer sent no challenge")
    nonce, peer = payload[:NONCE_BYTES], payload[NONCE_BYTES:].decode(errors="replace")
    ours = os.urandom(NONCE_BYTES)
    send_frame(sock, PROOF, ours + sign(key, "listener", peer, me, nonce, ours))
    kind, proof = recv_frame(sock)
    if kind != PROOF or not hmac.compare_digest(proof, sign(key, "connector", peer, me, nonce, ours)):
        raise IdentityError(f"{peer or 'the server'!r} did not prove it holds the broadcast's key")
    return peer, nonce + ours


def seal(key: bytes, binding: bytes, label: str, message: dict[str, Any]) -> bytes:
    """``message`` as a frame payload: its HMAC (under the key, for this connection and ``label``)
    then its JSON."""
    body = json.dumps(message).encode()
    return sign(key, label, binding, body) + body


def unseal(key: bytes, binding: bytes, label: str, payload: bytes) -> dict[str, Any]:
    """The message :func:`seal` made; :class:`IdentityError` if its HMAC is wrong."""
    proof, body = payload[:MAC_BYTES], payload[MAC_BYTES:]
    if not hmac.compare_digest(proof, sign(key, label, binding, body)):
        raise IdentityError(f"a {label} signed without the broadcast's key")
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ProtocolError(f"a {label} that is not an object")
    return message


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
    learn how many bytes it has and resend from there out of the replay buffer. ``me`` is who we are
    in the handshakes, under the broadcast's ``key``: a successor that does not prove it is the node
    expected at its address is bypassed like a dead one, having been sent nothing."""

    def __init__(
        self,
        config: dict[str, Any],
        successors: list[list[str]],
        note_lost: Callable[[str, str], None],
        key: bytes,
        me: str,
        pacing_rate: float = 0.0,
        start_state: Callable[[str], str | None] | None = None,
    ) -> None:
        self.config = config
        self.key, self.me = key, me
        # how long a successor that refuses connections may still be starting (0: it is lost at once),
        # and who says how its start goes: STARTING, "ready", why it failed, or None (nobody knows)
        self.start_wait = float(config.get("start_wait", 0))
        self.start_state = start_state
        self.pacing_rate = pacing_rate  # bytes/s the kernel sends at, at most (cap_pacing); 0: no cap
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
                self.sock, offset = self._connect(index, name, address)
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
                why = f"cannot reach {name} at {address}: {error or type(error).__name__}"
                self.note_lost(name, str(error) if isinstance(error, IdentityError) else why)
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
        self.sock, self.index = None, len(self.successors)

    def _connect(self, index: int, name: str, address: str) -> tuple[socket.socket, int]:
        """The handshake with successor ``index``. Where the session lets successors still be
        starting (``start_wait``), a refused connection (the node is up, its agent not listening
        yet) is tried again every ``START_RETRY`` seconds, until the agent listens, the server says
        its start failed, or ``start_wait`` seconds (or the broadcast's deadline) pass."""
        give_up = min(time.monotonic() + self.start_wait, self.deadline)
        asked_at = float("-inf")  # not 0.0: monotonic time counts from boot
        said_ready = False
        while True:
            try:
                return self._handshake(index, address)
            except ConnectionRefusedError:
                if (now := time.monotonic()) >= give_up:
                    raise
                if said_ready:  # refused after the server said it listens, not before
                    raise ProtocolError("its agent started, then stopped listening") from None
                if now - asked_at >= START_ASK_EVERY:
                    asked_at = now
                    state = self.start_state(name) if self.start_state else None
                    if state not in (None, STARTING, "ready"):
                        raise ProtocolError(f"its agent did not start: {state}") from None
                    if said_ready := state == "ready":  # it may have started since it refused: again
                        continue
                time.sleep(START_RETRY)

    def _handshake(self, index: int, address: str) -> tuple[socket.socket, int]:
        # a SYN unanswered for the ack timeout: that successor is gone too (it would cost the stall)
        sock = socket.create_connection(split_address(address), timeout=self.ack_timeout or self.stall)
        try:
            no_delay(sock)
            probe_when_idle(sock, self.ack_timeout)
            set_buffer(sock, socket.SO_SNDBUF, self.buffer)
            cap_pacing(sock, self.pacing_rate)
            sock.settimeout(self.stall)
            connect_as(sock, self.key, self.me, self.successors[index][0], address)
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
