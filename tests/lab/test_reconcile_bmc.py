"""Reconcile against the lab's real BMCs (ipmi_sim): a node recorded ``reference`` that its BMC says is
off, or whose BMC does not answer, is reported and marked for the orphan sweep to give back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from kasched.compose import open_site
from kasched.config import load
from kasched.deploy.operations import Operations
from kasched.identity import Caller
from kasched.models import NodeState
from kasched.reconcile import reconcile
from tests.lab.conftest import LabHandle

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_reconcile_reports_and_marks_nodes_whose_bmc_contradicts_them(in_lab: LabHandle, tmp_path: Path) -> None:
    """node-2 powered off through its BMC, node-3 through 'kasched power off' (neither changes the
    recorded state), node-4's BMC on a port where nothing answers: all three reported and marked
    deploy_failed; node-5, held by a grant and off, is not asked; the others' BMCs say on."""
    lab = in_lab.lab
    inventory = yaml.safe_load(lab.inventory_file.read_text())
    for group in inventory["clusters"][0]["nodes"]:
        if group["name"] == "node-4":
            group["bmc"] = {**group.get("bmc", {}), "port": 6999}  # a silent BMC
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(inventory))
    site = {"site": "lab", "state_dir": str(tmp_path / "state"), "credentials_file": str(lab.credentials_file)}
    (tmp_path / "kasched.yaml").write_text(yaml.safe_dump(site))
    config = load(tmp_path / "kasched.yaml")
    api = open_site(config, Caller("root", is_admin=True), load_entry_points=False)
    targets = in_lab.targets
    try:
        api.import_nodes(tmp_path / "inventory.yaml")
        api.grant("alice", "node-5", 1)
        in_lab.ipmi.off(targets["node-2"])
        assert Operations(api).power("node-3", "off").ok
        in_lab.ipmi.off(targets["node-5"])
        assert {n.name: n.state for n in api.list_nodes()}["node-2"] == "reference", "kasched still says reference"
        started = time.monotonic()
        report = reconcile(api, grace=0, bmc_timeout=5)
        took = time.monotonic() - started
        found = {f.node: f for f in report.power}
        assert set(found) == {"node-2", "node-3", "node-4"}, found
        assert found["node-2"].bmc == found["node-3"].bmc == "off"
        assert found["node-4"].bmc.startswith(("cannot tell", "no answer in 5 s")), found["node-4"]
        assert all(f.marked and f.recorded == "reference" for f in found.values())
        assert took < 15, f"BMCs asked in parallel, the silent one not waited on: {took:.1f} s"
        states = {n.name: n.state for n in api.list_nodes()}
        failed = [name for name, state in sorted(states.items()) if state == NodeState.DEPLOY_FAILED]
        assert failed == ["node-2", "node-3", "node-4"], states
        assert states["node-5"] == "reference", "held by a grant: its job's, not reconcile's"
        assert {"node-2", "node-3", "node-4"} <= set(report.orphans)
        print(f"reconcile over {len(targets)} real BMCs (one silent): {took:.2f} s")
    finally:
        for name in ("node-2", "node-3", "node-5"):
            in_lab.ipmi.on(targets[name])
        for name in ("node-2", "node-3", "node-5"):
            in_lab.wait_view(targets[name], timeout=180)
        api.close()
