"""Serial-over-LAN console through the node's BMC (``ipmitool sol activate``).

The password goes through the environment (``IPMI_PASSWORD``, ipmitool's ``-E``), never the command
line. Lab namespace nodes have no serial port: their BMC serves no SOL, and their console is the
file ``console.log`` of the node's lab directory (``kasched lab console NODE``); see docs/lab.md.
"""

from __future__ import annotations

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
