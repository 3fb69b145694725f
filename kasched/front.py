"""The front door of kasched: one typed protocol for everything a client does, whichever side of
kaschedd it runs on.

:class:`KaschedFront` is what the CLI calls, and all it calls. Two classes implement it:
:class:`kasched.local.LocalKasched` works in this process on the database (the API, the operations,
console and tokens composed), and :class:`kasched.service.remote.RemoteKasched` asks kaschedd over
its REST API. An operation's live progress is one stream of :data:`Event` s given to a
:data:`Listener`, the same in both: a step's attempt on a node, the image's stream, the operation's
start, a wait before it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from kasched.deploy.workflow import TransferReport
from kasched.errors import KaschedError, NodesBeingGivenBack
from kasched.messages import StepEvent

if TYPE_CHECKING:
    from kasched.api import ImportReport, Kasched
    from kasched.config import Config
    from kasched.deploy.operations import OperationResult
    from kasched.deploy.records import DeploymentView
    from kasched.drivers.reboot import RebootLevel
    from kasched.identity import Caller
    from kasched.messages import JobEnd, JobInfo
    from kasched.results import NodeResult
    from kasched.schedulers import SchedulerAdapter
    from kasched.stats import StatsFilter, StatsGroup
    from kasched.views import Decision, EnvironmentView, GrantView, NodeView, StepView

T = TypeVar("T")
POLL = 1.0  # seconds between two tries while the nodes are being given back


@dataclass(frozen=True)
class Started:
    """An operation passed its checks and holds its nodes: its id (``kasched deploy --status ID``),
    and where it runs (``"in kaschedd"``, or ``""`` in this process)."""

    kind: str
    operation_id: str
    where: str = ""


@dataclass(frozen=True)
class Waiting:
    """The operation is not running yet, or its runner does not answer for a while: why."""

    why: str


Event = StepEvent | TransferReport | Started | Waiting
Listener = Callable[[Event], None]


@dataclass(frozen=True)
class ConsolePage:
    """A piece of a node's console: its text, and the byte offset to ask from next."""

    node: str
    text: str
    offset: int


@dataclass(frozen=True)
class IssuedToken:
    """A signed token (shown once), its user, its expiry (Unix time) and the id that revokes it."""

    token: str
    user: str
    expires: float
    id: str


def ignore(event: Event) -> None:
    """A listener that shows nothing."""


class KaschedFront(Protocol):
    """Everything a client of kasched does, for one caller on one site. Errors are
    :class:`~kasched.errors.KaschedError` kinds, the same from both implementations."""

    config: Config

    @property
    def caller(self) -> Caller:
        """Who is asking (user, admin or not), as the site sees them."""
        ...

    def close(self) -> None:
        """Release what the front holds (database connections)."""

    def beside_database(self, why: str) -> Kasched:
        """The in-process API, for the commands that run beside the database (reclaim, reconcile,
        doctor); an :class:`~kasched.errors.InputError` saying ``why`` where the front is remote."""
        ...

    # --- Nodes -----------------------------------------------------------------------------------------

    def import_nodes(self, path: str | Path) -> ImportReport:
        """Create or update the nodes an inventory file describes (admins); all or nothing."""
        ...

    def list_nodes(self, pattern: str | None = None, state: str | None = None) -> list[NodeView]:
        """The nodes of a range (default all), in a state if given, in natural order."""
        ...

    def show_node(self, name: str) -> NodeView:
        """One node."""
        ...

    def remove_nodes(self, pattern: str) -> list[str]:
        """Remove nodes from the inventory (admins); refused while a grant holds any."""
        ...

    def set_node_state(self, pattern: str, state: str) -> list[str]:
        """Set the recorded state of nodes (admins)."""
        ...

    # --- Environments ----------------------------------------------------------------------------------

    def add_environment(self, path: str | Path, owner: str | None = None) -> EnvironmentView:
        """Add the environment a description file gives; its files are read as the caller."""
        ...

    def list_environments(
        self, *, include_shared: bool = False, owner: str | None = None, name: str | None = None
    ) -> list[EnvironmentView]:
        """Own and public environments; shared ones too with ``include_shared``."""
        ...

    def show_environment(self, reference: str) -> EnvironmentView:
        """The environment ``NAME[@OWNER][:VERSION]`` names."""
        ...

    def check_environment(self, reference: str) -> EnvironmentView:
        """Re-read the stored copies of an environment's files against their checksums."""
        ...

    def remove_environment(self, reference: str) -> EnvironmentView:
        """Remove an environment (its owner, or an admin)."""
        ...

    # --- Rights and jobs -------------------------------------------------------------------------------

    def grant(self, user: str, nodes: str, hours: float, job_id: str | None = None) -> GrantView:
        """An admin's grant, outside any scheduler."""
        ...

    def revoke(self, grant_id: int, reason: str = "revoked by an admin") -> GrantView:
        """Revoke a grant (admins)."""
        ...

    def rights(
        self, *, user: str | None = None, nodes: str | None = None, include_ended: bool = False
    ) -> list[GrantView]:
        """Who may deploy which nodes, why and until when."""
        ...

    def check(self, nodes: str | list[str], user: str | None = None) -> Decision:
        """May ``user`` (default: the caller) deploy ``nodes`` now?"""
        ...

    def record_job_start(self, job: JobInfo) -> GrantView:
        """A deploy job started: grant its nodes (scheduler hooks, admins)."""
        ...

    def record_job_end(self, end: JobEnd) -> GrantView:
        """A job ended: revoke its grant (scheduler hooks, admins)."""
        ...

    def scheduler_adapters(self) -> list[SchedulerAdapter]:
        """The scheduler adapters installed on this host (the hooks read their job with them)."""
        ...

    # --- Statistics ------------------------------------------------------------------------------------

    def stats(self, selection: StatsFilter) -> list[StepView]:
        """Steps of the history: an ordinary user's own, an admin's anyone's."""
        ...

    def stats_summary(self, selection: StatsFilter, by: str) -> list[StatsGroup]:
        """The history's steps summed up by ``by``."""
        ...

    # --- Operations ------------------------------------------------------------------------------------

    def deploy(
        self,
        environment: str,
        nodes: Sequence[str],
        key: str | None = None,
        *,
        stateless: bool = False,
        fanout: int = 0,
        listener: Listener = ignore,
        stop: threading.Event | None = None,
    ) -> OperationResult:
        """Deploy ``environment`` on ``nodes`` and wait for the end. While the nodes are still being
        given back after their previous job, wait up to ``revert_wait`` (:func:`when_given_back`).
        ``stop`` set: the operation stops after its current step, the nodes in a known state."""
        ...

    def revert(
        self, nodes: Sequence[str], *, listener: Listener = ignore, stop: threading.Event | None = None
    ) -> OperationResult:
        """Back to the site's verified reference environment; waits like :meth:`deploy`."""
        ...

    def reboot(
        self,
        nodes: Sequence[str],
        level: RebootLevel | None = None,
        to: str = "reference",
        *,
        listener: Listener = ignore,
        stop: threading.Event | None = None,
    ) -> OperationResult:
        """Reboot from ``level`` (default soft) up into ``to``: ``reference``, ``deploy`` or an
        environment on the deploy partition; waits like :meth:`deploy`."""
        ...

    def power(self, nodes: Sequence[str], action: str) -> list[NodeResult]:
        """Power ``on``, ``off`` or ``status`` through each node's BMC; one result per node."""
        ...

    def status(self, operation_id: str) -> DeploymentView:
        """An operation's record: its nodes, its step history (the caller's own, or an admin's)."""
        ...

    def cancel(self, operation_id: str) -> None:
        """Ask a running operation to stop after its current step."""
        ...

    def operations(self, *, running: bool = False, limit: int = 50) -> list[DeploymentView]:
        """The running and recent operations, newest first (an ordinary user's own; an admin's
        anyone's), without their step histories; ``running``: the running ones only."""
        ...

    # --- Console and tokens ----------------------------------------------------------------------------

    def console(self, node: str, offset: int | None = None, lines: int = 40) -> ConsolePage:
        """A node's console: its last ``lines`` lines, or what follows byte ``offset`` (the holder of a
        grant on it from where the console stood when the grant began; admins all of it)."""
        ...

    def issue_token(self, user: str, hours: float = 24.0) -> IssuedToken:
        """A signed token for ``user``, to reach kaschedd over TCP (admins)."""
        ...

    def revoke_token(self, token_id: str) -> None:
        """Revoke a signed token (admins)."""


def when_given_back(start: Callable[[], T], limit: float, listener: Listener, stop: threading.Event) -> T:
    """``start()``; while it is refused only because the nodes are still being given back after their
    previous job, say so to the listener and try again every :data:`POLL` seconds, for at most
    ``limit``."""
    deadline = time.monotonic() + limit
    said = ""
    while True:
        try:
            return start()
        except NodesBeingGivenBack as error:
            if time.monotonic() >= deadline:
                waited = f" for {limit:g} s (revert_wait)" if limit else " (revert_wait: 0)"
                raise NodesBeingGivenBack(f"{error}; waited{waited}; try again later") from None
            if str(error) != said:
                listener(Waiting(f"{error}: waiting for it, at most {limit:g} s"))
                said = str(error)
        if stop.wait(POLL):
            raise KaschedError("interrupted while waiting for the nodes to be given back: nothing was started")
