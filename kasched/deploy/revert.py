"""The revert the node cannot refuse: every node back to the verified reference environment, whatever
its last user did with it (they were root on it, could read and write every byte of its disk, answer
any command as they liked, ignore a soft reboot, take other addresses).

Its plan (check, setup, verify, boot; variants, timeouts) is the ``revert`` entry of
:data:`kasched.deploy.plans.PLANS`, printed in docs/deployment.md; the step functions are here.

A node that ends the plan is ``reference`` and trusted again (``nodes.trusted``, its key recorded in
``nodes.host_key``); a node that fails a step is ``deploy_failed`` with the step and the reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from kasched.deploy import steps
from kasched.deploy.nodes import SYSTEM_PROBE, stdout_of
from kasched.deploy.workflow import FINISHED
from kasched.drivers.reboot import RebootLevel
from kasched.partition_verify import PartitionCheck, patch_partitions, verify_partitions
from kasched.results import GroupResult, NodeResult

PATCH_AT_MOST = 0.5  # share of the blocks that may differ for a patch; more: the whole image, chained
DIFFERS = "the reference partition differs from the site's image"
NO_DIGEST = "the site's reference image is not raw: no digest to check the partition against (rewritten whole)"
# Through the BMC only, boot device the network: a hard reset (no system can refuse it), then off and
# on for a node the reset did not bring back (one its user powered off). Not off/on first: on this lab,
# 8 power-ons asked at once under load outran the IPMI driver's 15 s wait for "on" (CI), resets did not.
POWER_CYCLE = (RebootLevel.HARD, RebootLevel.VERY_HARD)
FROM_TRUSTED = (RebootLevel.SOFT, RebootLevel.HARD, RebootLevel.VERY_HARD)


def check_trusted(
    ctx: steps.StepContext, names: Sequence[str], deadline: float, cancel: threading.Event
) -> GroupResult:
    """Nodes kasched still vouches for, answering with their pinned key from the reference partition,
    are done (FINISHED); every other node goes on to the power cycle (ok, nothing done)."""
    results = GroupResult()
    trusted = [name for name in names if name in ctx.trusted]
    probed = ctx.shell.run(trusted, SYSTEM_PROBE, 30) if trusted else GroupResult()
    for name in names:
        node = ctx.targets[name]
        result = probed.get(name)
        reference = f"root={node.partition_device(node.reference_partition)}"
        if result is not None and result.ok and reference in stdout_of(result):
            results.add(NodeResult(name, True, "check", None, result.duration, FINISHED))
        else:
            steps.forget(ctx, [name])
            results.add(NodeResult(name, True, "check"))
    return results


def power_cycle(ctx: steps.StepContext, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
    """Into the deployment system by a BMC power cycle, proven by its per-boot key."""
    return steps.setup_deploy_system(POWER_CYCLE)(ctx, names, deadline, cancel)


def verify_digest(
    ctx: steps.StepContext, names: Sequence[str], deadline: float, cancel: threading.Event
) -> GroupResult:
    """Hash each node's reference partition (from the deployment system kaschedd booted) and compare
    with the site's image on kaschedd: identical is ok; a node that differs fails, saying how much,
    and goes on to the patch."""
    results = GroupResult()
    if ctx.reference_blocks is None:
        for name in names:
            results.add(NodeResult(name, False, "verify", NO_DIGEST))
        return results
    blocks = ctx.reference_blocks
    devices = {name: reference_device(ctx, name) for name in names}
    for name, result in verify_partitions(ctx.shell, devices, blocks, remaining(deadline)).items():
        check = result.value
        if result.ok and isinstance(check, PartitionCheck) and not check.identical:
            ctx.differing[name] = check
            count = len(blocks.hashes)
            result = NodeResult(name, False, "verify", f"{DIFFERS} in {len(check.differing)} of {count} blocks")
        results.add(result)
    return results


def patch(ctx: steps.StepContext, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
    """The blocks that differ written again (a node where most differ goes on to the whole rewrite),
    then the whole partition hashed again."""
    results = GroupResult()
    blocks = ctx.reference_blocks
    limit = PATCH_AT_MOST * len(blocks.hashes) if blocks is not None else -1
    few = {name: ctx.differing[name] for name in names if name in ctx.differing}
    few = {name: check for name, check in few.items() if len(check.differing) <= limit}
    for name in names:
        if name not in few:
            results.add(NodeResult(name, False, "verify", "too many blocks differ: the whole image instead"))
    if few and blocks is not None:
        patched = patch_partitions(ctx.shell, few, ctx.env, blocks, remaining(deadline))
        phases = [lambda alive: steps.ordered(patched, alive), lambda alive: verify_again(ctx, alive, deadline)]
        for result in steps.chain_phases(list(few), phases).values():
            results.add(result)
    return steps.ordered(results, names)


def rewrite(ctx: steps.StepContext, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
    """The reference image written again through the chain broadcast (then configured, for a tar
    image: hostname and the service's key), then hashed again (a raw image)."""
    return steps.chain_phases(
        names,
        [
            lambda alive: steps.broadcast_chain(ctx, alive, deadline, cancel),
            lambda alive: steps.configure(ctx, alive, deadline, cancel),
            lambda alive: verify_again(ctx, alive, deadline),
        ],
    )


def verify_again(ctx: steps.StepContext, names: Sequence[str], deadline: float) -> GroupResult:
    """After a write: the partition must now be identical to the site's image (a raw image)."""
    results = GroupResult()
    if ctx.reference_blocks is None:
        for name in names:
            results.add(NodeResult(name, True, "verify"))
        return results
    devices = {name: reference_device(ctx, name) for name in names}
    for name, result in verify_partitions(ctx.shell, devices, ctx.reference_blocks, remaining(deadline)).items():
        check = result.value
        if result.ok and isinstance(check, PartitionCheck) and not check.identical:
            result = NodeResult(
                name, False, "verify", f"still differs after the write in {len(check.differing)} blocks"
            )
        results.add(result)
    return results


def reference_device(ctx: steps.StepContext, name: str) -> str:
    node = ctx.targets[name]
    return node.partition_device(node.reference_partition)


def remaining(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def boot_reference(
    ctx: steps.StepContext, names: Sequence[str], deadline: float, cancel: threading.Event
) -> GroupResult:
    """The verified reference partition booted, proven by its per-boot key."""
    return steps.boot_environment(FROM_TRUSTED, trusted=True)(ctx, names, deadline, cancel)
