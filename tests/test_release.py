"""Giving nodes back to their scheduler once their revert has ended (kasched.deploy.release): only the
adapter of the grant's scheduler is told (every adapter for reconcile's orphans), a broken adapter is one
problem line and never keeps the others from being told, and the Reclaimer tells the scheduler at once
when there is nothing to revert. The adapters' own holds and releases are tested against their real
schedulers (tests/schedulers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from kasched.api import Kasched
from kasched.compose import open_site
from kasched.deploy import records
from kasched.deploy.release import release
from kasched.hookspecs import hookimpl
from kasched.messages import JobEnd, JobInfo
from kasched.models import NodeState
from kasched.schedulers import SchedulerAdapter


class Recording(SchedulerAdapter):
    """A scheduler adapter that records what it is told to release."""

    def __init__(self, name: str, broken: bool = False) -> None:
        self.name, self.broken = name, broken
        self.released: list[tuple[str | None, list[str], dict[str, str]]] = []

    def detect(self, environ: Mapping[str, str], argv: list[str]) -> bool:
        return False

    def read_job_start(self, environ: Mapping[str, str], argv: list[str]) -> JobInfo:
        raise NotImplementedError

    def read_job_end(self, environ: Mapping[str, str], argv: list[str]) -> JobEnd:
        raise NotImplementedError

    def release(self, job_id: str | None, back: Sequence[str], failed: Mapping[str, str]) -> list[str]:
        if self.broken:
            raise RuntimeError("scontrol exploded")
        self.released.append((job_id, list(back), dict(failed)))
        return [f"{node} unknown here" for node in back if node == "node-9"]


class Adapters:
    def __init__(self, *adapters: SchedulerAdapter) -> None:
        self.adapters = list(adapters)

    @hookimpl
    def kasched_scheduler_adapters(self) -> list[Any]:
        return self.adapters


def test_only_the_grants_scheduler_is_told_and_a_broken_one_is_a_line(cluster: Kasched) -> None:
    slurm, oar, broken = Recording("slurm"), Recording("oar"), Recording("pbs", broken=True)
    cluster.bus.register(Adapters(slurm, oar, broken), "adapters")
    assert release(cluster.bus, "slurm", "12", ["node-1", "node-9"], {"node-2": "kasched: revert failed"}) == [
        "slurm: node-9 unknown here"
    ]
    assert slurm.released == [("12", ["node-1", "node-9"], {"node-2": "kasched: revert failed"})]
    assert oar.released == []
    problems = release(cluster.bus, None, None, ["node-3"], {})  # reconcile's orphans: every adapter
    assert problems == ["pbs: release failed: RuntimeError: scontrol exploded"]
    assert slurm.released[-1] == oar.released[-1] == (None, ["node-3"], {})
    assert release(cluster.bus, None, None, [], {}) == [] and len(oar.released) == 1  # nothing to tell
    release(cluster.bus, "oar", "13", [], {"node-4": "kasched: revert failed:\nssh said \x1b[2J" + "x" * 300})
    reason = oar.released[-1][2]["node-4"]
    assert reason.startswith("kasched: revert failed: ssh said \\x1b[2Jxxx") and reason.endswith("...")
    assert len(reason) == 200, "one line a scheduler can show"


def test_a_job_end_with_nothing_to_revert_releases_at_once(cluster: Kasched) -> None:
    slurm = Recording("slurm")
    cluster.bus.register(Adapters(slurm), "adapters")
    cluster.record_job_start(JobInfo("slurm", "c", "7", "alice", ("node-1", "node-2")))
    cluster.set_node_state("node-[1-2]", "down")
    cluster.record_job_end(JobEnd("slurm", "c", "7", "job ended"))
    assert slurm.released == [("7", [], dict.fromkeys(["node-1", "node-2"], "kasched: set down in kasched"))]


def test_a_site_that_does_not_revert_releases_every_node_at_once(cluster: Kasched) -> None:
    api = open_site(replace(cluster.config, revert_at_job_end=False), cluster.caller, load_entry_points=False)
    slurm = Recording("slurm")
    api.bus.register(Adapters(slurm), "adapters")
    api.record_job_start(JobInfo("slurm", "c", "8", "alice", ("node-3",)))
    api.record_job_end(JobEnd("slurm", "c", "8", "job ended"))
    assert slurm.released == [("8", ["node-3"], {})]
    api.close()


def test_an_epilog_after_reconcile_revoked_its_grant_releases_what_is_settled(cluster: Kasched) -> None:
    """Reconcile revoked the grant first (and gave the nodes back); the job's late epilog held them
    again: its ``job end`` releases those not busy, as they are, since no revert of it will."""
    slurm = Recording("slurm")
    cluster.bus.register(Adapters(slurm), "adapters")
    cluster.record_job_start(JobInfo("slurm", "c", "9", "alice", ("node-1", "node-2", "node-3")))
    cluster.set_node_state("node-[1-3]", "down")  # nothing to revert: this first end releases at once
    cluster.record_job_end(JobEnd("slurm", "c", "9", "reconcile: slurm no longer runs job 9"))
    cluster.set_node_state("node-1", "reference")
    cluster.set_node_state("node-2", "deploy_failed")
    with cluster.database.session() as session:
        records.start(session, "revert", "root", None, ["node-3"], NodeState.REVERTING, is_admin=True)
    cluster.record_job_end(JobEnd("slurm", "c", "9", "job ended (exit 0)"))  # the late epilog
    assert slurm.released[-1] == ("9", ["node-1"], {"node-2": "kasched: deploy_failed after job 9: not given back"})
