"""The *soft* power driver (``reboot``/``poweroff`` run by the node's own system) and :class:`SshClient`,
which reaches a :class:`~kasched.drivers.base.NodeTarget` through kasched's one SSH layer
(:mod:`kasched.transports.ssh_session`: the same :class:`SshAuth`, :class:`SshSession` and
:class:`CommandOutput` the transports use). Errors are that layer's :class:`~kasched.errors.DriverError`
(or :class:`~kasched.errors.DriverTimeout`), naming the node.
"""

from __future__ import annotations

import socket
from pathlib import Path

from kasched.drivers.base import NodeTarget, PowerDriver, PowerState
from kasched.errors import DriverError
from kasched.transports.ssh_session import (
    CommandOutput,
    HostKeyPolicy,
    SshAuth,
    SshSession,
    known_host_name,
    load_private_key,
)


class SshClient:
    """Runs commands on nodes as ``user`` with the service's private key (read when first needed). A
    node whose target carries a host key (the one kaschedd gave its running system at its boot) must
    answer with that key; any other node's key is accepted (a deployment system's key is new at every
    deployment)."""

    def __init__(self, key_file: Path, *, user: str = "root", port: int = 22, timeout: float = 10.0) -> None:
        self.key_file = Path(key_file)
        self.user = user
        self.port = port
        self.timeout = timeout

    def auth(self, node: NodeTarget) -> SshAuth:
        """How to log in to ``node``: strict on its pinned host key if it has one."""
        auth = SshAuth.from_key_file(self.user, str(self.key_file))
        if not node.host_key:
            return auth
        kind, _, data = node.host_key.partition(" ")
        pinned = f"{known_host_name(node.ip, self.port)} {kind} {data.split()[0] if data else ''}"
        return SshAuth(auth.user, auth.private_key, HostKeyPolicy.STRICT, pinned)

    def session(self, node: NodeTarget) -> SshSession:
        """A connected session to ``node`` (a context manager)."""
        auth = self.auth(node)
        address = known_host_name(node.ip, self.port)
        return SshSession(node.name, address, auth, load_private_key(auth.private_key), self.timeout)

    def run(self, node: NodeTarget, command: str, timeout: float | None = None) -> CommandOutput:
        """Run ``command`` and wait for it (at most ``timeout`` seconds)."""
        with self.session(node) as session:
            return session.run(command, timeout or self.timeout)

    def start(self, node: NodeTarget, command: str) -> None:
        """Start ``command`` without waiting for it (``reboot`` cuts the connection)."""
        with self.session(node) as session:
            session.start(command)

    def reachable(self, node: NodeTarget, timeout: float = 1.0) -> bool:
        """Whether the node's sshd accepts a TCP connection (no login)."""
        try:
            with socket.create_connection((node.ip, self.port), timeout=timeout):
                return True
        except OSError:
            return False


class SshPowerDriver(PowerDriver):
    """Soft power control through the node's own system: it can reboot or halt, not power on."""

    name = "ssh"

    def __init__(self, client: SshClient, reboot_command: str = "reboot") -> None:
        self.client = client
        self.reboot_command = reboot_command

    def validate(self, node: NodeTarget) -> None:
        if not node.ip:
            raise DriverError("SSH needs the node's IP address", node=node.name)
        if not self.client.key_file.exists():
            raise DriverError(f"SSH key {self.client.key_file} does not exist", node=node.name)

    def status(self, node: NodeTarget) -> PowerState:
        return PowerState.ON if self.client.reachable(node) else PowerState.OFF

    def on(self, node: NodeTarget) -> None:
        raise DriverError("cannot power on through SSH (the node's system is not running)", node=node.name)

    def off(self, node: NodeTarget) -> None:
        self.validate(node)
        self.client.start(node, "poweroff")

    def reset(self, node: NodeTarget) -> None:
        """A clean reboot by the node's own system (the *soft* level)."""
        self.validate(node)
        self.client.start(node, self.reboot_command)
