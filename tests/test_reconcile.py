"""``kasched reconcile`` and ``kasched doctor`` on a site whose scheduler cannot be reached: grants are
left alone rather than guessed about, grants past their end are revoked. With a real Slurm:
tests/schedulers/test_slurm_deploy.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kasched.builtin.drivers import BuiltinDrivers
from kasched.drivers.base import NodeTarget, PowerDriver, PowerState
from kasched.errors import DriverError
from kasched.hookspecs import hookimpl
from tests import test_cli
from tests.conftest import EXAMPLES
from tests.test_cli import Run, one_line_error
from tests.test_reclaim import hook, hook_env, wait_for_file_text

site, run = test_cli.site, test_cli.run  # the CLI tests' fixtures: a SQLite site, the CLI in-process


@pytest.fixture(autouse=True)
def no_slurm_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Slurm's commands are not on this site's PATH: the slurm plugin cannot tell which jobs run."""
    monkeypatch.setenv("PATH", str(tmp_path))


def test_reconcile_leaves_alone_what_no_scheduler_can_tell(run: Run, site: Path) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    hook("prolog/kasched-prolog", hook_env("31", "node-1"))
    code, out, _ = run("reconcile", "--grace", "0")
    assert code == 0
    assert "left alone: grants of slurm:demo: the scheduler cannot tell" in out
    assert "0 revoked" in out
    assert json.loads(run("rights", "--json")[1])[0]["active"]


def test_reconcile_revokes_grants_past_their_end(run: Run, site: Path) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    env = {**hook_env("32", "node-[1-2]"), "KASCHED_SLURM_TIME_LIMIT": "1"}
    hook("prolog/kasched-prolog", env)
    time.sleep(1.5)  # the job's 1 s walltime passes; no epilog comes
    code, out, _ = run("reconcile", "--dry-run", "--walltime-grace", "0")
    assert code == 0 and "would revoke grant 1 of slurm:demo:32" in out
    code, out, _ = run("reconcile", "--walltime-grace", "0")
    assert "revoked grant 1 of slurm:demo:32 (alice on node-[1-2]): reconcile: past its end" in out
    grant = json.loads(run("rights", "--all", "--json")[1])[0]
    assert grant["revoke_reason"].startswith("reconcile: past its end")
    code, out, _ = run("reconcile", "--json")
    assert json.loads(out)["revoked"] == [], "a second run finds nothing left"
    code, _, err = run("reconcile", "--grace", "nan")
    one_line_error(err, "grace: expected seconds")


def test_doctor_reports_each_check(run: Run, site: Path) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    code, out, _ = run("doctor", "--json")
    checks = {c["what"]: c for c in json.loads(out)}
    assert code == 1, "no reference environment: a problem"
    assert checks["database"]["ok"] and "schema up to date" in checks["database"]["detail"]
    assert not checks["reference environment"]["ok"]
    assert checks["kaschedd"]["ok"] and "not running" in checks["kaschedd"]["detail"]
    assert "slurm: slurm" in checks, "each scheduler plugin adds its own checks"
    assert checks["here: slurm: reconcile"] == {
        "what": "here: slurm: reconcile", "ok": True, "detail": "no job of this scheduler was granted yet"
    }
    code, out, _ = run("doctor")
    assert "PROBLEM" in out and "reference environment" in out


def test_doctor_says_which_schedulers_reconcile_cannot_read(run: Run, site: Path) -> None:
    """A scheduler whose jobs this host cannot list is a PROBLEM line of its own: its grants are never
    reconciled, so a lost epilog would never be repaired."""
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    hook("prolog/kasched-prolog", hook_env("33", "node-1"))
    checks = {c["what"]: c for c in json.loads(run("doctor", "--json")[1])}
    line = checks["here: slurm:demo: reconcile"]
    assert not line["ok"]
    assert line["detail"] == (
        "the scheduler cannot tell which jobs run (not reachable from here?): its grants are left alone, "
        "a lost epilog is never repaired"
    )


def test_unusable_database_is_one_line(run: Run, site: Path) -> None:
    """A corrupt SQLite file, or a state directory that cannot be made: exit 7 and one line, no traceback
    (a scheduler hook logs the line and does what its scheduler needs)."""
    corrupt = site / "corrupt"
    corrupt.mkdir()
    (corrupt / "kasched.db").write_bytes(b"this is not a database file, whatever its name says" * 4)
    (corrupt / "k.yaml").write_text(f"site: t\nstate_dir: {corrupt}\n")
    code, _, err = run("--config", str(corrupt / "k.yaml"), "rights")
    assert code == 7
    one_line_error(err, "file is not a database")
    (site / "nowhere.yaml").write_text("site: t\nstate_dir: /etc/passwd/state\n")
    code, _, err = run("--config", str(site / "nowhere.yaml"), "rights")
    assert code == 7
    one_line_error(err, "cannot create its directory: Not a directory")


def test_reconcile_gives_back_orphan_nodes(run: Run, site: Path) -> None:
    """A node out of the reference environment with no grant and no operation (a deploy that outlived
    its grant, a lost revert) is reverted; one under an active grant, or busy, is left alone."""
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    run("rights", "grant", "-u", "alice", "-m", "node-4", "--hours", "1")
    for node, state in (("node-3", "deploy_failed"), ("node-4", "deployed"), ("node-5", "deploying")):
        assert run("nodes", "set-state", "-m", node, state)[0] == 0
    code, out, _ = run("reconcile", "--grace", "0", "--dry-run")
    assert "would give back node-3: out of the reference environment, held by no grant" in out, out
    code, out, _ = run("reconcile", "--grace", "0", "--json")
    assert code == 0 and json.loads(out)["orphans"] == ["node-3"]
    # The background 'kasched job reclaim --orphans' takes node-3 for the revert; this site has no
    # reference environment, which it says in one line (the lab runs the real revert).
    log = wait_for_file_text(site / "state" / "reclaim" / "orphans.log", "reference environment")
    assert "orphans: reverting node-3" in log and "Traceback" not in log, log
    code, out, _ = run("reconcile", "--json")
    assert json.loads(out)["orphans"] == [], "a node changed a moment ago is left for the next round"


def test_reconcile_leaves_a_grant_past_its_walltime_to_the_epilog(run: Run, site: Path) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    env = {**hook_env("33", "node-1"), "KASCHED_SLURM_TIME_LIMIT": "1"}
    hook("prolog/kasched-prolog", env)
    time.sleep(1.5)  # the walltime passed; the epilog (after the scheduler's kill) has not run yet
    code, out, _ = run("reconcile")
    assert code == 0 and "left to the epilog: grant 1 of slurm:demo:33" in out and "0 revoked" in out, out
    assert json.loads(run("rights", "--json")[1]) == [], "past its end: no deploy"
    assert json.loads(run("rights", "--all", "--json")[1])[0]["revoked_at"] is None
    ended = hook("epilog/kasched-epilog", {**env, "SLURM_JOB_EXIT_CODE": "0"})
    assert "revoked" in ended.stdout
    reason = json.loads(run("rights", "--all", "--json")[1])[0]["revoke_reason"]
    assert reason.startswith("job ended"), f"the epilog, not reconcile, says how the job ended: {reason}"
    code, _, err = run("reconcile", "--walltime-grace", "-1")
    one_line_error(err, "walltime-grace: expected seconds")


class ScriptedBmc(PowerDriver):
    """A power driver whose BMCs answer as the test says: on, off, an error, or nothing (hang)."""

    name = "ssh"  # stands in for the ssh driver, which the inventory accepts without BMC credentials

    def __init__(self, answers: dict[str, str], asked: list[str], release: threading.Event) -> None:
        self.answers, self.asked, self.release = answers, asked, release

    def validate(self, node: NodeTarget) -> None:
        pass

    def status(self, node: NodeTarget) -> PowerState:
        self.asked.append(node.name)
        answer = self.answers.get(node.name, "on")
        if answer == "error":
            raise DriverError("BMC refused the session (unauthorized name)", node=node.name)
        if answer == "hang":
            self.release.wait(60)
        return PowerState.OFF if answer == "off" else PowerState.ON

    def on(self, node: NodeTarget) -> None:
        raise AssertionError("reconcile only asks")

    off = reset = on


INVENTORY = """site: t
clusters:
  - name: c
    defaults: {bmc: {driver: ssh}}
    nodes:
      - {name: "n[1-8]", mac: "02:00:00:00:03:[01-08]", ip: "10.78.0.[1-8]"}
      - {name: n9, mac: "02:00:00:00:03:09", ip: 10.78.0.9, bmc: {driver: ipmi, address: 10.78.1.9, credentials: nope}}
"""


def test_reconcile_gives_back_nodes_whose_bmc_contradicts_their_state(
    run: Run, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node recorded as running a system (reference, deployed) that no grant and no operation holds,
    whose BMC says off, fails, or does not answer in time, is reported, marked deploy_failed with the
    reason in its history, and given back; nodes held, down or whose BMC says on are left alone."""
    asked: list[str] = []
    release = threading.Event()
    answers = {"n2": "off", "n3": "off", "n4": "error", "n5": "hang", "n6": "off"}
    original = BuiltinDrivers.kasched_power_drivers

    @hookimpl
    def scripted(self: BuiltinDrivers) -> dict[str, Any]:
        return {**original(self), "ssh": lambda config: ScriptedBmc(answers, asked, release)}

    monkeypatch.setattr(BuiltinDrivers, "kasched_power_drivers", scripted)
    (site / "inventory.yaml").write_text(INVENTORY)
    assert run("nodes", "import", str(site / "inventory.yaml"))[0] == 0
    run("rights", "grant", "-u", "alice", "-m", "n6", "--hours", "1")
    for node, state in (("n3", "deployed"), ("n7", "down"), ("n8", "deploying")):
        assert run("nodes", "set-state", "-m", node, state)[0] == 0
    try:
        code, out, _ = run("reconcile", "--dry-run", "--bmc-timeout", "1")
        assert code == 0
        assert "BMC contradicts n2 (recorded reference): off: would mark deploy_failed" in out, out
        assert "BMC contradicts n5 (recorded reference): no answer in 1 s: would mark deploy_failed" in out, out
        assert "would give back n[2-5]" in out, out
        states = {n["name"]: n["state"] for n in json.loads(run("nodes", "list", "--json")[1])}
        assert states["n2"] == "reference", "a dry run changes nothing"
        started = time.monotonic()
        code, out, _ = run("reconcile", "--json", "--bmc-timeout", "1")
        took = time.monotonic() - started
    finally:
        release.set()
    report = json.loads(out)
    power = {f["node"]: f for f in report["power"]}
    assert set(power) == {"n2", "n3", "n4", "n5", "n9"}, power
    assert power["n2"] == {"node": "n2", "recorded": "reference", "bmc": "off", "marked": True}
    assert power["n3"]["recorded"] == "deployed" and power["n3"]["marked"]
    assert power["n4"]["bmc"].startswith("cannot tell: ") and "BMC refused the session" in power["n4"]["bmc"]
    assert power["n5"]["bmc"] == "no answer in 1 s" and power["n5"]["marked"]
    assert power["n9"]["bmc"].startswith("not checked: ") and "credentials 'nope'" in power["n9"]["bmc"]
    assert not power["n9"]["marked"], "the site's own configuration, not the node: reported, left as it is"
    assert took < 5, f"a BMC that does not answer is not waited on: {took:.1f} s"
    assert report["orphans"] == ["n2", "n3", "n4", "n5"]
    assert not {"n6", "n7", "n8"} & set(asked), f"held, down and busy nodes are not asked: {asked}"
    states = {n["name"]: n["state"] for n in json.loads(run("nodes", "list", "--json")[1])}
    assert [n for n, s in sorted(states.items()) if s == "deploy_failed"] == ["n2", "n3", "n4", "n5"], states
    assert states["n1"] == states["n9"] == states["n6"] == "reference"
    history = json.loads(run("stats", "--json", "-m", "n2")[1])
    entry = next(e for e in history if e["step"] == "power_check")
    assert entry["kind"] == "reconcile" and not entry["ok"]
    assert entry["error"] == "recorded reference but its BMC: off: marked deploy_failed, to give back"
    log = wait_for_file_text(site / "state" / "reclaim" / "orphans.log", "orphans: reverting")
    assert "orphans: reverting n[2-5]" in log, log
