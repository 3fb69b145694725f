"""The composition root: builds a site's parts and wires them together, so that no part imports the
parts above it. :func:`open_site` opens the database (brought to the newest schema), builds the plugin
bus with the built-in plugins (each given what it needs, e.g. the reclaimer its :class:`DeployGiveBack`)
and the installed ones, and returns the typed API for one caller; :func:`open_local` wraps it into the
front door in this process (:class:`kasched.local.LocalKasched`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kasched.api import Kasched
from kasched.builtin.console_marks import ConsoleMarks
from kasched.builtin.drivers import BuiltinDrivers
from kasched.builtin.grant_keeper import GrantKeeper
from kasched.builtin.history import History
from kasched.builtin.journal import Journal
from kasched.builtin.reclaimer import Reclaimer
from kasched.builtin.stateless import StatelessImages
from kasched.bus import Bus
from kasched.config import Config
from kasched.db import Database
from kasched.deploy import reclaim
from kasched.deploy.release import release
from kasched.identity import Caller
from kasched.local import LocalKasched
from kasched.simulated.plugin import SimulatedDrivers
from kasched.views import GrantView

if TYPE_CHECKING:
    from kasched.front import KaschedFront
    from kasched.service.remote import RemoteKasched

    def _both_are_fronts(local: LocalKasched, remote: RemoteKasched) -> tuple[KaschedFront, KaschedFront]:
        """Checked by the type checker: both implementations satisfy the front door's protocol."""
        return local, remote


def open_site(config: Config, caller: Caller | None = None, *, load_entry_points: bool = True) -> Kasched:
    """The typed API of the site ``config`` describes, for ``caller`` (default: this process's user)."""
    database = Database(config.database)
    database.upgrade()
    bus = Bus(load_entry_points=load_entry_points, disabled=config.disabled_plugins)
    give_back = DeployGiveBack(database, config, bus)
    bus.register(GrantKeeper(database, config, bus, give_back), "grant-keeper")
    bus.register(History(database), "history")
    bus.register(Journal(), "journal")
    bus.register(Reclaimer(config, bus, give_back), "reclaimer")
    bus.register(BuiltinDrivers(), "drivers")
    bus.register(SimulatedDrivers(), "simulated")
    bus.register(StatelessImages(database, config), "stateless")
    bus.register(ConsoleMarks(config), "console-marks")
    return Kasched(config, database, bus, caller or Caller.current(config.admin_group))


def open_local(config: Config, caller: Caller | None = None) -> LocalKasched:
    """The front door in this process, on the site's database."""
    return LocalKasched(open_site(config, caller))


class DeployGiveBack:
    """The :class:`~kasched.builtin.reclaimer.GiveBack` of the reclaimer and the grant keeper, from
    :mod:`kasched.deploy.reclaim` and :mod:`kasched.deploy.release`."""

    def __init__(self, database: Database, config: Config, bus: Bus) -> None:
        self.database, self.config, self.bus = database, config, bus

    def is_hand_made(self, grant: GrantView) -> bool:
        return grant.scheduler == reclaim.HAND_MADE

    def plan(self, grant: GrantView) -> reclaim.ReclaimPlan:
        with self.database.session() as session:
            return reclaim.plan(session, grant.id, grant.nodes)

    def start(self, grant: GrantView) -> tuple[int, Path]:
        return reclaim.spawn(self.config, grant.id), reclaim.log_path(self.config, grant.id)

    def release(self, grant: GrantView, back: Sequence[str], kept: Mapping[str, str]) -> None:
        release(self.bus, grant.scheduler, grant.job_id, back, kept)

    def release_as_they_are(self, grant: GrantView) -> None:
        with self.database.session() as session:
            back, kept = reclaim.settled_release(session, grant)
        release(self.bus, grant.scheduler, grant.job_id, back, kept)
