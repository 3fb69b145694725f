"""Lab nodes' BMCs: one OpenIPMI ``ipmi_sim`` per node, IPMI 2.0 (RMCP+) on the node's BMC address.

Its chassis control program (:mod:`kasched.lab.chassis`) powers the node on, off, resets it and
records its boot device. Runs in the lab namespace, where the BMC addresses live.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kasched.errors import LabError
from kasched.lab.nodedir import NodeDir
from kasched.lab.system import read_pid
from kasched.processes import pid_alive

BMC_PORT = 623

_LAN_CONF = """# ipmi_sim configuration of lab node {name}'s BMC (written by kasched lab up)
name "{name}"
set_working_mc 0x20
  startlan 1
    addr {address} {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid {guid}
  endlan
  chassis_control "{chassis} 0x20"
  user 2 true "{user}" "{password}" admin 10 none md2 md5 straight
"""
_EMU = """mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
mc_enable 0x20
"""
_CHASSIS = """#!/bin/sh
# Chassis control program of lab node {name}'s BMC: see kasched.lab.chassis.
PYTHONPATH='{pythonpath}' exec '{python}' -m kasched.lab.chassis '{nodedir}' "$@"
"""


@dataclass(frozen=True)
class BmcCredentials:
    user: str
    password: str


class LabBmc:
    """The ``ipmi_sim`` serving one node's BMC."""

    def __init__(self, node: NodeDir, address: str, credentials: BmcCredentials, port: int = BMC_PORT):
        self.node = node
        self.address = address
        self.port = port
        self.credentials = credentials

    @property
    def pid_file(self) -> Path:
        return self.node.path / "bmc.pid"

    def configure(self, index: int) -> None:
        facts = self.node.facts()
        chassis = self.node.path / "chassis-control"
        chassis.write_text(
            _CHASSIS.format(name=facts.name, python=facts.python, pythonpath=facts.pythonpath, nodedir=self.node.path)
        )
        chassis.chmod(0o755)
        (self.node.path / "lan.conf").write_text(
            _LAN_CONF.format(
                name=facts.name,
                address=self.address,
                port=self.port,
                guid=f"{index:032x}",
                chassis=chassis,
                user=self.credentials.user,
                password=self.credentials.password,
            )
        )
        (self.node.path / "bmc.emu").write_text(_EMU)
        (self.node.path / "bmc-state").mkdir(exist_ok=True)

    def running(self) -> bool:
        pid = read_pid(self.pid_file)
        return pid is not None and pid_alive(pid)

    def start(self, lab_netns: str) -> None:
        if self.running():
            return
        path = self.node.path
        with open(path / "bmc.log", "ab") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", lab_netns, "ipmi_sim", "-n", "-c", str(path / "lan.conf"),
                 "-f", str(path / "bmc.emu"), "-s", str(path / "bmc-state")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.pid_file.write_text(f"{process.pid}\n")

    def wait_ready(self, timeout: float = 10) -> None:
        """Wait until ``ipmi_sim`` listens (its UDP socket shows in /proc/<pid>/net/udp)."""
        deadline = time.monotonic() + timeout
        pid = read_pid(self.pid_file)
        want = f"{socket.inet_aton(self.address)[::-1].hex().upper()}:{self.port:04X}"
        while time.monotonic() < deadline:
            if pid is None or not pid_alive(pid):
                log = (self.node.path / "bmc.log").read_text(errors="replace").strip().splitlines()
                raise LabError(f"BMC of {self.node.path.name} exited: {log[-1] if log else 'no output'}")
            try:
                table = Path(f"/proc/{pid}/net/udp").read_text()
            except OSError:
                table = ""
            if want in table:
                return
            time.sleep(0.02)
        raise LabError(f"BMC of {self.node.path.name} did not start listening in {timeout:.0f} s")
