"""Built-in plugin: the simulated hardware kind's drivers, registered as the real ones are (power and
boot drivers, an exec and a broadcast method, all named ``simulated``). Nothing is imported until a
site uses them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kasched.config import Config
from kasched.drivers.base import BootDriver, PowerDriver
from kasched.hookspecs import hookimpl

NAME = "simulated"


def _power(config: Config) -> PowerDriver:
    from kasched.simulated import drivers

    return drivers.power(config)


def _boot(config: Config) -> BootDriver:
    from kasched.simulated import drivers

    return drivers.boot(config)


def _exec(config: Config) -> Any:
    from kasched.simulated import drivers

    return drivers.exec_method(config)


def _broadcast(config: Config) -> Any:
    from kasched.simulated import drivers

    return drivers.broadcast_method(config)


class SimulatedDrivers:
    @hookimpl
    def kasched_power_drivers(self) -> dict[str, Callable[[Config], PowerDriver]]:
        return {NAME: _power}

    @hookimpl
    def kasched_boot_drivers(self) -> dict[str, Callable[[Config], BootDriver]]:
        return {NAME: _boot}

    @hookimpl
    def kasched_exec_methods(self) -> dict[str, Any]:
        return {NAME: _exec}

    @hookimpl
    def kasched_broadcast_methods(self) -> dict[str, Any]:
        return {NAME: _broadcast}

    @hookimpl
    def kasched_grant_revoked(self, grant: Any, reason: str) -> None:
        """Before the reclaimer (registered earlier, so called later) starts the job's revert in a
        process of its own: that process must find the nodes as this one left them."""
        from kasched.simulated.site import save_sites

        save_sites()
