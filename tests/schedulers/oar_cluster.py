"""A real one-host OAR 2.5.9 (PostgreSQL database, Almighty, OAR's sshd, the REST API CGI behind
plugins/oar/cgiserver.py) wired to kasched by scripts/start-oar.sh, and what the OAR tests do with it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_cluster import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
USER = "kasched-oar-user"
OAR_DIR = Path("/var/lib/kasched-oar")  # /etc/oar/oar.conf is the only one OAR's commands read: one OAR per host
LOGS = Path("/tmp/kasched-oar-test-logs")  # the hooks' and OAR's logs of the last run
API_PORT = 6680
LOCK = Path("/run/kasched-oar-test.lock")  # one OAR test at a time on this host, across pytest processes
_held: list[bool] = []
NEEDED = {
    "oar-server": "oar-server",
    "oarsub": "oar-user",
    "oarnodesetting": "oar-server",
    "pg_ctlcluster": "postgresql",
    "sshd": "openssh-server",
}


@dataclass
class OarCluster:
    env: dict[str, str]  # KASCHED_CONFIG and KASCHED_OAR_API_URL on top of a clean PATH

    def run(self, *args: str, user: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        command = ["runuser", "-u", user, "--", *args] if user else list(args)
        env = {**self.env, "PWD": "/tmp"}  # oarsub takes the launching directory from PWD (fails without it)
        return subprocess.run(command, env=env, cwd="/tmp", capture_output=True, text=True, timeout=timeout)

    def kasched(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(ROOT / ".venv/bin/kasched"), *args)

    def submit(self, *args: str) -> str:
        """oarsub as the ordinary user; the job id."""
        done = self.run("oarsub", *args, user=USER)
        assert done.returncode == 0, done.stdout + done.stderr
        ids = [line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("OAR_JOB_ID=")]
        assert ids, done.stdout
        return ids[0]

    def job(self, job_id: str) -> dict[str, object]:
        done = self.run("oarstat", "-fj", job_id, "-J")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)[job_id]

    def job_state(self, job_id: str) -> str:
        return str(self.job(job_id)["state"])

    def wait_state(self, job_id: str, states: set[str], timeout: float = 60) -> str:
        wait_for(lambda: self.job_state(job_id) in states, timeout, f"job {job_id} to be {states} ({self.logs()})")
        return self.job_state(job_id)

    def node_states(self) -> dict[str, str]:
        done = self.run("oarnodes", "-s", "-J")
        assert done.returncode == 0, done.stderr
        return {node: next(iter(res.values())) for node, res in json.loads(done.stdout).items()}

    def resources(self) -> dict[str, tuple[str, str]]:
        """OAR's resources as the admin sees them: node -> (drain, the kasched property)."""
        done = self.run("oarnodes", "-J", "--sql", "resource_id > 0")
        assert done.returncode == 0, done.stderr
        return {r["network_address"]: (r["drain"], r.get("kasched") or "") for r in json.loads(done.stdout).values()}

    def queues_active(self) -> bool:
        done = self.run("oarnotify", "-l")
        states = [line.split("=")[1].strip() for line in done.stdout.splitlines() if "state =" in line]
        return bool(states) and all(state == "Active" for state in states)

    def grants(self, job_id: str) -> list[dict[str, object]]:
        done = self.kasched("rights", "--all", "--json", "-u", USER)
        assert done.returncode == 0, done.stderr
        return [g for g in json.loads(done.stdout) if g["job_id"] == job_id and g["scheduler"] == "oar"]

    def grant(self, job_id: str) -> dict[str, object]:
        grants = self.grants(job_id)
        assert len(grants) == 1, f"job {job_id}: grants {grants}\n{self.logs()}"
        return grants[0]

    def wait_revoked(self, job_id: str, timeout: float = 90) -> dict[str, object]:
        wait_for(lambda: self.grant(job_id)["revoked_at"], timeout, f"the grant of job {job_id} to be revoked")
        return self.grant(job_id)

    def log(self, name: str) -> str:
        path = OAR_DIR / "log" / name
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        return f"prologue.log:\n{self.log('prologue.log')}\nepilogue.log:\n{self.log('epilogue.log')}"


@contextmanager
def oar_cluster(settings: Mapping[str, str] | None = None) -> Iterator[OarCluster]:
    """Start OAR (failing with the missing package's name), always stop it and drop its database.
    ``settings``: more of start-oar.sh's variables (KASCHED_CONFIG of an existing site, KASCHED_OAR_NODES)."""
    if os.geteuid() != 0:
        pytest.fail("the OAR tests need root to run OAR's daemons (run scripts/test.sh as root)")
    missing = sorted({package for command, package in NEEDED.items() if not _have(command)})
    if missing:
        pytest.fail(f"missing Debian package(s) {', '.join(missing)} (scripts/setup.sh installs scripts/packages/oar.txt)")
    if not (ROOT / ".venv/bin/kasched").exists():
        pytest.fail("kasched is not installed in .venv (run scripts/setup.sh)")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KASCHED_OAR_DIR": str(OAR_DIR), "KASCHED_OAR_API_PORT": str(API_PORT)}
    env.update(settings or {})
    stop = ["bash", str(ROOT / "scripts/stop-oar.sh")]
    with one_oar_per_host():
        subprocess.run([*stop, "--purge"], env=env, timeout=120, check=False)  # a clean site: jobs from 1
        yield from _running(env, stop)


def _running(env: dict[str, str], stop: list[str]) -> Iterator[OarCluster]:
    try:
        started = subprocess.run(
            ["bash", str(ROOT / "scripts/start-oar.sh")], env=env, capture_output=True, text=True, timeout=180
        )
        if started.returncode != 0:
            pytest.fail(f"scripts/start-oar.sh failed: {started.stderr.strip()[-800:]}")
        for line in started.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        yield OarCluster(env)
    finally:
        subprocess.run(stop, env=env, timeout=120, check=False)
        if (OAR_DIR / "log").is_dir():  # for a look after a failure
            shutil.copytree(OAR_DIR / "log", LOGS, dirs_exist_ok=True)
        subprocess.run([*stop, "--purge"], env=env, timeout=120, check=False)


@contextmanager
def one_oar_per_host(timeout: float = 1800) -> Iterator[None]:
    """Hold the host's OAR test lock (OAR reads only /etc/oar/oar.conf); waits for another pytest
    process's OAR test to finish. Reentrant within a process (the lab fixture holds it around OAR's)."""
    if _held:
        yield
        return
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another OAR test has held {LOCK} for {timeout:.0f} s")
                time.sleep(2)
        _held.append(True)
        try:
            yield
        finally:
            _held.clear()
            fcntl.flock(lock, fcntl.LOCK_UN)


def _have(command: str) -> bool:
    return shutil.which(command, path="/usr/sbin:/usr/bin:/sbin:/bin") is not None
