"""The faults the workflow handles, injected per simulated node: each fails its own node, with the
reason, and no other; the next revert brings back every node that can come back."""

from __future__ import annotations

import pytest

from kasched.models import NodeState
from tests.simulated.conftest import Sim

pytestmark = pytest.mark.simulated


def test_a_node_that_never_comes_back_and_a_silent_bmc_fail_alone(sim: Sim) -> None:
    sim.files.set_faults({"node-1": ["never_back"], "node-2": ["silent_bmc"]})
    result = sim.deploy()
    assert sorted(result.failed) == ["node-1", "node-2"] and len(result.succeeded) == 6
    lost, silent = result.results["node-1"], result.results["node-2"]
    assert lost.step == "setup" and "not back 600 s after a very_hard reboot" in (lost.error or "")
    assert silent.step == "setup" and "BMC node-2 did not answer" in (silent.error or "")
    states = sim.states()
    assert states["node-1"] == states["node-2"] == NodeState.DEPLOY_FAILED.value


def test_an_image_garbled_on_its_way_fails_the_checksum_and_is_not_booted(sim: Sim) -> None:
    sim.files.set_faults({"node-3": ["checksum_mismatch"]})
    result = sim.deploy()
    failed = result.results["node-3"]
    assert result.failed == ["node-3"] and failed.step == "broadcast"
    sent = [f for f in failed.fallbacks if f.startswith("broadcast/")]
    assert [f.split(":")[0] for f in sent] == ["broadcast/chain", "broadcast/unicast"]
    assert all("node-3: sha256 mismatch: got " in f for f in sent)
    assert sim.node("node-3").system.startswith("kasched.system=deploy")  # never booted what it got


def test_a_node_that_dies_mid_broadcast_is_bypassed_and_the_revert_brings_it_back(sim: Sim) -> None:
    sim.files.set_faults({"node-4": ["dies_mid_broadcast"]})
    result = sim.deploy()
    assert result.failed == ["node-4"]
    assert result.results["node-4"].fallbacks[2] == "broadcast/chain: node-4: no acknowledgement for 3 s: bypassed"
    assert not sim.node("node-4").powered
    sim.files.set_faults({})
    reverted = sim.revert("node-4")
    assert reverted.succeeded == ["node-4"] and sim.node("node-4").powered
    assert sim.states()["node-4"] == NodeState.REFERENCE.value


def test_another_machine_on_a_nodes_address_fails_the_host_key_check(sim: Sim) -> None:
    sim.files.set_faults({"node-5": ["wrong_host_key"]})
    result = sim.revert()
    assert result.failed == ["node-5"]
    assert "host key mismatch" in (result.results["node-5"].error or "")
    assert not any(v.trusted for v in sim.admin.list_nodes() if v.name == "node-5")
