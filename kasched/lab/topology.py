"""What a lab is made of: its nodes, switches and addresses, computed from a few numbers.

Addresses (all in 10.77.0.0/16, which exists only inside the lab's namespace):

* the service host (dnsmasq, the coordinator): 10.77.0.1
* node *k* of switch *s*: 10.77.*s*.(10+*k*), MAC 02:4b:00:00:*s*:*k* (hex)
* its BMC: 10.77.(100+*s*).(10+*k*), UDP port 623
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kasched.errors import InputError
from kasched.rates import rate_bits

SUBNET_PREFIX = "10.77"
SERVICE_ADDRESS = "10.77.0.1"
PREFIX_LENGTH = 16
MAX_PER_SWITCH = 240
MAX_SWITCHES = 99
_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


@dataclass(frozen=True)
class NodePlan:
    """One lab node: its names, addresses and where it is cabled."""

    name: str
    index: int  # 1-based, over the whole lab
    switch: int  # 1-based
    port: int  # 1-based, on its switch
    lab: str

    @property
    def mac(self) -> str:
        return f"02:4b:00:00:{self.switch:02x}:{self.port:02x}"

    @property
    def ip(self) -> str:
        return f"{SUBNET_PREFIX}.{self.switch}.{10 + self.port}"

    @property
    def bmc_address(self) -> str:
        return f"{SUBNET_PREFIX}.{100 + self.switch}.{10 + self.port}"

    @property
    def netns(self) -> str:
        return f"kl-{self.lab}-{self.name}"

    @property
    def lab_port(self) -> str:
        """The switch-side end of the node's cable (a veth in the lab namespace)."""
        return f"nd{self.index}"

    @property
    def switch_name(self) -> str:
        return f"sw{self.switch}"


@dataclass(frozen=True)
class LabPlan:
    """A whole lab: ``nodes`` nodes spread evenly over ``switches`` switches in a chain."""

    name: str = "lab"
    nodes: int = 16
    switches: int = 1
    link: str = "1gbit"
    uplink: str = "10gbit"
    # names dealt round-robin over the switches (node-1 on sw1, node-2 on sw2...) instead of in
    # blocks: name order then differs from cabling order (the topology benches)
    interleave: bool = False
    nodes_list: tuple[NodePlan, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InputError("lab name must be 1-8 lowercase letters or digits, starting with a letter")
        if not 1 <= self.switches <= MAX_SWITCHES:
            raise InputError(f"--switches must be between 1 and {MAX_SWITCHES}")
        if not 1 <= self.nodes <= self.switches * MAX_PER_SWITCH:
            raise InputError(f"--nodes must be between 1 and {self.switches * MAX_PER_SWITCH}")
        for option, rate in (("--link", self.link), ("--uplink", self.uplink)):
            try:
                rate_bits(rate)
            except ValueError:
                raise InputError(f"{option} {rate!r}: expected a rate such as 100mbit or 1gbit") from None
        object.__setattr__(self, "nodes_list", tuple(self._place_nodes()))

    def _place_nodes(self) -> list[NodePlan]:
        if self.interleave:
            return [
                NodePlan(f"node-{index}", index, (index - 1) % self.switches + 1,
                         (index - 1) // self.switches + 1, self.name)
                for index in range(1, self.nodes + 1)
            ]  # fmt: skip
        per_switch, extra = divmod(self.nodes, self.switches)
        placed, index = [], 0
        for switch in range(1, self.switches + 1):
            for port in range(1, per_switch + (1 if switch <= extra else 0) + 1):
                index += 1
                placed.append(NodePlan(f"node-{index}", index, switch, port, self.name))
        return placed

    @property
    def netns(self) -> str:
        return f"kl-{self.name}"

    def node(self, name: str) -> NodePlan:
        for node in self.nodes_list:
            if node.name == name:
                return node
        raise InputError(f"lab {self.name} has no node {name}")

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "nodes": self.nodes,
            "switches": self.switches,
            "link": self.link,
            "uplink": self.uplink,
            "interleave": self.interleave,
        }
