"""The plugin bus: one typed front class over pluggy's plugin manager."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pluggy

from kasched import hookspecs
from kasched.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from kasched.config import Config
    from kasched.drivers.base import BootDriver, PowerDriver
    from kasched.messages import JobEnd, JobInfo, Notification, StepEvent
    from kasched.views import GrantView

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "kasched"


class Bus:
    """Calls the hooks of every registered plugin; see :mod:`kasched.hookspecs` for their meaning."""

    def __init__(self, *, load_entry_points: bool = True, disabled: tuple[str, ...] = ()) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        for name in disabled:
            self.manager.set_blocked(name)
        if load_entry_points:
            try:
                self.manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            except (ImportError, AttributeError) as error:
                raise ConfigError(
                    f"a plugin of the {ENTRY_POINT_GROUP!r} entry-point group failed to load: {error}"
                ) from None

    def register(self, plugin: object, name: str | None = None) -> None:
        if name is None or not self.manager.is_blocked(name):
            self.manager.register(plugin, name=name)

    def plugin_names(self) -> list[str]:
        return sorted(name for name, plugin in self.manager.list_name_plugin() if name and plugin is not None)

    # Discovery
    def scheduler_adapters(self) -> list[Any]:
        return [adapter for adapters in self.manager.hook.kasched_scheduler_adapters() for adapter in adapters]

    def power_drivers(self) -> dict[str, Callable[[Config], PowerDriver]]:
        return _merge(self.manager.hook.kasched_power_drivers())

    def boot_drivers(self) -> dict[str, Callable[[Config], BootDriver]]:
        return _merge(self.manager.hook.kasched_boot_drivers())

    def broadcast_methods(self) -> dict[str, Any]:
        return _merge(self.manager.hook.kasched_broadcast_methods())

    def exec_methods(self) -> dict[str, Any]:
        return _merge(self.manager.hook.kasched_exec_methods())

    # Job phases
    def job_started(self, job: JobInfo) -> list[GrantView]:
        return [grant for grant in self.manager.hook.kasched_job_started(job=job) if grant is not None]

    def grant_created(self, grant: GrantView) -> None:
        self.manager.hook.kasched_grant_created(grant=grant)

    def deploy_step(self, event: StepEvent) -> None:
        self.manager.hook.kasched_deploy_step(event=event)

    def job_ended(self, job: JobEnd) -> list[GrantView]:
        return [grant for grant in self.manager.hook.kasched_job_ended(job=job) if grant is not None]

    def grant_revoked(self, grant: GrantView, reason: str) -> None:
        self.manager.hook.kasched_grant_revoked(grant=grant, reason=reason)

    def notify(self, notification: Notification) -> None:
        self.manager.hook.kasched_notify(notification=notification)


def _merge(mappings: list[dict[str, Any]]) -> dict[str, Any]:
    # pluggy returns the results of the last registered plugin first; earlier ones are overridden.
    merged: dict[str, Any] = {}
    for mapping in reversed(mappings):
        merged.update(mapping or {})
    return merged
