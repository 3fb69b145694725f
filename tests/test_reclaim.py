"""Giving a job's nodes back at its end: the epilog revokes the grant, cancels the user's running
operations, and starts ``kasched job reclaim`` in the background for the nodes that left the reference
environment. Real prolog/epilog processes; the revert itself runs on the lab in tests/e2e."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kasched.compose import open_site
from kasched.config import load
from kasched.deploy import records
from kasched.models import NodeState
from tests import test_cli
from tests.conftest import EXAMPLES, ROOT, write
from tests.test_cli import Run, one_line_error

site, run = test_cli.site, test_cli.run  # the CLI tests' fixtures: a SQLite site, the CLI in-process

BIN = Path(sys.executable).parent


def hook_env(job: str, nodes: str) -> dict[str, str]:
    return {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "KASCHED_CONFIG": os.environ["KASCHED_CONFIG"],
        "KASCHED": str(BIN / "kasched"),
        "SLURM_JOB_ID": job,
        "SLURM_JOB_USER": "alice",
        "SLURM_JOB_NODELIST": nodes,
        "SLURM_CLUSTER_NAME": "demo",
        "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld",
        "SLURM_JOB_CONSTRAINTS": "deploy",
    }


def hook(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    context = "prolog_slurmctld" if "prolog" in script else "epilog_slurmctld"
    done = subprocess.run(
        [str(ROOT / script)], env={**env, "SLURM_SCRIPT_CONTEXT": context}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def wait_for_file_text(path: Path, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{path}: no {text!r} after {timeout} s: {path.read_text() if path.exists() else 'none'}")


def test_every_node_of_an_ending_job_is_given_back_whatever_its_recorded_state(run: Run, site: Path) -> None:
    """A node recorded ``reference`` may have been changed or powered off by its user: it is given back
    too (the revert itself skips, without a reboot, a node kasched still vouches for)."""
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    run("nodes", "set-state", "-m", "node-3", "down")
    env = hook_env("21", "node-[1-3]")
    hook("prolog/kasched-prolog", env)
    ended = hook("epilog/kasched-epilog", env)
    found = re.search(r"reverting (\S+) in the background", ended.stdout)
    assert found and found.group(1) == "node-[1-2]", ended.stdout  # node-3 is out of service


def test_job_end_cancels_operations_and_reverts_in_background(run: Run, site: Path) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    env = hook_env("22", "node-[1-3]")
    hook("prolog/kasched-prolog", env)
    run("nodes", "set-state", "-m", "node-2", "deployed")
    api = open_site(load())
    try:
        with api.database.session() as session:  # alice's deployment on node-3, still running
            deployment = records.start(session, "deploy", "alice", "mine", ["node-3"], NodeState.DEPLOYING)
    finally:
        api.close()
    started = time.monotonic()
    ended = hook("epilog/kasched-epilog", env)
    returned_in = time.monotonic() - started
    assert f"cancelling its running operations {deployment}" in ended.stdout
    found = re.search(r"reverting (\S+) in the background \(pid (\d+), log (\S+)\)", ended.stdout)
    assert found, ended.stdout
    assert found.group(1) == "node-[1-3]", "every node of the job is given back, node-1 (reference) too"
    assert returned_in < 30, "the epilog does not wait for the revert"
    api = open_site(load())
    try:
        with api.database.session() as session:
            assert records.cancel_requested(session, deployment)
            # The cancelled operation stops: its process releases the node (here, by hand).
            records.finish(session, deployment, {"node-3": NodeState.DEPLOY_FAILED}, None, cancelled=True)
    finally:
        api.close()
    # The background reclaim waited for node-3, then tried the revert: this site has no reference
    # environment, which it says in one line (the lab tests run the real revert).
    log = wait_for_file_text(Path(found.group(3)), "reference environment")
    assert "reverting node-[2-3] (job of alice)" in log or "no reference environment" in log, log
    assert "Traceback" not in log


def test_reclaim_refuses_active_grants_and_users(run: Run, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    run("rights", "grant", "-u", "alice", "-m", "node-1", "--hours", "1", "--job", "j9")
    monkeypatch.setenv("KASCHED_DIRECT", "1")
    code, _, err = run("job", "reclaim", "1")
    assert code != 0
    one_line_error(err, "grant 1 is active: its job still runs")
    code, _, err = run("job", "reclaim", "7")
    one_line_error(err, "no grant 7")
    code, _, err = run("job", "reclaim", "1", "--wait", "nan")
    assert code == 2
    one_line_error(err, "wait: expected seconds")
    with pytest.raises(SystemExit) as usage:
        run("job", "reclaim", "x1")
    assert usage.value.code == 2


def test_revert_at_job_end_can_be_turned_off(run: Run, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(site / "off.yaml", f"site: t\nstate_dir: {site / 'state'}\nrevert_at_job_end: false\n")
    monkeypatch.setenv("KASCHED_CONFIG", str(config))
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    env = hook_env("23", "node-1")
    hook("prolog/kasched-prolog", env)
    run("nodes", "set-state", "-m", "node-1", "deployed")
    ended = hook("epilog/kasched-epilog", env)
    assert "revoked" in ended.stdout and "reverting" not in ended.stdout
    bad = write(site / "bad.yaml", "site: t\nrevert_at_job_end: sometimes\n")
    code, _, err = run("--config", str(bad), "config", "check")
    assert code == 2
    one_line_error(err, "revert_at_job_end: expected true or false")


def test_a_job_s_end_touches_only_its_own_job(run: Run, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Job 41 and job 42 of alice hold node-[1-2] at once (the scheduler gave the nodes to 42 before 41's
    epilog ran). 41's end cancels its own operation, not 42's on the same nodes, and its revert leaves
    alone the nodes 42 holds: its own operation's node too, once that one stopped."""
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    first, second = hook_env("41", "node-[1-2]"), hook_env("42", "node-[1-2]")
    hook("prolog/kasched-prolog", first)
    api = open_site(load())
    try:
        with api.database.session() as session:
            mine = records.start(session, "deploy", "alice", "a", ["node-1"], NodeState.DEPLOYING)
        hook("prolog/kasched-prolog", second)
        with api.database.session() as session:
            next_job = records.start(session, "deploy", "alice", "b", ["node-2"], NodeState.DEPLOYING)
        ended = hook("epilog/kasched-epilog", first)
        assert f"cancelling its running operations {mine}" in ended.stdout, ended.stdout
        assert next_job not in ended.stdout
        assert "reverting" not in ended.stdout, "both nodes are job 42's now"
        with api.database.session() as session:
            assert records.cancel_requested(session, mine)
            assert not records.cancel_requested(session, next_job)
            assert records.stop_reason(session, next_job) is None
            assert records.stop_reason(session, mine) == "the grant of job slurm:demo:41 ended"
            records.finish(session, mine, {"node-1": NodeState.DEPLOY_FAILED}, None, cancelled=True)
    finally:
        api.close()
    monkeypatch.setenv("KASCHED_DIRECT", "1")
    code, out, _ = run("job", "reclaim", "1", "--wait", "5")
    assert "grant 1: node-[1-2] granted to another job already: left alone" in out, out
    assert "grant 1: nothing to revert" in out and code == 0, out
    assert json.loads(run("nodes", "show", "node-1", "--json")[1])["state"] == "deploy_failed"


def test_reference_nodes_left_untrusted_by_an_ended_grant_are_orphans(run: Run, site: Path) -> None:
    """A node recorded ``reference`` whose job ended without its revert (a lost epilog, a failed
    reclaim) is given back by reconcile: its user may have changed the partition. A node kasched
    verified since, and one no grant ever held, are not."""
    from sqlalchemy import select, update

    from kasched import grants
    from kasched.deploy import reclaim
    from kasched.models import Grant, Node

    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    env = hook_env("31", "node-[1-2]")
    hook("prolog/kasched-prolog", env)
    api = open_site(load())
    try:
        with api.database.session() as session:  # the epilog's revoke, its revert lost
            grant_id = session.scalars(select(Grant.id).where(Grant.revoked_at.is_(None))).one()
            grants.revoke_by_id(session, grant_id, "job ended")
            session.execute(update(Node).where(Node.name == "node-2").values(trusted=True))
        with api.database.session() as session:
            found = reclaim.orphans(session)
    finally:
        api.close()
    assert "node-1" in found, found  # held, ended, never verified since
    assert "node-2" not in found and "node-3" not in found, found  # verified since; never held


def test_a_revert_that_fails_before_any_node_still_tells_the_scheduler(
    run: Run, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reference environment: the revert of a job's end fails before any node has an outcome. The
    scheduler is told all the same, every node kept out with that reason (else its hold would stay
    with no reason but "giving back")."""
    from kasched.cli import jobs

    told: list[tuple[object, ...]] = []
    monkeypatch.setattr(jobs, "release", lambda *args: told.append(args[1:]) or [])
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    env = hook_env("43", "node-[1-2]")
    hook("prolog/kasched-prolog", env)
    hook("epilog/kasched-epilog", env)  # its own background reclaim fails the same way, out of sight
    monkeypatch.setenv("KASCHED_DIRECT", "1")
    code, _, err = run("job", "reclaim", "1", "--wait", "0")
    assert code == 2
    one_line_error(err, "the site has no reference environment")
    reason = "kasched: revert failed: the site has no reference environment (add one with 'reference: true')"
    assert told == [("slurm", "43", [], {"node-1": reason, "node-2": reason})]
