"""The lab's DHCP and TFTP server: dnsmasq in the lab namespace, configured from the inventory by
:func:`kasched.drivers.pxe.dnsmasq_config` (the same function a real site uses)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from kasched.drivers.base import NodeTarget
from kasched.drivers.pxe import dnsmasq_config
from kasched.errors import LabError
from kasched.lab.system import read_pid
from kasched.lab.topology import PREFIX_LENGTH, SERVICE_ADDRESS
from kasched.processes import pid_alive


class LabDnsmasq:
    def __init__(self, state_dir: Path, netns: str) -> None:
        self.state_dir = state_dir
        self.netns = netns

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "dnsmasq.pid"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "dnsmasq.conf"

    def configure(self, nodes: Iterable[NodeTarget], tftp_root: Path) -> None:
        self.config_file.write_text(
            dnsmasq_config(
                nodes,
                interface="sw1",
                network=f"{SERVICE_ADDRESS}/{PREFIX_LENGTH}",
                tftp_root=tftp_root,
                lease_file=self.state_dir / "dnsmasq.leases",
                pid_file=self.pid_file,
            )
        )

    def running(self) -> bool:
        pid = read_pid(self.pid_file)
        return pid is not None and pid_alive(pid)

    def start(self) -> None:
        if self.running():
            return
        log = self.state_dir / "dnsmasq.log"
        command = ["ip", "netns", "exec", self.netns, "dnsmasq", f"--conf-file={self.config_file}",
                   f"--log-facility={log}", "--log-dhcp"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise LabError(f"dnsmasq did not start: {done.stderr.strip() or done.stdout.strip()}")
        deadline = time.monotonic() + 5
        while not self.running():
            if time.monotonic() > deadline:
                raise LabError(f"dnsmasq did not write {self.pid_file}")
            time.sleep(0.02)
