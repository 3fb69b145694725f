"""Rebooting many nodes: escalation per node, at most ``window`` nodes at once (after Kadeploy).

Levels, tried in order until the node is back:

* ``soft``: the node's own system reboots (SSH ``reboot``);
* ``hard``: the BMC resets the node (IPMI chassis reset);
* ``very_hard``: the BMC powers the node off, then on.

A level counts as done when the node was seen going down and coming back up (by default: its sshd
stops, then accepts connections again) within the level's timeout. Every node gets a
:class:`~kasched.results.NodeResult` (its value is the level that worked); one failing node never
stops the others.
"""

from __future__ import annotations

import enum
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from kasched.drivers.base import BootDevice, NodeTarget, PowerDriver
from kasched.errors import DriverError, DriverTimeout
from kasched.results import GroupResult, NodeResult, run_on_node


class RebootLevel(enum.StrEnum):
    SOFT = "soft"
    HARD = "hard"
    VERY_HARD = "very_hard"


ALL_LEVELS = (RebootLevel.SOFT, RebootLevel.HARD, RebootLevel.VERY_HARD)
WaitUp = Callable[[NodeTarget, float, bool], bool]  # (node, timeout, must see it go down first)


def port_cycle(port: int = 22, down_grace: float = 10.0) -> WaitUp:
    """A ``wait_up`` check: the node's ``port`` closes (within ``down_grace``, when it must be seen
    going down), then opens again."""

    def check(node: NodeTarget, timeout: float, expect_down: bool) -> bool:
        deadline = time.monotonic() + timeout
        down_deadline = time.monotonic() + min(down_grace, timeout)
        while expect_down and _port_open(node.ip, port):
            if time.monotonic() >= down_deadline:
                return False  # never seen going down: this level did not reboot it (the next one will)
            time.sleep(0.1)
        while time.monotonic() < deadline:
            if _port_open(node.ip, port):
                return True
            time.sleep(0.2)
        return False

    return check


@dataclass
class Rebooter:
    """Reboots nodes with escalation; ``soft`` may be None (no SSH), ``power`` is the BMC driver."""

    power: PowerDriver
    soft: PowerDriver | None = None
    window: int = 32
    timeout: float = 120.0  # per level and node, until the node is back
    levels: Sequence[RebootLevel] = ALL_LEVELS
    wait_up: WaitUp = field(default_factory=port_cycle)
    boot_device: BootDevice | None = BootDevice.NETWORK  # set before a hard reboot
    # Nodes waited for at once: a node's wait does not hold one of the ``window`` command slots (the
    # BMC and SSH calls), so a thousand nodes boot together rather than 32 at a time (bench/scale.py).
    wait_window: int = 1024

    def __post_init__(self) -> None:
        self._commands = threading.BoundedSemaphore(max(1, self.window))

    def reboot(self, nodes: Sequence[NodeTarget]) -> GroupResult:
        if self.window < 1:
            raise DriverError(f"the reboot window must be at least 1 (got {self.window})")
        results = GroupResult()
        workers = min(max(self.window, self.wait_window), max(1, len(nodes)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self.reboot_one, node) for node in nodes]
            for future in futures:
                results.add(future.result())
        return results

    def reboot_one(self, node: NodeTarget) -> NodeResult:
        started = time.monotonic()
        failures: list[str] = []
        for level in self.levels:
            result = run_on_node(node.name, f"reboot {level}", partial(self._try, node, level))
            if result.ok:
                result.duration = time.monotonic() - started
                result.value = str(level)
                if failures:
                    result.error = None
                return result
            failures.append(f"{level}: {result.error}")
        return NodeResult(
            node.name, False, "reboot", "; ".join(failures) or "no level to try", time.monotonic() - started
        )

    def _try(self, node: NodeTarget, level: RebootLevel) -> None:
        with self._commands:  # at most ``window`` nodes are being told to reboot at once
            self._command(node, level)
        # After a BMC reset or power-off the node is known to have gone down; after a soft reboot,
        # wait to see its sshd stop before waiting for it to come back.
        if not self.wait_up(node, self.timeout, level is RebootLevel.SOFT):
            raise DriverTimeout(f"not back {self.timeout:.0f} s after a {level} reboot", node=node.name)

    def _command(self, node: NodeTarget, level: RebootLevel) -> None:
        if level is RebootLevel.SOFT:
            if self.soft is None:
                raise DriverError("no soft (SSH) driver", node=node.name)
            self.soft.reset(node)
        else:
            if self.boot_device is not None:
                self.power.set_boot_device(node, self.boot_device)
            if level is RebootLevel.HARD:
                self.power.reset(node)
            else:
                self.power.off(node)
                self.power.on(node)


def _port_open(ip: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False
