"""Built-in plugin: the power and boot drivers kasched ships (IPMI, SSH, PXE)."""

from __future__ import annotations

from collections.abc import Callable

from kasched.config import Config
from kasched.drivers.base import BootDriver, PowerDriver
from kasched.hookspecs import hookimpl


def _ipmi(config: Config) -> PowerDriver:
    from kasched.drivers.ipmi import IpmiPowerDriver

    return IpmiPowerDriver()


def _ssh(config: Config) -> PowerDriver:
    from kasched.drivers.ssh import SshClient, SshPowerDriver

    return SshPowerDriver(SshClient(config.service_key))


def _pxe(config: Config) -> BootDriver:
    from kasched.drivers.pxe import PxeBootDriver

    return PxeBootDriver(
        config.boot_dir,
        local_initrd=config.pxe_local_initrd,
        kernel_args=config.pxe_kernel_args,
        base_url=config.pxe_base_url,
    )


class BuiltinDrivers:
    @hookimpl
    def kasched_power_drivers(self) -> dict[str, Callable[[Config], PowerDriver]]:
        return {"ipmi": _ipmi, "ssh": _ssh}

    @hookimpl
    def kasched_boot_drivers(self) -> dict[str, Callable[[Config], BootDriver]]:
        return {"pxe": _pxe}
