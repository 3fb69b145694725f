"""A real one-host Slurm 22.05 (munged, slurmctld, four slurmd) wired to kasched by scripts/start-slurm.sh,
and what the Slurm tests do with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SLURMD_TIMEOUT = 5  # seconds: short, so that a node without slurmd would be DOWN within ~15 s
USER = "kasched-slurm-user"
LOGS = Path("/tmp/kasched-slurm-test-logs")  # the daemons' and hooks' logs of the last run, per port
NEEDED = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "unshare": "util-linux",
    "ss": "iproute2",
    "pgrep": "procps",
}


@dataclass
class SlurmCluster:
    dir: Path
    env: dict[str, str]  # SLURM_CONF and KASCHED_CONFIG, on top of a clean PATH
    netns: str = ""  # the network namespace the cluster runs in (a lab's), where its commands must run

    def command(self, *args: str, user: str | None = None) -> list[str]:
        """``args`` as run by ``run``: as ``user``, inside the cluster's network namespace."""
        command = ["runuser", "-u", user, "--", *args] if user else list(args)
        return ["nsenter", f"--net=/run/netns/{self.netns}", *command] if self.netns else command

    def run(self, *args: str, user: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        command = self.command(*args, user=user)
        return subprocess.run(command, env=self.env, cwd="/tmp", capture_output=True, text=True, timeout=timeout)

    def kasched(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(ROOT / ".venv/bin/kasched"), *args)

    def submit(self, *args: str) -> str:
        """sbatch as the ordinary user; the job id."""
        done = self.run("sbatch", "--parsable", "-o", "/dev/null", *args, user=USER)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        done = self.run("squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T")
        return done.stdout.strip() if done.returncode == 0 else ""

    def node_states(self) -> dict[str, str]:
        done = self.run("sinfo", "-h", "-N", "-o", "%N %T")
        return dict(line.split() for line in done.stdout.splitlines() if line.strip())

    def node_addrs(self) -> dict[str, str]:
        done = self.run("sinfo", "-h", "-N", "-o", "%N %o")
        return dict(line.split() for line in done.stdout.splitlines() if line.strip())

    def may_deploy(self, nodes: str, user: str = USER) -> bool:
        done = self.kasched("rights", "check", "-u", user, "-m", nodes)
        assert done.returncode in (0, 5), done.stderr
        return done.returncode == 0

    def slurmd_pid(self, node: str) -> int | None:
        path = self.dir / "slurmd" / f"{node}@{os.uname().nodename.split('.')[0]}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_slurmd(self, node: str) -> None:
        """The node now runs the user's system: its own slurmd is gone."""
        pid = self.slurmd_pid(node)
        assert pid, f"no slurmd pid for {node}"
        os.kill(pid, 15)
        wait_for(lambda: not _alive(pid), 10, f"slurmd of {node} to stop")

    def start_slurmd(self, node: str) -> None:
        """The node is back in the reference system: its slurmd starts."""
        done = self.run("slurmd", "-N", node)
        assert done.returncode == 0, done.stderr

    def restart_slurmctld(self) -> None:
        """Stop slurmctld and start it again on its saved state (jobs and nodes are recovered)."""
        pid = int((self.dir / "slurmctld.pid").read_text().strip())
        os.kill(pid, 15)
        wait_for(lambda: not _alive(pid), 20, "slurmctld to stop")
        done = self.run("slurmctld", "-f", self.env["SLURM_CONF"])
        assert done.returncode == 0, done.stderr
        wait_for(lambda: "UP" in self.run("scontrol", "ping").stdout, 20, "slurmctld to answer")

    def log(self, name: str) -> str:
        path = self.dir / "log" / name
        return path.read_text() if path.exists() else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(condition: Callable[[], object], timeout: float, what: str, step: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def slurm_cluster(
    port: int = 16900, standin_addr: str = "127.0.0.2", nodes: int = 4, settings: dict[str, str] | None = None
) -> Iterator[SlurmCluster]:
    """Start the cluster (failing with the missing package's name), always stop it. ``standin_addr="none"``:
    no stand-ins, as Slurm is without kasched's help. ``settings``: more of start-slurm.sh's settings
    (with KASCHED_SLURM_NETNS the cluster and its commands run in that network namespace)."""
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests need root to run munged, slurmctld and slurmd (run scripts/test.sh as root)")
    missing = sorted({package for command, package in NEEDED.items() if not _have(command)})
    if missing:
        pytest.fail(
            f"missing Debian package(s) {', '.join(missing)} (scripts/setup.sh installs scripts/packages/slurm.txt)"
        )
    if not (ROOT / ".venv/bin/kasched").exists():
        pytest.fail("kasched is not installed in .venv (run scripts/setup.sh)")
    workdir = Path(f"/tmp/kasched-slurm-test-{uuid.uuid4().hex[:8]}")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "KASCHED_SLURM_DIR": str(workdir),
        "KASCHED_SLURM_PORT": str(port),
        "KASCHED_SLURM_STANDIN_ADDR": standin_addr,
        "KASCHED_SLURMD_TIMEOUT": str(SLURMD_TIMEOUT),
        "KASCHED_SLURM_NODES": str(nodes),
        **(settings or {}),
    }
    try:
        started = subprocess.run(
            ["bash", str(ROOT / "scripts/start-slurm.sh")], env=env, capture_output=True, text=True, timeout=120
        )
        if started.returncode != 0:
            pytest.fail(f"scripts/start-slurm.sh failed: {started.stderr.strip()[-800:]}")
        for line in started.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        if env.get("KASCHED_USER_BIN"):
            env["PATH"] = f"{env['KASCHED_USER_BIN']}:{env['PATH']}"
        yield SlurmCluster(workdir, env, env.get("KASCHED_SLURM_NETNS", ""))
    finally:
        subprocess.run(["bash", str(ROOT / "scripts/stop-slurm.sh")], env=env, timeout=120, check=False)
        if (workdir / "log").is_dir():  # for a look after a failure
            shutil.copytree(workdir / "log", LOGS / str(port), dirs_exist_ok=True)  # one cluster's own
        shutil.rmtree(workdir, ignore_errors=True)


def _have(command: str) -> bool:
    return shutil.which(command, path="/usr/sbin:/usr/bin:/sbin:/bin") is not None
