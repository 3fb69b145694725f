"""SSH to a node (paramiko): run a command, and the *soft* power driver (``reboot``/``poweroff``).

paramiko's and the socket layer's errors become :class:`~kasched.errors.DriverError` (or
:class:`~kasched.errors.DriverTimeout`) naming the node.
"""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass
from pathlib import Path

import paramiko

from kasched.drivers.base import NodeTarget, PowerDriver, PowerState
from kasched.errors import DriverError, DriverTimeout


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class SshClient:
    """Runs commands on nodes as ``user`` with the service's private key."""

    def __init__(
        self,
        key_file: Path,
        *,
        user: str = "root",
        port: int = 22,
        timeout: float = 10.0,
        known_hosts: Path | None = None,
    ) -> None:
        self.key_file = Path(key_file)
        self.user = user
        self.port = port
        self.timeout = timeout
        self.known_hosts = known_hosts

    def connect(self, node: NodeTarget) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if node.host_key:  # the key kaschedd gave the node's running system at its boot: pinned
            kind, _, data = node.host_key.partition(" ")
            pinned = paramiko.PKey.from_type_string(kind, base64.b64decode(data.split()[0]))
            client.get_host_keys().add(node.ip, kind, pinned)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        elif self.known_hosts is not None:
            client.load_host_keys(str(self.known_hosts))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:  # the deployment system's host key is new at every deployment
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(
                node.ip,
                port=self.port,
                username=self.user,
                key_filename=str(self.key_file),
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except Exception as error:
            client.close()
            raise _translate(error, node, "connect") from None
        return client

    def run(self, node: NodeTarget, command: str, timeout: float | None = None) -> CommandResult:
        """Run ``command`` and wait for it (at most ``timeout`` seconds)."""
        client = self.connect(node)
        try:
            _, stdout, stderr = client.exec_command(command, timeout=timeout or self.timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            return CommandResult(stdout.channel.recv_exit_status(), out, err)
        except Exception as error:
            raise _translate(error, node, command) from None
        finally:
            client.close()

    def start(self, node: NodeTarget, command: str) -> None:
        """Start ``command`` without waiting for it (``reboot`` cuts the connection)."""
        client = self.connect(node)
        try:
            channel = client.get_transport().open_session(timeout=self.timeout)  # type: ignore[union-attr]
            channel.exec_command(command)
            channel.status_event.wait(1.0)  # give it a moment; a reboot may never answer
        except Exception as error:
            raise _translate(error, node, command) from None
        finally:
            client.close()

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


def _translate(error: Exception, node: NodeTarget, what: str) -> DriverError:
    where = f"SSH {node.ip}"
    if isinstance(error, socket.timeout | TimeoutError):
        return DriverTimeout(f"{where}: {what}: no answer (timeout)", node=node.name)
    if isinstance(error, paramiko.AuthenticationException):
        return DriverError(f"{where}: the node refused the service's key", node=node.name)
    if isinstance(error, paramiko.SSHException | OSError):
        return DriverError(f"{where}: {what}: {error}", node=node.name)
    return DriverError(f"{where}: {what}: {type(error).__name__}: {error}", node=node.name)
