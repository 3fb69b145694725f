"""kasched's one SSH layer (paramiko), used by the transports and by the SSH power driver
(:mod:`kasched.drivers.ssh`): log in with :class:`SshAuth` (a user, a private key, a host key policy,
known hosts), open one :class:`SshSession` to one node, run one command and collect its
:class:`CommandOutput` (stdout, stderr, exit status) under a deadline, or start one without waiting.
paramiko and socket errors are wrapped here, at the boundary, into
:class:`~kasched.errors.DriverError` / :class:`~kasched.errors.DriverTimeout`."""

from __future__ import annotations

import contextlib
import enum
import io
import select
import time
from collections.abc import Iterable
from dataclasses import dataclass

import paramiko

from kasched.errors import DriverError, DriverTimeout

_READ_SIZE = 65536


class HostKeyPolicy(enum.StrEnum):
    """What to do with a node's host key. ``accept`` (the lab, freshly installed nodes): accept any
    key and record it. ``strict``: the key must be in the known hosts given by the caller."""

    ACCEPT = "accept"
    STRICT = "strict"


@dataclass(frozen=True)
class CommandOutput:
    """What one command printed and how it exited, as stored in ``NodeResult.value``."""

    stdout: str
    stderr: str
    exit_status: int


@dataclass(frozen=True)
class SshAuth:
    """How to log in: a user, a private key (its text, so relays can carry it in memory), a host
    key policy and the known host keys (OpenSSH ``known_hosts`` text)."""

    user: str
    private_key: str
    policy: HostKeyPolicy = HostKeyPolicy.ACCEPT
    known_hosts: str = ""

    @classmethod
    def from_key_file(
        cls, user: str, key_file: str, policy: HostKeyPolicy = HostKeyPolicy.ACCEPT, known_hosts: str = ""
    ) -> SshAuth:
        try:
            with open(key_file, encoding="ascii") as handle:
                return cls(user, handle.read(), HostKeyPolicy(policy), known_hosts)
        except OSError as error:
            raise DriverError(f"cannot read SSH key {key_file}: {error.strerror}") from error


def load_private_key(text: str) -> paramiko.PKey:
    """Parse an OpenSSH/PEM private key of any type paramiko knows."""
    errors = []
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError) as error:
            errors.append(str(error))
    raise DriverError(f"unusable SSH private key ({'; '.join(errors)})")


def split_address(address: str, default_port: int = 22) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` → (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if address.count(":") == 1:
        host, port = address.split(":")
        return host, int(port)
    return address, default_port


def known_host_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _RecordingPolicy(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)


class SshSession:
    """A connected SSH client to one node; use as a context manager."""

    def __init__(self, node: str, address: str, auth: SshAuth, pkey: paramiko.PKey, timeout: float) -> None:
        self.node = node
        self.host, self.port = split_address(address)
        self.client = paramiko.SSHClient()
        self._connect(auth, pkey, timeout)

    def _connect(self, auth: SshAuth, pkey: paramiko.PKey, timeout: float) -> None:
        if auth.known_hosts:
            for line in auth.known_hosts.splitlines():
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
                if entry is not None:
                    for name in entry.hostnames:
                        self.client.get_host_keys().add(name, entry.key.get_name(), entry.key)
        strict = auth.policy == HostKeyPolicy.STRICT
        self.client.set_missing_host_key_policy(paramiko.RejectPolicy() if strict else _RecordingPolicy())
        try:
            self.client.connect(
                self.host, self.port, auth.user, pkey=pkey, timeout=timeout, banner_timeout=timeout,
                auth_timeout=timeout, allow_agent=False, look_for_keys=False,
            )  # fmt: skip
        except TimeoutError as error:
            self.client.close()
            raise DriverTimeout(f"SSH connection timed out after {timeout:g}s", node=self.node) from error
        except paramiko.BadHostKeyException as error:
            self.client.close()
            raise DriverError(
                f"host key mismatch: {self.host} answered with a key ({error.key.get_name()} "
                f"{error.key.get_fingerprint().hex()[:16]}...) that is not the one kasched gave this boot "
                "(the node did not boot what it was told, or another machine holds its address)",
                node=self.node,
            ) from error
        except (paramiko.SSHException, OSError, EOFError) as error:
            self.client.close()
            raise DriverError(f"SSH connection failed: {error or type(error).__name__}", node=self.node) from error

    def host_key_line(self) -> str:
        """The node's host key as a ``known_hosts`` line."""
        transport = self.client.get_transport()
        if transport is None:
            return ""
        key = transport.get_remote_server_key()
        return f"{known_host_name(self.host, self.port)} {key.get_name()} {key.get_base64()}"

    def open_command(self, command: str) -> paramiko.Channel:
        try:
            transport = self.client.get_transport()
            if transport is None:
                raise paramiko.SSHException("not connected")
            channel = transport.open_session(timeout=10)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise DriverError(f"cannot start command: {error}", node=self.node) from error
        return channel

    def start(self, command: str, settle: float = 1.0) -> None:
        """Start ``command`` without waiting for it to end (``reboot`` cuts the connection): wait at
        most ``settle`` seconds for an exit status, which a reboot may never send."""
        channel = self.open_command(command)
        channel.status_event.wait(settle)
        channel.close()

    def run(self, command: str, timeout: float, stdin_data: bytes = b"") -> CommandOutput:
        """Run ``command``; :class:`DriverTimeout` if it does not finish within ``timeout`` seconds."""
        channel = self.open_command(command)
        try:
            if stdin_data:
                # The command may end before it reads all its input: its output and status say why.
                with contextlib.suppress(OSError):
                    channel.sendall(stdin_data)
            return self._output(channel, time.monotonic() + timeout)
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise DriverError(f"SSH channel failed: {error}", node=self.node) from error
        finally:
            channel.close()

    def _output(self, channel: paramiko.Channel, deadline: float) -> CommandOutput:
        """End the command's input, then read its output and status (until ``deadline``)."""
        if not channel.closed:
            channel.shutdown_write()
        stdout, stderr = read_channel(channel, deadline, self.node)
        status = channel.recv_exit_status()
        return CommandOutput(stdout.decode(errors="replace"), stderr.decode(errors="replace"), status)

    def stream(self, command: str, deadline: float, chunks: Iterable[bytes]) -> CommandOutput:
        """Run ``command`` with ``chunks`` sent on its stdin as they come (its output read at the end:
        the command writes little until its input ends); :class:`DriverTimeout` past ``deadline``."""
        channel = self.open_command(command)
        try:
            channel.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                for chunk in chunks:
                    channel.sendall(chunk)
                    channel.settimeout(max(0.1, deadline - time.monotonic()))
            except TimeoutError as error:
                raise DriverTimeout("command timed out while reading its input", node=self.node) from error
            except OSError:
                pass  # the command ended before it read all its input: its output and status say why
            return self._output(channel, deadline)
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise DriverError(f"SSH channel failed: {error}", node=self.node) from error
        finally:
            channel.close()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SshSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_channel(channel: paramiko.Channel, deadline: float, node: str) -> tuple[bytes, bytes]:
    """Read stdout and stderr until the channel is closed by the remote end or the deadline passes."""
    stdout, stderr = bytearray(), bytearray()
    while True:
        while channel.recv_ready():
            stdout += channel.recv(_READ_SIZE)
        while channel.recv_stderr_ready():
            stderr += channel.recv_stderr(_READ_SIZE)
        drained = not channel.recv_ready() and not channel.recv_stderr_ready()
        if channel.exit_status_ready() and drained and (channel.eof_received or channel.closed):
            return bytes(stdout), bytes(stderr)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DriverTimeout("command timed out", node=node)
        try:
            select.select([channel], [], [], min(remaining, 0.5))
        except (OSError, ValueError):
            time.sleep(0.05)
