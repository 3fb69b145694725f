"""The reboot's window bounds the BMC commands in flight, not the nodes waited for: 8 nodes with a
window of 2 boot together (one boot's time), while never more than 2 commands run at once."""

from __future__ import annotations

import threading
import time

from kasched.drivers.base import NodeTarget, PowerDriver, PowerState
from kasched.drivers.reboot import Rebooter, RebootLevel

BOOT = 0.3


class Counting(PowerDriver):
    def __init__(self) -> None:
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def _call(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.02)
        with self.lock:
            self.now -= 1

    def validate(self, node: NodeTarget) -> None: ...
    def status(self, node: NodeTarget) -> PowerState:
        return PowerState.ON

    def on(self, node: NodeTarget) -> None:
        self._call()

    def off(self, node: NodeTarget) -> None:
        self._call()

    def reset(self, node: NodeTarget) -> None:
        self._call()


def test_nodes_are_waited_for_together_and_commands_stay_within_the_window() -> None:
    power = Counting()
    nodes = [NodeTarget(f"n{i}", f"02:00:00:00:00:{i:02x}", f"10.0.0.{i}") for i in range(1, 9)]
    rebooter = Rebooter(power, None, window=2, levels=[RebootLevel.HARD], boot_device=None,
                        wait_up=lambda node, timeout, down: time.sleep(BOOT) is None)  # fmt: skip
    started = time.monotonic()
    results = rebooter.reboot(nodes)
    elapsed = time.monotonic() - started
    assert all(result.ok for result in results.values())
    assert power.most <= 2
    assert elapsed < 2 * BOOT  # the window holding the waits too took 4 boots here (8 nodes, window 2)
