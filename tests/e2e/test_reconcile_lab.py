"""Reconcile on the lab, end to end: nodes recorded ``reference`` that were powered off behind kasched's
back (through ``kasched power off``, or through the BMC itself), and one whose BMC hangs, are reported,
marked and given back by the orphan sweep; checked from inside the nodes afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from tests.conftest import ROOT
from tests.e2e.conftest import KASCHED, Site
from tests.e2e.test_deploy_lab import assert_runs_reference

pytestmark = [pytest.mark.lab, pytest.mark.slow]
NODES = ("node-2", "node-6", "node-8")


def states(site: Site) -> dict[str, str]:
    done = site.kasched("nodes", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {node["name"]: node["state"] for node in json.loads(done.stdout)}


def bmc_off(site: Site, node: str) -> None:
    """Power ``node`` off through its BMC with ipmitool, as a user who knows the BMC's password would."""
    entry = site.nodes()[node]
    credentials = next(iter(yaml.safe_load((site.lab_dir / "credentials.yaml").read_text()).values()))
    inventory = yaml.safe_load((site.lab_dir / "inventory.yaml").read_text())
    port = str(inventory["clusters"][0]["defaults"]["bmc"]["port"])
    done = subprocess.run(
        [*KASCHED, "lab", "exec", "--name", site.lab, "--", "ipmitool", "-I", "lanplus", "-H",
         str(entry["bmc"]["address"]), "-p", port, "-U", credentials["user"], "-P", credentials["password"],
         "chassis", "power", "off"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_reconcile_gives_back_nodes_powered_off_behind_its_back(site: Site) -> None:
    assert all(states(site)[node] == "reference" for node in NODES)
    off = site.kasched("power", "off", "-m", "node-2", "--json")
    assert off.returncode == 0, off.stderr
    bmc_off(site, "node-6")
    assert states(site)["node-2"] == states(site)["node-6"] == "reference", "powering off changes no state"
    pid = int((site.lab_dir / "nodes" / "node-8" / "bmc.pid").read_text())
    os.kill(pid, signal.SIGSTOP)  # node-8's BMC hangs: it neither answers nor refuses
    try:
        started = time.monotonic()
        done = site.kasched("reconcile", "--grace", "0", "--json")
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    power = {finding["node"]: finding for finding in report["power"]}
    assert power["node-2"] == {"node": "node-2", "recorded": "reference", "bmc": "off", "marked": True}
    assert power["node-6"] == {"node": "node-6", "recorded": "reference", "bmc": "off", "marked": True}
    silent = power["node-8"]["bmc"]  # the driver's own timeout, or reconcile's bound: 5 s at most
    assert silent == "no answer in 5 s" or "did not answer power status (timeout)" in silent, power
    assert power["node-8"]["marked"] and took < 30, (power, took)
    assert set(NODES) <= set(report["orphans"]), report
    print(f"reconcile with 8 real BMCs, one hanging: {took:.1f} s (the CLI's start included)")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and any(states(site)[node] != "reference" for node in NODES):
        time.sleep(3)
    log = (site.work / "state" / "reclaim" / "orphans.log").read_text()
    assert all(states(site)[node] == "reference" for node in NODES), f"{states(site)}\n{log[-3000:]}"
    print(f"given back in {time.monotonic() - started:.0f} s after reconcile started")
    for node in NODES:
        assert_runs_reference(site, node)
    history = json.loads(site.kasched("stats", "--kind", "reconcile", "-m", "node-6", "--json").stdout)
    assert history[0]["error"] == "recorded reference but its BMC: off: marked deploy_failed, to give back", history
