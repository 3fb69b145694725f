"""The live progress view of an operation: per step, nodes ok / failed / in progress, and while an
image streams, the bytes the server has sent and their rate."""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from typing import TextIO

from kasched.deploy.workflow import TransferReport
from kasched.front import Event, Started, Waiting
from kasched.messages import StepEvent

MIB = 1 << 20
RATE_LINE_EVERY = 5.0  # seconds between two rate lines when the output is not a terminal


class ProgressView:
    """One status line rewritten in place on a terminal; one line per step change otherwise."""

    def __init__(self, total: int, out: TextIO | None = None) -> None:
        self.total = total
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.step = ""
        self.ok: dict[str, set[str]] = defaultdict(set)
        self.failed: dict[str, set[str]] = defaultdict(set)
        self.transfer: TransferReport | None = None  # the stream of the current step, if any
        self.rate_shown = 0.0

    def __call__(self, report: Event) -> None:
        if isinstance(report, Waiting):
            self.waiting(report.why)
            return
        if isinstance(report, Started):
            self.announce(report)
            return
        with self.lock:
            if isinstance(report, TransferReport):
                self._transfer(report)
                return
            self._enter(report.step)
            if report.ok or report.final:
                (self.ok if report.ok else self.failed)[report.step].add(report.node)
            if report.ok:
                self.failed[report.step].discard(report.node)
            self._show(report)

    def _enter(self, step: str) -> None:
        if step != self.step:
            if self.tty and self.step:
                self.out.write("\n")
            self.step = step
            self.transfer = None

    def _transfer(self, report: TransferReport) -> None:
        """The image's stream (it runs before the step's first node result): switch to its step."""
        self._enter(report.step)
        self.transfer = report
        now = time.monotonic()
        if self.tty or report.done or now - self.rate_shown >= RATE_LINE_EVERY:
            self.rate_shown = now
            self._show(None)

    def line(self) -> str:
        ok, failed = len(self.ok[self.step]), len(self.failed[self.step])
        line = (
            f"[{time.monotonic() - self.started:6.1f}s] {self.step:<10} ok {ok}/{self.total}  failed {failed}  "
            f"in progress {max(0, self.total - ok - failed)}"
        )
        if self.transfer is not None:
            line += f"  sent {self.transfer.sent / MIB:.1f} MiB at {self.transfer.rate / MIB:.1f} MiB/s"
        return line

    def _show(self, report: StepEvent | None) -> None:
        line = self.line()
        if self.tty:
            self.out.write("\r" + line.ljust(78))
        elif report is not None and not report.ok and not report.final:
            fallback = f"{report.variant} did not work, trying the next way"
            self.out.write(f"{line}  ({report.node}: {fallback}: {report.error})\n")
        elif report is not None and not report.ok:
            self.out.write(f"{line}  ({report.node}: {report.error})\n")
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def waiting(self, why: str) -> None:
        """The operation has not started yet: say why (once per reason)."""
        with self.lock:
            self.step = "waiting"
            line = f"[{time.monotonic() - self.started:6.1f}s] waiting    {why}"
            self.out.write(("\r" + line.ljust(78)) if self.tty else line + "\n")
            self.out.flush()

    def announce(self, event: Started) -> None:
        """The operation holds its nodes: its id, to follow it from elsewhere."""
        where = f" {event.where}" if event.where else ""
        with self.lock:
            if self.tty and self.step:
                self.out.write("\n")
            follow = f"kasched deploy --status {event.operation_id}"
            self.out.write(f"{event.kind} {event.operation_id} started{where} ({follow})\n")
            self.out.flush()

    def close(self) -> None:
        if self.tty and self.step:
            self.out.write("\n")
            self.out.flush()
