"""Deploy jobs end to end with a real Slurm 22.05 on a lab's nodes: an ordinary user submits a deploy job,
deploys an environment inside it with ``kasched deploy`` (no node list: the job's nodes), and the job
ends three ways (normal end, walltime, scancel). After each, with no admin action: the grant is revoked
with the right reason, the nodes run the reference environment again (seen from inside them) and Slurm
has them back, idle. Outside a job, or on another user's job, ``kasched deploy`` is refused.

Placement (docs/slurm.md): the lab's nodes are reachable only inside its network namespace kl-kslab, so
everything that drives them runs there: kaschedd (as root), slurmctld, the nodes' slurmds and the
stand-ins (scripts/start-slurm.sh with KASCHED_SLURM_NETNS; hooks inherit it, and so does the background
revert the epilog starts), and the users' salloc/sbatch (the lab's service host is the login node).
munged is shared with the host through its socket file. The lab keeps no route out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from labsite import stop
from slurm_cluster import USER, SlurmCluster, slurm_cluster, wait_for
from test_slurm_deploy import grant_of, wait_idle

from kasched.nodeset import expand
from tests.conftest import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.lab, pytest.mark.slow]
LAB = "kslab"
NETNS = f"kl-{LAB}"
PORT = 17900  # not the session cluster's 16900 (that one runs on the host's loopback, this one in NETNS)
OTHER = "kasched-slurm-other"
KASCHED = [str(ROOT / ".venv/bin/kasched")]
SSH = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
       "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]  # fmt: skip
# What the user's job runs: deploy on the job's nodes (no node list), note the exit code.
DEPLOY = 'kasched deploy -e userenv -k "$KEY.pub" > "$OUT/deploy-$SLURM_JOB_ID.log" 2>&1; echo $? > "$OUT/deployed-$SLURM_JOB_ID"'


@dataclass
class SlurmLab:
    slurm: SlurmCluster
    lab_dir: Path
    user_dir: Path  # the user's key and the jobs' files

    def ip(self, node: str) -> str:
        inventory = yaml.safe_load((self.lab_dir / "inventory.yaml").read_text())
        return next(str(n["ip"]) for n in inventory["clusters"][0]["nodes"] if n["name"] == node)

    def inside(self, node: str, command: str, key: Path) -> subprocess.CompletedProcess[str]:
        return self.slurm.run(*SSH, "-i", str(key), f"root@{self.ip(node)}", command, timeout=60)

    def script(self, body: str) -> str:
        """A job script of the user's: ``body`` runs with $KEY (the user's key) and $OUT (a directory)."""
        path = self.user_dir / f"job-{len(list(self.user_dir.glob('job-*')))}.sh"
        path.write_text(f"#!/bin/sh\nKEY={self.user_dir}/key OUT={self.user_dir}\n{body}\n")
        path.chmod(0o755)
        return str(path)

    def sbatch(self, *args: str, body: str) -> str:
        done = self.slurm.run("sbatch", "--parsable", "-o", "/dev/null", *args, self.script(body), user=USER)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def deployed(self, job_id: str) -> str:
        """Wait until the job's ``kasched deploy`` is done, check that it succeeded; the job's nodes."""
        done = self.user_dir / f"deployed-{job_id}"
        wait_for(done.exists, 240, f"job {job_id} to deploy ({self.slurm.log('prolog.log')[-600:]})", step=1)
        log = self.user_dir / f"deploy-{job_id}.log"
        assert done.read_text().strip() == "0", log.read_text()[-1500:]
        print(f"job {job_id}: {log.read_text().splitlines()[-3:]}")
        return self.slurm.run("squeue", "-h", "-j", job_id, "-o", "%N").stdout.strip()

    def runs(self, node: str, key: Path | None = None) -> list[str]:
        """The node's name and system, from inside it (ssh with ``key``, default the service's)."""
        done = self.inside(node, "hostname; cat /etc/kasched-system", key or self.lab_dir / "ssh" / "id_ed25519")
        return done.stdout.split() if done.returncode == 0 else [f"ssh failed: {done.stderr.strip()}"]

    def waited(self, first: str, second: str) -> int:
        """Seconds between the end of job ``first`` and the start of job ``second`` (squeue's clock)."""
        jobs = {str(j["job_id"]): j for j in json.loads(self.slurm.run("squeue", "--json").stdout)["jobs"]}
        return int(jobs[second]["start_time"]) - int(jobs[first]["end_time"])

    def node(self, name: str) -> dict[str, str]:
        """``scontrol show node``'s fields (State=IDLE+DRAIN, Reason=... [root@...])."""
        shown = self.slurm.run("scontrol", "show", "node", name).stdout
        fields = dict(w.split("=", 1) for w in shown.split() if "=" in w)
        fields["Reason"] = shown.split("Reason=", 1)[1].strip() if "Reason=" in shown else ""
        return fields

    def watch_held(self, name: str, until: Callable[[dict[str, str]], bool], timeout: float) -> list[str]:
        """Watch the node from its job's end until ``until`` holds: once drained (the epilog's hold), it must
        never be schedulable again, not even for a moment. The states seen, in order."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = self.node(name)
            state = f"{shown['State']} ({shown['Reason'][:40]})"
            if not seen or seen[-1] != state:
                seen.append(state)
            if any("DRAIN" in s for s in seen):
                assert "DRAIN" in shown["State"], f"{name} schedulable before it is back: {' -> '.join(seen)}"
            if until(shown):
                return seen
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {name}: {' -> '.join(seen)}")

    def wait_back(self, job_id: str, nodes: list[str], reason: tuple[str, ...]) -> None:
        """After the job's end: grant revoked for ``reason``, nodes in the reference environment (seen
        from inside; the user's key gone with the user's system) and idle in Slurm, nobody helping."""
        wait_for(lambda: grant_of(self.slurm, job_id)["revoked_at"], 120, f"the grant of job {job_id} to be revoked")
        grant = grant_of(self.slurm, job_id)
        assert str(grant["revoke_reason"]).startswith(reason), grant
        revoked = time.monotonic()
        for node in nodes:
            want = [node, "reference"]
            wait_for(lambda n=node, w=want: self.runs(n) == w, 240, f"{node} to run the reference environment", 2)
            assert self.inside(node, "true", self.user_dir / "key").returncode != 0, "the user's key is gone"
        took = time.monotonic() - revoked
        wait_idle(self.slurm, nodes, timeout=120)
        print(
            f"job {job_id} ({grant['revoke_reason']}): nodes in the reference environment {took:.0f} s after the revoke"
        )


def _run(*args: str, timeout: float = 300) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args[:5])}... failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def _environments(lab_dir: Path, work: Path) -> None:
    """The small user environment (the lab's system, /etc/kasched-system says userenv) and the site's
    reference environment (the lab's reference partition, as a zstd raw image), as tests/e2e makes them."""
    _run(*KASCHED, "lab", "make-env", "--name", LAB, str(work / "userenv.tgz"))
    (work / "userenv.yaml").write_text("name: userenv\nvisibility: public\nimage: {file: userenv.tgz, kind: tar}\n")
    golden = lab_dir / "systems" / "golden.img"
    partition = json.loads(_run("sfdisk", "--json", str(golden)))["partitiontable"]["partitions"][1]
    raw = work / "reference.ext4"
    _run("dd", f"if={golden}", f"of={raw}", "bs=512", f"skip={partition['start']}", f"count={partition['size']}",
         "status=none")  # fmt: skip
    _run("zstd", "-q", "-f", "--rm", str(raw), "-o", f"{raw}.zst")
    (work / "reference.yaml").write_text(
        "name: reference\nvisibility: public\nreference: true\nimage: {file: reference.ext4.zst, kind: raw}\n"
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[SlurmLab]:
    work = Path(tempfile.mkdtemp(prefix="kasched-slurm-lab-"))
    work.chmod(0o755)
    lab_dir = work / "lab"
    config = lab_dir / "kasched.yaml"
    _run(*KASCHED, "lab", "down", "--name", LAB)
    kaschedd: subprocess.Popen[bytes] | None = None
    try:
        _run(*KASCHED, "lab", "up", "--name", LAB, "--nodes", "4", "--switches", "1", "--state-dir", str(lab_dir))
        lab_dir.chmod(0o755)
        _environments(lab_dir, work)
        for command in (["nodes", "import", str(lab_dir / "inventory.yaml")], ["env", "add", str(work / "userenv.yaml")],
                        ["env", "add", str(work / "reference.yaml")]):  # fmt: skip
            _run(*KASCHED, "lab", "exec", "--name", LAB, "--", *KASCHED, *command)  # as root, the lab's config
        user_dir = work / "user"
        user_dir.mkdir()
        if subprocess.run(["id", USER], capture_output=True).returncode != 0:  # as start-slurm.sh makes it
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
        shutil.chown(user_dir, USER)
        subprocess.run(["runuser", "-u", USER, "--", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(user_dir / "key")], check=True, capture_output=True)  # fmt: skip
        if subprocess.run(["id", OTHER], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER], check=True)
        settings = {"KASCHED_SLURM_NETNS": NETNS, "KASCHED_SLURM_NODE_PREFIX": "node-", "KASCHED_CONFIG": str(config)}
        with slurm_cluster(port=PORT, settings=settings) as slurm:
            # kaschedd releases the nodes the epilog held (SlurmAdapter.release, in kaschedd and the reclaim
            # it starts): the stand-ins' state dir from the site configuration, Slurm's own from its environment.
            with config.open("a") as site:
                site.write(f"scheduler_settings:\n  KASCHED_SLURM_STATE_DIR: {slurm.dir / 'standin'}\n")
            kaschedd = _start_kaschedd(config, work, slurm.env["SLURM_CONF"])
            yield SlurmLab(slurm, lab_dir, user_dir)
    finally:
        stop(kaschedd, LAB, work)


def _start_kaschedd(config: Path, work: Path, slurm_conf: str) -> subprocess.Popen[bytes]:
    """kaschedd as root in the lab's namespace: ordinary users deploy through it."""
    log = (work / "kaschedd.log").open("ab")
    service = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{NETNS}", str(ROOT / ".venv/bin/kaschedd"), "--config", str(config)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, env={**os.environ, "SLURM_CONF": slurm_conf},
    )  # fmt: skip
    log.close()
    socket = yaml.safe_load(config.read_text())["state_dir"] + "/kaschedd.sock"
    env = {**os.environ, "KASCHED_CONFIG": str(config)}
    for _ in range(300):
        if service.poll() is not None:
            pytest.fail(f"kaschedd exited: {(work / 'kaschedd.log').read_text()[-800:]}")
        if (
            Path(socket).exists()
            and subprocess.run([*KASCHED, "env", "list"], env=env, capture_output=True).returncode == 0
        ):
            return service
        subprocess.run(["sleep", "0.2"])
    service.kill()
    pytest.fail("kaschedd did not answer")


def test_deploy_refused_outside_a_job_and_on_another_users_job(lab: SlurmLab) -> None:
    job = lab.sbatch("-C", "deploy", "-N", "1", "-t", "5", body="sleep 300")
    wait_for(lambda: lab.slurm.job_state(job) == "RUNNING", 60, f"job {job} to run")
    (node,) = expand(lab.slurm.run("squeue", "-h", "-j", job, "-o", "%N").stdout.strip())
    outside = lab.slurm.run("kasched", "deploy", "-e", "userenv", user=USER)
    assert outside.returncode != 0 and "run inside a deploy job" in outside.stderr, outside.stderr
    other = lab.slurm.run("env", f"SLURM_JOB_NODELIST={node}", "kasched", "deploy", "-e", "userenv", user=OTHER)
    assert other.returncode != 0, other.stdout
    assert f"{OTHER} may not deploy these nodes: {node}: granted to {USER}" in other.stderr, other.stderr
    assert lab.slurm.run("scancel", job, user=USER).returncode == 0
    lab.wait_back(job, [node], ("cancelled", "killed by signal 15"))


def test_deploy_job_ends_three_ways_and_the_nodes_come_back(lab: SlurmLab) -> None:
    """A walltime job (-t 1) and a salloc job deploy at the same time; the salloc job ends normally; a
    batch job then deploys on the nodes it gave back and is cancelled; the walltime job runs out."""
    walltime = lab.sbatch("-C", "deploy", "-N", "2", "-t", "1", body=f"{DEPLOY}\nsleep 600")
    stop = lab.user_dir / "stop"
    salloc = subprocess.Popen(
        lab.slurm.command("salloc", "-C", "deploy", "-N", "2", "-t", "5",
                          lab.script(f"{DEPLOY}\nwhile [ ! -e {stop} ]; do sleep 1; done"), user=USER),
        env=lab.slurm.env, cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        normal = _job_of(lab, exclude={walltime})
        for job in (walltime, normal):
            nodes = expand(lab.deployed(job))
            for node in nodes:
                assert lab.runs(node, lab.user_dir / "key") == [node, "userenv"]
        normal_nodes = expand(lab.deployed(normal))
        stop.write_text("")
        stop.chmod(0o644)
        output, _ = salloc.communicate(timeout=120)
        assert salloc.returncode == 0, output
    finally:
        if salloc.poll() is None:
            salloc.kill()
    lab.wait_back(normal, normal_nodes, ("job ended",))

    cancelled = lab.sbatch("-C", "deploy", "-N", "2", "-t", "5", body=f"{DEPLOY}\nsleep 600")
    cancelled_nodes = expand(lab.deployed(cancelled))
    assert all(lab.runs(node, lab.user_dir / "key") == [node, "userenv"] for node in cancelled_nodes)
    assert lab.slurm.run("scancel", cancelled, user=USER).returncode == 0
    lab.wait_back(cancelled, cancelled_nodes, ("cancelled", "killed by signal 15"))

    walltime_nodes = [n for n in grant_of(lab.slurm, walltime)["nodes"]]  # type: ignore[attr-defined]
    wait_for(lambda: lab.slurm.job_state(walltime) in ("TIMEOUT", "COMPLETING", ""), 180, "the walltime to pass")
    lab.wait_back(walltime, walltime_nodes, ("walltime",))
    times = lab.slurm.log("hooks-time.log")
    print(times)
    assert f"job {walltime} epilog exit 0" in times and f"job {cancelled} epilog exit 0" in times


def _job_of(lab: SlurmLab, exclude: set[str]) -> str:
    """The id of the user's other deploy job (the salloc's)."""
    jobs: list[str] = []

    def found() -> bool:
        listed = lab.slurm.run("squeue", "-h", "-u", USER, "-o", "%i").stdout.split()
        jobs[:] = [j for j in listed if j not in exclude]
        return bool(jobs)

    wait_for(found, 60, "the salloc job to start")
    return jobs[0]


def test_back_to_back_jobs_on_the_same_nodes_keep_their_deployments(lab: SlurmLab) -> None:
    """One user's two deploy jobs on node-[1-2], the second queued behind the first, each running `kasched
    deploy` once: Slurm starts the second only once the first's nodes are reverted (held, drained, until
    then), so its deploy goes through at once; the first job's end never cancels or reverts it."""
    nodes = ["node-1", "node-2"]
    first = lab.sbatch("-C", "deploy", "-w", ",".join(nodes), "-t", "5", body=f"{DEPLOY}\nsleep 2")
    second = lab.sbatch("-C", "deploy", "-w", ",".join(nodes), "-t", "5", body=f"{DEPLOY}\nsleep 600")
    lab.deployed(first)
    lab.deployed(second)
    print(f"job {second} started {lab.waited(first, second)} s after job {first} ended (its nodes' revert)")
    assert "busy" not in (lab.user_dir / f"deploy-{second}.log").read_text()
    log = (lab.user_dir / f"deploy-{second}.log").read_text()
    deployment = next(line.split()[1] for line in log.splitlines() if "started in kaschedd" in line)
    watched = time.monotonic()
    while time.monotonic() - watched < 45:  # the first job's background revert has long finished by then
        for node in nodes:
            assert lab.runs(node, lab.user_dir / "key") == [node, "userenv"], f"{node} was taken from job {second}"
        time.sleep(5)
    status = lab.slurm.run("kasched", "deploy", "--status", deployment, "--json", user=USER)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "done", status.stdout + status.stderr
    epilogs = lab.slurm.log("epilog.log")
    assert deployment not in epilogs, f"job {first}'s end named job {second}'s deployment:\n{epilogs}"
    assert lab.slurm.run("scancel", second, user=USER).returncode == 0
    lab.wait_back(second, nodes, ("cancelled", "killed by signal 15"))


def test_a_node_whose_revert_fails_stays_drained_until_a_later_revert_succeeds(lab: SlurmLab) -> None:
    """node-3's BMC stops answering while a user's job runs there: at the job's end its revert fails, and
    Slurm keeps it drained with the reason (`sinfo -R`), so the user's next job, queued on it, does not
    start. Once the BMC answers again, an admin's `kasched job reclaim --orphans` reverts it, the node is
    RESUMEd, and the next job starts and deploys (once, no retry)."""
    node = "node-3"
    first = lab.sbatch("-C", "deploy", "-w", node, "-t", "5", body=f"{DEPLOY}\nsleep 600")
    lab.deployed(first)
    bmc = int((lab.lab_dir / "nodes" / node / "bmc.pid").read_text().strip())
    second = lab.sbatch("-C", "deploy", "-w", node, "-t", "5", body=f"{DEPLOY}\nsleep 600")
    os.kill(bmc, signal.SIGSTOP)  # the BMC is silent: the revert cannot power-cycle the node
    try:
        assert lab.slurm.run("scancel", first, user=USER).returncode == 0
        ended = time.monotonic()
        seen = lab.watch_held(node, until=lambda shown: shown["Reason"].startswith("kasched: revert"), timeout=300)
        failed = time.monotonic() - ended
        print(f"{node} from the scancel to the failure: {' -> '.join(seen)}")
        shown = lab.node(node)
        assert "DRAIN" in shown["State"], shown
        drained = lab.slurm.run("sinfo", "-R", "-h", "-n", node, "-o", "%E").stdout
        assert drained.startswith("kasched: revert") and node in drained, drained
        print(f"{node}: revert failed {failed:.0f} s after the scancel; sinfo -R: {drained.strip()}")
        time.sleep(5)
        assert lab.slurm.job_state(second) == "PENDING", "the next job must not get a node whose revert failed"
    finally:
        os.kill(bmc, signal.SIGCONT)
    reclaim = lab.slurm.run("env", "KASCHED_DIRECT=1", *KASCHED, "job", "reclaim", "--orphans", timeout=300)
    assert reclaim.returncode == 0, reclaim.stdout + reclaim.stderr
    print(reclaim.stdout)
    wait_for(lambda: lab.slurm.job_state(second) == "RUNNING", 60, f"job {second} to start once {node} is back")
    lab.deployed(second)
    assert lab.runs(node, lab.user_dir / "key") == [node, "userenv"]
    assert lab.slurm.run("scancel", second, user=USER).returncode == 0
    lab.wait_back(second, [node], ("cancelled", "killed by signal 15"))
