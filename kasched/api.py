"""The typed API of kasched: every command of the CLI is one call here, and the service exposes the
same calls. Each call checks the caller's rights, runs in a short transaction and returns views."""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.orm import Session, selectinload

from kasched import environments as env_catalog
from kasched import grants, imagestore, inventory, partition_digest, stats, urlfetch
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
from kasched.environments import EnvironmentReference
from kasched.errors import ConflictError, InputError, NotFoundError, PermissionDenied
from kasched.identity import Caller
from kasched.imagestore import ImageStore
from kasched.jobs import JobEnd, JobInfo, StepEvent
from kasched.models import Cluster, Environment, GrantNode, Node, NodeState, Visibility, utcnow
from kasched.nodeset import MAX_NODES, SMALL, check_size, count, expand_many, fold
from kasched.simulated.plugin import SimulatedDrivers
from kasched.stats import StatsFilter, StatsGroup
from kasched.views import Decision, EnvironmentView, GrantView, NodeView, OperationView


@dataclass
class ImportReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


class Kasched:
    """One caller's view of one site."""

    def __init__(self, config: Config, database: Database, bus: Bus, caller: Caller) -> None:
        self.config = config
        self.database = database
        self.bus = bus
        self.caller = caller

    @classmethod
    def open(cls, config: Config, caller: Caller | None = None, *, load_entry_points: bool = True) -> Kasched:
        database = Database(config.database)
        database.upgrade()
        bus = Bus(load_entry_points=load_entry_points, disabled=config.disabled_plugins)
        bus.register(GrantKeeper(database, config, bus), "grant-keeper")
        bus.register(History(database), "history")
        bus.register(Journal(), "journal")
        bus.register(Reclaimer(database, config, bus), "reclaimer")
        bus.register(BuiltinDrivers(), "drivers")
        bus.register(SimulatedDrivers(), "simulated")
        bus.register(StatelessImages(database, config), "stateless")
        bus.register(ConsoleMarks(config), "console-marks")
        return cls(config, database, bus, caller or Caller.current(config.admin_group))

    def close(self) -> None:
        self.database.dispose()

    def as_caller(self, caller: Caller) -> Kasched:
        """The same site seen by another caller (the service serves many users)."""
        return Kasched(self.config, self.database, self.bus, caller)

    # --- Nodes -------------------------------------------------------------------------------------------

    def import_nodes(self, path: str | Path, text: str | None = None) -> ImportReport:
        """Create or update the nodes an inventory file describes (or ``text``, named ``path``). All or
        nothing."""
        self._require_admin("import nodes")
        spec = inventory.load(path) if text is None else inventory.loads(text, source=str(path))
        report = ImportReport()
        try:
            with self.database.session() as session:
                clusters = {c.name: c for c in session.scalars(select(Cluster))}
                existing = {n.name: n for n in session.scalars(select(Node))}
                by_mac = {n.mac: n.name for n in existing.values()}
                by_ip = {n.ip: n.name for n in existing.values()}
                for name in spec.clusters:
                    if name not in clusters:
                        clusters[name] = Cluster(name=name, site=spec.site)
                        session.add(clusters[name])
                    clusters[name].site = spec.site
                for node_spec in spec.nodes:
                    inventory.conflicts_with_database(node_spec, by_mac, by_ip)
                    _upsert_node(existing.get(node_spec.name), node_spec, clusters, session, report)
        except SqlIntegrityError as error:
            raise ConflictError(f"{path}: a name, MAC or IP is used twice: {str(error.orig).splitlines()[0]}") from None
        return report

    def list_nodes(self, pattern: str | None = None, state: str | None = None) -> list[NodeView]:
        query = select(Node).options(selectinload(Node.cluster), selectinload(Node.environment))
        if state:
            query = query.where(Node.state == _node_state(state))
        with self.database.session() as session:
            if pattern:
                names = self.node_names(pattern)
                grants.node_ids_by_name(session, names)
                query = query.where(Node.name.in_(names))
            return sorted((NodeView.of(n) for n in session.scalars(query)), key=lambda v: _natural(v.name))

    def show_node(self, name: str) -> NodeView:
        with self.database.session() as session:
            node = session.scalars(select(Node).where(Node.name == name)).first()
            if node is None:
                raise NotFoundError(f"unknown node {name}")
            return NodeView.of(node)

    def remove_nodes(self, pattern: str) -> list[str]:
        """Remove nodes from the inventory; refused while any of them is in an active grant."""
        self._require_admin("remove nodes")
        names = self.node_names(pattern)
        with self.database.session() as session:
            ids = grants.node_ids_by_name(session, names)
            busy = [g for g in grants.list_grants(session, nodes=names)]
            if busy:
                raise ConflictError(f"{fold(names)}: in the active grant of job {busy[0].job}; revoke it first")
            session.execute(delete(GrantNode).where(GrantNode.node_id.in_(ids.values())))
            session.execute(delete(Node).where(Node.id.in_(ids.values())))
        return names

    def set_node_state(self, pattern: str, state: str) -> list[str]:
        self._require_admin("change node states")
        names = self.node_names(pattern)
        new_state = _node_state(state)
        with self.database.session() as session:
            ids = grants.node_ids_by_name(session, names)
            for node in session.scalars(select(Node).where(Node.id.in_(ids.values()))):
                node.state, node.state_changed_at = new_state, utcnow()
        return names

    # --- Environments ------------------------------------------------------------------------------------

    def add_environment(
        self, path: str | Path, owner: str | None = None, *, text: str | None = None, checked_reads: bool = False
    ) -> EnvironmentView:
        """Add the environment a description file gives (or ``text``, with files relative to ``path``'s
        folder). Its image and scripts are read once, as the caller (who must be able to read them),
        never through a symlink, into kaschedd's store (:mod:`kasched.imagestore`); everything later
        uses those copies. (``checked_reads``: kept for the service; files are always read as the caller.)"""
        if text is None:
            spec = env_catalog.load(path)
        else:
            spec = env_catalog.loads(text, source=str(path), base=Path(path).parent)
        owner = self._may_add(spec, owner)
        store = ImageStore(self.config)
        created: list[str] = []
        forbidden = self._node_addresses() if urlparse(spec.image_location).scheme else set()
        try:
            files = store.ingest(
                spec.image_location, spec.postinstall, self.caller.user, self.caller.is_admin, forbidden, created
            )
            spec.image_location, spec.image_size, spec.sha256 = files.image.path, files.image.size, files.image.sha256
            spec.postinstall = [script.path for script in files.scripts]
            if spec.reference:  # the block list its nodes' partitions are checked against, recorded now
                partition_digest.record(self.config, spec)
            with imagestore.lock:
                if not all(os.path.exists(p) for p in [spec.image_location, *spec.postinstall]):
                    raise ConflictError(f"{spec.name}: a copy was removed meanwhile (another environment's removal): "
                                        "add it again")  # fmt: skip
                return self._insert_environment(spec, owner)
        except BaseException:
            with imagestore.lock:
                store.discard(created, self._store_references())
            raise

    def _may_add(self, spec: env_catalog.EnvironmentSpec, owner: str | None) -> str:
        """The owner of the environment to add, once the caller may add it (before any file is read)."""
        if owner and owner != self.caller.user:
            self._require_admin("add an environment for another user")
        owner = owner or self.caller.user
        if spec.visibility is Visibility.PUBLIC:
            self._require_admin("make an environment public")
        if spec.reference:
            self._require_admin("set the site's reference environment")
        if spec.version is not None:
            with self.database.session() as session:
                if session.scalar(select(Environment.id).where(Environment.name == spec.name,
                                  Environment.owner == owner, Environment.version == spec.version)):  # fmt: skip
                    raise ConflictError(f"environment {spec.name}@{owner}:{spec.version} exists already")
        return owner

    def _insert_environment(self, spec: env_catalog.EnvironmentSpec, owner: str) -> EnvironmentView:
        with self.database.session() as session:
            versions = session.scalars(
                select(Environment.version).where(Environment.name == spec.name, Environment.owner == owner)
            ).all()
            version = spec.version or max(versions, default=0) + 1
            if version in versions:
                raise ConflictError(f"environment {spec.name}@{owner}:{version} exists already")
            if spec.reference:
                for old in session.scalars(select(Environment).where(Environment.reference.is_(True))):
                    old.reference = False
            env = Environment(
                name=spec.name,
                version=version,
                owner=owner,
                description=spec.description,
                visibility=spec.visibility,
                image_kind=spec.image_kind,
                compression=spec.compression,
                image_location=spec.image_location,
                image_size=spec.image_size,
                sha256=spec.sha256,
                kernel=spec.kernel,
                initrd=spec.initrd,
                cmdline=spec.cmdline,
                postinstall=spec.postinstall,
                destructive=spec.destructive,
                reference=spec.reference,
            )
            session.add(env)
            session.flush()
            return EnvironmentView.of(env)

    def _node_addresses(self) -> set[str]:
        """The inventory's node and BMC addresses: never a source of URL images."""
        with self.database.session() as session:
            rows = session.execute(select(Node.ip, Node.bmc_address)).all()
        return urlfetch.management_addresses(a for row in rows for a in row if a)

    def _store_references(self) -> set[str]:
        """Every store file an environment uses."""
        with self.database.session() as session:
            rows = session.execute(select(Environment.image_location, Environment.postinstall)).all()
        return {location for location, _ in rows} | {script for _, scripts in rows for script in scripts or []}

    def list_environments(
        self, *, include_shared: bool = False, owner: str | None = None, name: str | None = None
    ) -> list[EnvironmentView]:
        """Own and public environments; shared ones (and, for admins, all) with ``include_shared``."""
        with self.database.session() as session:
            query = select(Environment).order_by(Environment.name, Environment.owner, Environment.version)
            if owner:
                query = query.where(Environment.owner == owner)
            if name:
                query = query.where(Environment.name == name)
            views = [
                EnvironmentView.of(e)
                for e in session.scalars(query)
                if self._sees(e, listing=True, everything=include_shared)
            ]
        return views

    def show_environment(self, reference: str) -> EnvironmentView:
        with self.database.session() as session:
            return EnvironmentView.of(self._resolve(session, EnvironmentReference.parse(reference)))

    def check_environment(self, reference: str) -> EnvironmentView:
        """Re-read kaschedd's copies (image, scripts) and compare them with what was read at add time."""
        env = self.show_environment(reference)
        ImageStore(self.config).verify(env.image_location, env.sha256, env.postinstall, env.label)
        return env

    def remove_environment(self, reference: str) -> EnvironmentView:
        """Remove an environment, and the store copies no other environment uses."""
        with imagestore.lock:
            with self.database.session() as session:
                env = self._resolve(session, EnvironmentReference.parse(reference))
                if env.owner != self.caller.user:
                    self._require_admin(f"remove {env.name}@{env.owner}:{env.version}, owned by {env.owner}")
                if env.reference:
                    raise ConflictError(
                        f"{env.name}@{env.owner}:{env.version} is the site's reference environment; "
                        "add another one with 'reference: true' first"
                    )
                view = EnvironmentView.of(env)
                session.delete(env)
            ImageStore(self.config).discard([view.image_location, *view.postinstall], self._store_references())
        return view

    def reference_environment(self) -> EnvironmentView | None:
        with self.database.session() as session:
            # the newest one flagged: a site installs a new reference as a new version
            newest = select(Environment).where(Environment.reference.is_(True)).order_by(Environment.id.desc())
            env = session.scalars(newest).first()
            return EnvironmentView.of(env) if env else None

    def _resolve(self, session: Session, ref: EnvironmentReference) -> Environment:
        query = select(Environment).where(Environment.name == ref.name)
        if ref.owner:
            query = query.where(Environment.owner == ref.owner)
        if ref.version is not None:
            query = query.where(Environment.version == ref.version)
        candidates = [e for e in session.scalars(query) if self._sees(e)]
        if not candidates:
            raise NotFoundError(f"no environment {ref} that you ({self.caller.user}) may use")
        mine = [e for e in candidates if e.owner == self.caller.user]
        pool = mine if (mine and not ref.owner) else candidates
        owners = sorted({e.owner for e in pool})
        if len(owners) > 1:
            raise InputError(
                f"{ref} is ambiguous: name one of {', '.join(f'{ref.name}@{o}' for o in owners)}", field="environment"
            )
        return max(pool, key=lambda e: e.version)

    def _sees(self, env: Environment, *, listing: bool = False, everything: bool = True) -> bool:
        if env.owner == self.caller.user or env.visibility is Visibility.PUBLIC:
            return True
        if self.caller.is_admin:
            return everything
        return env.visibility is Visibility.SHARED and (everything or not listing)

    # --- Rights --------------------------------------------------------------------------------------------

    def grant(self, user: str, nodes: str, hours: float, job_id: str | None = None) -> GrantView:
        """An admin's grant, outside any scheduler (maintenance, tests)."""
        self._require_admin("grant nodes by hand")
        if not math.isfinite(hours) or hours <= 0:
            raise InputError(f"{hours} is not a positive number of hours", field="hours")
        job = JobInfo(
            scheduler="admin",
            cluster=self.config.site,
            job_id=job_id or f"manual-{secrets.token_hex(4)}",
            user=user,
            nodes=tuple(self.node_names(nodes)),
            walltime=hours * 3600,
        )
        return self.job_started(job)

    def revoke(self, grant_id: int, reason: str = "revoked by an admin") -> GrantView:
        self._require_admin("revoke grants by hand")
        with self.database.session() as session:
            view, revoked_now = grants.revoke_by_id(session, grant_id, f"{reason} ({self.caller.user})")
        if revoked_now:
            self.bus.grant_revoked(view, reason)
        return view

    def rights(
        self, *, user: str | None = None, nodes: str | None = None, include_ended: bool = False
    ) -> list[GrantView]:
        """Who may deploy which nodes, why (scheduler, job) and until when."""
        names = self.node_names(nodes) if nodes else None
        with self.database.session() as session:
            return grants.list_grants(session, user=user, nodes=names, include_ended=include_ended)

    def check(self, nodes: Sequence[str] | str, user: str | None = None) -> Decision:
        """May ``user`` (default: the caller) deploy ``nodes`` now? Admins may always, on known nodes."""
        names = self.node_names(nodes) if isinstance(nodes, str) else list(nodes)
        if user and user != self.caller.user:
            self._require_admin("check another user's rights")
        who = user or self.caller.user
        is_admin = self.caller.is_admin and who == self.caller.user
        with self.database.session() as session:
            return grants.check(session, who, names, is_admin=is_admin)

    # --- Jobs (called by the scheduler hooks) --------------------------------------------------------------

    def job_started(self, job: JobInfo) -> GrantView:
        self._require_admin("record a job start")
        created = self.bus.job_started(job)
        if not created:
            raise NotFoundError("no plugin created a grant (is the grant-keeper plugin disabled?)")
        return created[0]

    def job_ended(self, end: JobEnd) -> GrantView:
        self._require_admin("record a job end")
        revoked = self.bus.job_ended(end)
        if not revoked:
            raise NotFoundError("no plugin revoked a grant (is the grant-keeper plugin disabled?)")
        return revoked[0]

    # --- Statistics ------------------------------------------------------------------------------------------

    def record_step(self, event: StepEvent) -> None:
        self.bus.deploy_step(event)

    def stats(self, selection: StatsFilter) -> list[OperationView]:
        """Operations of the history: an ordinary user's own only, an admin's anyone's."""
        with self.database.session() as session:
            return stats.select_operations(session, stats.own(selection, self.caller))

    def stats_summary(self, selection: StatsFilter, by: str) -> list[StatsGroup]:
        with self.database.session() as session:
            return stats.summarise(session, stats.own(selection, self.caller), by)

    def node_names(self, pattern: str) -> list[str]:
        """The names of a node range, refused before it is expanded when it names more nodes than the
        inventory holds (a few bytes must not cost kaschedd its memory)."""
        names = count(pattern)
        if names > SMALL:
            with self.database.session() as session:
                held = session.scalar(select(func.count(Node.id))) or 0
            check_size(pattern, min(held, MAX_NODES), what="the inventory holds")
        return expand_many([pattern], limit=None if names <= SMALL else MAX_NODES)

    def _require_admin(self, action: str) -> None:
        if not self.caller.is_admin:
            raise PermissionDenied(
                f"only admins may {action} (you are {self.caller.user}; admins are root "
                f"and the members of group {self.config.admin_group})"
            )


def _upsert_node(
    node: Node | None, spec: inventory.NodeSpec, clusters: dict[str, Cluster], session: Session, report: ImportReport
) -> None:
    values = {k: v for k, v in vars(spec).items() if k != "cluster"}
    if node is None:
        session.add(Node(cluster=clusters[spec.cluster], **values))
        report.added.append(spec.name)
        return
    changed = node.cluster is not clusters[spec.cluster] or any(getattr(node, k) != v for k, v in values.items())
    node.cluster = clusters[spec.cluster]
    for key, value in values.items():
        setattr(node, key, value)
    (report.updated if changed else report.unchanged).append(spec.name)


def _node_state(state: str) -> NodeState:
    try:
        return NodeState(state)
    except ValueError:
        raise InputError(f"{state!r} is not one of {', '.join(s.value for s in NodeState)}", field="state") from None


def _natural(name: str) -> list[object]:
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
