"""Deploy jobs of a real OAR 2.5.9 on the lab's nodes, end to end (oar_lab.py: kaschedd in the lab's
namespace, OAR in the host's): an ordinary user's ``oarsub -t deploy`` script runs ``kasched deploy``
without a node list and the environment is checked from inside the nodes; then the jobs end three
ways at once (the script returns, the walltime, oardel) and each time the grant is revoked with the
reason, the nodes are back in the reference environment (from inside) and Alive in OAR, with no admin
action, and the queues stay active. Outside a job, or on another user's job's nodes, deploying is refused."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from oar_cluster import USER
from oar_lab import OTHER_USER, LabOar, lab_oar
from slurm_cluster import wait_for

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
