"""The site's exec and broadcast methods, looked up by name (settings ``exec_method``,
``broadcast_method``) among those plugins register (hooks ``kasched_exec_methods``,
``kasched_broadcast_methods``); None for the built-in SSH ones (``tree``, ``chain``)."""

from __future__ import annotations

from kasched.bus import Bus
from kasched.config import Config
from kasched.drivers.transport import BUILTIN_BROADCAST, BUILTIN_EXEC, BroadcastMethod, ExecMethod
from kasched.errors import ConfigError


def exec_method(bus: Bus, config: Config) -> ExecMethod | None:
    if config.exec_method == BUILTIN_EXEC:
        return None
    factories = bus.exec_methods()
    if config.exec_method not in factories:
        raise ConfigError(f"exec_method: no {config.exec_method!r} is registered (known: tree, {', '.join(factories)})")
    method: ExecMethod = factories[config.exec_method](config)
    return method


def broadcast_method(bus: Bus, config: Config) -> BroadcastMethod | None:
    if config.broadcast_method == BUILTIN_BROADCAST:
        return None
    factories = bus.broadcast_methods()
    if config.broadcast_method not in factories:
        raise ConfigError(
            f"broadcast_method: no {config.broadcast_method!r} is registered (known: chain, {', '.join(factories)})"
        )
    method: BroadcastMethod = factories[config.broadcast_method](config)
    return method
