"""Deployments on the lab, end to end, checked from inside the nodes: deploy a real environment on 8
nodes across 2 switches, revert them; then the faults: a changed image, a node powered off in the
middle of the broadcast, a node that never comes back, a BMC that does not answer."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import KASCHED, LAB, Site

pytestmark = [pytest.mark.lab, pytest.mark.slow]
ALL = "node-[1-8]"


def deploy(site: Site, nodes: str, *extra: str) -> tuple[int, dict[str, object], str]:
    done = site.kasched("deploy", "-e", "userenv", "-m", nodes, "-k", f"{site.user_key}.pub", "--json", *extra)
    data = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, data, done.stderr


def boots(site: Site, node: str) -> int:
    """How many times the node's firmware has booted (its console log, written by the lab)."""
    return (site.lab_dir / "nodes" / node / "console.log").read_text().count("power on, booting")


def assert_runs_userenv(site: Site, node: str) -> None:
    inside = site.ssh(
        site.ip(node),
        "hostname; cat /etc/kasched-marker; cat /run/kasched/cmdline; sha256sum /var/payload | cut -c1-16",
        key=site.user_key,
    )
    assert inside.returncode == 0, f"{node}: {inside.stderr}"
    lines = inside.stdout.split("\n")
    assert lines[0] == node and lines[1] == "deployed by kasched" and "root=/dev/sda3" in lines[2]


def assert_runs_reference(site: Site, node: str) -> None:
    inside = site.ssh(site.ip(node), "hostname; cat /etc/kasched-system; cat /run/kasched/cmdline")
    assert inside.returncode == 0, f"{node}: {inside.stderr}"
    assert inside.stdout.split("\n")[:2] == [node, "reference"] and "root=/dev/sda2" in inside.stdout
    refused = site.ssh(site.ip(node), "true", key=site.user_key)
    assert refused.returncode != 0  # the user's key is gone with the user's environment


def test_deploy_eight_nodes_then_revert(site: Site) -> None:
    code, result, stderr = deploy(site, ALL)
    assert code == 0, stderr
    assert result["state"] == "done"
    # Each node fell back three times, and its outcome says so: no "nomini" and no kexec setup, the
    # nodes running a reference kasched has not verified (the lab booted it) or, once verified, one
    # without python3 and kexec-tools (a namespace node must not replace the kernel it shares with the
    # host; no kexec for the boot either): PXE reboots did both.
    untrusted = "the running system is not the verified reference environment (a user held the node since)"
    for outcome in result["nodes"].values():  # type: ignore[attr-defined]
        assert outcome["variant"] == "pxe" and outcome["error"] is None, outcome
        assert outcome["fallbacks"][0] in (
            f"setup/nomini: {untrusted}",
            "setup/nomini: running system: exit 3: missing python3",
        )
        assert outcome["fallbacks"][1] in (
            f"setup/kexec: kexec: {untrusted}",
            "setup/kexec: kexec: exit 3: kexec-tools is not installed on the node",
        )
        assert outcome["fallbacks"][2:] == ["boot/kexec: kexec: exit 3: kexec-tools is not installed on the node"]
    size = (site.work / "userenv.tar.zst").stat().st_size
    assert f"sent {size / (1 << 20):.1f} MiB at " in stderr  # the live view: the whole image, and its rate
    payloads = set()
    for node in site.nodes():
        assert_runs_userenv(site, node)
        payloads.add(site.ssh(site.ip(node), "sha256sum /var/payload", key=site.user_key).stdout.split()[0])
    assert len(payloads) == 1  # the same image everywhere
    listed = json.loads(site.kasched("nodes", "list", "--json").stdout)
    assert {n["state"] for n in listed} == {"deployed"} and {n["environment"] for n in listed} == {"userenv@root:1"}
    reverted = site.kasched("revert", "-m", ALL, "--json")
    assert reverted.returncode == 0, reverted.stderr
    for node in site.nodes():
        assert_runs_reference(site, node)
    assert {n["state"] for n in json.loads(site.kasched("nodes", "list", "--json").stdout)} == {"reference"}
    listed = json.loads(site.kasched("nodes", "list", "--json").stdout)
    assert all(n["trusted"] and n["host_key"].startswith("ssh-ed25519 ") for n in listed)  # the revert's keys
    assert len({n["host_key"] for n in listed}) == 8  # one per node and boot
    stats = json.loads(site.kasched("stats", "--by", "step", "--json").stdout)
    assert {"setup/pxe", "broadcast/chain", "configure/postinstall", "boot/pxe"} <= {g["key"] for g in stats}
    assert {"check/trusted", "setup/power-cycle", "boot/pxe"} <= {g["key"] for g in stats}


def test_changed_image_is_refused_before_any_reboot(site: Site) -> None:
    # kaschedd deploys its own copy of the image (made at env add): a change to that copy is refused.
    shown = json.loads(site.kasched("env", "show", "userenv", "--json").stdout)
    image = Path(shown["image_location"])
    assert image.is_relative_to(site.work / "state" / "images")
    before = {node: boots(site, node) for node in ("node-1", "node-2")}
    saved = image.read_bytes()
    try:
        image.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        code, _, stderr = deploy(site, "node-[1-2]")
        assert code == 6 and "has sha256" in stderr and "Traceback" not in stderr
    finally:
        image.write_bytes(saved)
    assert {node: boots(site, node) for node in ("node-1", "node-2")} == before


def test_node_powered_off_during_the_broadcast(site: Site) -> None:
    credentials = yaml.safe_load((site.lab_dir / "credentials.yaml").read_text())
    entry = next(iter(credentials.values()))
    bmc = site.nodes()["node-3"]["bmc"]["address"]
    port = f"nd{list(site.nodes()).index('node-3') + 1}"
    env = [f"KASCHED_CONFIG={site.config}", "KASCHED_DIRECT=1"]
    command = ["deploy", "-e", "userenv", "-m", "node-[1-4]", "-k", f"{site.user_key}.pub", "--json"]
    process = subprocess.Popen(
        [*KASCHED, "lab", "exec", "--name", LAB, "--", "env", *env, *KASCHED, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    shaping = [
        "tc",
        "-n",
        f"kl-{LAB}",
        "qdisc",
        "replace",
        "dev",
        port,
        "root",
        "tbf",
        "burst",
        "256kb",
        "latency",
        "100ms",
        "rate",
    ]
    try:
        for line in process.stderr:  # the progress view: wait until the deployment system runs everywhere
            if "setup" in line and "ok 4/4" in line:
                break
        # node-3's link slowed to 8 Mbit/s: the chain goes at its pace (about 75 s for the image), so the
        # power cut (IPMI takes about 10 s in the lab) lands in the middle of the stream.
        subprocess.run([*shaping, "8mbit"], check=True)
        baseline, deadline = _sent_to(port), time.monotonic() + 300
        while _sent_to(port) - baseline < 16 << 20 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        off = subprocess.run(
            [
                *KASCHED,
                "lab",
                "exec",
                "--name",
                LAB,
                "--",
                "ipmitool",
                "-I",
                "lanplus",
                "-H",
                bmc,
                "-U",
                entry["user"],
                "-P",
                entry["password"],
                "chassis",
                "power",
                "off",
            ],
            capture_output=True,
            text=True,
        )
        assert off.returncode == 0, off.stderr
    finally:
        subprocess.run([*shaping, "200mbit"], check=True)
    out, _ = process.communicate(timeout=600)
    result = json.loads(out)
    assert process.returncode == 1 and result["state"] == "partial"
    assert not result["nodes"]["node-3"]["ok"] and result["nodes"]["node-3"]["step"] == "broadcast"
    for node in ("node-1", "node-2", "node-4"):
        assert result["nodes"][node]["ok"], result["nodes"][node]
        assert_runs_userenv(site, node)
    assert json.loads(site.kasched("nodes", "show", "node-3", "--json").stdout)["state"] == "deploy_failed"


def _sent_to(port: str) -> int:
    """Bytes a switch port has sent its node (the port's transmit counter in the lab namespace)."""
    shown = subprocess.run(
        ["ip", "-n", f"kl-{LAB}", "-s", "-j", "link", "show", port], capture_output=True, text=True, check=True
    )
    return int(json.loads(shown.stdout)[0]["stats64"]["tx"]["bytes"])


def test_node_that_never_comes_back(site: Site) -> None:
    port = f"nd{list(site.nodes()).index('node-6') + 1}"
    subprocess.run(["ip", "-n", f"kl-{LAB}", "link", "set", port, "down"], check=True)
    try:
        code, result, _ = deploy(site, "node-[6-7]")
    finally:
        subprocess.run(["ip", "-n", f"kl-{LAB}", "link", "set", port, "up"], check=True)
    assert code == 1 and result["state"] == "partial"
    assert result["nodes"]["node-6"]["step"] == "setup" and "not back" in result["nodes"]["node-6"]["error"]
    assert result["nodes"]["node-7"]["ok"]
    assert_runs_userenv(site, "node-7")


def test_bmc_that_does_not_answer(site: Site) -> None:
    pid = int((site.lab_dir / "nodes" / "node-8" / "bmc.pid").read_text())
    import os

    os.kill(pid, signal.SIGSTOP)  # the BMC hangs: it neither answers nor refuses
    try:
        code, result, _ = deploy(site, "node-[5,8]")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert code == 1 and result["state"] == "partial"
    error = result["nodes"]["node-8"]["error"]
    assert result["nodes"]["node-8"]["step"] == "setup" and "node-8" in error, error
    assert result["nodes"]["node-5"]["ok"]
    assert_runs_userenv(site, "node-5")
