"""Every hook of kasched, in one typed module, grouped by the phase of a job.

Hooks are called through :class:`kasched.bus.Bus`. Each hook's docstring says when it is called and
what a return value means. Built-in behaviour (grants, statistics, logging) is itself a plugin
implementing these hooks (see ``kasched/builtin``); third-party plugins register under the
``kasched`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from kasched.config import Config
    from kasched.drivers.base import BootDriver, PowerDriver
    from kasched.messages import JobEnd, JobInfo, Notification, StepEvent
    from kasched.views import GrantView

PROJECT = "kasched"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Discovery: what plugins bring -----------------------------------------------------------------


@hookspec
def kasched_scheduler_adapters() -> list[Any]:
    """Called when kasched needs to talk to batch schedulers (prolog, epilog, reconcile, doctor).

    Return a list of scheduler adapter objects this plugin provides (one per scheduler it knows),
    or an empty list. The results of all plugins are concatenated.
    """


@hookspec
def kasched_power_drivers() -> dict[str, Callable[[Config], PowerDriver]]:
    """Called once when power drivers are looked up.

    Return a mapping of driver name (as written in the inventory's ``bmc.driver``) to a factory
    that builds the :class:`~kasched.drivers.base.PowerDriver` from the site configuration. Later
    plugins override earlier names.
    """


@hookspec
def kasched_boot_drivers() -> dict[str, Callable[[Config], BootDriver]]:
    """Called once when boot-profile drivers are looked up.

    Return a mapping of driver name (``pxe``...) to a factory that builds the
    :class:`~kasched.drivers.base.BootDriver` from the site configuration.
    """


@hookspec
def kasched_broadcast_methods() -> dict[str, Any]:
    """Called when an operation starts, if the site's ``broadcast_method`` is not the built-in
    ``chain`` (over SSH).

    Return a mapping of method name to a factory that builds, from the site configuration, a
    :class:`~kasched.drivers.transport.BroadcastMethod` (sends an image to nodes and returns a
    :class:`~kasched.results.GroupResult`). The simulated hardware kind registers ``simulated``.
    """


@hookspec
def kasched_exec_methods() -> dict[str, Any]:
    """Called when an operation starts, if the site's ``exec_method`` is not the built-in ``tree``
    (SSH, direct or through relays).

    Return a mapping of method name to a factory that builds, from the site configuration, a
    :class:`~kasched.drivers.transport.ExecMethod` (runs a command on nodes and returns a
    :class:`~kasched.results.GroupResult`). The simulated hardware kind registers ``simulated``.
    """


# --- Job start: a scheduler allocated nodes to a job -----------------------------------------------


@hookspec
def kasched_job_started(job: JobInfo) -> GrantView | None:
    """Called by a scheduler's prolog when a deploy job starts on its nodes.

    The built-in grants plugin creates the grant (idempotently: a prolog run twice gives one grant).
    Return the :class:`~kasched.views.GrantView` this implementation created, or None if it
    created none. An exception makes the prolog fail; raise only a KaschedError with a reason.
    """


@hookspec
def kasched_grant_created(grant: GrantView) -> None:
    """Called after a grant was stored (by a job start or by an admin). Return value ignored."""


# --- During the job: deployments, reboots, power --------------------------------------------------


@hookspec
def kasched_deploy_step(event: StepEvent) -> None:
    """Called when a step of a deployment, reboot or power operation ends on one node.

    The built-in statistics plugin stores it for ``kasched stats``. Return value ignored.
    """


# --- Job end: the scheduler took the nodes back -----------------------------------------------------


@hookspec
def kasched_job_ended(job: JobEnd) -> GrantView | None:
    """Called by a scheduler's epilog when a job ends (normal end, walltime, cancel).

    The built-in grants plugin revokes the job's grant (idempotently). Return the revoked
    :class:`~kasched.views.GrantView`, or None if this implementation revoked nothing.
    """


@hookspec
def kasched_grant_revoked(grant: GrantView, reason: str) -> None:
    """Called after a grant was revoked; ``reason`` says why. Return value ignored.

    The nodes of ``grant.nodes`` (those stored at grant time) are to go back to the reference
    environment.
    """


# --- Any phase ------------------------------------------------------------------------------------------


@hookspec
def kasched_notify(notification: Notification) -> None:
    """Called when something should reach a person (log, mail, chat). Return value ignored."""
