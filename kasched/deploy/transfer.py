"""How much of an image the server has sent into a broadcast: a meter over the reads of the image,
telling the live view at most every half second and at the end of each stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class TransferMeter:
    """Counts the bytes the server reads from the image (what it sends into the chains) and tells
    ``report`` at most every ``every`` seconds, and once more at the end of each stream."""

    def __init__(self, report: Callable[[int, float, bool], None] | None, every: float = 0.5) -> None:
        self.report, self.every = report, every
        # last report: never (not 0.0: monotonic time counts from boot, and a machine up for less than
        # ``every`` seconds would not hear of the first read)
        self.sent, self.started, self.last = 0, 0.0, float("-inf")
        self.lock = threading.Lock()

    def add(self, count: int, *, final: bool = False) -> None:
        with self.lock:
            now = time.monotonic()
            self.started = self.started or now  # the clock starts with the stream, not with the agents
            self.sent += count
            if self.report is None or not (final or now - self.last >= self.every):
                return
            self.last = now
            sent, elapsed = self.sent, now - self.started
        self.report(sent, elapsed, final)


class CountingReader:
    """A binary file object that tells a meter about every read."""

    def __init__(self, handle: Any, meter: TransferMeter) -> None:
        self.handle, self.meter = handle, meter

    def read(self, size: int = -1) -> bytes:
        chunk: bytes = self.handle.read(size)
        self.meter.add(len(chunk), final=not chunk)
        return chunk

    def fileno(self) -> int:
        """The file's descriptor (the broadcast sizes its batches from it); raises for a stream."""
        return int(self.handle.fileno())
