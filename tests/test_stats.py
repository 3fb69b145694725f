"""Statistics: step events sent on the bus are stored and selected like kastat does."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from kasched.api import Kasched
from kasched.errors import InputError
from kasched.messages import StepEvent
from kasched.models import utcnow
from kasched.stats import StatsFilter, parse_time


def event(
    node: str,
    step: str,
    ok: bool = True,
    user: str = "alice",
    ago_hours: float = 0,
    duration: float = 1.0,
    env: str = "debian12@alice:1",
    kind: str = "deploy",
) -> StepEvent:
    return StepEvent(
        kind=kind,
        node=node,
        user=user,
        step=step,
        variant="",
        attempt=1,
        started_at=utcnow() - timedelta(hours=ago_hours),
        duration=duration,
        ok=ok,
        error=None if ok else "timeout",
        environment=env,
        deployment_id="d1",
    )


@pytest.fixture
def history(admin: Kasched) -> Kasched:
    for node in ("node-1", "node-2", "node-3"):
        admin.record_step(event(node, "setup", duration=10))
        admin.record_step(event(node, "broadcast", ok=node != "node-3", duration=20))
    admin.record_step(event("node-1", "power_on", user="bob", kind="power", env="", ago_hours=48, duration=2))
    return admin


def test_selection_filters(history: Kasched) -> None:
    assert len(history.stats(StatsFilter())) == 7
    failed = history.stats(StatsFilter(failed_only=True))
    assert [(op.node, op.step, op.error) for op in failed] == [("node-3", "broadcast", "timeout")]
    assert {op.user for op in history.stats(StatsFilter(user="bob"))} == {"bob"}
    assert {op.node for op in history.stats(StatsFilter(nodes=("node-2",)))} == {"node-2"}
    assert len(history.stats(StatsFilter(environment="debian12"))) == 6
    assert len(history.stats(StatsFilter(kind="power"))) == 1
    assert len(history.stats(StatsFilter(since=utcnow() - timedelta(hours=1)))) == 6
    assert len(history.stats(StatsFilter(until=utcnow() - timedelta(hours=1)))) == 1
    assert len(history.stats(StatsFilter(limit=2))) == 2


def test_summary_per_step_and_node(history: Kasched) -> None:
    by_step = {g.key: g for g in history.stats_summary(StatsFilter(kind="deploy"), "step")}
    assert by_step["broadcast"].count == 3 and by_step["broadcast"].failures == 1
    assert by_step["setup"].mean_duration == pytest.approx(10)
    by_node = {g.key: g for g in history.stats_summary(StatsFilter(), "node")}
    assert by_node["node-1"].count == 3 and by_node["node-1"].max_duration == pytest.approx(20)
    with pytest.raises(InputError, match="'colour' is not one of"):
        history.stats_summary(StatsFilter(), "colour")


def test_a_step_is_recorded_with_the_variant_it_was_tried_with(admin: Kasched) -> None:
    tried = replace(event("node-1", "setup", ok=False), variant="kexec", final=False)
    admin.record_step(tried)
    admin.record_step(replace(event("node-1", "setup"), variant="pxe", attempt=2))
    recorded = admin.stats(StatsFilter(nodes=("node-1",)))
    assert sorted((op.step, op.ok) for op in recorded) == [("setup/kexec", False), ("setup/pxe", True)]


def test_time_parsing() -> None:
    now = utcnow()
    assert parse_time("3h", field="since", now=now) == now - timedelta(hours=3)
    assert parse_time("2026-11-20", field="since").tzinfo is not None
    with pytest.raises(InputError, match="since: 'yesterday' is neither a date"):
        parse_time("yesterday", field="since")
