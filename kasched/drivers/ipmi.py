"""Power through the node's BMC: IPMI 2.0 (RMCP+) with pyghmi.

Every pyghmi error becomes a :class:`~kasched.errors.DriverError` naming the node: a refused user or
password says so, a BMC that does not answer is a :class:`~kasched.errors.DriverTimeout`. Each call
opens its own session, logs out when done and runs under a deadline, so one silent BMC never blocks
the others, and a session the BMC has dropped is never reused.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pyghmi import exceptions as pyghmi_exceptions
from pyghmi.ipmi import command as ipmi_command
from pyghmi.ipmi.private import session as ipmi_session

from kasched.drivers.base import BootDevice, NodeTarget, PowerDriver, PowerState
from kasched.errors import DriverError, DriverTimeout

T = TypeVar("T")
_AUTH_WORDS = ("password", "unauthorized name", "authentication", "privilege")
_BOOT_DEVICES = {BootDevice.NETWORK: "network", BootDevice.DISK: "hd"}


class IpmiPowerDriver(PowerDriver):
    """IPMI chassis control: status, on, off, reset, cycle, next boot device."""

    name = "ipmi"

    def __init__(self, timeout: float = 15.0) -> None:
        self.timeout = timeout

    def validate(self, node: NodeTarget) -> None:
        missing = [
            field
            for field, value in (
                ("bmc address", node.bmc_address),
                ("BMC user", node.bmc_user),
                ("BMC password", node.bmc_password),
            )
            if not value
        ]
        if missing:
            raise DriverError(f"IPMI needs a {', '.join(missing)}", node=node.name)

    def status(self, node: NodeTarget) -> PowerState:
        state = self._call(node, "power status", lambda c: c.get_power())["powerstate"]
        return PowerState.ON if state == "on" else PowerState.OFF

    def on(self, node: NodeTarget) -> None:
        self._call(node, "power on", lambda c: c.set_power("on", wait=self.timeout))

    def off(self, node: NodeTarget) -> None:
        self._call(node, "power off", lambda c: c.set_power("off", wait=self.timeout))

    def reset(self, node: NodeTarget) -> None:
        self._call(node, "reset", lambda c: c.set_power("reset"))

    def set_boot_device(self, node: NodeTarget, device: BootDevice) -> None:
        self._call(node, f"boot device {device}", lambda c: c.set_bootdev(_BOOT_DEVICES[device]))

    def boot_device(self, node: NodeTarget) -> str:
        """The BMC's next boot device as pyghmi names it (``network``, ``hd``, ``default``...)."""
        return str(self._call(node, "boot device", lambda c: c.get_bootdev())["bootdev"])

    # -- the boundary with pyghmi -----------------------------------------------------------------
    def _call(self, node: NodeTarget, what: str, action: Callable[[Any], T]) -> T:
        self.validate(node)
        where = f"BMC {node.bmc_address}:{node.bmc_port}"
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                _follow_network_namespace()
                # Bytes, not str: pyghmi matches its cached sessions on bytes, and with str a second
                # Command for the same BMC waits forever on the first one's login.
                session = ipmi_command.Command(
                    bmc=node.bmc_address,
                    userid=str(node.bmc_user).encode(),
                    password=str(node.bmc_password).encode(),
                    port=node.bmc_port,
                    keepalive=False,
                )
                try:
                    outcome["value"] = action(session)
                finally:
                    _log_out(session)
            except Exception as error:  # pyghmi raises many kinds; all are translated below
                outcome["error"] = error

        worker = threading.Thread(target=work, name=f"ipmi-{node.name}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            _forget_sessions(node)
            raise DriverTimeout(f"{where} did not answer {what} in {self.timeout:.0f} s", node=node.name)
        if "error" in outcome:
            raise _translate(outcome["error"], node, where, what, self.timeout) from None
        value: T = outcome["value"]
        return value


def _log_out(command: Any) -> None:
    """Close the call's session on the BMC, so that no later call reuses it.

    pyghmi keeps a logged-in session and hands it to the next ``Command`` for the same BMC, even
    without keepalives. A BMC drops an idle session (``ipmi_sim`` after about 30 s) and then ignores
    its packets: the next call would time out on a BMC that is up. Logging out also frees one of the
    BMC's few session slots.
    """
    with contextlib.suppress(Exception):  # the answer is already in; a failed logout changes nothing
        command.ipmi_session.logout()


def _forget_sessions(node: NodeTarget) -> None:
    """Drop pyghmi's cached sessions for a BMC that did not answer, so the next call logs in anew.

    The timed-out call's thread still waits on its session; marking that session broken lets the
    thread give up, and the next call no longer queues behind it.
    """
    with _pool_lock:
        for key, stale in list(ipmi_session.Session.initting_sessions.items()):
            if key[0] == node.bmc_address and key[3] == node.bmc_port:
                stale.broken = True
                ipmi_session.Session.initting_sessions.pop(key, None)
        for sockaddr, by_port in list(ipmi_session.Session.bmc_handlers.items()):
            if sockaddr[1] == node.bmc_port and sockaddr[0] in (node.bmc_address, f"::ffff:{node.bmc_address}"):
                for stale in list(by_port.values()):
                    stale.broken = True
                ipmi_session.Session.bmc_handlers.pop(sockaddr, None)


_pool_lock = threading.Lock()
_pool_namespace: list[int] = []


def _follow_network_namespace() -> None:
    """Start a fresh pyghmi socket pool when the calling thread's network namespace changed.

    pyghmi shares its UDP sockets process-wide, and a socket stays in the namespace it was opened
    in: without this, a process that drove one lab (or the host) would talk to another lab's BMC
    addresses through the first one's sockets.
    """
    try:
        current = os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return
    with _pool_lock:
        if _pool_namespace and _pool_namespace[0] != current:
            ipmi_session.Session.socketpool.clear()  # new sessions open sockets here
            ipmi_session.Session.bmc_handlers.clear()
        _pool_namespace[:] = [current]


def _translate(error: Exception, node: NodeTarget, where: str, what: str, timeout: float) -> DriverError:
    message = str(error) if str(error) not in ("", "None") else ""
    lowered = message.lower()
    if isinstance(error, pyghmi_exceptions.IpmiException):
        if any(word in lowered for word in _AUTH_WORDS):
            return DriverError(f"{where} refused user {node.bmc_user!r} or its password ({message})", node=node.name)
        if not message or "timeout" in lowered or "no longer connected" in lowered:
            return DriverTimeout(f"{where} did not answer {what} (timeout)", node=node.name)
    if isinstance(error, OSError):
        return DriverError(f"{where}: {what}: network error: {error}", node=node.name)
    return DriverError(f"{where}: {what} failed: {message or type(error).__name__}", node=node.name)
