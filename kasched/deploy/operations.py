"""Operations on nodes: deploy an environment, revert to the reference one, reboot, power.

Each operation checks the caller's grants and its input before touching a node, takes its nodes
atomically (a busy node is refused), runs a :class:`~kasched.deploy.workflow.Workflow`, records every
node's outcome and every step in the history, and leaves every node in a known state, also when it
is cancelled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

from kasched import grants
from kasched.api import Kasched
from kasched.bootkeys import BootKeys
from kasched.builtin.stateless import StatelessImages
from kasched.config import Config
from kasched.deploy import plans, records, steps, transports
from kasched.deploy.nodes import NodeShell
from kasched.deploy.targets import targets
from kasched.deploy.workflow import (
    ProgressListener,
    TransferReport,
    Workflow,
)
from kasched.drivers.base import NodeTarget, PowerDriver
from kasched.drivers.reboot import RebootLevel
from kasched.errors import ConfigError, ConflictError, InputError, PermissionDenied
from kasched.imagestore import ImageStore
from kasched.messages import StepEvent
from kasched.models import NodeState, OperationKind, utcnow
from kasched.nodeset import fold
from kasched.partition_digest import BlockList, expected_blocks
from kasched.rates import rate_bits
from kasched.results import GroupResult, run_on_node
from kasched.transports.chain import BroadcastOptions
from kasched.views import EnvironmentView, NodeView

CANCEL_POLL = 1.0


@dataclass(frozen=True)
class OperationResult:
    """An operation's record (its id, kind and final state) and one :class:`NodeResult` per node."""

    deployment_id: str
    kind: str
    state: str
    results: GroupResult

    @property
    def ok(self) -> bool:
        return self.results.ok

    @property
    def succeeded(self) -> list[str]:
        return self.results.succeeded

    @property
    def failed(self) -> list[str]:
        return self.results.failed


@dataclass
class PendingOperation:
    """An operation that passed every check and holds its nodes; :meth:`run` does the work."""

    operations: Operations
    deployment_id: str
    kind: OperationKind
    names: list[str]
    env: EnvironmentView | None
    context: steps.StepContext
    plan: plans.Plan  # what the workflow runs (kasched.deploy.plans)
    final: NodeState
    environment_id: int | None

    def run(self) -> OperationResult:
        return self.operations.execute(self)


class Operations:
    """Deploy, revert and reboot for one caller, through the API's database, bus and configuration."""

    def __init__(
        self,
        api: Kasched,
        *,
        progress: ProgressListener | None = None,
        cancel: threading.Event | None = None,
        fanout: int = 0,
        reboot_timeout: float | None = None,
        broadcast: BroadcastOptions | None = None,
        releasing: bool = False,
    ) -> None:
        self.api = api
        # An admin giving nodes back (a job's end, reconcile): nodes an active grant or another operation
        # holds when the operation starts are left out, not refused (records.releasable).
        self.releasing = releasing
        self.progress = progress or (lambda report: None)
        self.cancel = cancel or threading.Event()
        self.fanout = fanout
        self.reboot_timeout = reboot_timeout or api.config.reboot_timeout
        self.broadcast_options = broadcast

    def deploy(
        self, environment: str, nodes: str | Sequence[str], user_key: str | None = None, *, stateless: bool = False
    ) -> OperationResult:
        return self.prepare_deploy(environment, nodes, user_key, stateless=stateless).run()

    def revert(self, nodes: str | Sequence[str]) -> OperationResult:
        return self.prepare_revert(nodes).run()

    def reboot(
        self, nodes: str | Sequence[str], level: RebootLevel = RebootLevel.SOFT, to: str = "reference"
    ) -> OperationResult:
        return self.prepare_reboot(nodes, level, to).run()

    def prepare_deploy(
        self, environment: str, nodes: str | Sequence[str], user_key: str | None = None, *, stateless: bool = False
    ) -> PendingOperation:
        if user_key is not None and not user_key.strip().startswith(("ssh-", "ecdsa-", "sk-")):
            raise InputError("this is not an OpenSSH public key", field="key")
        names = self._allowed(nodes)
        env = self.api.show_environment(environment)
        with self.api.database.session() as session:  # before the image's checksum (seconds per GB)
            records.refuse_busy(session, names)  # asked again where the nodes are taken
        # kaschedd's copies (image, scripts), never the owner's files: before any reboot
        ImageStore(self.api.config).verify(env.image_location, env.sha256, env.postinstall, env.label)
        if stateless:
            return self._stateless(names, env)
        return self._run(OperationKind.DEPLOY, names, env, self._deploy_partition, user_key, plans.PLANS["deploy"])

    def _stateless(self, names: list[str], env: EnvironmentView) -> PendingOperation:
        if env.image_kind != "raw" or env.compression != "gz":
            raise InputError(
                f"{env.label} cannot boot stateless: its image must be a gzip'd cpio initramfs "
                "(kind raw, compression gz)",
                field="stateless",
            )
        files = self._publish_stateless(env, names)
        plan = plans.PLANS["deploy-stateless"]
        return self._run(OperationKind.DEPLOY, names, env, self._deploy_partition, None, plan, stateless_files=files)

    def _publish_stateless(self, env: EnvironmentView, names: list[str]) -> tuple[str, str]:
        """Publish the image (kaschedd's copy) where the nodes' network boot finds it, for the caller's
        grants on ``names`` (it is removed when they end: :mod:`kasched.builtin.stateless`)."""
        with self.api.database.session() as session:
            grant_ids = [g.id for g in grants.list_grants(session, user=self.api.caller.user, nodes=names)]
        relative = StatelessImages(self.api.database, self.api.config).publish(env, grant_ids)
        return env.kernel.lstrip("/") or "deploy/vmlinuz", relative

    def prepare_revert(self, nodes: str | Sequence[str]) -> PendingOperation:
        """Back to the verified reference environment, by a revert the node cannot refuse
        (:mod:`kasched.deploy.revert`)."""
        names = self._allowed(nodes)
        reference = self.api.reference_environment()
        if reference is None:
            raise ConfigError("the site has no reference environment (add one with 'reference: true')")
        try:  # the site's image, block by block (checked against kaschedd's copy) before any node is touched
            blocks: BlockList | None = expected_blocks(self.api.config, reference)
        except InputError:  # not a raw image: no digest; the revert writes it whole
            blocks = None
        plan = plans.PLANS["revert"]
        pending = self._run(
            OperationKind.REVERT, names, reference, self._reference_partition, None, plan, final=NodeState.REFERENCE
        )
        pending.context.reference_blocks = blocks
        return pending

    def prepare_reboot(
        self, nodes: str | Sequence[str], level: RebootLevel = RebootLevel.SOFT, to: str = "reference"
    ) -> PendingOperation:
        """Reboot, starting at ``level`` and escalating, into ``to``: ``reference``, ``deploy`` (the
        deployment system) or an environment already deployed on the nodes' deploy partition."""
        if to == "deploy":
            names = self._allowed(nodes)
            env = None  # the deployment system is the site's, not an environment of the catalog
            return self._run(
                OperationKind.REBOOT,
                names,
                env,
                lambda n: n.deploy_partition,
                None,
                plans.from_level(plans.PLANS["reboot-to-deploy"], level),
                final=NodeState.DEPLOYED,
                record_environment=False,
            )
        if to == "reference":
            names = self._allowed(nodes)
            env = self.api.reference_environment() or self._no_reference()
            partition = self._reference_partition
            final = NodeState.REFERENCE
        else:
            names = self._allowed(nodes)
            env = self.api.show_environment(to)
            partition, final = self._deploy_partition, NodeState.DEPLOYED
        plan = plans.from_level(plans.PLANS["reboot"], level)
        return self._run(OperationKind.REBOOT, names, env, partition, None, plan, final=final)

    def power(self, nodes: str | Sequence[str], action: str) -> GroupResult:
        """Power ``on``, ``off`` or ``status`` through each node's BMC driver; one result per node."""
        if action not in ("on", "off", "status"):
            raise InputError(f"{action!r} is not one of on, off, status", field="power")
        names = self._allowed(nodes)
        views = self._views(names)
        node_targets = {t.name: t for t in targets(self.api.config, views)}
        drivers = self._power_drivers(views, node_targets)
        if action != "status":  # whatever boots now, kasched did not boot it: the next revert cycles it
            with self.api.database.session() as session:
                records.distrust(session, names)
        results = GroupResult()
        for name in names:
            driver, target = drivers[name], node_targets[name]
            result = run_on_node(name, f"power_{action}", partial(getattr(driver, action), target))
            if action == "status" and result.ok:
                result.value = str(result.value)
            results.add(result)
            self.api.record_step(
                StepEvent(
                    kind=OperationKind.POWER,
                    node=name,
                    user=self.api.caller.user,
                    step=f"power_{action}",
                    variant="",
                    attempt=1,
                    started_at=utcnow(),
                    duration=result.duration,
                    ok=result.ok,
                    error=result.error,
                )
            )
        return results

    def _views(self, names: list[str]) -> list[NodeView]:
        """The nodes' views in one query (one per node cost 2.9 ms a node at 1,000 nodes)."""
        found = {view.name: view for view in self.api.list_nodes(fold(names))} if names else {}
        return [found[name] if name in found else self.api.show_node(name) for name in names]

    @staticmethod
    def _reference_partition(node: NodeTarget) -> int:
        return node.reference_partition

    @staticmethod
    def _deploy_partition(node: NodeTarget) -> int:
        return node.deploy_partition

    @staticmethod
    def _no_reference() -> EnvironmentView:
        raise ConfigError("the site has no reference environment (add one with 'reference: true')")

    # --- the common frame of every operation -----------------------------------------------------------

    def _allowed(self, nodes: str | Sequence[str]) -> list[str]:
        names = self.api.node_names(nodes) if isinstance(nodes, str) else list(dict.fromkeys(nodes))
        decision = self.api.check(names)
        if not decision.allowed:
            raise PermissionDenied(f"{self.api.caller.user} may not deploy these nodes: {decision.reason()}")
        return names

    def _run(
        self,
        kind: OperationKind,
        names: list[str],
        env: EnvironmentView | None,
        partition: Callable[[NodeTarget], int],
        user_key: str | None,
        plan: plans.Plan,
        final: NodeState = NodeState.DEPLOYED,
        record_environment: bool = True,
        stateless_files: tuple[str, str] = ("", ""),
    ) -> PendingOperation:
        """Everything that can be refused is checked here; then the nodes are taken and recorded."""
        views = self._views(names)
        context = self._make_context(views, env, partition, user_key, stateless_files)
        busy = NodeState.REVERTING if kind == OperationKind.REVERT else NodeState.DEPLOYING
        caller = self.api.caller
        with self.api.database.session() as session:  # the grant is checked again where the nodes are taken
            if self.releasing:
                free = set(records.releasable(session, names))
                names = [name for name in names if name in free]
                if not names:
                    raise ConflictError("nothing to give back: every node is granted, busy or gone")
            label = env.label if env else None
            deployment_id = records.start(
                session, kind, caller.user, label, names, busy, is_admin=caller.is_admin, gives_back=self.releasing
            )
            trust = records.take_trust(session, names)  # what kasched vouched for, read with the nodes taken
        context.shell.pins.update(trust.pins)
        context.trusted = set(trust.trusted)
        env_id = self._environment_id(env) if record_environment else None
        return PendingOperation(self, deployment_id, kind, names, env, context, plan, final, env_id)

    def execute(self, pending: PendingOperation) -> OperationResult:
        """Run a prepared operation's workflow, record its outcome, release its nodes."""
        watcher = _CancelWatcher(self.api, pending.deployment_id, self.cancel)
        watcher.start()
        try:
            workflow = Workflow(
                plans.bind(pending.plan, pending.context, self.reboot_timeout),
                cancel=self.cancel,
                listener=lambda r: self._on_step(pending.kind, pending.deployment_id, pending.env, r),
                guard=lambda: self._stop_reason(pending.deployment_id),
                on_attempt=lambda reports: self._on_attempt(pending.deployment_id, reports),
            )
            outcomes = workflow.run(pending.names)
        finally:
            watcher.stop()
        return self._finish(pending, outcomes)

    def _finish(self, pending: PendingOperation, outcomes: GroupResult) -> OperationResult:
        with self.api.database.session() as session:
            rows = [(node, o.step, o.ok, o.error, o.duration) for node, o in outcomes.items()]
            records.record_nodes(session, pending.deployment_id, rows)
            states = {n: pending.final if o.ok else NodeState.DEPLOY_FAILED for n, o in outcomes.items()}
            ctx = pending.context
            trust = records.Trust(dict(ctx.shell.pins), frozenset(ctx.trusted))
            state = records.finish(
                session,
                pending.deployment_id,
                states,
                pending.environment_id,
                cancelled=self.cancel.is_set(),
                trust=trust,
            )
        return OperationResult(pending.deployment_id, pending.kind, state.value, outcomes)

    def _stop_reason(self, deployment_id: str) -> str | None:
        """Asked before each attempt of each step: why the operation must stop (its grant ended)."""
        with self.api.database.session() as session:
            return records.stop_reason(session, deployment_id)

    def _environment_id(self, env: EnvironmentView | None) -> int | None:
        if env is None:
            return None
        from sqlalchemy import select

        from kasched.models import Environment

        with self.api.database.session() as session:
            return session.scalar(
                select(Environment.id).where(
                    Environment.name == env.name, Environment.owner == env.owner, Environment.version == env.version
                )
            )

    def _on_step(self, kind: str, deployment_id: str, env: EnvironmentView | None, report: StepEvent) -> None:
        self.api.record_step(
            replace(
                report,
                kind=kind,
                user=self.api.caller.user,
                environment=env.label if env else None,
                deployment_id=deployment_id,
            )
        )
        self.progress(report)

    def _on_attempt(self, deployment_id: str, reports: list[StepEvent]) -> None:
        """Live per-node progress for --status and the service: every node of an attempt in one
        transaction (one per node made a 1,000-node revert wait on SQLite's commits, bench/scale.py)."""
        rows = [(r.node, r.step, None, None if r.ok else r.error, r.duration) for r in reports]
        with self.api.database.session() as session:
            records.record_nodes(session, deployment_id, rows)

    def _make_context(
        self,
        views: list[NodeView],
        env: EnvironmentView | None,
        partition: Callable[[NodeTarget], int],
        user_key: str | None,
        stateless_files: tuple[str, str],
    ) -> steps.StepContext:
        config = self.api.config
        node_targets = {t.name: t for t in targets(config, views)}
        power = self._power_drivers(views, node_targets)
        boot_factories = self.api.bus.boot_drivers()
        if config.boot_driver not in boot_factories:
            raise ConfigError(
                f"no {config.boot_driver!r} boot driver is registered (is the 'drivers' plugin disabled?)"
            )
        method = transports.exec_method(self.api.bus, config)
        soft = method.soft_power() if method is not None else self.api.bus.power_drivers()["ssh"](config)
        shell = NodeShell(config.service_key, {v.name: v.ip for v in views}, fanout=self.fanout, method=method)
        return steps.StepContext(
            targets=node_targets,
            placement={v.name: (v.switch, v.rack) for v in views},
            power=power,
            soft=soft,
            boot=boot_factories[config.boot_driver](config),
            shell=shell,
            environment=env,
            partition=partition,
            user_key=user_key,
            reboot_timeout=self.reboot_timeout,
            broadcast=self.broadcast_options or site_broadcast_options(config),
            stateless_kernel=stateless_files[0],
            stateless_initrd=stateless_files[1],
            on_transfer=lambda sent, elapsed, done: self.progress(TransferReport("broadcast", sent, elapsed, done)),
            keys=BootKeys(config.boot_dir),
            wait_up=method.wait_up if method is not None else None,
            broadcast_method=transports.broadcast_method(self.api.bus, config),
        )

    def _power_drivers(self, views: list[NodeView], node_targets: dict[str, NodeTarget]) -> dict[str, PowerDriver]:
        factories = self.api.bus.power_drivers()
        built: dict[str, PowerDriver] = {}
        power = {}
        for view in views:
            if view.bmc_driver not in factories:
                raise ConfigError(
                    f"node {view.name}: no power driver {view.bmc_driver!r} (installed: {', '.join(sorted(factories))})"
                )
            if view.bmc_driver not in built:
                built[view.bmc_driver] = factories[view.bmc_driver](self.api.config)
            driver = built[view.bmc_driver]
            driver.validate(node_targets[view.name])
            power[view.name] = driver
        return power


def site_broadcast_options(config: Config) -> BroadcastOptions:
    """The chain's options from the site's settings: its timeouts for a dead node, the rate the server
    sends at, at most, and the address nodes report to."""
    return BroadcastOptions(
        stall_timeout=config.broadcast_stall_timeout,
        ack_timeout=config.broadcast_ack_timeout,
        source_rate=rate_bits(config.broadcast_source_rate) / 8 if config.broadcast_source_rate else None,
        report_host=config.service_address or None,
    )


class _CancelWatcher:
    """Turns a cancel request stored by another process (``kasched deploy --cancel ID``) into the event."""

    def __init__(self, api: Kasched, deployment_id: str, cancel: threading.Event) -> None:
        self.api, self.deployment_id, self.cancel = api, deployment_id, cancel
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="kasched-cancel-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(CANCEL_POLL * 2)

    def _watch(self) -> None:
        while not self.stopped.wait(CANCEL_POLL):
            with self.api.database.session() as session:
                if records.cancel_requested(session, self.deployment_id):
                    self.cancel.set()
                    return
