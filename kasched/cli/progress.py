"""The live progress view of an operation: per step, nodes ok / failed / in progress."""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from typing import TextIO

from kasched.deploy.workflow import StepReport


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

    def __call__(self, report: StepReport) -> None:
        with self.lock:
            if report.step != self.step:
                if self.tty and self.step:
                    self.out.write("\n")
                self.step = report.step
            (self.ok if report.ok else self.failed)[report.step].add(report.node)
            if report.ok:
                self.failed[report.step].discard(report.node)
            self._show(report)

    def _show(self, report: StepReport) -> None:
        ok, failed = len(self.ok[self.step]), len(self.failed[self.step])
        line = (
            f"[{time.monotonic() - self.started:6.1f}s] {self.step:<10} ok {ok}/{self.total}  failed {failed}  "
            f"in progress {max(0, self.total - ok - failed)}"
        )
        if self.tty:
            self.out.write("\r" + line.ljust(78))
        elif not report.ok:
            self.out.write(f"{line}  ({report.node}: {report.error})\n")
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.step:
            self.out.write("\n")
            self.out.flush()
