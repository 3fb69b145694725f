"""The plan of each operation kind is data (kasched/deploy/plans.py): bound to one operation's context
explicitly, trimmed to the reboot level asked, and printed as it is in docs/deployment.md."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kasched.deploy import plans, steps
from kasched.drivers.reboot import RebootLevel
from kasched.results import GroupResult, NodeResult

PAGE = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


def test_the_page_shows_the_plans_as_they_are() -> None:
    text = PAGE.read_text()
    assert plans.rewrite_doc(text) == text, "run: python -m kasched.deploy.plans docs/deployment.md"
    assert "| revert | verify | `rewrite` | 900 s + 2 s/node |" in text


def test_every_variant_names_a_step_function() -> None:
    for plan in plans.PLANS.values():
        for step in plan:
            for variant in step.variants:
                assert callable(variant.step_function()), variant.function


def test_a_bound_plan_runs_each_step_on_the_context_it_was_bound_to(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, tuple[RebootLevel, ...]]] = []

    def boot_environment(levels: tuple[RebootLevel, ...]) -> plans.StepFunction:
        def step(ctx: Any, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
            seen.append((ctx, levels))
            return GroupResult({n: NodeResult(n, True, "reboot") for n in names})

        return step

    monkeypatch.setattr(steps, "boot_environment", boot_environment)
    first, second = object(), object()
    plan = plans.from_level(plans.PLANS["reboot"], RebootLevel.HARD)
    one = plans.bind(plan, first, reboot_timeout=100)  # type: ignore[arg-type]
    two = plans.bind(plan, second, reboot_timeout=100)  # type: ignore[arg-type]
    assert [s.name for s in one] == ["reboot"] and one[0].variants[0].name == "local"
    assert one[0].variants[0].timeout.for_nodes(10) == 2 * 100 + 60 + 0.5 * 10  # hard, very_hard: 2R
    two[0].variants[0].action(["n1"], 0.0, threading.Event())
    one[0].variants[0].action(["n1"], 0.0, threading.Event())
    levels = (RebootLevel.HARD, RebootLevel.VERY_HARD)
    assert seen == [(second, levels), (first, levels)]


def test_the_deploy_plan_tries_its_variants_in_order() -> None:
    plan = {step.name: [v.name for v in step.variants] for step in plans.PLANS["deploy"]}
    assert plan == {
        "setup": ["nomini", "kexec", "pxe"],
        "broadcast": ["chain", "unicast"],
        "configure": ["postinstall"],
        "boot": ["kexec", "pxe"],
    }
    setup_pxe = plans.PLANS["deploy"][0].variants[2]
    assert setup_pxe.timeout(120).for_nodes(4) == 2 * 120 + 60 + 0.5 * 4
