"""The steps of a deployment, as workflow actions: each takes nodes, a deadline and a cancel event,
and returns one result per node (see :mod:`kasched.deploy.workflow`).

* set up the deployment system: the running reference system as is ("nomini"), or boot profile
  ``deploy`` then a reboot (escalating), checked from the node (kexec: :mod:`kasched.deploy.kexec`);
* broadcast: prepare the target partition while a chain agent starts on every node (one SSH session
  per node), stream the image once
  through the chain (or to each node alone, the unicast fallback), checked by sha256 on every node;
* configure: hostname, the user's SSH key, the environment's postinstall scripts;
* boot: boot profile ``local partition N``, then a reboot through the firmware (or kexec, in
  :mod:`kasched.deploy.kexec`); check from the node that partition N booted.
"""

from __future__ import annotations

import base64
import os
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, BinaryIO, cast

from kasched import imagestore
from kasched.bootkeys import BootKeys
from kasched.deploy.nodes import NO_PIN, SYSTEM_PROBE, NodeShell, checked, stdout_of
from kasched.deploy.transfer import CountingReader, TransferMeter
from kasched.drivers.base import BootDevice, BootDriver, BootTarget, NodeTarget, PowerDriver
from kasched.drivers.reboot import Rebooter, RebootLevel, WaitUp, port_cycle
from kasched.drivers.transport import BroadcastMethod
from kasched.errors import KaschedError
from kasched.partition_digest import BlockList
from kasched.partition_verify import PartitionCheck
from kasched.results import GroupResult, NodeResult, run_on_node
from kasched.transports.chain import BroadcastOptions, ChainNode
from kasched.transports.chain_ssh import broadcast_over_ssh
from kasched.transports.ssh_session import CommandOutput
from kasched.views import EnvironmentView

MOUNT = "/mnt/kasched"
AGENT_PORT = 7373


@dataclass
class StepContext:
    """What the steps of one operation share."""

    targets: dict[str, NodeTarget]
    placement: dict[str, tuple[str, str]]  # node -> (switch, rack)
    power: dict[str, PowerDriver]  # node -> its BMC's driver
    soft: PowerDriver  # reboot through the node's own system (SSH)
    boot: BootDriver
    shell: NodeShell
    environment: EnvironmentView | None  # None: only the deployment system is booted
    partition: Callable[[NodeTarget], int]  # the partition the environment goes to
    user_key: str | None = None
    reboot_timeout: float = 120.0
    command_timeout: float = 120.0
    broadcast: BroadcastOptions = field(default_factory=BroadcastOptions)
    broken: set[str] = field(default_factory=set)  # nodes whose running system cannot run a command
    stateless_kernel: str = ""  # boot paths (relative to the boot directory) of a stateless boot
    stateless_initrd: str = ""
    on_transfer: Callable[[int, float, bool], None] | None = None  # (bytes sent, seconds, a stream ended)
    keys: BootKeys | None = None  # per-boot host keys (None: no boot of a trusted system)
    reference_blocks: BlockList | None = None  # the site's reference image, block by block (a revert)
    differing: dict[str, PartitionCheck] = field(default_factory=dict)  # node -> what its verify found
    # Nodes whose running system kasched vouches for: the verified reference no user held since, or a
    # system booted in this operation with its per-boot key checked. Only they get a soft reboot.
    trusted: set[str] = field(default_factory=set)
    # The site's transports when they are not SSH's (exec_method, broadcast_method): how a reboot sees a
    # node back, and how the image is sent (None: sshd's port, the chain over SSH).
    wait_up: WaitUp | None = None
    broadcast_method: BroadcastMethod | None = None

    @property
    def env(self) -> EnvironmentView:
        """The environment of the operation (the steps that write or boot one need it)."""
        if self.environment is None:
            raise KaschedError("this step needs an environment, and the operation has none")
        return self.environment

    def nodes(self, names: Sequence[str]) -> list[NodeTarget]:
        return [self.targets[name] for name in names]


# --- Setting up the deployment system, and booting ------------------------------------------------


def set_profiles(ctx: StepContext, names: Sequence[str], target: BootTarget, **profile: Any) -> GroupResult:
    results = GroupResult()
    for node in ctx.nodes(names):
        results.add(run_on_node(node.name, "boot profile", partial(ctx.boot.set_profile, node, target, **profile)))
    return results


def reboot(ctx: StepContext, names: Sequence[str], levels: Sequence[RebootLevel], deadline: float) -> GroupResult:
    """Reboot nodes, grouped by BMC driver, escalating through ``levels``. No soft level for a node
    whose running system kasched does not vouch for (a user's system can ignore its own ``reboot``
    or fake one), nor for a broken one: the BMC's reset and power cycle cannot be refused."""
    groups: dict[tuple[int, bool], list[NodeTarget]] = {}
    for node in ctx.nodes(names):
        no_soft = node.name in ctx.broken or node.name not in ctx.trusted
        node = replace(node, host_key=ctx.shell.pins.get(node.name))  # a soft reboot goes to the pinned system
        groups.setdefault((id(ctx.power[node.name]), no_soft), []).append(node)
    results = GroupResult()
    for (_, no_soft), group in groups.items():
        usable = [level for level in levels if not (no_soft and level is RebootLevel.SOFT)] or [RebootLevel.HARD]
        rebooter = Rebooter(
            power=ctx.power[group[0].name],
            soft=ctx.soft,
            levels=usable,
            timeout=ctx.reboot_timeout,
            boot_device=BootDevice.NETWORK,
            wait_up=ctx.wait_up or port_cycle(),
        )
        for result in rebooter.reboot(group).values():
            results.add(result)
    return results


REBOOT_TOKEN = "/run/kasched-reboot-token"


def leave_token(ctx: StepContext, names: Sequence[str]) -> GroupResult:
    """Before a reboot into a system kasched does not vouch for: a file in /run (a tmpfs, empty after
    any boot), so the check can tell the node rebooted (only a hint: a user's system can delete it; a
    system kasched boots proves its boot with its per-boot key instead). A node that cannot be reached
    is down already (and will have no token either). A node that answers but cannot write the token
    runs a broken system: it gets no soft reboot."""
    written = ctx.shell.run(names, f"touch {REBOOT_TOKEN}", 15, trust_any=True)
    results = GroupResult()
    for name in names:
        result = written.get(name)
        if result is not None and not result.ok and isinstance(result.value, CommandOutput):
            ctx.broken.add(name)
        results.add(NodeResult(name, True, "reboot token"))
    return results


def check_system(
    ctx: StepContext, names: Sequence[str], expected: str, what: str, *, pinned: bool = False
) -> GroupResult:
    """From the node side: it rebooted (no token left in /run) and its command line contains
    ``expected``. ``pinned``: the node must answer with the host key kaschedd gave this boot (what
    proves the boot; the token and the command line are then only the system's own words)."""
    probe = f"{SYSTEM_PROBE}; test ! -e {REBOOT_TOKEN} || echo kasched-not-rebooted"
    probed = checked(ctx.shell.run(names, probe, ctx.command_timeout, trust_any=not pinned), what)
    results = GroupResult()
    for name, result in probed.items():
        output = stdout_of(result)
        if result.ok and "kasched-not-rebooted" in output:
            result = NodeResult(name, False, what, f"{what}: the node did not reboot", result.duration)
        elif result.ok and expected not in output:
            result = NodeResult(
                name, False, what, f"{what}: booted {output.strip()!r}, not {expected!r}", result.duration
            )
        results.add(result)
    return results


def boot_into(
    ctx: StepContext,
    names: Sequence[str],
    target: BootTarget,
    expected: str,
    what: str,
    levels: Sequence[RebootLevel],
    deadline: float,
    *,
    trusted: bool = False,
    **profile: Any,
) -> GroupResult:
    """Profile, token, reboot, check: the phases of every boot, chained per node. ``trusted``: the
    system booted is kasched's (the deployment system, the verified reference): each node gets a new
    host key in its boot files and must answer with it (:mod:`kasched.bootkeys`); else the booted
    system is the user's, and nothing pinned is left for it."""
    if trusted:
        return boot_trusted(ctx, names, target, expected, what, levels, deadline, **profile)
    results = chain_phases(
        names,
        [
            lambda alive: set_profiles(ctx, alive, target, **profile),
            lambda alive: leave_token(ctx, alive),
            lambda alive: reboot(ctx, alive, levels, deadline),
            lambda alive: check_system(ctx, alive, expected, what),
        ],
    )
    forget(ctx, names)
    return results


def boot_trusted(
    ctx: StepContext,
    names: Sequence[str],
    target: BootTarget,
    expected: str,
    what: str,
    levels: Sequence[RebootLevel],
    deadline: float,
    **profile: Any,
) -> GroupResult:
    """A boot of a system kasched vouches for, proven by a per-boot host key."""
    if ctx.keys is None:
        raise KaschedError("no boot directory for per-boot host keys")
    keys = {node.name: ctx.keys.issue(node.name, node.mac) for node in ctx.nodes(names)}

    def with_keys(alive: list[str]) -> GroupResult:
        results = GroupResult()
        for node in ctx.nodes(alive):
            extra = [keys[node.name].initrd]
            set_one = lambda node=node, extra=extra: ctx.boot.set_profile(node, target, extra_initrds=extra, **profile)  # noqa: E731
            results.add(run_on_node(node.name, "boot profile", set_one))
        return results

    def check(alive: list[str]) -> GroupResult:
        ctx.shell.pins.update({name: keys[name].public for name in alive})
        return check_system(ctx, alive, expected, what, pinned=True)

    results = chain_phases(
        names,
        [with_keys, lambda alive: reboot(ctx, alive, levels, deadline), check],
    )
    for node in ctx.nodes(names):  # the key served once: later boots of this profile get none
        ctx.keys.withdraw(node.mac)
        if node.name in results and results[node.name].ok:
            ctx.trusted.add(node.name)
            run_on_node(node.name, "boot profile", partial(ctx.boot.set_profile, node, target, **profile))
        else:
            forget(ctx, [node.name])
    return results


def forget(ctx: StepContext, names: Sequence[str]) -> None:
    """The nodes now run a system kasched does not vouch for: no pinned key, no soft reboot."""
    for name in names:
        ctx.shell.pins.pop(name, None)
        ctx.trusted.discard(name)


def setup_deploy_system(levels: Sequence[RebootLevel]) -> Callable[..., GroupResult]:
    """Boot the deployment system (kasched's: proven by its per-boot key)."""

    def action(ctx: StepContext, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
        return boot_into(
            ctx, names, BootTarget.DEPLOY, "kasched.system=deploy", "deployment system", levels, deadline, trusted=True
        )

    return action


NOMINI_TOOLS = "python3 mkfs.ext4 tar base64 mount"
UNTRUSTED = "the running system is not the verified reference environment (a user held the node since)"


def use_running_reference(
    ctx: StepContext, names: Sequence[str], deadline: float, cancel: threading.Event
) -> GroupResult:
    """Kadeploy2's "nomini": no first reboot when the node runs the reference environment and that
    system has the tools the broadcast needs. Fails fast otherwise, so the next variant reboots."""
    if ctx.env.destructive:
        failed = GroupResult()
        for name in names:
            failed.add(NodeResult(name, False, "setup", "a destructive environment overwrites the running system"))
        return failed
    probe = (
        f"{SYSTEM_PROBE}; for tool in {NOMINI_TOOLS}; do command -v $tool >/dev/null || "
        '{ echo "missing $tool" >&2; exit 3; }; done'
    )
    results = GroupResult()
    untrusted = [name for name in names if name not in ctx.trusted]
    for name in untrusted:  # only the verified reference, no user since, and its pinned key answering
        results.add(NodeResult(name, False, "setup", UNTRUSTED))
    trusted = [name for name in names if name in ctx.trusted]
    for name, result in checked(ctx.shell.run(trusted, probe, 30), "running system").items():
        node = ctx.targets[name]
        if result.ok and f"root={node.partition_device(node.reference_partition)}" not in stdout_of(result):
            result = NodeResult(name, False, "setup", "the node does not run the reference environment")
        results.add(result)
    return ordered(results, names)


def boot_stateless(ctx: StepContext, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
    """Perceus' model: the environment's image is the initramfs the node boots into RAM; no disk write."""
    return boot_into(
        ctx,
        names,
        BootTarget.STATELESS,
        "kasched.system=stateless",
        "stateless system",
        (RebootLevel.SOFT, RebootLevel.HARD, RebootLevel.VERY_HARD),
        deadline,
        kernel=ctx.stateless_kernel,
        initrd=ctx.stateless_initrd,
        cmdline=ctx.env.cmdline,
    )


def partition_device(ctx: StepContext, name: str) -> str:
    """The device of the partition the operation writes on node ``name``."""
    node = ctx.targets[name]
    return node.partition_device(ctx.partition(node))


def per_partition(ctx: StepContext, names: Sequence[str], run: Callable[[int, list[str]], GroupResult]) -> GroupResult:
    """``run(partition, nodes)`` once per target partition (its number, and the disk it is on: nodes
    of a job may differ); all the nodes of one call have the same partition device."""
    groups: dict[tuple[int, str], list[str]] = {}
    for node in ctx.nodes(names):
        partition = ctx.partition(node)
        groups.setdefault((partition, node.partition_device(partition)), []).append(node.name)
    results = GroupResult()
    for (partition, _), group in groups.items():
        for result in run(partition, group).values():
            results.add(result)
    return ordered(results, names)


def boot_environment(levels: Sequence[RebootLevel], *, trusted: bool = False) -> Callable[..., GroupResult]:
    """Boot the operation's environment from its partition; ``trusted``: it is the reference, just
    verified (its boot proven by a per-boot key), else a system kasched does not vouch for."""

    def action(ctx: StepContext, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
        def boot(partition: int, group: list[str]) -> GroupResult:
            return boot_into(
                ctx,
                group,
                BootTarget.LOCAL,
                f"root={partition_device(ctx, group[0])}",
                f"partition {partition}",
                levels,
                deadline,
                trusted=trusted,
                partition=partition,
                cmdline=ctx.env.cmdline,
            )

        return per_partition(ctx, names, boot)

    return action


# --- Broadcasting the image ------------------------------------------------------------------------


def prepare_command(ctx: StepContext, node: NodeTarget) -> str:
    device = partition_device(ctx, node.name)
    if ctx.env.image_kind == "raw":
        return f"test -b {device} && umount {device} 2>/dev/null; true"
    return (
        f"umount {MOUNT} 2>/dev/null; mkfs.ext4 -q -F -L kasched {device} && mkdir -p {MOUNT} && mount {device} {MOUNT}"
    )


DECOMPRESS = {"gz": "gzip -dc", "xz": "xz -dc", "zst": "zstd -dc"}


def sink_for(ctx: StepContext, device: str) -> dict[str, Any]:
    """Where each node writes the stream: untar into the mounted partition, or raw onto the partition
    ``device`` (decompressed on the way)."""
    env = ctx.env
    if env.image_kind == "raw":
        if env.compression == "none":
            return {"kind": "raw", "dest": device}
        return {"kind": "command", "argv": ["sh", "-c", f"{DECOMPRESS[env.compression]} > {device} && sync"]}
    return {"kind": "tar", "dest": MOUNT, "compression": env.compression}


def broadcast_chain(
    ctx: StepContext, names: Sequence[str], deadline: float, cancel: threading.Event, *, alone: bool = False
) -> GroupResult:
    """Prepare each node while its agent starts (one SSH session per node), send the image once
    through the chain (or to each node alone)."""

    def send(alive: list[str]) -> GroupResult:
        # One chain per target partition device (the sink is the same along a chain); alone: one per node.
        chains: dict[object, list[ChainNode]] = {}
        for name in alive:
            key = name if alone else partition_device(ctx, name)
            chains.setdefault(key, []).append(
                ChainNode(name, f"{ctx.targets[name].ip}:{AGENT_PORT}", *ctx.placement[name])
            )
        results = GroupResult()
        meter = TransferMeter(ctx.on_transfer)
        with ThreadPoolExecutor(max_workers=len(chains)) as pool:
            for group in pool.map(lambda c: _send_one_chain(ctx, c, meter), chains.values()):
                for result in group.values():
                    results.add(result)
        return results

    return chain_phases(names, [send])


def broadcast_alone(ctx: StepContext, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
    """The unicast fallback: the image sent to each node on its own (no forwarding between nodes)."""
    return broadcast_chain(ctx, names, deadline, cancel, alone=True)


def _send_one_chain(ctx: StepContext, chain: list[ChainNode], meter: TransferMeter | None = None) -> GroupResult:
    unpinned = GroupResult()
    for node in chain:  # the agents are started only over sessions pinned to the node's boot key
        if node.name not in ctx.shell.pins:
            unpinned.add(NodeResult(node.name, False, "broadcast", f"broadcast: {NO_PIN}"))
    nodes = [node for node in chain if node.name not in unpinned]
    if not nodes:
        return unpinned
    sink = sink_for(ctx, partition_device(ctx, nodes[0].name))
    location = ctx.env.image_location
    auth = ctx.shell.auth([node.name for node in nodes])
    addresses = {node.name: ctx.targets[node.name].ip for node in nodes}

    def send(source: BinaryIO) -> GroupResult:
        # The agents are shipped over SSH (the node needs python3 only), started, sent to, stopped.
        counted = cast(BinaryIO, CountingReader(source, meter)) if meter is not None else source  # reads, fileno
        method: BroadcastMethod = ctx.broadcast_method or broadcast_over_ssh
        return method(
            counted, nodes, sink, addresses, auth, expected_sha256=ctx.env.sha256, options=ctx.broadcast,
            prepare=lambda name: prepare_command(ctx, ctx.targets[name]), prepare_timeout=ctx.command_timeout,
        )  # fmt: skip

    try:  # kaschedd's copy, opened without following a link (the pre-deploy check verified it)
        with os.fdopen(imagestore.open_image(location), "rb") as image:
            results = send(image)
    except (KaschedError, OSError) as error:
        results = GroupResult()
        for node in nodes:
            results.add(NodeResult(node.name, False, "broadcast", f"broadcast: {error}"))
    for result in unpinned.values():
        results.add(result)
    return results


# --- Configuring the written system ----------------------------------------------------------------


def configure_command(ctx: StepContext, node: str) -> str:
    """Hostname, the user's key, the environment's scripts, then unmount (tar images only)."""
    if ctx.env.image_kind == "raw":
        return "sync"
    lines = [f"set -e; cd {MOUNT}", f"echo {shlex.quote(node)} > etc/hostname"]
    if ctx.user_key:
        lines += [
            "mkdir -p root/.ssh && chmod 700 root/.ssh",
            f"echo {shlex.quote(ctx.user_key.strip())} >> root/.ssh/authorized_keys",
            "chmod 600 root/.ssh/authorized_keys",
        ]
    lines.append(
        f"mkdir -p root/.ssh && cat {shlex.quote('/root/.ssh/authorized_keys')} >> root/.ssh/authorized_keys "
        "2>/dev/null || true"
    )  # the service keeps access (to revert)
    for script in ctx.env.postinstall:  # kaschedd's copies, read at env add, checked against their sha256
        encoded = base64.b64encode(imagestore.read_script(script, ctx.env.label)).decode()
        lines.append(
            f"echo {encoded} | base64 -d > /tmp/kasched-postinstall && chmod +x /tmp/kasched-postinstall "
            f"&& KASCHED_ROOT={MOUNT} KASCHED_NODE={shlex.quote(node)} /tmp/kasched-postinstall"
        )
    lines += ["cd /", f"sync; umount {MOUNT}"]
    return "\n".join(lines)


def configure(ctx: StepContext, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
    return checked(
        ctx.shell.run_each(names, lambda n: configure_command(ctx, n), ctx.command_timeout), "configuring the node"
    )


# --- Helpers ----------------------------------------------------------------------------------------------


def chain_phases(names: Sequence[str], phases: list[Callable[[list[str]], GroupResult]]) -> GroupResult:
    """Run phases in order; a node that fails a phase skips the rest with its failure kept. A node's
    duration is the wall time from the first phase to the end of its last one."""
    results = GroupResult()
    alive = list(names)
    start = time.monotonic()
    last = GroupResult()
    for phase in phases:
        if not alive:
            break
        phase_start = time.monotonic()
        outcome = phase(alive)
        elapsed = time.monotonic() - start
        for name in alive:
            result = outcome.get(name) or NodeResult(name, False, error="no result")
            # The node's own time in this phase when the phase measured it, else the phase's.
            result.duration = (phase_start - start) + result.duration if result.duration else elapsed
            if not result.ok:
                results.add(result)
        alive = [name for name in alive if (r := outcome.get(name)) is not None and r.ok]
        last = outcome
    for name in alive:
        results.add(last[name])
    return ordered(results, names)


def ordered(results: GroupResult, names: Sequence[str]) -> GroupResult:
    """``results`` in the order of ``names`` (those it has)."""
    group = GroupResult()
    for name in names:
        if name in results:
            group.add(results[name])
    return group
