"""Why kasched needs stand-ins: the same deploy job on the real Slurm without them loses its nodes within
a few SlurmdTimeouts of their slurmd stopping. If this starts failing, Slurm changed how it handles a
silent node: docs/slurm.md should be measured again."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from slurm_cluster import SLURMD_TIMEOUT, SlurmCluster, slurm_cluster, wait_for

from kasched.nodeset import expand

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def bare_slurm() -> Iterator[SlurmCluster]:
    with slurm_cluster(port=17000, standin_addr="none") as cluster:
        yield cluster


def test_without_standins_a_silent_node_is_down_and_the_job_ends(bare_slurm: SlurmCluster) -> None:
    job = bare_slurm.submit("-C", "deploy", "-N", "2", "-t", "5", "--wrap", "sleep 600")
    wait_for(lambda: bare_slurm.job_state(job) == "RUNNING", 30, f"job {job} to run")
    nodes = expand(bare_slurm.run("squeue", "-h", "-j", job, "-o", "%N").stdout.strip())
    for node in nodes:
        bare_slurm.kill_slurmd(node)
    gone = time.monotonic()
    wait_for(
        lambda: all(bare_slurm.node_states().get(n) == "down*" for n in nodes),
        6 * SLURMD_TIMEOUT,
        "the nodes without slurmd to be DOWN",
    )
    down_after = time.monotonic() - gone
    wait_for(lambda: bare_slurm.job_state(job) not in ("RUNNING", "COMPLETING"), 30, f"job {job} to end")
    print(
        f"without stand-ins: nodes DOWN {down_after:.1f} s after their slurmd stopped, job {bare_slurm.job_state(job)}"
    )
    assert bare_slurm.job_state(job) in ("NODE_FAIL", "FAILED", "CANCELLED"), "deploy jobs are not requeued"
    assert "revoked" in bare_slurm.log("epilog.log")
    for node in nodes:
        bare_slurm.start_slurmd(node)
    wait_for(lambda: all(bare_slurm.node_states().get(n) == "idle" for n in nodes), 30, "ReturnToService=2")
