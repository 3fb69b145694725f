"""What one connection to kaschedd may take: a total time per request (not one per ``recv``: a client
sending a byte every few seconds is cut off all the same), and a cap on the connections open at once,
in all (503) and per user (429): a uid on the Unix socket, an address over TCP."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kaschedd")
REFUSALS = {
    503: b"503 Service Unavailable",
    429: b"429 Too Many Requests",
}
REARM = 0.25  # seconds: how often a plain socket's kernel limits may be set again to the time left
TIME_UP = "time is up (service_request_timeout): connection cut off"
LOG_EVERY = 10.0  # seconds between two log lines about refusals of one key


class DeadlineSocket:
    """A connection whose reads and writes all end by one moment (:meth:`restart` sets it), give or
    take :data:`REARM` seconds.

    A plain socket stays blocking, with the time left as the kernel's own per-call limits
    (``SO_RCVTIMEO``, ``SO_SNDTIMEO``), set again only when the last setting is REARM seconds old: a
    quick request sets each once, and every read is one ``recv``, as without a limit (Python's own
    timeouts poll before each call; they, or a setting per call, cost kaschedd some 10 % of its CPU per
    request under load). A TLS socket uses Python's timeout."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock
        self._kernel = not isinstance(sock, ssl.SSLSocket) and sock.gettimeout() is None
        self._armed: dict[int, float] = {}
        self.until = time.monotonic() + seconds

    def restart(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    def _arm(self, option: int) -> None:
        now = time.monotonic()
        left = self.until - now
        if left <= 0:
            raise TimeoutError(TIME_UP)
        if not self._kernel:
            self._sock.settimeout(left)
        elif now - self._armed.get(option, -REARM) >= REARM:
            self._armed[option] = now
            seconds = int(left)
            self._sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", seconds, int((left - seconds) * 1e6)))

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        while True:
            self._arm(socket.SO_RCVTIMEO)
            try:
                return self._sock.recv_into(buffer, nbytes, flags)
            except TimeoutError:
                raise TimeoutError(TIME_UP) from None
            except BlockingIOError:  # the kernel's limit (EAGAIN): set for an earlier deadline, or this one's
                self._armed.clear()

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm(socket.SO_SNDTIMEO)  # sendall's timeout bounds the whole send
        try:
            self._sock.sendall(data, flags)
        except (TimeoutError, BlockingIOError):
            raise TimeoutError(TIME_UP) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class ConnectionLimits:
    """Counts open connections, in all and per key; :meth:`enter` refuses one past a cap."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self.open: Counter[Any] = Counter()
        self._lock = threading.Lock()
        self._refused: dict[Any, tuple[float, int]] = {}

    def enter(self, key: Any, exempt: Callable[[], bool] = lambda: False) -> int | None:
        """None (counted in), or the status of the refusal: 503 past the total, 429 past the key's cap.
        ``exempt`` (asked only at the key's cap) lifts the per-key cap (admins: the scheduler's hooks)."""
        with self._lock:
            if sum(self.open.values()) >= self.total:
                return 503
            if self.open[key] < self.per_key:
                self.open[key] += 1
                return None
        if not exempt():  # outside the lock: it may ask the system's user database
            return 429
        with self._lock:
            if sum(self.open.values()) >= self.total:
                return 503
            self.open[key] += 1
            return None

    def leave(self, key: Any) -> None:
        with self._lock:
            self.open[key] -= 1
            if self.open[key] <= 0:
                del self.open[key]

    def log_refusal(self, who: str, key: Any, status: int) -> None:
        """One log line for a refusal, then at most one per LOG_EVERY seconds for the same key."""
        now = time.monotonic()
        with self._lock:
            last, count = self._refused.get(key, (0.0, 0))
            if now - last < LOG_EVERY:
                self._refused[key] = (last, count + 1)
                return
            self._refused[key] = (now, 0)
        if status == 503:
            why = f"{self.total} connections open in all (service_max_connections)"
        else:
            why = f"{self.per_key} connections of this user open (service_max_connections_per_user)"
        more = f" ({count} more refused in the last {LOG_EVERY:.0f} s)" if count else ""
        log.warning("%s: connection refused with %d: %s%s", who, status, why, more)


def refuse(request: socket.socket, status: int, plain: bool) -> None:
    """Answer ``status`` without waiting for the client (a full buffer: it gets nothing), then close."""
    if plain:
        body = b'{"error": "too many connections, try again later"}'
        head = b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n" % REFUSALS[status]
        head += b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" % len(body)
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(head + body)
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)
    request.close()


class LimitedThreadingMixIn:
    """A thread per connection, within the caps; subclasses say whose a connection is (:meth:`key_of`)."""

    limits: ConnectionLimits
    plain_refusals = True  # False over TLS: no HTTP answer can be sent before the handshake

    def key_of(self, request: Any, client_address: Any) -> Any:
        raise NotImplementedError

    def who(self, key: Any) -> str:
        return str(key)

    def exempt(self, key: Any) -> bool:
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            key = self.key_of(request, client_address)
        except OSError:
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        status = self.limits.enter(key, lambda: self.exempt(key))
        if status is not None:
            self.limits.log_refusal(self.who(key), key, status)
            refuse(request, status, self.plain_refusals)
            return
        try:
            threading.Thread(target=self._counted, args=(request, client_address, key), daemon=True).start()
        except BaseException:
            self.limits.leave(key)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            raise

    def _counted(self, request: Any, client_address: Any, key: Any) -> None:
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]
            self.limits.leave(key)
