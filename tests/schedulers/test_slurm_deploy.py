"""Deploy jobs on a real Slurm 22.05 (slurmctld, four slurmd on this host, kasched's PrologSlurmctld and
EpilogSlurmctld): grants at start, revoked at every kind of end, and nodes kept for the whole job while
their own slurmd is gone (they run a user's system), given back to Slurm at its end."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime

import pytest
from slurm_cluster import ROOT, SLURMD_TIMEOUT, USER, SlurmCluster, wait_for

from kasched.nodeset import expand, fold

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def grant_of(slurm: SlurmCluster, job_id: str) -> dict[str, object]:
    done = slurm.kasched("rights", "--all", "--json", "-u", USER)
    assert done.returncode == 0, done.stderr
    grants = [g for g in json.loads(done.stdout) if g["job_id"] == job_id and g["scheduler"] == "slurm"]
    assert len(grants) == 1, f"job {job_id}: grants {grants}\nprolog log:\n{slurm.log('prolog.log')}"
    return grants[0]


def job_nodes(slurm: SlurmCluster, job_id: str) -> str:
    done = slurm.run("squeue", "-h", "-j", job_id, "-o", "%N")
    return done.stdout.strip()


def wait_running(slurm: SlurmCluster, job_id: str) -> str:
    wait_for(lambda: slurm.job_state(job_id) == "RUNNING", 30, f"job {job_id} to run ({slurm.log('prolog.log')})")
    return job_nodes(slurm, job_id)


def wait_revoked(slurm: SlurmCluster, job_id: str) -> dict[str, object]:
    # Not just inactive: a grant also lapses at the job's time limit, a little before the epilog runs.
    wait_for(lambda: grant_of(slurm, job_id)["revoked_at"], 60, f"the grant of job {job_id} to be revoked")
    grant = grant_of(slurm, job_id)
    assert not grant["active"]
    return grant


def wait_idle(slurm: SlurmCluster, nodes: list[str], timeout: float = 30) -> None:
    wait_for(
        lambda: all(slurm.node_states().get(n) == "idle" for n in nodes),
        timeout,
        f"nodes {nodes} to be idle (now {slurm.node_states()})",
    )


def test_deploy_job_normal_end_grants_then_revokes(slurm: SlurmCluster) -> None:
    job = slurm.submit("-C", "deploy", "-N", "2", "-t", "5", "--comment", "env=debian12", "--wrap", "sleep 6")
    nodes = wait_running(slurm, job)
    grant = grant_of(slurm, job)
    assert grant["active"] and grant["environment_request"] == "debian12"
    assert sorted(grant["nodes"]) == expand(nodes)
    assert slurm.may_deploy(nodes)
    lasts = datetime.fromisoformat(str(grant["expires_at"])) - datetime.fromisoformat(str(grant["created_at"]))
    assert lasts.total_seconds() == 5 * 60, "the grant lasts the job's time limit"
    assert set(slurm.node_addrs()[n] for n in expand(nodes)) == {"127.0.0.2"}, "stand-ins answer for the nodes"
    revoked = wait_revoked(slurm, job)
    assert "job ended" in str(revoked["revoke_reason"])
    assert not slurm.may_deploy(nodes)
    # The nodes never left the reference system: their slurmd answers at once and Slurm has them back.
    wait_idle(slurm, expand(nodes))
    assert set(slurm.node_addrs()[n] for n in expand(nodes)) == {"127.0.0.1"}


def test_deploy_job_scancel_revokes(slurm: SlurmCluster) -> None:
    job = slurm.submit("-C", "deploy", "-N", "1", "-t", "5", "--wrap", "sleep 300")
    nodes = wait_running(slurm, job)
    assert slurm.may_deploy(nodes)
    shown = slurm.run("scontrol", "-o", "show", "job", job).stdout
    assert "Requeue=0" in shown and "OverSubscribe=NO" in shown, "job_submit.lua: no requeue, whole nodes"
    cancelled = slurm.run("scancel", job, user=USER)
    assert cancelled.returncode == 0, cancelled.stderr
    revoked = wait_revoked(slurm, job)
    assert str(revoked["revoke_reason"]).startswith(("cancelled", "killed by signal 15")), revoked
    wait_idle(slurm, expand(nodes))


def test_salloc_deploy_job(slurm: SlurmCluster) -> None:
    """salloc holds the allocation from the login node for as long as its command runs."""
    done = slurm.run(
        "salloc", "-C", "deploy", "-N", "2", "-t", "5", "--comment", "env=mine",
        "sh", "-c", "sleep 2; echo nodes=$SLURM_JOB_NODELIST job=$SLURM_JOB_ID",
        user=USER, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    fields = dict(word.split("=", 1) for word in done.stdout.split() if "=" in word)
    grant = wait_revoked(slurm, fields["job"])
    assert sorted(grant["nodes"]) == expand(fields["nodes"])
    assert grant["environment_request"] == "mine"
    wait_idle(slurm, expand(fields["nodes"]))


def test_ordinary_job_gets_no_grant_and_keeps_its_nodes(slurm: SlurmCluster) -> None:
    job = slurm.submit("-N", "1", "-t", "5", "--wrap", "sleep 3")
    nodes = wait_running(slurm, job)
    assert not slurm.may_deploy(nodes)
    assert slurm.node_addrs()[nodes] == "127.0.0.1"
    wait_for(lambda: slurm.job_state(job) in ("COMPLETED", ""), 30, f"job {job} to complete")
    assert f"job {job}: not a deploy job" in slurm.log("prolog.log")


def test_nodes_kept_without_slurmd_until_walltime_then_given_back(slurm: SlurmCluster) -> None:
    """The acceptance of issue 6: with SlurmdTimeout=5 s, a deploy job whose nodes have no slurmd (they run
    the user's system) keeps them for at least 3x that time; here for its whole 1-minute walltime. At its
    end the nodes come back idle, with no admin action, once their slurmd runs again."""
    job = slurm.submit("-C", "deploy", "-N", "2", "-t", "1", "--wrap", "sleep 600")
    nodes = list(expand(wait_running(slurm, job)))
    for node in nodes:
        slurm.kill_slurmd(node)
    gone = time.monotonic()
    kept = 0.0
    while time.monotonic() - gone < 150:
        states, held = slurm.node_states(), job_nodes(slurm, job)
        if slurm.job_state(job) != "RUNNING":  # read after the nodes: they were read while it ran
            break
        assert all(states[n] == "allocated" for n in nodes), f"after {kept:.0f} s without slurmd: {states}"
        assert held == fold(nodes), "the job keeps all its nodes"
        kept = time.monotonic() - gone
        time.sleep(1)
    print(f"nodes kept {kept:.1f} s without their slurmd (SlurmdTimeout={SLURMD_TIMEOUT} s)")
    assert kept >= 3 * SLURMD_TIMEOUT
    assert slurm.job_state(job) in ("TIMEOUT", "COMPLETING"), slurm.job_state(job)
    revoked = wait_revoked(slurm, job)
    assert str(revoked["revoke_reason"]).startswith("walltime"), revoked
    # Still in the user's system: Slurm must not schedule them.
    time.sleep(2)
    states = slurm.node_states()
    assert all(states[n] != "idle" for n in nodes), states
    for node in nodes:
        slurm.start_slurmd(node)
    back = time.monotonic()
    wait_idle(slurm, nodes)
    print(f"nodes idle {time.monotonic() - back:.1f} s after their slurmd started")


def test_nodes_kept_across_slurmctld_reconfigure_and_restart(slurm: SlurmCluster) -> None:
    """slurmctld forgets the stand-ins' NodeAddr when it reconfigures or restarts; the keeper sets it back
    before SlurmdTimeout runs out, so the job keeps its nodes."""
    job = slurm.submit("-C", "deploy", "-N", "1", "-t", "5", "--wrap", "sleep 600")
    (node,) = expand(wait_running(slurm, job))
    slurm.kill_slurmd(node)
    assert slurm.run("scontrol", "reconfigure").returncode == 0
    slurm.restart_slurmctld()
    gone = time.monotonic()
    while time.monotonic() - gone < 4 * SLURMD_TIMEOUT:
        assert slurm.job_state(job) == "RUNNING", slurm.log("slurmctld.log")[-2000:]
        time.sleep(1)
    assert slurm.node_states()[node] == "allocated"
    assert slurm.node_addrs()[node] == "127.0.0.2"
    assert "set back to 127.0.0.2" in (slurm.dir / "standin" / "keeper.log").read_text()
    assert slurm.run("scancel", job, user=USER).returncode == 0
    wait_revoked(slurm, job)
    slurm.start_slurmd(node)
    wait_idle(slurm, [node])


def test_reconcile_and_doctor_with_real_slurm(slurm: SlurmCluster) -> None:
    """A grant whose epilog was lost (here: made for a job Slurm never ran) is revoked by reconcile;
    the grant of a job Slurm runs is kept. doctor sees slurmctld and kasched's hooks in its config."""
    job = slurm.submit("-C", "deploy", "-N", "1", "-t", "5", "--wrap", "sleep 300")
    nodes = wait_running(slurm, job)
    other = next(n for n in ("n1", "n2", "n3", "n4") if n not in expand(nodes))
    lost = {
        "SLURM_JOB_ID": "987654", "SLURM_JOB_USER": USER, "SLURM_JOB_NODELIST": other,
        "SLURM_CLUSTER_NAME": "kasched", "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld", "SLURM_JOB_CONSTRAINTS": "deploy",
    }  # fmt: skip
    started = subprocess.run(
        [str(ROOT / ".venv/bin/kasched"), "job", "start"], env={**slurm.env, **lost}, capture_output=True, text=True
    )
    assert started.returncode == 0, started.stderr
    done = slurm.kasched("reconcile", "--grace", "0", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "slurm:kasched:987654" in [r["job"] for r in report["revoked"]], report
    assert f"slurm:kasched:{job}" in report["running"] and not report["unknown"], report
    assert grant_of(slurm, "987654")["revoke_reason"] == "reconcile: slurm no longer runs job 987654"
    assert grant_of(slurm, job)["active"]
    doctor = slurm.kasched("doctor", "--json")
    checks = {c["what"]: c for c in json.loads(doctor.stdout)}
    assert checks["slurm: slurmctld"]["ok"] and "cluster kasched" in checks["slurm: slurmctld"]["detail"]
    assert checks["slurm: PrologSlurmctld"]["ok"] and checks["slurm: EpilogSlurmctld"]["ok"], checks
    assert "no pyslurm for Slurm 22.05" in checks["slurm: client"]["detail"]
    assert slurm.run("scancel", job, user=USER).returncode == 0
    wait_revoked(slurm, job)
