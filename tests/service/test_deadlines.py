"""A hook's deadline (issue 18, audit F6): with the database locked, the scheduler's hook gives up,
and no grant is ever stored after it did. The hook sends its deadline (KASCHED_DEADLINE, then the
X-Kasched-Deadline header); kaschedd's database waits end before it, and a commit after it is refused.
A real kaschedd, the real PBS hook script (with the stand-in ``pbs`` module) and Slurm hook, and a
real exclusive SQLite lock held by another process; the lock waits of PostgreSQL and MariaDB too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from kasched import deadline
from kasched.api import Kasched
from kasched.config import load
from kasched.errors import DatabaseError
from kasched.messages import JobInfo
from tests.conftest import EXAMPLES
from tests.schedulers.test_pbs_hooks import Site, deploy_job, log_text
from tests.service.conftest import kaschedd

LOCKER = (
    "import sqlite3, sys, time\n"
    "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
    "c.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "c.execute('ROLLBACK')\n"
)


@pytest.fixture
def pbs_site() -> Iterator[Site]:
    """The PBS hook's site (tests/schedulers/test_pbs_hooks.py), served by kaschedd."""
    base = Path(tempfile.mkdtemp(prefix="kasched-deadline-"))
    base.chmod(0o755)
    directory = base / "site"
    directory.mkdir()
    directory.chmod(0o777)
    made = Site(directory)
    assert made.kasched("nodes", "import", str(EXAMPLES / "cluster.yaml")).returncode == 0
    try:
        with kaschedd(load(made.config)):
            yield made
    finally:
        shutil.rmtree(base, ignore_errors=True)


def lock_database(database: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding an exclusive lock on the SQLite file for ``seconds``."""
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(database), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
    return locker


@pytest.mark.slow
def test_the_pbs_hook_gives_up_and_no_grant_is_ever_stored(pbs_site: Site) -> None:
    pbs_site.configure(timeout=6)
    locker = lock_database(pbs_site.directory / "state" / "kasched.db", 12)
    started = time.monotonic()
    result = pbs_site.run_hook("runjob", deploy_job())
    took = time.monotonic() - started
    assert not result["accepted"], result
    assert "deadline passed" in result["reject_message"] and "nothing was stored" in result["reject_message"], result
    assert took < 6, took  # kaschedd answered before the hook's own limit
    assert "job 41.pbs-server not run" in log_text(result)
    locker.wait(30)
    time.sleep(3)  # the database is free: a request still waiting in kaschedd would store its grant now
    assert pbs_site.grants() == []
    started = time.monotonic()
    assert pbs_site.run_hook("runjob", deploy_job())["accepted"]  # and the next try gets it at once
    assert time.monotonic() - started < 6
    assert [g["job_id"] for g in pbs_site.grants()] == ["41.pbs-server"]


@pytest.mark.slow
def test_the_slurm_hook_sends_its_deadline_and_no_grant_is_stored(
    pbs_site: Site, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kasched_slurm import hooks

    monkeypatch.setattr(hooks, "KASCHED_TIMEOUT", 6.0)
    environ = {
        **os.environ,
        "KASCHED": str(Path(sys.executable).parent / "kasched"),
        "KASCHED_CONFIG": str(pbs_site.config),
        "SLURM_JOB_ID": "77",
        "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld",
        "SLURM_JOB_USER": "kasched-alice",
        "SLURM_JOB_NODELIST": "node-[3-4]",
        "SLURM_CLUSTER_NAME": "c1",
        "SLURM_JOB_CONSTRAINTS": "deploy",
    }
    locker = lock_database(pbs_site.directory / "state" / "kasched.db", 10)
    started = time.monotonic()
    code = hooks.kasched("start", environ)
    output = capsys.readouterr().out
    assert code != 0 and time.monotonic() - started < 6, output
    assert "deadline passed" in output
    locker.wait(30)
    time.sleep(3)
    assert pbs_site.grants() == [] and "77" not in json.dumps(pbs_site.kasched("rights", "--all", "--json").stdout)


def test_the_oar_hook_sends_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from kasched_oar import hooks
    from kasched_oar.oarjobs import OarJob

    seen: dict[str, Any] = {}

    def run(command: list[str], env: dict[str, str], timeout: float, **_: Any) -> subprocess.CompletedProcess[str]:
        seen.update(env=env, timeout=timeout)
        return subprocess.CompletedProcess(command, 0, "ok", "")

    monkeypatch.setattr(hooks.subprocess, "run", run)
    job = OarJob(job_id="5", user="kasched-alice", state="Launching", nodes=("node-1",), walltime=60, types=("deploy",))
    now = time.time()
    hooks.kasched("start", job, {"KASCHED_OAR_HOOK_TIMEOUT": "40"})
    moment = float(seen["env"][deadline.ENV])
    assert seen["timeout"] == 40 and now + 40 - deadline.HOOK_MARGIN - 1 < moment <= now + 40 - deadline.HOOK_MARGIN + 1


def slurm_job(job_id: str) -> JobInfo:
    return JobInfo(scheduler="slurm", cluster="c1", job_id=job_id, user="alice", nodes=("node-1",), walltime=600)


def hold_lock(url: str, seconds: float, locked: threading.Event) -> None:
    """Another connection holding the grants table for ``seconds`` (SQLite: the whole file)."""
    engine = create_engine(url)
    with engine.connect() as connection:
        if url.startswith("sqlite"):
            connection.exec_driver_sql("BEGIN EXCLUSIVE")
        elif url.startswith("postgresql"):
            connection.execute(text("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE"))
        else:
            connection.execute(text("LOCK TABLES grants WRITE, grant_nodes WRITE, nodes WRITE"))
        locked.set()
        time.sleep(seconds)
        connection.rollback()
        if url.startswith("mysql"):
            connection.execute(text("UNLOCK TABLES"))
    engine.dispose()


def test_a_deadline_bounds_every_backends_lock_wait(cluster: Kasched) -> None:
    locked = threading.Event()
    holder = threading.Thread(target=hold_lock, args=(cluster.database.url, 6, locked))
    holder.start()
    assert locked.wait(30)
    started = time.monotonic()
    with pytest.raises(DatabaseError), deadline.within(1.5):
        cluster.record_job_start(slurm_job("91"))
    assert time.monotonic() - started < 4
    holder.join(30)
    assert [g.job_id for g in cluster.rights(include_ended=True)] == []


def test_a_commit_after_the_deadline_is_refused(cluster: Kasched) -> None:
    from kasched import grants

    with pytest.raises(DatabaseError, match="deadline passed"), deadline.within(0.3), cluster.database.session() as s:
        grants.create(s, slurm_job("92"), origin="test", max_hours=1)
        time.sleep(0.5)  # the grant is written, and the deadline passes before the commit
    assert cluster.rights(include_ended=True) == []
    with deadline.within(30):
        cluster.record_job_start(slurm_job("93"))
    assert [g.job_id for g in cluster.rights()] == ["93"]
