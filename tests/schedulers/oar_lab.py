"""Real OAR 2.5.9 whose resources are the nodes of a lab (node-1..N, the lab's inventory names).

The arrangement (docs/oar.md, "OAR on the lab"): kaschedd runs as root **inside** the lab's network
namespace kl-koar, the only place where the nodes, their BMCs and the boot services can be reached;
OAR (Almighty, PostgreSQL on 127.0.0.1, OAR's sshd, the REST API) stays in the host's namespace.
OAR's hooks (as oar) and the user's ``kasched deploy`` (inside the job, on OAR's deploy host) reach
kaschedd over its Unix socket, which crosses namespaces; whatever kaschedd starts, including the
background ``kasched job reclaim`` of a job's end, runs in the lab's namespace. Nothing else enters it.
kaschedd reaches OAR's commands (to release held resources, and for its periodic reconcile to list
OAR's jobs) through the lab's bridge back to the host's namespace: the site's scheduler_settings give
it ``KASCHED_OAR_COMMAND_PREFIX=nsenter --net=/run/netns/kasched-oar-host``, a handle on the host's
namespace the fixture makes (``ip netns attach``; /proc/1 is out of reach on this machine). On a real
site the prefix is ``ssh oar-server``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from labsite import populate, root
from oar_cluster import OAR_DIR, USER, OarCluster, oar_cluster, one_oar_per_host
from slurm_cluster import wait_for

from kasched import config as config_module
from kasched.errors import KaschedError
from kasched.service.client import ServiceClient

ROOT = Path(__file__).resolve().parent.parent.parent
LAB = "koar"
NETNS = f"kl-{LAB}"
KASCHED = [sys.executable, "-m", "kasched"]
HOST_NETNS = "kasched-oar-host"  # a name for the host's network namespace, where OAR lives
LAB_BRIDGE = f"nsenter --net=/run/netns/{HOST_NETNS}"  # from kaschedd in kl-koar back to OAR's namespace
RECONCILE_INTERVAL = 15  # kaschedd's own reconcile, seconds: repairs a lost epilogue within a minute or two
OTHER_USER = "kasched-oar-other"  # a second ordinary user, for another user's job's nodes
PATH_ENV = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])
SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
]  # fmt: skip
JOB_SCRIPT = """#!/bin/sh
# A deploy job's script: kasched deploy on the job's nodes (OAR_NODEFILE, no node list), then wait
# until the test releases the job (the walltime and oardel jobs are never released).
out={out}/job-$OAR_JOB_ID
KASCHED_CONFIG={config} {python} -m kasched deploy -e userenv -k {key} >$out.deploy 2>&1
echo $? >$out.exit
while [ -d {out} ] && [ ! -e $out.release ]; do sleep 1; done  # ends with the test's directory, whatever happens
"""


@dataclass
class LabOar:
    oar: OarCluster
    work: Path
    lab_dir: Path
    config: Path
    user_key: Path

    @property
    def out(self) -> Path:
        return self.work / "out"

    def ip(self, node: str) -> str:
        inventory = yaml.safe_load((self.lab_dir / "inventory.yaml").read_text())
        return next(str(n["ip"]) for n in inventory["clusters"][0]["nodes"] if n["name"] == node)

    def submit(self, walltime: str, nodes: tuple[str, ...] = ()) -> str:
        """A 2-node deploy job running the job script; on exactly ``nodes`` if given."""
        where = ["-p", "network_address IN ({})".format(",".join(f"'{n}'" for n in nodes))] if nodes else []
        return self.oar.submit("-t", "deploy", "-t", "env=userenv", "-l", f"nodes=2,walltime={walltime}", *where,
                               str(self.work / "job.sh"))  # fmt: skip

    def resources(self) -> dict[str, tuple[str, str]]:
        """OAR's resources as the admin sees them: node -> (drain, the kasched property)."""
        return self.oar.resources()

    def bmc_pid(self, node: str) -> int:
        """The node's BMC (ipmi_sim) process."""
        return int((self.lab_dir / "nodes" / node / "bmc.pid").read_text().strip())

    @contextmanager
    def epilogue_lost(self) -> Iterator[None]:
        """The epilogue's ``kasched job end`` fails (the wrapper runs /bin/false as kasched) until left."""
        wrapper = OAR_DIR / "hooks" / "epilogue"
        original = wrapper.read_text()
        wrapper.write_text(re.sub(r"^exec ", "export KASCHED=/bin/false\nexec ", original, flags=re.MULTILINE))
        try:
            yield
        finally:
            wrapper.write_text(original)

    def deployed(self, job_id: str, timeout: float = 300) -> str:
        """Wait for the job's ``kasched deploy`` to return; its exit code and output."""
        done = self.out / f"job-{job_id}.exit"
        wait_for(done.exists, timeout, f"job {job_id}'s kasched deploy ({self.oar.logs()})")
        output = self.out / f"job-{job_id}.deploy"
        return f"{done.read_text().strip()}\n{output.read_text()}"

    def release(self, job_id: str) -> None:
        (self.out / f"job-{job_id}.release").touch()

    def kasched_as(self, user: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """kasched run by an ordinary user on the host (no job), through kaschedd's socket."""
        python = str(OAR_DIR / "venv" / "bin" / "python")
        base = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "KASCHED_CONFIG": str(self.config), **(env or {})}
        command = ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in base.items())]
        return subprocess.run([*command, python, "-m", "kasched", *args], capture_output=True, text=True,
                              timeout=120, cwd="/tmp")  # fmt: skip

    def ssh(self, node: str, command: str, user_key: bool = False) -> subprocess.CompletedProcess[str]:
        """``command`` on the node as root, from inside the lab: with the user's key or the service's."""
        key = self.user_key if user_key else self.lab_dir / "ssh" / "id_ed25519"
        return subprocess.run(
            ["ip", "netns", "exec", NETNS, "ssh", *SSH_OPTIONS, "-i", str(key), f"root@{self.ip(node)}", command],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def node_states(self) -> dict[str, str]:
        """kasched's record of each node (root, through kaschedd)."""
        done = self.oar.kasched("nodes", "list", "--json")
        assert done.returncode == 0, done.stderr
        return {n["name"]: n["state"] for n in yaml.safe_load(done.stdout)}

    def reclaim_logs(self) -> str:
        logs = sorted((self.work / "state" / "reclaim").glob("*.log"))
        return "\n".join(f"{log.name}:\n{log.read_text()}" for log in logs)


def _site(work: Path, lab_dir: Path) -> Path:
    """kasched's site for the lab (admins: group kasched-oar-admins, which start-oar.sh puts oar in)."""
    config = work / "kasched.yaml"
    settings = {
        "site": "lab", "state_dir": str(work / "state"), "boot_dir": str(lab_dir / "boot"),
        "credentials_file": str(lab_dir / "credentials.yaml"), "service_key": str(lab_dir / "ssh" / "id_ed25519"),
        "reboot_timeout": 20, "admin_group": "kasched-oar-admins", "reconcile_interval": RECONCILE_INTERVAL,
        "scheduler_settings": {"KASCHED_OAR_COMMAND_PREFIX": LAB_BRIDGE, "KASCHED_OAR_CLUSTER": "oar"},
    }  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    (work / "state").mkdir(mode=0o755)
    populate(config, work, lab_dir, LAB)
    return config


@contextmanager
def kaschedd(config: Path) -> Iterator[subprocess.Popen[str]]:
    """kaschedd as root inside the lab's namespace until it answers on its socket; always stopped."""
    env = {**os.environ, "PYTHONPATH": PATH_ENV, "KASCHED_CONFIG": str(config)}
    command = [sys.executable, "-m", "kasched.service.main", "--config", str(config)]
    log = open(config.parent / "kaschedd.log", "w")  # noqa: SIM115 (closed below)
    service = subprocess.Popen([*KASCHED, "lab", "exec", "--name", LAB, "--", *command], env=env, stderr=log, text=True)
    try:
        client = ServiceClient(config_module.load(str(config)).service_socket, timeout=30)
        wait_for(lambda: _answers(client) or service.poll() is not None, 60, "kaschedd to answer")
        assert service.poll() is None, (config.parent / "kaschedd.log").read_text()
        yield service
    finally:
        for child in Path(f"/proc/{service.pid}/task/{service.pid}/children").read_text().split() if service.poll() is None else []:
            os.kill(int(child), 15)  # kaschedd itself: 'ip netns exec' execs it under 'kasched lab exec'
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        log.close()


def _answers(client: ServiceClient) -> bool:
    try:
        return client.request("GET", "/v1/health")[0] == 200
    except KaschedError:
        return False


@contextmanager
def lab_oar() -> Iterator[LabOar]:
    """A 6-node lab (three 2-node jobs at once), kasched's site on it with kaschedd in its namespace, and
    OAR on the lab's nodes. Torn down in reverse, even on failure; the logs go to /tmp/kasched-oar-test-logs."""
    if os.geteuid() != 0:
        pytest.fail("the OAR lab test needs root (run scripts/test.sh as root)")
    with one_oar_per_host():  # also keeps the lab's name to one test at a time
        yield from _lab_oar()


def _lab_oar() -> Iterator[LabOar]:
    work = Path(tempfile.mkdtemp(prefix="kasched-oar-lab-"))
    work.chmod(0o755)
    lab_dir = work / "lab"
    root(*KASCHED, "lab", "down", "--name", LAB)
    try:
        root(*KASCHED, "lab", "up", "--name", LAB, "--state-dir", str(lab_dir), "--nodes", "6", "--link", "1gbit")
        config = _site(work, lab_dir)
        root("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{USER}@oar-lab", "-f", str(work / "user"))
        (work / "out").mkdir(mode=0o1777)
        (work / "out").chmod(0o1777)
        python = OAR_DIR / "venv" / "bin" / "python"
        script = JOB_SCRIPT.format(out=work / "out", config=config, python=python, key=work / "user.pub")
        (work / "job.sh").write_text(script)
        (work / "job.sh").chmod(0o755)
        if subprocess.run(["id", OTHER_USER], capture_output=True).returncode != 0:
            root("useradd", "--create-home", "--shell", "/bin/bash", OTHER_USER)
        subprocess.run(["ip", "netns", "del", HOST_NETNS], capture_output=True, check=False)
        root("ip", "netns", "attach", HOST_NETNS, str(os.getpid()))  # this process runs in the host's namespace
        with kaschedd(config), oar_cluster({"KASCHED_CONFIG": str(config), "KASCHED_OAR_NODES": "6"}) as oar:
            yield LabOar(oar, work, lab_dir, config, work / "user")
    finally:
        subprocess.run(["ip", "netns", "del", HOST_NETNS], capture_output=True, check=False)  # the handle only
        _keep_logs(work)
        subprocess.run([*KASCHED, "lab", "down", "--name", LAB], capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": PATH_ENV})  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


def _keep_logs(work: Path) -> None:
    """kaschedd's log, the background reclaims', the jobs' outputs, the nodes' BMC and console logs."""
    logs = Path("/tmp/kasched-oar-test-logs/lab")
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    for path in [work / "kaschedd.log", *(work / "state" / "reclaim").glob("*.log"), *(work / "out").glob("job-*")]:
        if path.is_file():
            shutil.copy(path, logs / path.name)
    for path in [*(work / "lab" / "nodes").glob("*/bmc.log"), *(work / "lab" / "nodes").glob("*/console.log")]:
        shutil.copy(path, logs / f"{path.parent.name}-{path.name}")

