"""What a client following an operation run by kaschedd sees that is not stored: the image's broadcast
progress (bytes sent, seconds, rate). It lives in the service's memory, only while the operation runs;
``GET /v1/deployments/{id}`` adds the latest one as ``transfer``. The meter of the broadcast step
reports at most every half second, and clients poll once a second."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from kasched.deploy.workflow import TransferReport
from kasched.messages import StepEvent

if TYPE_CHECKING:
    from kasched.deploy.operations import PendingOperation


class TransferBoard:
    """The latest transfer report of each running operation, by operation id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, TransferReport] = {}

    def publish(self, deployment_id: str, report: TransferReport) -> None:
        with self._lock:
            self._latest[deployment_id] = report

    def step_finished(self, deployment_id: str, step: str) -> None:
        """A node result of ``step`` came in: a transfer of an earlier step is over, forget it."""
        with self._lock:
            latest = self._latest.get(deployment_id)
            if latest is not None and latest.step != step:
                del self._latest[deployment_id]

    def forget(self, deployment_id: str) -> None:
        with self._lock:
            self._latest.pop(deployment_id, None)

    def latest(self, deployment_id: str) -> dict[str, Any] | None:
        """The JSON form of the latest report (``rate`` in bytes per second), or None."""
        with self._lock:
            report = self._latest.get(deployment_id)
        if report is None:
            return None
        return {
            "step": report.step,
            "sent": report.sent,
            "elapsed": report.elapsed,
            "done": report.done,
            "rate": report.rate,
        }


TRANSFERS = TransferBoard()


class LiveProgress:
    """The progress listener of one operation the service runs: its transfers go to the board."""

    def __init__(self, board: TransferBoard = TRANSFERS) -> None:
        self.board = board
        self.deployment_id = ""

    def __call__(self, report: StepEvent | TransferReport) -> None:
        if not self.deployment_id:
            return
        if isinstance(report, TransferReport):
            self.board.publish(self.deployment_id, report)
        else:
            self.board.step_finished(self.deployment_id, report.step)

    def run(self, pending: PendingOperation) -> None:
        """Run the operation (in the service's thread for it); its transfer is forgotten at the end."""
        self.deployment_id = pending.deployment_id
        try:
            pending.run()
        finally:
            self.board.forget(pending.deployment_id)
