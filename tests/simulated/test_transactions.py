"""The live per-node progress of an operation is written one transaction per attempt, not one per
node and attempt (on SQLite each commit waits for the disk: a 1,000-node revert spent most of its
time there, bench/scale.py)."""

from __future__ import annotations

import pytest
from sqlalchemy import event

from kasched.deploy.operations import Operations
from kasched.messages import StepEvent
from tests.simulated.conftest import Sim

pytestmark = pytest.mark.simulated


def test_a_deploy_commits_about_once_per_step_report_not_twice(sim: Sim) -> None:
    commits, reports = [], []
    engine = sim.user.database.engine
    listener = lambda connection: commits.append(1)  # noqa: E731
    event.listen(engine, "commit", listener)
    try:
        progress = lambda report: reports.append(report) if isinstance(report, StepEvent) else None  # noqa: E731
        result = Operations(sim.user, progress=progress).deploy("userenv", "node-[1-8]")
    finally:
        event.remove(engine, "commit", listener)
    assert result.state == "done" and len(reports) >= 40
    # each report: one for the history (kasched stats); the live progress one per attempt; the guard reads
    assert len(commits) < 2 * len(reports), (len(commits), len(reports))  # 116 for 48 reports when per node
