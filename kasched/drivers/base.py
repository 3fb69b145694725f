"""The driver contracts (after Ironic's interfaces): small ABCs with a fast ``validate()``.

A driver acts on one node. It raises :class:`~kasched.errors.DriverError` (naming the node) for any
failure, wrapping the errors of the library it uses; callers that act on many nodes turn those into
per-node results, so one failing node never hides the others.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeTarget:
    """What a driver needs to know of a node; built from the inventory, with credentials resolved."""

    name: str
    mac: str
    ip: str
    bmc_address: str | None = None
    bmc_port: int = 623
    bmc_user: str | None = None
    bmc_password: str | None = None
    disk_device: str = "/dev/sda"
    reference_partition: int = 2
    deploy_partition: int = 3
    host_key: str | None = None  # the running system's pinned SSH host key (kasched.bootkeys), if any

    def partition_device(self, number: int) -> str:
        """Partition ``number`` of the node's disk as Linux names it: /dev/sda3, /dev/vda3, but
        /dev/nvme0n1p3 and /dev/mmcblk0p3 (a disk whose name ends in a digit takes a ``p``), and
        udev's stable links take ``-partN`` (/dev/disk/by-id/wwn-0x5000c500a1b2c3d4-part3)."""
        if self.disk_device.startswith("/dev/disk/by-"):
            return f"{self.disk_device}-part{number}"
        return f"{self.disk_device}{'p' if self.disk_device[-1:].isdigit() else ''}{number}"


class PowerState(enum.StrEnum):
    ON = "on"
    OFF = "off"


class BootDevice(enum.StrEnum):
    NETWORK = "network"  # PXE: the node follows the boot profile the site serves for it
    DISK = "disk"


class BootTarget(enum.StrEnum):
    """What a node's boot profile makes it boot."""

    DEPLOY = "deploy"  # the deployment system, running from the network, nothing taken from the disk
    LOCAL = "local"  # a partition of its local disk
    STATELESS = "stateless"  # an environment in RAM, no disk write


class PowerDriver(ABC):
    """Turns a node on and off, and chooses its next boot device."""

    name: str = ""

    @abstractmethod
    def validate(self, node: NodeTarget) -> None:
        """Check quickly, without touching the hardware, that ``node`` has what this driver needs."""

    @abstractmethod
    def status(self, node: NodeTarget) -> PowerState: ...

    @abstractmethod
    def on(self, node: NodeTarget) -> None: ...

    @abstractmethod
    def off(self, node: NodeTarget) -> None: ...

    @abstractmethod
    def reset(self, node: NodeTarget) -> None:
        """Hard reset: the node restarts at once, without a clean shutdown."""

    def cycle(self, node: NodeTarget) -> None:
        """Very hard: off, then on."""
        self.off(node)
        self.on(node)

    def set_boot_device(self, node: NodeTarget, device: BootDevice) -> None:  # noqa: B027
        """Choose the device of the next boot; drivers that cannot do it keep this default (no-op)."""


@dataclass(frozen=True)
class BootFiles:
    """What a boot profile boots, as files on the server: a kernel, an initrd (or none) and the
    kernel command line. What a kexec into that system needs."""

    kernel: Path
    initrd: Path | None
    cmdline: str


class BootDriver(ABC):
    """Writes the boot profile a node finds on the network (iPXE, PXELINUX, GRUB)."""

    name: str = ""

    @abstractmethod
    def validate(self, node: NodeTarget) -> None: ...

    @abstractmethod
    def set_profile(
        self,
        node: NodeTarget,
        target: BootTarget,
        *,
        partition: int | None = None,
        kernel: str = "",
        initrd: str = "",
        cmdline: str = "",
        extra_initrds: Sequence[str] = (),
    ) -> None:
        """Write, atomically, the profile that makes ``node`` boot ``target`` at its next network boot;
        ``extra_initrds`` (paths under the boot directory) are loaded after the target's own initrd
        (a per-boot host key: :mod:`kasched.bootkeys`)."""

    def boot_files(self, node: NodeTarget, target: BootTarget) -> BootFiles | None:
        """The files ``target``'s profile would boot ``node`` with (kernel, initrd, command line), so
        that the running system can kexec them; None when the driver cannot say (no kexec setup)."""
        return None


class ConsoleDriver(ABC):
    """Gives access to a node's console (serial-over-LAN)."""

    name: str = ""

    @abstractmethod
    def validate(self, node: NodeTarget) -> None: ...

    @abstractmethod
    def command(self, node: NodeTarget) -> list[str]:
        """The command a user runs to attach to the console."""
