"""The plan of each operation kind, as one table of data: its macro-steps in order, each step's variants
(tried in order: a node that fails one goes on to the next), each variant's step function, timeout,
retries and reboot levels, and what it does.

:func:`bind` turns a plan into the workflow's :class:`~kasched.deploy.workflow.MacroStep` list for one
operation's :class:`~kasched.deploy.steps.StepContext`; nothing else decides what an operation runs.
:func:`render` prints the table in docs/deployment.md (``python -m kasched.deploy.plans
docs/deployment.md`` rewrites it there; a test checks the page is current). Timeouts are written in
``R``, the site's ``reboot_timeout``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

from kasched.deploy import kexec, revert, steps
from kasched.deploy.workflow import MacroStep, Timeout, Variant
from kasched.drivers.reboot import RebootLevel
from kasched.results import GroupResult

SOFT, HARD, VERY_HARD = RebootLevel.SOFT, RebootLevel.HARD, RebootLevel.VERY_HARD
LEVELS: Literal["levels"] = "levels"  # a timeout with one R per reboot level the variant may use
# Where a variant's step function lives: looked up when the plan is bound (tests replace them there).
MODULES = {"steps": steps, "kexec": kexec, "revert": revert}
StepFunction = Callable[[steps.StepContext, Sequence[str], float, threading.Event], GroupResult]


@dataclass(frozen=True)
class PlannedVariant:
    """One way to do a macro-step. ``function`` is ``module.name`` in :data:`MODULES`; with ``levels``,
    that function is given the reboot levels and returns the step function. The timeout is
    ``reboots * R + base + per_node * n`` seconds for ``n`` nodes (``reboots`` may be :data:`LEVELS`:
    one R per level)."""

    name: str
    function: str
    what: str
    base: float
    per_node: float
    reboots: int | Literal["levels"] = 0
    retries: int = 0
    levels: tuple[RebootLevel, ...] | None = None

    def timeout(self, reboot_timeout: float) -> Timeout:
        reboots = len(self.levels or ()) if self.reboots == LEVELS else int(self.reboots)
        return Timeout(reboots * reboot_timeout + self.base, self.per_node)

    def step_function(self) -> StepFunction:
        module, _, name = self.function.partition(".")
        function = getattr(MODULES[module], name)
        built: StepFunction = function(self.levels) if self.levels is not None else function
        return built


@dataclass(frozen=True)
class PlannedStep:
    """A macro-step: its name and its variants, in the order they are tried."""

    name: str
    variants: tuple[PlannedVariant, ...]


Plan = tuple[PlannedStep, ...]

PLANS: dict[str, Plan] = {
    "deploy": (
        PlannedStep("setup", (
            PlannedVariant("nomini", "steps.use_running_reference", "a node already running the reference "
                           "environment, with the tools the broadcast needs, is used as it is: no reboot", 60, 0.1),
            PlannedVariant("kexec", "kexec.setup_deploy_system_kexec", "kexec into the deployment system from the "
                           "running trusted system (no firmware, no BMC)", 120, 0.5, reboots=1),
            PlannedVariant("pxe", "steps.setup_deploy_system", "boot profile \"deployment system\"; reboot by "
                           "the BMC (hard, then power off and on)", 60, 0.5, reboots=2, levels=(HARD, VERY_HARD)),
        )),
        PlannedStep("broadcast", (
            PlannedVariant("chain", "steps.broadcast_chain", "the image through a TCP chain of the nodes, each "
                           "writing it while forwarding it", 600, 2),
            PlannedVariant("unicast", "steps.broadcast_alone", "the image sent to each node left alone", 600, 10),
        )),
        PlannedStep("configure", (
            PlannedVariant("postinstall", "steps.configure", "hostname, the user's key, the environment's "
                           "postinstall script", 300, 1),
        )),
        PlannedStep("boot", (
            PlannedVariant("kexec", "kexec.boot_environment_kexec", "kexec into the deployed environment from "
                           "the deployment system", 60, 0.5, reboots=1),
            PlannedVariant("pxe", "steps.boot_environment", "boot profile \"local partition\"; reboot (soft, "
                           "then the BMC)", 60, 0.5, reboots=3, levels=(SOFT, HARD, VERY_HARD)),
        )),
    ),
    "deploy-stateless": (
        PlannedStep("boot", (
            PlannedVariant("pxe", "steps.boot_stateless", "boot the environment's kernel and initramfs over the "
                           "network; nothing written to disk", 60, 0.5, reboots=3),
        )),
    ),
    "revert": (
        PlannedStep("check", (
            PlannedVariant("trusted", "revert.check_trusted", "a node kasched still vouches for, answering with "
                           "its pinned key from the reference partition, is done; every other goes on", 60, 0.1),
        )),
        PlannedStep("setup", (
            PlannedVariant("power-cycle", "revert.power_cycle", "deployment system with a new per-boot host key, "
                           "by the BMC only (no system can refuse it); the node must answer with that key",
                           60, 0.5, reboots=2),
        )),
        PlannedStep("verify", (
            PlannedVariant("digest", "revert.verify_digest", "hash the reference partition block by block and "
                           "compare with the site's image on kaschedd", 300, 1),
            PlannedVariant("patch", "revert.patch", "write again the blocks that differ (at most half), then hash "
                           "again", 600, 2),
            PlannedVariant("rewrite", "revert.rewrite", "the whole reference image through the chain broadcast, "
                           "then hash again", 900, 2),
        )),
        PlannedStep("boot", (
            PlannedVariant("pxe", "revert.boot_reference", "boot the reference partition with a new per-boot key "
                           "(soft from the trusted deployment system, then the BMC)", 60, 0.5, reboots=3),
        )),
    ),
    "reboot": (
        PlannedStep("reboot", (
            PlannedVariant("local", "steps.boot_environment", "into the reference or a deployed environment, "
                           "from the level asked, escalating", 60, 0.5, reboots=LEVELS,
                           levels=(SOFT, HARD, VERY_HARD)),
        )),
    ),
    "reboot-to-deploy": (
        PlannedStep("reboot", (
            PlannedVariant("deploy-system", "steps.setup_deploy_system", "into the deployment system, from the "
                           "level asked, escalating", 60, 0.5, reboots=LEVELS, levels=(SOFT, HARD, VERY_HARD)),
        )),
    ),
}  # fmt: skip


def from_level(plan: Plan, level: RebootLevel) -> Plan:
    """``plan`` with every variant's reboot levels starting at ``level`` (the gentler ones left out)."""
    order = (SOFT, HARD, VERY_HARD)

    def trimmed(variant: PlannedVariant) -> PlannedVariant:
        if variant.levels is None:
            return variant
        return replace(variant, levels=tuple(lv for lv in variant.levels if order.index(lv) >= order.index(level)))

    return tuple(replace(step, variants=tuple(trimmed(v) for v in step.variants)) for step in plan)


def bind(plan: Plan, context: steps.StepContext, reboot_timeout: float) -> list[MacroStep]:
    """The workflow's macro-steps for ``plan``, each variant's step function run on ``context``."""
    return [
        MacroStep(
            step.name,
            tuple(
                Variant(v.name, partial(v.step_function(), context), v.timeout(reboot_timeout), v.retries)
                for v in step.variants
            ),
        )
        for step in plan
    ]


# --- the table in docs/deployment.md ------------------------------------------------------------------

BEGIN, END = "<!-- plans: begin (python -m kasched.deploy.plans docs/deployment.md) -->", "<!-- plans: end -->"


def _timeout_text(variant: PlannedVariant) -> str:
    reboots = "R per level" if variant.reboots == LEVELS else f"{variant.reboots}R" if variant.reboots else ""
    parts = [reboots.replace("1R", "R"), f"{variant.base:g} s", f"{variant.per_node:g} s/node"]
    return " + ".join(part for part in parts if part)


def render() -> str:
    """The plans as one Markdown table."""
    lines = [
        "| operation | macro-step | variant | timeout | retries | reboot levels | what it does |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, plan in PLANS.items():
        for step in plan:
            for variant in step.variants:
                levels = ", ".join(level.value for level in variant.levels) if variant.levels else ""
                lines.append(
                    f"| {kind} | {step.name} | `{variant.name}` | {_timeout_text(variant)} | {variant.retries} "
                    f"| {levels} | {variant.what} (`{variant.function}`) |"
                )
    return "\n".join(lines) + "\n"


def rewrite_doc(text: str) -> str:
    """``text`` with the table between its markers replaced by :func:`render`."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError("the page has no plans markers")
    return f"{head}{BEGIN}\n{render()}{END}{tail}"


if __name__ == "__main__":
    page = Path(sys.argv[1])
    page.write_text(rewrite_doc(page.read_text()))
