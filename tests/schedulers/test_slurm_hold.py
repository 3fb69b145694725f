"""The hold of a deploy job's nodes from its end until their revert has ended (kasched_slurm.hold), without
daemons: Slurm's node commands are answered by a small model of what Slurm 22.05 was measured to do
(DOWN keeps DRAIN and its reason; RESUME of a node neither drained nor down is refused; RESUME clears the
reason). Which nodes a release RESUMEs or keeps drained, with which scontrol calls, and that a release
landing before the epilog's detach is applied by the detach, never undone by it nor applied while the
node still points at its stand-in."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kasched_slurm import hold, hooks, slurmcli, standin
from kasched_slurm.plugin import SlurmAdapter

from kasched.schedulers import HOLD_MARK

STANDIN_ADDR = "127.0.0.2"


@dataclass
class FakeNode:
    state: str = "IDLE"
    flags: set[str] = field(default_factory=set)
    reason: str = ""
    address: str = "127.0.0.1"


@dataclass
class FakeSlurm:
    """sinfo --json and scontrol update on a few nodes, as Slurm 22.05 answered them (docs/slurm.md)."""

    nodes: dict[str, FakeNode]
    updates: list[str] = field(default_factory=list)  # every scontrol update, as typed
    wrong: list[str] = field(default_factory=list)  # a RESUME while the node pointed at its stand-in
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, args: list[str], timeout: float = 0) -> str:
        with self.lock:
            if args[:2] == ["squeue", "--json"]:
                return json.dumps({"jobs": []})
            if args[:2] == ["sinfo", "--json"]:
                return json.dumps({"nodes": [self._entry(name, node) for name, node in self.nodes.items()]})
            assert args[:2] == ["scontrol", "update"], args
            self.updates.append(" ".join(args[2:]))
            fields = dict(arg.split("=", 1) for arg in args[2:])
            for name in fields.pop("NodeName").split(","):
                self._update(name, fields)
            return ""

    @staticmethod
    def _entry(name: str, node: FakeNode) -> dict[str, object]:
        return {"name": name, "address": node.address, "hostname": "localhost", "port": 17001,
                "state": node.state.lower(), "state_flags": sorted(node.flags), "reason": node.reason}  # fmt: skip

    def _update(self, name: str, fields: dict[str, str]) -> None:
        node = self.nodes[name]
        state = fields.get("State")
        if state in ("DOWN", "DRAIN") and "Reason" not in fields:
            raise slurmcli.SlurmCommandError("You must specify a reason when DOWNING or DRAINING a node")
        if state == "RESUME":
            if node.state != "DOWN" and "DRAIN" not in node.flags:
                raise slurmcli.SlurmCommandError("slurm_update error: Invalid node state specified")
            if node.address == STANDIN_ADDR:
                self.wrong.append(name)
            node.state, node.reason = "IDLE", ""
            node.flags.discard("DRAIN")
        elif state == "DOWN":
            node.state = "DOWN"
        elif state == "DRAIN":
            node.flags.add("DRAIN")
        if "Reason" in fields and state != "RESUME":
            node.reason = fields["Reason"]
        if "NodeAddr" in fields:
            node.address = fields["NodeAddr"]


@pytest.fixture
def slurm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSlurm]:
    fake = FakeSlurm({f"node-{i}": FakeNode() for i in range(1, 5)})
    monkeypatch.setattr(slurmcli, "run", fake.run)
    yield fake


def held_state(node: FakeNode) -> tuple[str, bool, str]:
    return node.state, "DRAIN" in node.flags, node.reason


def test_hold_drains_the_jobs_nodes_but_leaves_an_admins_drain(slurm: FakeSlurm) -> None:
    slurm.nodes["node-2"] = FakeNode(flags={"DRAIN"}, reason="disk check by the admin")
    assert hold.hold("7", ["node-1", "node-2", "node-9"]) == ["node-1"]
    assert held_state(slurm.nodes["node-1"]) == ("IDLE", True, "kasched: giving back after job 7")
    assert held_state(slurm.nodes["node-2"]) == ("IDLE", True, "disk check by the admin")
    assert slurm.updates == ["NodeName=node-1 State=DRAIN Reason=kasched: giving back after job 7"]


def test_release_resumes_only_what_kasched_holds_and_keeps_failures_drained(
    slurm: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the detach (no stand-in record left): back -> one RESUME for the nodes kasched holds;
    failed -> drained with why; an admin's drain, another job's give-back and unknown nodes untouched."""
    for name in ("node-1", "node-2"):
        slurm.nodes[name] = FakeNode("DOWN", {"DRAIN"}, "kasched: giving back after job 7")
    slurm.nodes["node-3"] = FakeNode("IDLE", {"DRAIN"}, "bad DIMM")
    slurm.nodes["node-4"] = FakeNode("DOWN", {"DRAIN"}, "kasched: giving back after job 8")
    why = f"{HOLD_MARK} revert 12 failed: node-2: BMC 10.77.1.2:623 did not answer"
    monkeypatch.setenv("KASCHED_SLURM_STATE_DIR", str(tmp_path))  # the adapter reads it, as in kaschedd
    problems = SlurmAdapter().release("7", ["node-1", "node-3", "node-4", "node-9"], {"node-2": why})
    assert problems == []
    assert held_state(slurm.nodes["node-1"]) == ("IDLE", False, "")
    assert held_state(slurm.nodes["node-2"]) == ("DOWN", True, why)
    assert held_state(slurm.nodes["node-3"]) == ("IDLE", True, "bad DIMM")
    assert held_state(slurm.nodes["node-4"]) == ("DOWN", True, "kasched: giving back after job 8")
    assert slurm.updates == ["NodeName=node-1 State=RESUME", f"NodeName=node-2 State=DRAIN Reason={why}"]


def test_orphans_release_resumes_a_node_whose_revert_failed_before(slurm: FakeSlurm, tmp_path: Path) -> None:
    why = f"{HOLD_MARK} revert 12 failed: node-2: power cycle failed"
    slurm.nodes["node-2"] = FakeNode("IDLE", {"DRAIN"}, why)
    slurm.nodes["node-3"] = FakeNode()  # in service: a RESUME would be refused, none is sent
    assert hold.release(tmp_path, None, ["node-2", "node-3"], {}) == []
    assert held_state(slurm.nodes["node-2"]) == ("IDLE", False, "")
    assert slurm.updates == ["NodeName=node-2 State=RESUME"]


def test_one_refused_node_does_not_keep_the_others(slurm: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("node-1", "node-2"):
        slurm.nodes[name] = FakeNode("DOWN", {"DRAIN"}, "kasched: giving back after job 7")
    real = slurm.run

    def refusing(args: list[str], timeout: float = 0) -> str:
        if args[:2] == ["scontrol", "update"] and "node-1" in args[2]:
            raise slurmcli.SlurmCommandError("scontrol update failed: Invalid node name specified")
        return real(args, timeout)

    monkeypatch.setattr(slurmcli, "run", refusing)
    problems = hold.release(tmp_path, "7", ["node-1", "node-2"], {})
    assert problems == ["node-1: scontrol update failed: Invalid node name specified"]
    assert held_state(slurm.nodes["node-2"]) == ("IDLE", False, "")


def _attached(slurm: FakeSlurm, directory: Path, job_id: str, names: list[str]) -> list[subprocess.Popen[bytes]]:
    """The state of a running deploy job: its stand-ins (``sleep`` processes), its record, its nodes
    pointed at the stand-ins."""
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in names]
    entries = [standin.Standin(name, p.pid, "127.0.0.1", 17001) for name, p in zip(names, sleepers, strict=True)]
    standin._save(standin.StandinSettings(STANDIN_ADDR, "", directory), job_id, entries)
    for name in names:
        slurm.nodes[name] = FakeNode(state="ALLOCATED", address=STANDIN_ADDR)
    return sleepers


def test_a_release_before_the_detach_is_applied_by_the_detach(slurm: FakeSlurm, tmp_path: Path) -> None:
    """A trusted node's revert (1-3 s), or nothing to revert, ends before the epilog's detach: the release
    is written down, no scontrol call, and the detach applies it once the nodes have their own address."""
    settings = standin.StandinSettings(STANDIN_ADDR, "", tmp_path)
    sleepers = _attached(slurm, tmp_path, "7", ["node-1", "node-2"])
    assert hold.hold("7", ["node-1", "node-2"]) == ["node-1", "node-2"]
    slurm.updates.clear()
    why = f"{HOLD_MARK} revert 12 failed: node-2: no answer"
    assert hold.release(tmp_path, "7", ["node-1"], {"node-2": why}) == []
    assert slurm.updates == [] and (tmp_path / "job-7.released").exists()
    assert [s.node for s in standin.detach(settings, "7")] == ["node-1", "node-2"]
    assert all(p.wait(5) is not None for p in sleepers)
    assert held_state(slurm.nodes["node-1"]) == ("IDLE", False, "") and slurm.nodes["node-1"].address == "127.0.0.1"
    assert held_state(slurm.nodes["node-2"]) == ("DOWN", True, why)
    assert not slurm.wrong and not list(tmp_path.glob("job-7.*"))


def test_a_release_after_the_detach_finds_the_nodes_held(slurm: FakeSlurm, tmp_path: Path) -> None:
    settings = standin.StandinSettings(STANDIN_ADDR, "", tmp_path)
    _attached(slurm, tmp_path, "7", ["node-1"])
    hold.hold("7", ["node-1"])
    standin.detach(settings, "7")
    assert held_state(slurm.nodes["node-1"]) == ("DOWN", True, "kasched: giving back after job 7"), "still held"
    assert hold.release(tmp_path, "7", ["node-1"], {}) == []
    assert held_state(slurm.nodes["node-1"]) == ("IDLE", False, "")


def test_release_and_detach_racing_always_end_the_same(slurm: FakeSlurm, tmp_path: Path) -> None:
    """For at least 5 s, job after job: kaschedd's release and the epilog's detach run at the same time in
    two threads, the release a random moment before or after. Every time, the node back is in service at
    its own address, the failed one drained with its reason, and no RESUME ever reached a node that still
    pointed at its stand-in."""
    settings = standin.StandinSettings(STANDIN_ADDR, "", tmp_path)
    why = f"{HOLD_MARK} revert failed: node-2: no answer"
    started, rounds = time.monotonic(), 0
    while time.monotonic() - started < 5 or rounds < 30:
        rounds += 1
        job = str(rounds)
        _attached(slurm, tmp_path, job, ["node-1", "node-2"])
        hold.hold(job, ["node-1", "node-2"])
        delay = random.uniform(0, 0.25)  # a detach takes about 0.1 s here: before, during and after it
        threads = [
            threading.Thread(target=lambda j=job: standin.detach(settings, j)),
            threading.Thread(target=lambda j=job, d=delay: (time.sleep(d), hold.release(tmp_path, j, ["node-1"], {"node-2": why}))),
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert held_state(slurm.nodes["node-1"]) == ("IDLE", False, ""), f"round {rounds}"
        assert slurm.nodes["node-1"].address == "127.0.0.1"
        assert held_state(slurm.nodes["node-2"]) == ("DOWN", True, why), f"round {rounds}"
        assert not slurm.wrong, f"round {rounds}: RESUME at the stand-in's address"
        assert not list(tmp_path.glob(f"job-{job}.*"))
    print(f"{rounds} rounds")


def test_a_releasing_record_left_by_a_dead_epilog_does_not_hold_a_release_forever(slurm: FakeSlurm, tmp_path: Path) -> None:
    slurm.nodes["node-1"] = FakeNode("DOWN", {"DRAIN"}, "kasched: giving back after job 7")
    record = tmp_path / "job-7.releasing"
    record.write_text(json.dumps([{"node": "node-1", "pid": 1, "own_addr": "127.0.0.1", "port": 17001}]))
    assert hold.release(tmp_path, "7", ["node-1"], {}) == [] and slurm.updates == []  # a live epilog's: deferred
    (tmp_path / "job-7.released").unlink()
    old = time.time() - hold.STALE_SECONDS - 5
    os.utime(record, (old, old))
    assert hold.release(tmp_path, "7", ["node-1"], {}) == []
    assert held_state(slurm.nodes["node-1"]) == ("IDLE", False, "")


def test_without_slurm_where_kasched_runs_release_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OAR or PBS site has the Slurm plugin installed too: reconcile's release (every adapter) must not
    warn about a missing scontrol."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert SlurmAdapter().release(None, ["node-1"], {"node-2": f"{HOLD_MARK} revert failed"}) == []


@pytest.mark.parametrize(
    ("ended", "prolog_failed", "held"),
    [(0, False, True), (hooks.NOT_FOUND, False, False), (0, True, False)],
    ids=["revoked: kasched releases", "no grant", "the prolog revoked it"],
)
def test_the_epilog_holds_and_releases_itself_only_when_no_release_will_come(
    slurm: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ended: int, prolog_failed: bool, held: bool
) -> None:
    """The epilog drains the nodes before `kasched job end`. When that call revoked the grant, kasched's
    release will come: the nodes stay held. When there was no grant, or the prolog had revoked it already
    (its stand-ins failed), nothing else would ever release them: the epilog does."""
    calls: list[str] = []

    def kasched(action: str, environ: object) -> int:
        calls.append(action)
        assert "DRAIN" in slurm.nodes["node-1"].flags, "held before kasched job end"
        return ended

    monkeypatch.setattr(hooks, "kasched", kasched)
    if prolog_failed:
        (tmp_path / "job-7.prolog-failed").touch()
    environ = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node-[1-2]", "SLURM_JOB_CONSTRAINTS": "deploy",
               "KASCHED_SLURM_STANDIN_ADDR": STANDIN_ADDR, "KASCHED_SLURM_STATE_DIR": str(tmp_path)}  # fmt: skip
    assert hooks.epilog(environ) == 0
    assert calls == ["end"]
    for name in ("node-1", "node-2"):
        want = ("IDLE", True, "kasched: giving back after job 7") if held else ("IDLE", False, "")
        assert held_state(slurm.nodes[name]) == want
    assert not (tmp_path / "job-7.prolog-failed").exists()


def test_a_release_leaves_alone_a_node_the_next_job_holds(slurm: FakeSlurm, tmp_path: Path) -> None:
    """A late release (reconcile's, or an old job's) must not touch a node another job's stand-ins answer
    for: that job's own end will hold and release it."""
    sleepers = _attached(slurm, tmp_path, "8", ["node-1"])
    slurm.nodes["node-1"] = FakeNode("IDLE", {"DRAIN"}, "kasched: giving back after job 8", STANDIN_ADDR)
    problems = hold.release(tmp_path, None, ["node-1"], {})
    assert problems == ["node-1: in job 8's hands (stand-ins not given back yet): left alone"]
    assert hold.release(tmp_path, "7", [], {"node-1": f"{HOLD_MARK} revert failed"}) == [
        "node-1: in job 8's hands (stand-ins not given back yet): left alone"
    ]
    assert slurm.updates == [] and not slurm.wrong
    for sleeper in sleepers:
        sleeper.kill()
        sleeper.wait()
