"""Fake nodes for transport tests and benches: real OpenSSH ``sshd`` processes, one per node, each on
its own 127.0.x.y address, with a generated host key and an authorized_keys file in a temp dir."""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
REPO = Path(__file__).resolve().parents[2]
RELAY_COMMAND = f"PYTHONPATH={shlex.quote(str(REPO))} {shlex.quote(sys.executable)} -m kasched.transports.relay"


def node_address(index: int, subnet: int = 41) -> str:
    """127.<subnet>.<hi>.<lo>: one loopback address per fake node."""
    return f"127.{subnet}.{index // 250}.{index % 250 + 1}"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class SshdCluster:
    """``count`` sshd processes; ``addresses`` maps node names (n01...) to ``host:port``."""

    root: Path
    count: int
    subnet: int = 41
    key_file: Path = field(init=False)
    addresses: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, timeout: float = 20.0) -> SshdCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.key_file = self.root / "id_ed25519"
        _keygen(self.key_file)
        _keygen(self.root / "host_ed25519")
        (self.root / "authorized_keys").write_bytes(self.key_file.with_suffix(".pub").read_bytes())
        width = len(str(self.count))
        for index in range(self.count):
            host = node_address(index, self.subnet)
            port = free_port(host)
            self.addresses[f"n{index + 1:0{width}d}"] = f"{host}:{port}"
            self.processes.append(self._start_sshd(index, host, port))
        self._wait_ready(time.monotonic() + timeout)
        return self

    @property
    def nodes(self) -> list[str]:
        return list(self.addresses)

    def _start_sshd(self, index: int, host: str, port: int) -> subprocess.Popen[bytes]:
        config = self.root / f"sshd_{index}.conf"
        config.write_text(
            f"ListenAddress {host}:{port}\nHostKey {self.root / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPidFile {self.root / f'sshd_{index}.pid'}\n"
            "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nMaxStartups 200:30:400\nMaxSessions 50\nLogLevel ERROR\n"
            "UseDNS no\nPrintMotd no\n"
        )
        log = open(self.root / f"sshd_{index}.log", "wb")  # noqa: SIM115 - kept by the process
        return subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)

    def _wait_ready(self, deadline: float) -> None:
        for address in self.addresses.values():
            host, port = address.rsplit(":", 1)
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"sshd on {address} did not start") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self.processes.clear()


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, capture_output=True,
        timeout=20,
    )  # fmt: skip
