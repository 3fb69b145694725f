"""Many prolog and epilog processes at once on the SQLite default: nothing lost, never "locked"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kasched.compose import open_site
from kasched.config import Config
from kasched.identity import Caller
from tests.conftest import EXAMPLES, ROOT

PROCESSES = 50
WORKER = """
import sys
from kasched.compose import open_site
from kasched.config import Config
from kasched.identity import Caller
from kasched.messages import JobEnd, JobInfo
from pathlib import Path

state, worker = Path(sys.argv[1]), int(sys.argv[2])
api = open_site(Config(site="t", state_dir=state), Caller("root", True), load_entry_points=False)
node = f"node-{worker % 8 + 1}"
for round_ in range(4):
    job = f"{worker}-{round_}"
    api.record_job_start(JobInfo("slurm", "c", job, f"user{worker}", (node,), walltime=600))
    if round_ % 2 == 0:
        api.record_job_end(JobEnd("slurm", "c", job, reason="done"))
api.close()
print("ok")
"""


@pytest.mark.slow
def test_fifty_processes_grant_and_revoke_at_once(tmp_path: Path) -> None:
    config = Config(site="t", state_dir=tmp_path / "state")
    api = open_site(config, Caller("root", True), load_entry_points=False)
    api.import_nodes(EXAMPLES / "cluster.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(config.state_dir), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(PROCESSES)
    ]
    failures = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        if worker.returncode != 0 or out.strip() != "ok":
            failures.append(err.strip().splitlines()[-1:] or ["(no output)"])
    assert failures == [], failures
    assert not any("locked" in str(f) for f in failures)
    grants = api.rights(include_ended=True)
    assert len(grants) == PROCESSES * 4  # nothing lost
    assert sum(1 for g in grants if g.revoked_at is not None) == PROCESSES * 2
    assert sum(1 for g in grants if g.active) == PROCESSES * 2
    api.close()
