"""A deploy job's vnodes stay out of scheduling until their revert has really ended, with the PBS
STAND-IN (pbs_standin/standin_server.py: a server that never runs a job on an OFFLINE or DOWN vnode, runs
kasched's real hook through the stand-in ``pbs`` module, and answers its stand-in ``pbsnodes``) and a
real kasched site on a lab: kaschedd as root in the lab's namespace kl-kpbs, the lab's 3 nodes,
their real BMCs (ipmi_sim) and boot. An ordinary user's deploy job runs ``kasched deploy`` once,
ends, and the user's next job on the same nodes is not started before the revert has ended; its own
``kasched deploy``, run once with no retry, succeeds. A node whose revert fails (its BMC stopped)
stays offline with the reason in its comment, and no job gets it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from labsite import populate, root, stop
from slurm_cluster import wait_for

from tests.conftest import ROOT
from tests.test_cli import unix_user

sys.path.insert(0, str(Path(__file__).parent / "pbs_standin"))
from standin_server import StandinServer  # the stand-in, not PBS

pytestmark = [pytest.mark.lab, pytest.mark.slow]
LAB = "kpbs"
NETNS = f"kl-{LAB}"
USER = "kasched-pbs-user"
KASCHED = [sys.executable, "-m", "kasched"]
HOOK = ROOT / "plugins/pbs/hooks/kasched_pbs_hook.py"
PACKAGES = Path(sys.prefix) / f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
]  # fmt: skip


@dataclass
class PbsLab:
    server: StandinServer
    work: Path
    lab_dir: Path
    config: Path
    end_log: Path

    def job(self, job_id: str, nodes: list[str]) -> dict[str, Any]:
        return {
            "id": job_id, "euser": USER, "Job_Owner": f"{USER}@login", "queue": "deploy",
            "exec_vnode": "+".join(f"({node}:ncpus=1)" for node in nodes),
            "Resource_List": {"deploy": True, "kasched_env": "userenv", "walltime": "0:30:00", "place": "scatter:excl"},
        }  # fmt: skip

    def deploy(self, nodes: str) -> subprocess.CompletedProcess[str]:
        """What the job's script runs, once: ``kasched deploy``, as the job's user, through kaschedd."""
        entry = unix_user(USER)
        start = f"import site, sys; site.addsitedir({str(PACKAGES)!r}); from kasched.cli import main; sys.exit(main())"
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "KASCHED_CONFIG": str(self.config),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}  # fmt: skip
        command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
                   "/usr/bin/python3", "-c", start, "deploy", "-e", "userenv", "-m", nodes,
                   "-k", str(self.work / "user" / "key.pub")]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd="/tmp")

    def states(self) -> dict[str, str]:
        """kasched's record of each node (root, through kaschedd)."""
        done = subprocess.run([*KASCHED, "nodes", "list", "--json"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "KASCHED_CONFIG": str(self.config)})  # fmt: skip
        assert done.returncode == 0, done.stderr
        return {n["name"]: n["state"] for n in yaml.safe_load(done.stdout)}

    def vnode(self, name: str) -> dict[str, Any]:
        vnode: dict[str, Any] = self.server.state()["vnodes"][name]
        return vnode

    def system(self, node: str) -> str:
        """What the node runs, from inside it (the service's key)."""
        ip = next(n["ip"] for n in yaml.safe_load((self.lab_dir / "inventory.yaml").read_text())["clusters"][0]["nodes"]
                  if n["name"] == node)  # fmt: skip
        done = subprocess.run(["ip", "netns", "exec", NETNS, "ssh", *SSH_OPTIONS, "-i",
                               str(self.lab_dir / "ssh" / "id_ed25519"), f"root@{ip}", "cat /etc/kasched-system"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        return done.stdout.strip() if done.returncode == 0 else f"ssh failed: {done.stderr.strip()}"

    def logs(self) -> str:
        reclaims = "".join(f"{p.name}:\n{p.read_text()}" for p in sorted(self.work.glob("state/reclaim/*.log")))
        helper = self.end_log.read_text() if self.end_log.exists() else ""
        return f"helper:\n{helper}\nreclaim:\n{reclaims}\nkaschedd:\n{(self.work / 'kaschedd.log').read_text()[-1500:]}"


def _site(work: Path, lab_dir: Path) -> Path:
    """kasched's site for the lab; kaschedd finds the stand-in's pbsnodes through scheduler_settings."""

    config = work / "kasched.yaml"
    settings = {
        "site": "lab", "state_dir": str(work / "state"), "boot_dir": str(lab_dir / "boot"),
        "credentials_file": str(lab_dir / "credentials.yaml"), "service_key": str(lab_dir / "ssh" / "id_ed25519"),
        "reboot_timeout": 20, "scheduler_settings": {"KASCHED_PBS_EXEC": str(work / "pbs")},
    }  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    config.chmod(0o644)
    (work / "state").mkdir(mode=0o755)
    populate(config, work, lab_dir, LAB)
    return config


def _kaschedd(config: Path, work: Path) -> subprocess.Popen[bytes]:
    """kaschedd as root in the lab's namespace: the user deploys through it, the hook reaches it."""
    log = (work / "kaschedd.log").open("ab")
    service = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{NETNS}", str(ROOT / ".venv/bin/kaschedd"), "--config", str(config)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])},
    )  # fmt: skip
    log.close()
    env = {**os.environ, "KASCHED_CONFIG": str(config)}
    for _ in range(300):
        if service.poll() is not None:
            pytest.fail(f"kaschedd exited: {(work / 'kaschedd.log').read_text()[-800:]}")
        if (work / "state" / "kaschedd.sock").exists() and subprocess.run(
            [*KASCHED, "env", "list"], env=env, capture_output=True
        ).returncode == 0:
            return service
        time.sleep(0.2)
    service.kill()
    pytest.fail("kaschedd did not answer")


@pytest.fixture(scope="module")
def lab() -> Iterator[PbsLab]:
    from tests.e2e.conftest import fresh_work_dir

    work = fresh_work_dir("kasched-pbs-lab-", LAB)
    lab_dir = work / "lab"
    kaschedd = None
    try:
        root(*KASCHED, "lab", "up", "--name", LAB, "--nodes", "3", "--switches", "1", "--state-dir", str(lab_dir))
        lab_dir.chmod(0o755)
        config = _site(work, lab_dir)
        kaschedd = _kaschedd(config, work)
        user = unix_user(USER)
        (work / "user").mkdir()
        os.chown(work / "user", user.pw_uid, user.pw_gid)
        root("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "user" / "key"))
        (work / "user" / "key.pub").chmod(0o644)
        hook_config = work / "kasched_pbs_hook.json"
        end_log = work / "pbs-jobs.log"
        hook_config.write_text(json.dumps({
            "kasched": str(ROOT / ".venv/bin/kasched"), "kasched_config": str(config), "cluster": "pbs-server",
            "timeout": 30, "path": f"{ROOT / '.venv/bin'}:/usr/bin:/bin", "end_log": str(end_log),
        }))  # fmt: skip
        server = StandinServer.create(work / "pbs", ["node-1", "node-2", "node-3"], HOOK, hook_config)
        yield PbsLab(server, work, lab_dir, config, end_log)
    finally:
        stop(kaschedd, LAB, work)


def test_the_next_job_starts_only_once_the_nodes_are_back_and_deploys_at_once(lab: PbsLab) -> None:
    nodes = ["node-1", "node-2"]
    first = lab.job("1.pbs-server", nodes)
    assert lab.server.run(first)["ran"]
    deployed = lab.deploy("node-[1-2]")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr + lab.logs()
    assert [lab.system(node) for node in nodes] == ["userenv", "userenv"]
    assert lab.vnode("node-1")["comment"] == "kasched: in deploy job 1.pbs-server"

    ended = lab.server.end("1.pbs-server")
    assert ended["accepted"] and ended["seconds"] < 5, ended
    second = lab.job("2.pbs-server", nodes)
    refused, started = 0, time.monotonic()
    while not (ran := lab.server.run(second))["ran"]:  # the scheduler's cycles, one a second
        assert ran["why"].startswith("node-1 is offline"), ran
        vnode = lab.vnode("node-1")
        assert vnode["comment"].startswith("kasched: giving back after job 1.pbs-server") or not refused, vnode
        refused += 1
        assert time.monotonic() - started < 300, lab.logs()
        time.sleep(1)
    waited = time.monotonic() - started
    states = lab.states()
    assert states["node-1"] == states["node-2"] == "reference", (states, lab.logs())
    assert refused >= 3, f"the next job was refused only {refused} times: was the revert held at all?"
    print(f"job 2 started {waited:.1f} s after job 1 ended (refused {refused} times while its nodes were given back)")
    deployed = lab.deploy("node-[1-2]")  # once, no retry
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr + lab.logs()
    assert [lab.system(node) for node in nodes] == ["userenv", "userenv"]
    lab.server.end("2.pbs-server")


def test_a_node_whose_revert_fails_stays_offline_with_the_reason(lab: PbsLab) -> None:
    job = lab.job("3.pbs-server", ["node-3"])
    assert lab.server.run(job)["ran"]
    deployed = lab.deploy("node-3")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr + lab.logs()
    pid = int((lab.lab_dir / "nodes" / "node-3" / "bmc.pid").read_text())
    os.kill(pid, signal.SIGSTOP)  # node-3's BMC hangs: the revert cannot power-cycle it
    try:
        assert lab.server.end("3.pbs-server")["accepted"]
        wait_for(lambda: "failed" in lab.vnode("node-3")["comment"], 300, f"node-3's revert to fail\n{lab.logs()}", 2)
    finally:
        os.kill(pid, signal.SIGCONT)
    vnode = lab.vnode("node-3")
    assert vnode["offline"] and vnode["comment"].startswith("kasched: revert ") and len(vnode["comment"]) <= 79, vnode
    listed = subprocess.run([str(lab.server.home / "bin" / "pbsnodes"), "-l"], capture_output=True, text=True)
    assert f"node-3               offline {vnode['comment']}" in listed.stdout, listed.stdout
    print(f"pbsnodes -l: {listed.stdout.strip()}")
    refused = lab.server.run(lab.job("4.pbs-server", ["node-3"]))
    assert refused == {"ran": False, "why": "node-3 is offline"}, refused
    time.sleep(10)  # nothing puts it back behind the admin's back
    assert lab.vnode("node-3")["offline"] and lab.server.run(lab.job("4.pbs-server", ["node-3"]))["ran"] is False
