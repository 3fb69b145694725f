"""The node side of the chain broadcast: receive an image stream from the predecessor, write it to a
sink (untar into a directory, or raw into a file/device), forward it to the successor (with
:mod:`kasched.transports.chain_wire`'s :class:`Forwarder`), check its sha256 and report to the server.
Standard library only: run it as ``python3 -m kasched.transports.chain_agent --listen HOST:PORT --name
NODE`` with the broadcast's key on stdin (one line of hex), or ship it over SSH as one program,
``chain_wire``'s source followed by this one's without its import of ``chain_wire``, the key written
into it (``chain_ssh.agent_program(key)``, read by ``python3 - --listen ...``). The protocol is
described in ``docs/transports.md``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable

# bundle: begin (chain_ssh.AGENT_SOURCE leaves this import out: chain_wire's source comes first there)
from kasched.transports.chain_wire import (
    ABORT,
    ACK,
    CHUNK,
    DATA,
    END,
    END_PAYLOAD,
    FRAME,
    HANDSHAKE_TIMEOUT,
    HEADER,
    KEEPALIVE,
    KEY_BYTES,
    OFFSET,
    OFFSET_REPLY,
    SERVER,
    SOCKET_BUFFER,
    SUPERSEDED,
    DeadlinePassed,
    Forwarder,
    NewUpstream,
    ProtocolError,
    Superseded,
    UpstreamLost,
    accept_as,
    connect_as,
    no_delay,
    recv_frame,
    seal,
    send_frame,
    set_buffer,
    split_address,
    unseal,
)

# bundle: end

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: every node starts this program
if TYPE_CHECKING:
    import subprocess
    from typing import Any

MAX_LOW_WATER = CHUNK  # a node waits for at most this many bytes before it wakes up to forward them
SINK_PIPE = 1 << 20  # bytes a tar or command sink's pipe holds: it absorbs the sink's jitter
BATCH_SECONDS = 0.01  # a batch is at most this long at the rate the stream arrives (see Pacer)
BATCH_RANGE = (16 << 10, MAX_LOW_WATER)  # bytes; the session's low_water caps it too
RATE_WINDOW = 0.25  # seconds over which the arrival rate is measured
TAR_FLAGS = {"gz": ["--gzip"], "xz": ["--xz"], "zst": ["--zstd"], "none": []}
BIND_RETRY = 3.0  # seconds an agent tries again to listen on an address in use (an earlier one ending)
SESSION_GONE = 4  # the exit status of an agent whose session went away (nobody reads it then)
# the broadcast's key (hex): chain_ssh.agent_program() writes it here in the program it ships over the
# node's SSH session (never on a command line, which every user of the node sees); empty: read on stdin
BROADCAST_KEY = ""


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
    """Send one signed JSON message per connection to the server's report address (best effort),
    after the handshake in which we, ``me``, and the server prove we hold the broadcast's ``key``."""

    def __init__(self, address: str, timeout: float, key: bytes, me: str) -> None:
        self.address = address
        self.timeout = timeout
        self.key, self.me = key, me

    def _open(self, message: dict[str, Any]) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(split_address(self.address), timeout=self.timeout)
        try:
            no_delay(sock)  # the proof then the report, two small frames: neither waits for an ack
            binding = connect_as(sock, self.key, self.me, SERVER, self.address)
            send_frame(sock, HEADER, seal(self.key, binding, "report", message))
        except BaseException:
            sock.close()
            raise
        return sock, binding

    def send(self, message: dict[str, Any]) -> None:
        try:
            self._open(message)[0].close()
        except (OSError, ProtocolError) as error:
            print(f"chain agent: cannot report to {self.address}: {error}", file=sys.stderr)

    def ask(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Send ``message`` and read the server's one-frame answer (signed too); None if there is none."""
        try:
            sock, binding = self._open(message)
            with sock:
                kind, payload = recv_frame(sock)
                return unseal(self.key, binding, "answer", payload) if kind == HEADER else None
        except (OSError, ProtocolError, ValueError):
            return None


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

    def __init__(self, listener: socket.socket, name: str, key: bytes) -> None:
        self.listener = listener
        self.name = name
        self.key = key
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
        """Accept a connection; if its peer proves it holds the broadcast's key (``accept_as``) and
        opens our session (or a first one), make it the upstream."""
        conn, _ = self.listener.accept()
        try:
            no_delay(conn)
            conn.settimeout(min(self.stall, HANDSHAKE_TIMEOUT))
            accept_as(conn, self.key, self.name)
            conn.settimeout(self.stall)
            kind, payload = recv_frame(conn)
            header: dict[str, Any] = json.loads(payload)
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
    reporter = Reporter(config["report"], agent.stall, agent.key, agent.name)
    session = config["session"]
    result: dict[str, Any] = {"type": "result", "session": session, "node": agent.name, "error": None, "lost": []}

    def note_lost(node: str, error: str) -> None:
        result["lost"].append(node)
        reporter.send({"type": "lost", "session": session, "node": node, "by": agent.name, "error": error})

    def start_state(node: str) -> str | None:  # a successor that refuses connections: still starting?
        answer = reporter.ask({"type": "start", "session": session, "node": node, "by": agent.name})
        return None if answer is None else answer.get("state")

    forwarder = Forwarder(config, config["chain"], note_lost, agent.key, agent.name, start_state=start_state)
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


USAGE = "usage: chain_agent --listen HOST:PORT --name NODE [--accept-timeout SECONDS] (the key in hex on stdin)"


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


def _listen(address: tuple[str, int], give_up: float) -> socket.socket:
    """A listening socket on ``address``; while it is in use, tried again until ``give_up``: an agent
    of an earlier try on this node may still be ending (see end_with_session)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    while True:
        try:
            return socket.create_server(address, family=family, backlog=16)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or time.monotonic() >= give_up:
                raise
            time.sleep(0.05)


def end_with_session(fd: int) -> None:
    """Exit once whoever reads our stdout (the SSH session that started us) is gone: an agent left
    behind keeps its port, so a later try on the node could not listen there, and would take that
    try's stream into a partition being formatted again. When sshd closes the session, the pipe to
    our stdout loses its reader (poll says POLLERR; a socket pair, POLLHUP). Not on a file or a
    terminal that stays open: nothing is said there, and the agent ends with its broadcast."""
    poller = select.poll()
    poller.register(fd, 0)  # no event asked for: only the ones poll always reports
    while events := [mask for _, mask in poller.poll()]:
        if any(mask & (select.POLLERR | select.POLLHUP) for mask in events):
            os._exit(SESSION_GONE)
        if any(mask & select.POLLNVAL for mask in events):  # no stdout at all: nothing to watch
            return


def _key(text: str) -> bytes:
    """The broadcast's key from its hex (the program's BROADCAST_KEY, or the line on stdin)."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) < KEY_BYTES:
        raise ValueError(f"no broadcast key: expected {KEY_BYTES} bytes in hex on stdin\n{USAGE}")
    return key


def main(argv: list[str] | None = None) -> int:
    try:
        options = _parse_args(sys.argv[1:] if argv is None else argv)
        accept_timeout = _seconds(options["--accept-timeout"])
        listen, name = _listen_address(options["--listen"]), options["--name"]
        key = _key(BROADCAST_KEY or (sys.stdin.readline() if sys.stdin else ""))
    except ValueError as error:
        print(f"chain agent: {error}", file=sys.stderr)
        return 2
    try:
        listener = _listen(listen, time.monotonic() + BIND_RETRY)
    except OSError as error:
        print(f"chain agent {name}: cannot listen on {options['--listen']}: {error.strerror or error}", file=sys.stderr)
        return 2
    host, port = listener.getsockname()[:2]
    print(f"ready {host}:{port}", flush=True)
    threading.Thread(target=end_with_session, args=(sys.stdout.fileno(),), name="session", daemon=True).start()
    try:
        result = serve(Agent(listener, name, key), accept_timeout)
    except ProtocolError as error:
        print(f"chain agent {name}: {error}", file=sys.stderr)
        return 2
    if not result["ok"]:
        print(f"chain agent {name}: {result['error']}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
