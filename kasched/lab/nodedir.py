"""A lab node's directory: the files its BMC, power supply and firmware share.

``<state>/nodes/<name>/`` holds ``node.json`` (what the node is), ``bootdev`` (the boot device its
BMC was told), ``console.log``, the BMC's configuration and state, and the disk image.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kasched.errors import LabError
from kasched.files import write_atomic

BOOT_NETWORK = "pxe"
BOOT_DISK = "default"


@dataclass(frozen=True)
class NodeFacts:
    """What a node's machinery needs to know, written once at ``lab up``."""

    name: str
    netns: str
    mac: str
    disk_image: str
    disk_device: str  # the loop device holding the disk image
    python: str  # the interpreter and path that run kasched's lab programs
    pythonpath: str


class NodeDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def facts_file(self) -> Path:
        return self.path / "node.json"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def bootdev_file(self) -> Path:
        return self.path / "bootdev"

    @property
    def power_script(self) -> Path:
        return self.path / "power-supply.sh"

    @property
    def root_mount(self) -> Path:
        return self.path / "root"

    def facts(self) -> NodeFacts:
        try:
            return NodeFacts(**json.loads(self.facts_file.read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise LabError(f"{self.facts_file}: unreadable node description: {error}") from None

    def write_facts(self, facts: NodeFacts) -> None:
        write_atomic(self.facts_file, json.dumps(asdict(facts), indent=1) + "\n")

    def bootdev(self) -> str:
        try:
            return self.bootdev_file.read_text().strip() or BOOT_NETWORK
        except OSError:
            return BOOT_NETWORK

    def set_bootdev(self, device: str) -> None:
        write_atomic(self.bootdev_file, device + "\n")
