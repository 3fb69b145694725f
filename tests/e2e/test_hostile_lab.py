"""A hostile user's job on the lab, end to end: what they leave behind is gone at the job's end, checked
from inside the nodes afterwards.

* an environment that ignores reboots, fakes ``/run/kasched/cmdline`` and the reboot token, says it
  is the reference and closes port 22 for a moment when told to reboot: reverted to the real
  reference, which carries a marker the user's system does not have;
* an authorized key and a changed file written on the reference partition during the job: gone, and
  the node's history says the partition was rewritten;
* a node powered off during the job, through its BMC and through ``kasched power off``: back in the
  reference environment.

The job is a Slurm job as its prolog and epilog see it (``kasched job start`` / ``job end`` with
Slurm's variables); the revert runs in the background as on a site (``kasched job reclaim``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import KASCHED, LAB, Site, _run

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTILE_REBOOT = """#!/bin/sh
# hostile: a reboot that is not one. The token goes, the command line says the reference partition,
# and sshd closes for 3 s, as if the node went down and came back.
rm -f /run/kasched-reboot-token
echo 'root=/dev/sda2 ro' > /run/kasched/cmdline
touch /run/hostile-pause
kill "$(cat /run/sshd.pid)" 2>/dev/null
exit 0
"""
HOSTILE_SSHD = """#!/bin/sh
# respawned by init: wait 3 s after a fake reboot before sshd listens again
[ -f /run/hostile-pause ] && { rm -f /run/hostile-pause; sleep 3; }
exec /usr/sbin/sshd -D -e
"""


@pytest.fixture(scope="module")
def marked(site: Site) -> str:
    """A new version of the site's reference environment with a marker file only it carries; the
    nodes get it at their next revert (their partition differs from it)."""
    marker = secrets.token_hex(8)
    raw = site.work / "reference-marked.ext4"
    _run("zstd", "-q", "-d", "-f", str(site.work / "reference.ext4.zst"), "-o", str(raw))
    (site.work / "marker").write_text(marker + "\n")
    _run("debugfs", "-w", "-R", f"write {site.work / 'marker'} etc/kasched-reference-marker", str(raw))
    _run("zstd", "-q", "-f", "--rm", str(raw), "-o", f"{raw}.zst")
    (site.work / "reference-marked.yaml").write_text(
        "name: lab-reference\nvisibility: public\nreference: true\n"
        "image: {file: reference-marked.ext4.zst, kind: raw}\n"
    )
    added = site.kasched("env", "add", str(site.work / "reference-marked.yaml"))
    assert added.returncode == 0, added.stderr
    return marker


@pytest.fixture(scope="module")
def hostile(site: Site) -> str:
    """The hostile environment: the lab's base system, rigged as the module docstring says."""
    from kasched.lab.rootfs import build_rootfs
    from kasched.lab.systems import SystemKeys, make_tree

    keys = SystemKeys(
        site.lab_dir / "ssh" / "ssh_host_ed25519_key", (site.lab_dir / "ssh" / "id_ed25519.pub").read_text()
    )
    tree = make_tree(build_rootfs(), site.work / "hostile", "reference", keys)  # it says it is the reference
    (tree / "etc" / "inittab").write_text("::sysinit:/etc/init.d/rcS\n::respawn:/etc/hostile-sshd\n")
    for path, text in {"etc/hostile-sshd": HOSTILE_SSHD, "usr/local/sbin/reboot": HOSTILE_REBOOT}.items():
        target = tree / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    for name in ("sbin/reboot", "usr/sbin/reboot", "bin/reboot"):
        if os.path.lexists(tree / name):
            (tree / name).unlink()
            shutil.copy(tree / "usr/local/sbin/reboot", tree / name)
    (tree / "etc" / "hostile").write_text("the user's system\n")
    image = site.work / "hostile.tar.gz"
    _run("tar", "-C", str(tree), "-czf", str(image), ".")
    shutil.rmtree(tree)
    (site.work / "hostile.yaml").write_text(
        "name: hostile\nvisibility: public\nimage: {file: hostile.tar.gz, kind: tar}\n"
    )
    added = site.kasched("env", "add", str(site.work / "hostile.yaml"))
    assert added.returncode == 0, added.stderr
    return "hostile"


def job(site: Site, hook: str, job_id: str, nodes: str) -> subprocess.CompletedProcess[str]:
    """The Slurm prolog's or epilog's call, as a Slurm controller would make it."""
    variables = {
        "KASCHED_CONFIG": str(site.config),
        "KASCHED_DIRECT": "1",
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_USER": "root",
        "SLURM_JOB_NODELIST": nodes,
        "SLURM_CLUSTER_NAME": "e2e",
        "SLURM_JOB_CONSTRAINTS": "deploy",
        "SLURM_SCRIPT_CONTEXT": f"{hook.replace('start', 'prolog').replace('end', 'epilog')}_slurmctld",
    }
    env = [f"{key}={value}" for key, value in variables.items()]
    command = [*KASCHED, "lab", "exec", "--name", LAB, "--", "env", *env, *KASCHED, "job", hook, "--scheduler", "slurm"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def wait_reverted(site: Site, nodes: list[str], timeout: float = 600) -> dict[str, dict[str, object]]:
    """Until every node is recorded trusted in the reference environment (the background revert)."""
    deadline = time.monotonic() + timeout
    while True:
        listed = {n["name"]: n for n in json.loads(site.kasched("nodes", "list", "--json").stdout)}
        if all(listed[n]["state"] == "reference" and listed[n]["trusted"] for n in nodes):
            return listed
        failed = [n for n in nodes if listed[n]["state"] == "deploy_failed"]
        if failed or time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-3000:] for p in (site.work / "state" / "reclaim").glob("*.log"))
            pytest.fail(f"not back: {[(n, listed[n]['state']) for n in nodes]}\n{logs}")
        time.sleep(2)


def inside(site: Site, node: str, command: str, key: Path | None = None) -> str:
    done = site.ssh(site.ip(node), command, key=key)
    assert done.returncode == 0, f"{node}: {done.stderr}"
    return done.stdout


def assert_real_reference(site: Site, node: str, marker: str) -> None:
    seen = inside(site, node, "cat /etc/kasched-reference-marker; ls /etc/hostile 2>&1; cat /run/kasched/cmdline")
    lines = seen.splitlines()
    assert lines[0] == marker, f"{node}: {seen}"
    assert "No such file" in lines[1] and "root=/dev/sda2" in lines[2], f"{node}: {seen}"


def history(site: Site, node: str) -> list[str]:
    shown = json.loads(site.kasched("stats", "--by", "step", "-m", node, "--json").stdout)
    return [group["key"] for group in shown]


def test_a_system_that_fakes_its_reboot_is_reverted_to_the_real_reference(
    site: Site, hostile: str, marked: str
) -> None:
    nodes = ["node-5", "node-6"]
    job(site, "start", "9101", "node-[5-6]")
    deployed = site.kasched("deploy", "-e", hostile, "-m", "node-[5-6]", "-k", f"{site.user_key}.pub", "--json")
    assert deployed.returncode == 0, deployed.stderr
    for node in nodes:  # the user's system says it is the reference, and plays a reboot when told to
        inside(site, node, "reboot; sleep 4", key=site.user_key)
        said = inside(site, node, "cat /etc/kasched-system /run/kasched/cmdline /etc/hostile")
        assert said.splitlines()[:3] == ["reference", "root=/dev/sda2 ro", "the user's system"]
    job(site, "end", "9101", "node-[5-6]")
    listed = wait_reverted(site, nodes)
    for node in nodes:
        assert_real_reference(site, node, marked)
        assert listed[node]["host_key"], node
    assert "setup/power-cycle" in history(site, "node-5")


def test_a_changed_reference_partition_is_rewritten_and_the_history_says_so(site: Site, marked: str) -> None:
    job(site, "start", "9102", "node-7")
    deployed = site.kasched("deploy", "-e", "userenv", "-m", "node-7", "-k", f"{site.user_key}.pub", "--json")
    assert deployed.returncode == 0, deployed.stderr
    user_pub = Path(f"{site.user_key}.pub").read_text().strip()
    tamper = (
        "mkdir -p /mnt/ref && mount /dev/sda2 /mnt/ref && mkdir -p /mnt/ref/root/.ssh && "
        f"echo '{user_pub}' >> /mnt/ref/root/.ssh/authorized_keys && echo patched > /mnt/ref/etc/kasched-system && "
        "sync && umount /mnt/ref"
    )
    inside(site, "node-7", tamper, key=site.user_key)
    job(site, "end", "9102", "node-7")
    wait_reverted(site, ["node-7"])
    assert_real_reference(site, "node-7", marked)
    assert inside(site, "node-7", "cat /etc/kasched-system").strip() == "reference"
    assert site.ssh(site.ip("node-7"), "true", key=site.user_key).returncode != 0  # the user's key is gone
    steps = history(site, "node-7")
    assert "verify/digest" in steps and ({"verify/patch", "verify/rewrite"} & set(steps)), steps


def test_nodes_powered_off_during_the_job_are_back_in_the_reference(site: Site, marked: str) -> None:
    job(site, "start", "9103", "node-[7-8]")
    credentials = yaml.safe_load((site.lab_dir / "credentials.yaml").read_text())
    entry = next(iter(credentials.values()))
    bmc = site.nodes()["node-8"]["bmc"]["address"]
    ipmi = ["ipmitool", "-I", "lanplus", "-H", bmc, "-U", entry["user"], "-P", entry["password"]]
    off = subprocess.run([*KASCHED, "lab", "exec", "--name", LAB, "--", *ipmi, "chassis", "power", "off"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert off.returncode == 0, off.stderr
    powered = site.kasched("power", "off", "-m", "node-7")
    assert powered.returncode == 0, powered.stderr
    job(site, "end", "9103", "node-[7-8]")
    wait_reverted(site, ["node-7", "node-8"])
    for node in ("node-7", "node-8"):
        assert_real_reference(site, node, marked)


IMPOSTOR = r"""
import os, socket, struct, subprocess, sys, threading, time
ip, iface, log = sys.argv[1], sys.argv[2], sys.argv[3]
subprocess.run(["ip", "addr", "add", f"{ip}/16", "dev", iface], check=True)
mac = bytes.fromhex(open(f"/sys/class/net/{iface}/address").read().strip().replace(":", ""))
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind((iface, 0))
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac, socket.inet_aton(ip), b"\xff" * 6, socket.inet_aton(ip))
received = {"agent": 0, "ssh": 0}
def serve(port, name):
    server = socket.create_server((ip, port), reuse_port=False)
    while True:
        conn, _ = server.accept()
        conn.settimeout(5)
        try:
            if name == "ssh":
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 impostor\r\n")
            while chunk := conn.recv(65536):
                received[name] += len(chunk)
        except OSError:
            pass
        conn.close()
for port, name in ((7373, "agent"),):
    threading.Thread(target=serve, args=(port, name), daemon=True).start()
for _ in range(600):  # gratuitous ARP every 0.5 s: "this address is mine now"
    raw.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
    with open(log, "w") as out:
        out.write(f"{received['agent']} {received['ssh']}\n")
    time.sleep(0.5)
"""


def test_a_machine_that_takes_a_deploying_nodes_address_receives_nothing(site: Site) -> None:
    """During the broadcast node-4 (another machine on the deploy network) takes node-2's address,
    node-2 being cut off: it answers on the chain's port and runs an sshd with its own host key. It
    receives nothing of the image; node-2 fails with the key reason; node-1 and node-3 finish."""
    nodes = site.nodes()
    victim, impostor = "node-2", "node-4"
    port = f"nd{list(nodes).index(victim) + 1}"
    slow = f"nd{list(nodes).index('node-3') + 1}"
    log = site.work / "impostor.log"
    job(site, "start", "9104", "node-[1-3]")
    env = [f"KASCHED_CONFIG={site.config}", "KASCHED_DIRECT=1"]
    command = ["deploy", "-e", "userenv", "-m", "node-[1-3]", "-k", f"{site.user_key}.pub", "--json"]
    process = subprocess.Popen(
        [*KASCHED, "lab", "exec", "--name", LAB, "--", "env", *env, *KASCHED, *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    shaping = ["tc", "-n", f"kl-{LAB}", "qdisc", "replace", "dev", slow, "root", "tbf", "burst", "256kb",
               "latency", "100ms", "rate"]  # fmt: skip
    netns = f"kl-{LAB}-{impostor}"
    taker = None
    sshd = None
    try:
        for line in process.stderr:
            if "setup" in line and "ok 3/3" in line:
                break
        subprocess.run([*shaping, "8mbit"], check=True)  # the chain at node-3's pace: the stream lasts
        for line in process.stderr:
            if "broadcast" in line and "sent" in line and " 0.0 MiB" not in line:
                break
        subprocess.run(["ip", "-n", f"kl-{LAB}", "link", "set", port, "down"], check=True)  # node-2 cut off
        taker = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", IMPOSTOR, site.ip(victim),
                                  "eth0", str(log)])  # fmt: skip
        host_key = site.work / "impostor_host_key"
        if not host_key.exists():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        time.sleep(1)
        sshd = subprocess.Popen(["ip", "netns", "exec", netns, "/usr/sbin/sshd", "-D", "-e", "-h", str(host_key),
                                 "-o", f"ListenAddress={site.ip(victim)}", "-o", "PidFile=none",
                                 "-o", f"AuthorizedKeysFile={site.work}/none"], stderr=subprocess.PIPE, text=True)  # fmt: skip
        out, _ = process.communicate(timeout=900)
    finally:
        subprocess.run([*shaping, "200mbit"], check=False)
        for child in (taker, sshd):
            if child is not None:
                child.kill()
                child.wait()
        subprocess.run(["ip", "netns", "exec", netns, "ip", "addr", "del", f"{site.ip(victim)}/16", "dev", "eth0"],
                       check=False)  # fmt: skip
        subprocess.run(["ip", "-n", f"kl-{LAB}", "link", "set", port, "up"], check=False)
    result = json.loads(out)
    outcome = result["nodes"][victim]
    assert not outcome["ok"] and outcome["step"] == "broadcast", outcome
    assert "key" in outcome["error"], outcome  # the unicast fallback met the impostor's sshd
    assert any("key" in fallback for fallback in outcome["fallbacks"]) or "host key mismatch" in outcome["error"]
    for node in ("node-1", "node-3"):
        assert result["nodes"][node]["ok"], result["nodes"][node]
    agent_bytes, _ = (int(word) for word in log.read_text().split())
    assert agent_bytes < 4096, f"the impostor received {agent_bytes} bytes on the chain's port"  # challenges only
    assert sshd is not None and sshd.stderr is not None
    assert "Accepted" not in sshd.stderr.read()  # kaschedd never logged in to the impostor
    job(site, "end", "9104", "node-[1-3]")
    wait_reverted(site, ["node-1", "node-2", "node-3"])
