"""A request's deadline: the moment after which whoever asked has given up, so nothing may be stored.

A scheduler hook runs ``kasched job start`` with ``$KASCHED_DEADLINE`` (a Unix time: the hook and the
command share one clock) a few seconds before it would kill the command. The client sends kaschedd the
seconds it will still wait, in the ``X-Kasched-Deadline`` header: seconds rather than a time, because
over TCP the two clocks may differ, and a request travels in milliseconds. kaschedd keeps
:data:`ANSWER_MARGIN` of them to answer, and runs the request :func:`within` the rest: every database
wait of the request ends by then (:mod:`kasched.db`), and a transaction that would commit after it is
rolled back instead (:func:`check`). The value lives in a context variable, so it belongs to the
request's thread only (threads a request starts, such as a deployment's, are not bound by it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from kasched.errors import DatabaseError, InputError

HEADER = "X-Kasched-Deadline"
ENV = "KASCHED_DEADLINE"
ANSWER_MARGIN = 1.0  # seconds kaschedd keeps, of those the client gives, to send its answer back
CLIENT_MARGIN = 0.5  # seconds the client keeps, of its own, for the answer to arrive
HOOK_MARGIN = 3.0  # seconds a hook keeps, before it kills the command, for the command to start and end
MAX_SECONDS = 24 * 3600.0

_current: ContextVar[float | None] = ContextVar("kasched_deadline", default=None)  # time.monotonic()


def remaining() -> float | None:
    """Seconds left before the current deadline (may be negative), or None without a deadline."""
    moment = _current.get()
    return None if moment is None else moment - time.monotonic()


@contextmanager
def within(seconds: float | None) -> Iterator[None]:
    """Run the block under a deadline ``seconds`` from now (None: no deadline; an outer one stays)."""
    if seconds is None:
        yield
        return
    moment = time.monotonic() + seconds
    outer = _current.get()
    token = _current.set(moment if outer is None else min(outer, moment))
    try:
        yield
    finally:
        _current.reset(token)


def wait_ms(default_ms: int) -> int:
    """How long a database wait may last now, in milliseconds: ``default_ms``, or less before a deadline
    (rounded down, so that it changes seldom). A deadline already passed is a DatabaseError: the request
    must not begin a transaction."""
    left = remaining()
    if left is None:
        return default_ms
    if left <= 0:
        raise DatabaseError(passed_message())
    ms = math.floor(left * 1000)
    step = 1000 if ms >= 5000 else 100  # whole seconds (tenths near the end): SQLite's setting changes seldom
    return max(1, min(default_ms, ms - ms % step))


def check() -> None:
    """Refuse to commit after the deadline: the caller has given up and will never see the result."""
    left = remaining()
    if left is not None and left <= 0:
        raise DatabaseError(passed_message())


def passed_message() -> str:
    return "the request's deadline passed (the database was busy): nothing was stored, try again"


def parse_header(value: str) -> float:
    """The seconds an ``X-Kasched-Deadline`` header gives; InputError for anything but a positive number."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_SECONDS:  # NaN fails too
        raise InputError(f"{HEADER}: {value[:40]!r} is not a number of seconds (0 to {MAX_SECONDS:.0f})")
    return seconds


def from_environ() -> float | None:
    """Seconds left before ``$KASCHED_DEADLINE`` (a Unix time set by a hook), or None if unset or bad."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        moment = float(raw)
    except ValueError:
        return None
    return moment - time.time() if math.isfinite(moment) else None


def hook_environ(timeout: float, now: float | None = None) -> dict[str, str]:
    """What a hook adds to the command's environment when it kills the command after ``timeout`` s."""
    moment = (time.time() if now is None else now) + max(1.0, timeout - HOOK_MARGIN)
    return {ENV: f"{moment:.3f}"}
