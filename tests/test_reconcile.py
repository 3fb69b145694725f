"""``kasched reconcile`` and ``kasched doctor`` on a site whose scheduler cannot be reached: grants are
left alone rather than guessed about, grants past their end are revoked. With a real Slurm:
tests/schedulers/test_slurm_deploy.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

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
    code, out, _ = run("doctor")
    assert "PROBLEM" in out and "reference environment" in out


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
