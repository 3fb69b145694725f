"""Deploy jobs of a real OAR 2.5.9 on the lab's nodes, end to end (oar_lab.py: kaschedd in the lab's
namespace, OAR in the host's): an ordinary user's ``oarsub -t deploy`` script runs ``kasched deploy``
without a node list and the environment is checked from inside the nodes; then the jobs end three
ways at once (the script returns, the walltime, oardel) and each time the grant is revoked with the
reason, the nodes are back in the reference environment (from inside) and Alive in OAR, with no admin
action, and the queues stay active. Outside a job, or on another user's job's nodes, deploying is refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from kasched_oar.holds import hold_reason
from oar_cluster import USER
from oar_lab import KASCHED, LAB, LAB_BRIDGE, OTHER_USER, PATH_ENV, LabOar, lab_oar
from slurm_cluster import wait_for

from kasched.schedulers import HOLD_MARK

pytestmark = [pytest.mark.oar, pytest.mark.lab, pytest.mark.slow]
WALLTIME = "0:01:40"  # room for the deploys (15 s when the three run at once on 2 busy cores) and the checks


@pytest.fixture(scope="module")
def site() -> Iterator[LabOar]:
    with lab_oar() as made:
        yield made


@pytest.fixture(scope="module")
def jobs(site: LabOar) -> dict[str, str]:
    """Three 2-node deploy jobs at once on the six nodes, each deploying with kasched from its script."""
    jobs = {end: site.submit(WALLTIME if end == "walltime" else "0:10:00") for end in ("normal", "walltime", "cancel")}
    for job_id in jobs.values():
        site.oar.wait_state(job_id, {"Running"})
    for job_id in jobs.values():
        output = site.deployed(job_id)
        assert output.startswith("0\n"), f"job {job_id}: kasched deploy exit {output}"
    return jobs


def job_nodes(site: LabOar, job_id: str) -> list[str]:
    return sorted(site.oar.job(job_id)["assigned_network_address"])  # type: ignore[arg-type]


def test_deploy_outside_a_job_is_refused(site: LabOar) -> None:
    no_nodes = site.kasched_as(USER, "deploy", "-e", "userenv", "-k", str(site.user_key) + ".pub")
    assert no_nodes.returncode != 0 and "no nodes: give -m NODES" in no_nodes.stderr, no_nodes.stderr
    no_grant = site.kasched_as(USER, "deploy", "-e", "userenv", "-m", "node-1", "-k", str(site.user_key) + ".pub")
    assert no_grant.returncode != 0 and "node-1" in no_grant.stderr, no_grant.stderr
    assert len(no_grant.stderr.strip().splitlines()) == 1 and "Traceback" not in no_grant.stderr


def test_deploy_inside_the_job_reaches_its_nodes(site: LabOar, jobs: dict[str, str]) -> None:
    for job_id in jobs.values():
        grant = site.oar.grant(job_id)
        nodes = job_nodes(site, job_id)
        assert grant["user"] == USER and sorted(grant["nodes"]) == nodes and grant["environment_request"] == "userenv"  # type: ignore[arg-type]
        for node in nodes:
            inside = site.ssh(node, "hostname; cat /etc/kasched-marker; cat /run/kasched/cmdline", user_key=True)
            assert inside.returncode == 0, f"{node}: {inside.stderr}"
            lines = inside.stdout.split("\n")
            assert lines[:2] == [node, "deployed by kasched in an OAR job"] and "root=/dev/sda3" in lines[2]


def test_deploy_on_another_users_job_nodes_is_refused(site: LabOar, jobs: dict[str, str]) -> None:
    node = job_nodes(site, jobs["cancel"])[0]
    refused = site.kasched_as(OTHER_USER, "deploy", "-e", "userenv", "-m", node, "-k", str(site.user_key) + ".pub")
    assert refused.returncode != 0 and node in refused.stderr and USER in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def ended(site: LabOar, jobs: dict[str, str]) -> dict[str, str]:
    """The normal and oardel ends at once; the walltime job ends by itself meanwhile."""
    site.release(jobs["normal"])
    done = site.oar.run("oardel", jobs["cancel"], user=USER)
    assert done.returncode == 0, done.stderr
    return jobs


@pytest.mark.parametrize(
    ("end", "reason"), [("normal", "job ended (exit 0)"), ("cancel", "cancelled, oardel"), ("walltime", "walltime")]
)
def test_every_end_gives_the_nodes_back(site: LabOar, ended: dict[str, str], end: str, reason: str) -> None:
    job_id = ended[end]
    nodes = job_nodes(site, job_id)
    grant = site.oar.wait_revoked(job_id, timeout=240)
    assert not grant["active"] and str(grant["revoke_reason"]).startswith(reason), grant
    site.oar.wait_state(job_id, {"Terminated", "Error"})
    wait_for(
        lambda: all(site.node_states()[node] == "reference" for node in nodes),
        300,
        f"{nodes} back in the reference environment ({site.node_states()})\n{site.reclaim_logs()}",
    )
    for node in nodes:
        inside = site.ssh(node, "hostname; cat /etc/kasched-system; cat /run/kasched/cmdline")
        assert inside.returncode == 0, f"{node}: {inside.stderr}"
        assert inside.stdout.split("\n")[:2] == [node, "reference"] and "root=/dev/sda2" in inside.stdout
        assert site.ssh(node, "true", user_key=True).returncode != 0  # the user's key left with the environment
    states = site.oar.node_states()
    assert all(states[node] == "Alive" for node in nodes), states
    assert site.oar.queues_active()


# A node goes back to OAR only when it is back (docs/oar.md, "While a node is given back"): the
# epilogue drains the job's resources (reason in the 'kasched' property) before kasched job end, and
# kaschedd releases them when the revert ends; a failed revert keeps the node drained with why; a lost
# epilogue is repaired by kaschedd's own periodic reconcile, which reaches OAR through the lab's bridge.
PAIR = ("node-1", "node-2")  # jobs handed the same nodes back to back, then the lost epilogue
FAILING = ("node-3", "node-4")  # node-3's BMC stops answering before its job ends: its revert fails


@dataclass
class HandOver:
    """What the admin saw in OAR while the first jobs on PAIR and FAILING were given back."""

    first: str  # job on PAIR, then given back
    second: str  # job on PAIR submitted while the first ran: starts once PAIR is back
    failing: str  # job on FAILING, node-3's revert fails
    after_failing: str  # job on FAILING submitted meanwhile: must not start
    held: dict[str, tuple[str, str]]  # PAIR's resources while reverting
    second_state_while_held: str
    ended_at: float  # when the first job's script was let return (time.time())
    released_at: float  # when PAIR's resources were seen released (time.time())
    failed: dict[str, tuple[str, str]]  # FAILING's resources once node-3's revert failed
    after_failing_state: str
    oarnodes_text: str  # `oarnodes node-3` as the admin reads it


def wait_deployed(site: LabOar, *job_ids: str) -> None:
    for job_id in job_ids:
        site.oar.wait_state(job_id, {"Running"}, timeout=120)
    for job_id in job_ids:
        output = site.deployed(job_id)
        assert output.startswith("0\n"), f"job {job_id}: kasched deploy exit {output}"


@pytest.fixture(scope="module")
def handed_over(site: LabOar) -> HandOver:
    wait_for(lambda: all(site.resources()[n] == ("NO", "") for n in PAIR + FAILING), 300, "the nodes released")
    first, failing = site.submit("0:10:00", PAIR), site.submit("0:10:00", FAILING)
    wait_deployed(site, first, failing)
    second, after_failing = site.submit("0:10:00", PAIR), site.submit("0:10:00", FAILING)
    time.sleep(3)
    assert site.oar.job_state(second) == "Waiting" and site.oar.job_state(after_failing) == "Waiting"
    bmc = site.bmc_pid("node-3")
    os.kill(bmc, signal.SIGSTOP)
    try:
        ended_at = time.time()
        site.release(first)
        site.release(failing)
        seen: dict[str, object] = {}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ("released_at" in seen and "failed" in seen):
            now, resources = time.time(), site.resources()
            if "held" not in seen and all(resources[n] == ("YES", hold_reason(first)) for n in PAIR):
                seen["held"] = {n: resources[n] for n in PAIR}
                seen["second_state"] = site.oar.job_state(second)
            if "held" in seen and "released_at" not in seen and all(resources[n] == ("NO", "") for n in PAIR):
                seen["released_at"] = now
            if "failed" in resources["node-3"][1]:
                seen["failed"] = {n: resources[n] for n in FAILING}
                seen["after_failing_state"] = site.oar.job_state(after_failing)
                seen["oarnodes"] = site.oar.run("oarnodes", "node-3").stdout
            time.sleep(0.5)
        assert "held" in seen, f"{PAIR} never seen held: {site.resources()}\n{site.oar.logs()}"
        assert "released_at" in seen and "failed" in seen, f"{seen}\n{site.resources()}\n{site.reclaim_logs()}"
    finally:
        os.kill(bmc, signal.SIGCONT)
    site.oar.run("oardel", after_failing, user=USER)  # node-3 stays out until the admin's repair
    return HandOver(
        first, second, failing, after_failing, seen["held"], str(seen["second_state"]), ended_at,  # type: ignore[arg-type]
        float(seen["released_at"]),  # type: ignore[arg-type]
        seen["failed"], str(seen["after_failing_state"]), str(seen["oarnodes"]),  # type: ignore[arg-type]
    )  # fmt: skip


def test_next_job_on_the_same_nodes_starts_once_they_are_back_and_deploys_once(
    site: LabOar, handed_over: HandOver
) -> None:
    assert handed_over.held == {n: ("YES", hold_reason(handed_over.first)) for n in PAIR}
    assert handed_over.second_state_while_held == "Waiting"
    wait_deployed(site, handed_over.second)  # its script runs kasched deploy once, no retry
    started = int(site.oar.job(handed_over.second)["startTime"])  # type: ignore[call-overload]
    assert started >= int(handed_over.released_at) - 1, (started, handed_over.released_at)
    for node in PAIR:
        inside = site.ssh(node, "cat /etc/kasched-marker", user_key=True)
        assert inside.returncode == 0 and inside.stdout == "deployed by kasched in an OAR job\n", inside.stderr
    hook = re.search(rf"job {handed_over.first}: epilogue done in ([\d.]+) s", site.oar.log("epilogue.log"))
    assert hook and float(hook.group(1)) < 30, site.oar.log("epilogue.log")
    waited = started - handed_over.ended_at
    print(f"\nnext job started {waited:.0f} s after the first one's end, {started - handed_over.released_at:+.1f} s after"
          f" the release; epilogue {hook.group(1)} s")  # fmt: skip


def test_a_node_whose_revert_failed_stays_out_with_the_reason(site: LabOar, handed_over: HandOver) -> None:
    drain, reason = handed_over.failed["node-3"]
    assert drain == "YES" and reason.startswith(f"{HOLD_MARK} revert ") and "failed" in reason, reason
    assert "node-3" in reason  # the revert's own error: which BMC did not answer
    assert handed_over.failed["node-4"] == ("NO", "")  # its revert ended well: back in service
    assert handed_over.after_failing_state == "Waiting"  # not given node-3
    assert "drain=YES" in handed_over.oarnodes_text.replace(" ", "") and reason in handed_over.oarnodes_text
    assert site.oar.queues_active()


def test_a_lost_epilogue_is_repaired_by_kaschedds_own_reconcile(site: LabOar, handed_over: HandOver) -> None:
    job_id = handed_over.second
    wait_deployed(site, job_id)
    with site.epilogue_lost():
        site.release(job_id)
        site.oar.wait_state(job_id, {"Terminated", "Error"}, timeout=120)
    assert f"job {job_id}: revoking failed" in site.oar.log("epilogue.log")
    assert all(site.resources()[n] == ("YES", hold_reason(job_id)) for n in PAIR)  # held: no next job meanwhile
    assert site.oar.grant(job_id)["active"]
    ended = time.monotonic()
    grant = site.oar.wait_revoked(job_id, timeout=240)
    assert str(grant["revoke_reason"]).startswith(f"reconcile: oar no longer runs job {job_id}"), grant
    wait_for(lambda: all(site.resources()[n] == ("NO", "") for n in PAIR), 240,
             f"{PAIR} released in OAR ({site.resources()})\n{site.reclaim_logs()}")  # fmt: skip
    for node in PAIR:
        inside = site.ssh(node, "hostname; cat /etc/kasched-system; cat /run/kasched/cmdline")
        assert inside.returncode == 0, f"{node}: {inside.stderr}"
        assert inside.stdout.split("\n")[:2] == [node, "reference"] and "root=/dev/sda2" in inside.stdout
    assert all(site.node_states()[n] == "reference" for n in PAIR)
    assert site.oar.queues_active()
    print(f"\nlost epilogue repaired {time.monotonic() - ended:.0f} s after the job's end")


def test_doctor_run_where_kaschedd_runs_lists_oars_jobs(site: LabOar) -> None:
    """From the lab's namespace, with the site's scheduler_settings (the bridge), as kaschedd does."""
    done = subprocess.run(
        [*KASCHED, "lab", "exec", "--name", LAB, "--", "env", f"KASCHED_CONFIG={site.config}", "KASCHED_DIRECT=1", *KASCHED,
         "doctor", "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": PATH_ENV},
    )  # fmt: skip
    assert done.stdout.startswith("["), (
        f"kasched doctor exit {done.returncode}: {done.stdout[-500:]} {done.stderr[-1500:]}"
    )
    checks = {c["what"]: c for c in json.loads(done.stdout)}
    jobs = checks["oar: OAR jobs from here"]
    assert jobs["ok"] and f"behind '{LAB_BRIDGE}'" in jobs["detail"], jobs
    assert checks["oar: resource property kasched"]["ok"], checks
    unbridged = subprocess.run(
        [*KASCHED, "lab", "exec", "--name", LAB, "--", "env", f"KASCHED_CONFIG={site.config}", "KASCHED_DIRECT=1",
         "KASCHED_OAR_COMMAND_PREFIX=", *KASCHED, "doctor", "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": PATH_ENV},
    )  # fmt: skip
    jobs = {c["what"]: c for c in json.loads(unbridged.stdout)}["oar: OAR jobs from here"]
    assert not jobs["ok"] and "a lost epilogue is never repaired" in jobs["detail"], jobs
