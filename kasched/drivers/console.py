"""Serial-over-LAN console through the node's BMC (``ipmitool sol activate``).

The password goes through the environment (``IPMI_PASSWORD``, ipmitool's ``-E``), never the command
line. Lab namespace nodes have no serial port: their BMC serves no SOL, and their console is the
file ``console.log`` of the node's lab directory (``kasched lab console NODE``); see docs/lab.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from kasched.drivers.base import ConsoleDriver, NodeTarget
from kasched.errors import DriverError


class IpmiSolConsole(ConsoleDriver):
    name = "ipmi-sol"

    def validate(self, node: NodeTarget) -> None:
        if not node.bmc_address or not node.bmc_user:
            raise DriverError("serial-over-LAN needs a BMC address and user", node=node.name)

    def command(self, node: NodeTarget) -> list[str]:
        self.validate(node)
        return [
            "ipmitool", "-I", "lanplus", "-H", str(node.bmc_address), "-p", str(node.bmc_port),
            "-U", str(node.bmc_user), "-E", "sol", "activate",
        ]  # fmt: skip

    def environment(self, node: NodeTarget) -> dict[str, str]:
        """The environment the command needs (the BMC password)."""
        return {"IPMI_PASSWORD": node.bmc_password or ""}


class LogFileConsole:
    """A console that is a file the node's output is written to (lab nodes: ``nodes/<node>/console.log``).

    Read-only: the tail of the log, or what was written after a byte offset (to follow it)."""

    name = "log-file"
    CHUNK = 64 * 1024

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, node: str) -> Path:
        return self.directory / node / "console.log"

    def available(self, node: str) -> bool:
        return self.path(node).is_file()

    def read(self, node: str, offset: int | None = None, lines: int = 40) -> tuple[str, int]:
        """The text and the offset to read from next: the last ``lines`` lines, or from ``offset``."""
        try:
            with open(self.path(node), "rb") as log:
                size = log.seek(0, os.SEEK_END)
                if offset is None:
                    log.seek(max(0, size - 4 * self.CHUNK))
                    tail = log.read().decode(errors="replace").splitlines()[-lines:] if lines else []
                    return "".join(f"{line}\n" for line in tail), size
                log.seek(offset if offset <= size else 0)  # a shorter file was started anew
                data = log.read(self.CHUNK)
                return data.decode(errors="replace"), log.tell()
        except OSError as error:
            raise DriverError(f"console log {self.path(node)}: {error.strerror}", node=node) from None
