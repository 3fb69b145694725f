"""kaschedd on the lab: root runs the service inside the lab's network namespace; ordinary Unix users
(no database, no BMC password, no service key) deploy, reboot, power and revert the nodes of their
grants through it, and are refused everything else. Then kaschedd is killed with kill -9 in the middle
of a broadcast and restarted: the operation is interrupted, its nodes recorded for revert, nothing of
it keeps running on the nodes, and the user's revert brings them back. Checked from inside the nodes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kasched.config import Config
from kasched.errors import KaschedError
from kasched.service.client import ServiceClient
from kasched.service.follow import POLL
from tests.conftest import ROOT
from tests.e2e.conftest import Site, _reference_environment, _user_environment
from tests.service.test_service import as_user
from tests.test_cli import unix_user

pytestmark = [pytest.mark.lab, pytest.mark.slow]
LAB = "ksvc"
NETNS = f"kl-{LAB}"
KASCHED = [sys.executable, "-m", "kasched"]
ALICE, BOB = "kasched-alice", "kasched-bob"
PATH_ENV = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])
SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
]  # fmt: skip


@dataclass
class ServiceLab:
    work: Path
    lab_dir: Path
    config_file: Path
    config: Config
    alice_key: Path
    service: subprocess.Popen[str] | None = None

    @property
    def client(self) -> ServiceClient:
        return ServiceClient(self.config.service_socket, timeout=30)

    def ip(self, node: str) -> str:
        inventory = yaml.safe_load((self.lab_dir / "inventory.yaml").read_text())
        return next(str(n["ip"]) for n in inventory["clusters"][0]["nodes"] if n["name"] == node)

    def start(self) -> None:
        """kaschedd as root inside the lab's namespace (``kasched lab exec``), until it answers."""
        env = {**os.environ, "PYTHONPATH": PATH_ENV, "KASCHED_CONFIG": str(self.config_file)}
        command = [sys.executable, "-m", "kasched.service.main", "--config", str(self.config_file)]
        self.service = subprocess.Popen(
            [*KASCHED, "lab", "exec", "--name", LAB, "--", *command], env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(600):
            try:
                if self.client.request("GET", "/v1/health")[0] == 200:
                    return
            except KaschedError:
                pass  # not listening yet, or the socket of a killed kaschedd
            time.sleep(0.1)
        raise AssertionError("kaschedd did not start")

    def daemon_pid(self) -> int:
        """kaschedd's own pid: the child of ``kasched lab exec`` (``ip netns exec`` execs it)."""
        assert self.service is not None
        children = Path(f"/proc/{self.service.pid}/task/{self.service.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def stop(self) -> str:
        if self.service is None:
            return ""
        if self.service.poll() is None:
            os.kill(self.daemon_pid(), signal.SIGTERM)
        _, stderr = self.service.communicate(timeout=60)
        self.service = None
        return stderr

    def kasched(self, user: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """A kasched command as ``user`` (root: an admin), through kaschedd's socket."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "KASCHED_CONFIG": str(self.config_file),
               "PYTHONPATH": PATH_ENV}  # fmt: skip
        return subprocess.run(
            [*_as(user), *KASCHED, *args], capture_output=True, text=True, env={**env}, timeout=timeout
        )

    def ssh(self, node: str, command: str, user: str = "root") -> subprocess.CompletedProcess[str]:
        """``command`` on ``node``, from inside the lab: as ``user`` with their key, root with the service's."""
        key = self.alice_key if user == ALICE else self.lab_dir / "ssh" / "id_ed25519"
        return subprocess.run(
            ["ip", "netns", "exec", NETNS, *_as(user), "ssh", *SSH_OPTIONS, "-i", str(key), f"root@{self.ip(node)}",
             command],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip


def _as(user: str) -> list[str]:
    if user == "root":
        return []
    entry = unix_user(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]


def _root(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": PATH_ENV}
    )
    assert done.returncode == 0, f"{' '.join(args[:6])}: {done.stderr.strip()[-800:]}"
    return done.stdout


def service_lab(nodes: int, users: tuple[str, ...], prefix: str) -> Iterator[ServiceLab]:
    """A lab of ``nodes`` nodes on one switch with kaschedd, ``users`` made as Unix users; always torn down."""
    if os.geteuid() != 0:
        pytest.fail("the lab needs root (run scripts/test.sh as root)")
    for user in users:
        unix_user(user)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o755)
    lab_dir = work / "lab"
    _root(*KASCHED, "lab", "down", "--name", LAB)
    try:
        _root(*KASCHED, "lab", "up", "--name", LAB, "--state-dir", str(lab_dir), "--nodes", str(nodes),
              "--switches", "1", "--link", "200mbit")  # fmt: skip
        yield from _prepare(work, lab_dir)
    finally:
        subprocess.run([*KASCHED, "lab", "down", "--name", LAB], capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": PATH_ENV})  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[ServiceLab]:
    yield from service_lab(3, (ALICE, BOB), "kasched-svc-")


def _prepare(work: Path, lab_dir: Path) -> Iterator[ServiceLab]:
    """The site: nodes and environments (added by root directly), then kaschedd; alice's SSH key."""
    state = work / "state"
    settings = {
        "site": "lab", "state_dir": str(state), "boot_dir": str(lab_dir / "boot"),
        "credentials_file": str(lab_dir / "credentials.yaml"), "service_key": str(lab_dir / "ssh" / "id_ed25519"),
        "reboot_timeout": 20,
    }  # fmt: skip
    config_file = work / "kasched.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    config_file.chmod(0o644)
    site = Site(lab_dir, work, config_file, work / "unused", lab_dir / "ssh" / "id_ed25519")
    _user_environment(site)
    _reference_environment(site)
    direct = {**os.environ, "PYTHONPATH": PATH_ENV, "KASCHED_CONFIG": str(config_file), "KASCHED_DIRECT": "1"}
    for command in (
        ["nodes", "import", str(lab_dir / "inventory.yaml")],
        ["env", "add", str(work / "userenv.yaml")],
        ["env", "add", str(work / "reference.yaml")],
    ):
        done = subprocess.run([*KASCHED, *command], capture_output=True, text=True, env=direct, timeout=300)
        assert done.returncode == 0, done.stderr
    state.chmod(0o755)  # users reach the socket; the database stays root's
    for path in state.glob("kasched.db*"):
        path.chmod(0o600)
    home = work / "alice"
    home.mkdir()
    _root("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@ksvc", "-f", str(home / "id_ed25519"))
    uid, gid = unix_user(ALICE).pw_uid, unix_user(ALICE).pw_gid
    for path in (home, home / "id_ed25519", home / "id_ed25519.pub"):
        os.chown(path, uid, gid)
    service_lab = ServiceLab(work, lab_dir, config_file, Config(site="lab", state_dir=state), home / "id_ed25519")
    service_lab.start()
    try:
        yield service_lab
    finally:
        service_lab.stop()


def refused(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    """Refused with exit ``code`` and one line saying why; never a traceback."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert text in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def slurm_job(lab: ServiceLab, hook: str, job_id: str, nodes: str = "node-[1-2]") -> None:
    """What Slurm's PrologSlurmctld / EpilogSlurmctld run (as an admin: the scheduler's user)."""
    variables = {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_USER": ALICE, "SLURM_JOB_NODELIST": nodes,
        "SLURM_JOB_CONSTRAINTS": "deploy", "SLURM_CLUSTER_NAME": LAB, "SLURM_JOB_EXIT_CODE": "0",
        "SLURM_SCRIPT_CONTEXT": f"{'prolog' if hook == 'start' else 'epilog'}_slurmctld",
    }  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "KASCHED_CONFIG": str(lab.config_file), "PYTHONPATH": PATH_ENV, **variables}
    done = subprocess.run([*KASCHED, "job", hook], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr


def active_grants(lab: ServiceLab, user: str) -> list[dict[str, object]]:
    done = lab.kasched(user, "rights", "-u", user, "--json")
    assert done.returncode == 0, done.stderr
    return [g for g in json.loads(done.stdout) if g["user"] == user and g["active"]]


def runs(lab: ServiceLab, node: str, system: str) -> None:
    """From inside ``node``: its name, the system it runs, and (the user's environment) its marker, over
    SSH with alice's key; the reference system refuses her key."""
    if system == "userenv":
        inside = lab.ssh(node, "hostname; cat /etc/kasched-marker; cat /run/kasched/cmdline", user=ALICE)
        assert inside.returncode == 0, f"{node}: {inside.stderr}"
        lines = inside.stdout.splitlines()
        assert lines[:2] == [node, "deployed by kasched"] and "root=/dev/sda3" in lines[2], lines
        return
    inside = lab.ssh(node, "hostname; cat /etc/kasched-system; cat /run/kasched/cmdline")
    assert inside.returncode == 0, f"{node}: {inside.stderr}"
    assert inside.stdout.splitlines()[:2] == [node, system], inside.stdout
    if system == "reference":
        assert "root=/dev/sda2" in inside.stdout
        assert lab.ssh(node, "true", user=ALICE).returncode != 0  # her key left with her environment


def test_users_hold_no_secret(lab: ServiceLab) -> None:
    secrets = [lab.config.state_dir / "kasched.db", lab.lab_dir / "credentials.yaml", lab.lab_dir / "ssh" / "id_ed25519"]
    for path in secrets:
        read = subprocess.run([*_as(ALICE), "head", "-c1", str(path)], capture_output=True, text=True)
        assert read.returncode != 0 and "Permission denied" in read.stderr, path
    health = lab.kasched(ALICE, "nodes", "list", "--json")
    assert health.returncode == 0 and len(json.loads(health.stdout)) == 3, health.stderr


def test_without_a_grant_everything_is_refused(lab: ServiceLab) -> None:
    for command in (
        ["deploy", "-e", "userenv", "-m", "node-1"],
        ["reboot", "-m", "node-1"],
        ["power", "status", "-m", "node-1"],
        ["revert", "-m", "node-1"],
    ):
        refused(lab.kasched(ALICE, *command), 5, f"{ALICE} may not deploy these nodes: node-1: no active grant")
    status, data = as_user(ALICE, lab.config, "POST", "/v1/deployments", {"kind": "reboot", "nodes": "node-1"})
    assert status == 403 and "no active grant" in str(data), data
    status, data = as_user(ALICE, lab.config, "POST", "/v1/power", {"action": "off", "nodes": "node-1"})
    assert status == 403 and "no active grant" in str(data), data


def test_a_user_deploys_through_the_service(lab: ServiceLab) -> None:
    slurm_job(lab, "start", "41")
    bob = lab.kasched("root", "rights", "grant", "-u", BOB, "-m", "node-3")
    assert bob.returncode == 0, bob.stderr
    _refusals_with_a_grant(lab)
    key = f"{lab.alice_key}.pub"
    done = lab.kasched(ALICE, "deploy", "-e", "userenv", "-m", "node-[1-2]", "-k", key)
    assert done.returncode == 0, done.stderr
    assert "started in kaschedd" in done.stderr
    view = [line.split()[2:4] for line in done.stderr.splitlines()[1:] if line.startswith("[")]  # the live view
    assert [step for step in ("setup", "broadcast", "configure", "boot") if [step, "ok"] in view] == [
        "setup", "broadcast", "configure", "boot"
    ], done.stderr  # every step, even those that went by between two polls
    assert done.stderr.splitlines()[-1].endswith("boot       ok 2/2  failed 0  in progress 0"), done.stderr
    assert done.stdout.startswith("deploy ") and ": done; ok node-[1-2]; failed -" in done.stdout
    for node in ("node-1", "node-2"):
        runs(lab, node, "userenv")
    rebooted = lab.kasched(ALICE, "reboot", "-m", "node-[1-2]", "--to", "userenv", "--level", "hard")
    assert rebooted.returncode == 0, rebooted.stderr
    for node in ("node-1", "node-2"):
        runs(lab, node, "userenv")
    power = lab.kasched(ALICE, "power", "status", "-m", "node-[1-2]", "--json")
    assert power.returncode == 0, power.stderr
    assert [(p["node"], p["ok"], p["value"]) for p in json.loads(power.stdout)] == [
        ("node-1", True, "on"), ("node-2", True, "on")
    ]
    reverted = lab.kasched(ALICE, "revert", "-m", "node-[1-2]")
    assert reverted.returncode == 0, reverted.stderr
    for node in ("node-1", "node-2"):
        runs(lab, node, "reference")
    slurm_job(lab, "end", "41")
    assert active_grants(lab, ALICE) == []
    refused(lab.kasched(ALICE, "reboot", "-m", "node-1"), 5, "node-1: no active grant")


def _refusals_with_a_grant(lab: ServiceLab) -> None:
    """alice holds node-[1-2]: bob's node, bob's private environment and a public one are refused."""
    for command in (
        ["deploy", "-e", "userenv", "-m", "node-[2-3]"],
        ["reboot", "-m", "node-3"],
        ["power", "off", "-m", "node-3"],
        ["revert", "-m", "node-3"],
    ):
        refused(lab.kasched(ALICE, *command), 5, f"node-3: granted to {BOB}")
    status, data = as_user(ALICE, lab.config, "POST", "/v1/deployments", {"kind": "revert", "nodes": "node-3"})
    assert status == 403 and f"granted to {BOB}" in str(data), data
    shared = lab.work / "shared"
    shared.mkdir(exist_ok=True)
    for name, visibility in (("secret", "private"), ("mine", "public")):
        desc = shared / f"{name}.yaml"
        desc.write_text(f"name: {name}\nvisibility: {visibility}\nimage: {{file: {lab.work / 'userenv.tar.zst'}, kind: tar}}\n")
        desc.chmod(0o644)
    added = lab.kasched(BOB, "env", "add", str(shared / "secret.yaml"))
    assert added.returncode == 0, added.stderr
    refused(lab.kasched(ALICE, "deploy", "-e", f"secret@{BOB}", "-m", "node-1"), 3, f"that you ({ALICE}) may use")
    refused(lab.kasched(ALICE, "env", "add", str(shared / "mine.yaml")), 5, "only admins may make an environment public")


def shape(port: str, rate: str) -> None:
    """The switch port's egress towards its node, as the lab shapes it (``kasched.lab.network``)."""
    from kasched.lab.network import shaping_command

    _root("ip", "netns", "exec", NETNS, "tc", *shaping_command(port, rate).split())


def sent_to(port: str) -> int:
    shown = _root("ip", "-n", NETNS, "-s", "-j", "link", "show", port)
    return int(json.loads(shown)[0]["stats64"]["tx"]["bytes"])


def host_leftovers() -> list[str]:
    """Processes of the lab's namespace that are not the lab's own (BMCs, dnsmasq, httpd)."""
    found = []
    for pid in _root("ip", "netns", "pids", NETNS).split():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue  # gone meanwhile
        if not any(lab_program in command for lab_program in ("ipmi_sim", "dnsmasq", "busybox httpd")):
            found.append(command)
    return found


def node_leftovers(lab: ServiceLab, node: str) -> list[str]:
    """kasched's programs still running on ``node`` (chain agents, relays, image writers) and SSH
    sessions other than the one asking."""
    inside = lab.ssh(node, "ps -o pid,ppid,args")
    assert inside.returncode == 0, f"{node}: {inside.stderr}"
    rows = [(*line.split(None, 2), "")[:3] for line in inside.stdout.splitlines()[1:]]
    parents = {pid: ppid for pid, ppid, _ in rows}
    asking = next(pid for pid, _, args in rows if args.startswith("ps -o"))
    own = set()
    while asking in parents and asking not in own:  # this session: ps, its shell, its sshd processes
        own.add(asking)
        asking = parents[asking]
    programs = ("python", "--listen", "kasched", "tar ")  # the agent is ``python3 - --listen ... --name NODE``
    return [
        args
        for pid, _, args in rows
        if pid not in own
        and (any(word in args for word in programs) or (args.startswith("sshd:") and "listener" not in args))
    ]


def test_kill_9_mid_deployment_then_revert(lab: ServiceLab) -> None:
    slurm_job(lab, "start", "42")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "KASCHED_CONFIG": str(lab.config_file), "PYTHONPATH": PATH_ENV}
    command = ["deploy", "-e", "userenv", "-m", "node-[1-2]", "-k", f"{lab.alice_key}.pub"]
    user = subprocess.Popen([*_as(ALICE), *KASCHED, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    try:
        operation, grants = _kill_during_the_broadcast(lab, user)
        assert host_leftovers() == []  # kaschedd left nothing running in the lab (its SSH is in-process)
        time.sleep(3 * POLL)  # down for several of the client's polls: a quick restart could fall between two
        lab.service = None
        lab.start()
        out, err = user.communicate(timeout=300)
    finally:
        if user.poll() is None:
            user.kill()
    # The user's command waited for the service to come back, then showed the operation's end.
    assert user.returncode == 1 and "waiting for it to come back" in err, err
    assert f"deploy {operation}: interrupted; ok -; failed node-[1-2]" in out, out
    status = json.loads(lab.kasched(ALICE, "deploy", "--status", operation, "--json").stdout)
    assert status["state"] == "interrupted"
    assert {d["error"] for d in status["nodes"].values()} == {"interrupted: the process running it died"}
    nodes = json.loads(lab.kasched(ALICE, "nodes", "list", "--json").stdout)
    assert [(n["name"], n["state"]) for n in nodes][:2] == [("node-1", "deploy_failed"), ("node-2", "deploy_failed")]
    assert active_grants(lab, ALICE) == grants  # the restart neither ended nor extended the job's grant
    _nodes_settle_in_the_deployment_system(lab)
    reverted = lab.kasched(ALICE, "revert", "-m", "node-[1-2]")
    assert reverted.returncode == 0, reverted.stderr
    for node in ("node-1", "node-2"):
        runs(lab, node, "reference")
        assert node_leftovers(lab, node) == []
    slurm_job(lab, "end", "42")
    assert active_grants(lab, ALICE) == []
    refused(lab.kasched(ALICE, "revert", "-m", "node-1"), 5, "node-1: no active grant")


def _kill_during_the_broadcast(lab: ServiceLab, user: subprocess.Popen[str]) -> tuple[str, list[dict[str, object]]]:
    """kill -9 of kaschedd while it streams the image: the operation's id, and alice's grants then."""
    assert user.stderr is not None
    started = user.stderr.readline()  # deploy ID started in kaschedd (...)
    while started and "started in kaschedd" not in started:  # after a wait for the previous job's revert
        started = user.stderr.readline()
    operation = started.split()[1]
    try:
        _wait_for_setup(lab, operation)
        # node-1's port slowed to 8 Mbit/s: the 64 MiB image takes over a minute, kaschedd is killed
        # when 8 MiB went through.
        shape("nd1", "8mbit")
        baseline = sent_to("nd1")
        while sent_to("nd1") - baseline < 8 << 20 and user.poll() is None:
            time.sleep(0.05)
        assert user.poll() is None, started + "".join(user.communicate())
        grants = active_grants(lab, ALICE)
        os.kill(lab.daemon_pid(), signal.SIGKILL)
        assert lab.service is not None and lab.service.wait(60) != 0
    finally:
        shape("nd1", "200mbit")
    return operation, grants


def _wait_for_setup(lab: ServiceLab, operation: str) -> None:
    """Until the deployment system runs on both nodes: the broadcast starts (its agents take a second)."""
    while True:
        nodes = lab.client.call("GET", f"/v1/deployments/{operation}")["nodes"].values()
        if all(node["step"] == "setup" and node["error"] is None for node in nodes):
            return
        assert all(node["step"] in ("", None, "setup") for node in nodes), nodes  # not past it unseen
        time.sleep(0.05)


def _nodes_settle_in_the_deployment_system(lab: ServiceLab) -> None:
    """After the kill, each node still runs the deployment system (recorded deploy_failed: to revert);
    the chain agents of the dead broadcast stop on their own (upstream lost, not resumed)."""
    for node in ("node-1", "node-2"):
        runs(lab, node, "deploy")
    deadline = time.monotonic() + 180
    while any(node_leftovers(lab, node) for node in ("node-1", "node-2")) and time.monotonic() < deadline:
        time.sleep(2)
    assert [node_leftovers(lab, node) for node in ("node-1", "node-2")] == [[], []]
