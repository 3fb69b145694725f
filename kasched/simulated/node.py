"""A simulated node and what it holds: its partitions' contents and the boot profile it finds on the
network (kasched.simulated.site drives them; kasched.simulated.persist writes them down)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from kasched.drivers.base import BootTarget, NodeTarget


@dataclass(frozen=True)
class Content:
    """What a partition holds: the sha256 of what was written, and the raw bytes when they matter
    (a raw image, whose blocks a verify hashes); shared by every node that holds it."""

    sha256: str
    raw: bytes | None = None
    _hashes: dict[int, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    def hashes(self, block: int) -> tuple[str, ...]:
        if block not in self._hashes:
            data = self.raw or b""
            self._hashes[block] = tuple(
                hashlib.sha256(data[start : start + block]).hexdigest() for start in range(0, len(data), block)
            )
        return self._hashes[block]


@dataclass
class Profile:
    """The boot profile the node finds on the network (what the simulated boot driver wrote)."""

    target: BootTarget
    partition: int | None = None
    cmdline: str = ""
    key: str | None = None  # the per-boot host key its files carry


@dataclass
class SimulatedNode:
    """One node: its power, what runs on it (the kernel command line; "" while down), from when it
    answers (a real monotonic time), its host key, the token in /run, its disk and its faults."""

    target: NodeTarget
    powered: bool = True
    system: str = ""
    up_at: float = 0.0
    host_key: str = ""
    token: bool = False
    profile: Profile | None = None
    network_boot: bool = True
    partitions: dict[str, Content] = field(default_factory=dict)
    changed: dict[str, dict[int, str]] = field(default_factory=dict)  # device -> block -> hash written
    received: dict[str, bytes] = field(default_factory=dict)  # files pushed into /run/kasched-kexec
    faults: frozenset[str] = frozenset()
    boots: int = 0
    version: int = 0  # wall clock (ns) of its last change (kasched.simulated.persist)
    went_down: bool = False  # restarted since a reboot's wait last looked (what sshd's port going down shows)

    @property
    def name(self) -> str:
        return self.target.name

    def up(self, now: float) -> bool:
        return self.powered and bool(self.system) and self.up_at <= now
