"""Every operation path of the real workflow on simulated nodes: deploy (each variant and fallback),
revert (the trusted fast path, the patch, the whole rewrite), reboot, power, cancel; checked in the
database and in the nodes' own state (which system runs, what their disks hold, their host keys)."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from kasched.deploy.operations import Operations
from kasched.drivers.reboot import RebootLevel
from kasched.models import NodeState
from tests.simulated.conftest import ALL, Sim

pytestmark = pytest.mark.simulated


def variants(result: object) -> set[str]:
    return {outcome.variant for outcome in result.results.values()}  # type: ignore[attr-defined]


def test_first_deploy_boots_the_deployment_system_by_pxe_and_the_environment_by_kexec(sim: Sim) -> None:
    result = sim.deploy()
    assert result.state == "done" and len(result.succeeded) == 8
    image = sim.admin.show_environment("userenv")
    digest = hashlib.sha256(open(image.image_location, "rb").read()).hexdigest()  # noqa: SIM115
    for name, outcome in result.results.items():
        # untrusted at first (no verified reference yet): no nomini, no kexec setup; PXE did it
        assert [f.split(":")[0] for f in outcome.fallbacks] == ["setup/nomini", "setup/kexec"], outcome
        assert outcome.variant == "kexec" and outcome.step == "boot"
        node = sim.node(name)
        assert node.system.startswith("root=/dev/sda3") and node.partitions["/dev/sda3"].sha256 == digest
    assert set(sim.states().values()) == {NodeState.DEPLOYED.value}


def test_revert_verifies_the_reference_then_a_second_revert_takes_the_trusted_fast_path(sim: Sim) -> None:
    sim.deploy()
    reverted = sim.revert()
    assert reverted.state == "done"
    assert {o.step for o in reverted.results.values()} == {"boot"}  # power cycle, digest, boot
    keys = {view.name: view.host_key for view in sim.admin.list_nodes()}
    assert all(sim.node(name).host_key == key for name, key in keys.items())  # the pinned per-boot keys
    assert len(set(keys.values())) == 8
    boots = {name: sim.node(name).boots for name in keys}
    again = sim.revert()
    assert again.state == "done" and {o.step for o in again.results.values()} == {"check"}
    assert {name: sim.node(name).boots for name in keys} == boots  # nothing rebooted


def test_deploy_from_the_trusted_reference_skips_the_first_reboot(sim: Sim) -> None:
    sim.revert()
    boots = sim.node("node-1").boots
    result = sim.deploy()
    assert result.state == "done"
    assert all(not o.fallbacks for o in result.results.values())  # nomini, chain, postinstall, kexec
    assert sim.node("node-1").boots == boots + 1  # only the environment's kexec


def test_without_the_tools_the_setup_falls_to_kexec_and_without_kexec_to_pxe(sim: Sim) -> None:
    sim.revert()
    sim.files.set_faults({"node-1": ["no_tools"], "node-2": ["no_tools", "no_kexec"]})
    result = sim.deploy()
    assert result.state == "done"
    one, two = result.results["node-1"], result.results["node-2"]
    assert one.fallbacks == ["setup/nomini: running system: exit 3: missing python3"]
    assert two.fallbacks == [
        "setup/nomini: running system: exit 3: missing python3",
        "setup/kexec: kexec: exit 3: kexec-tools is not installed on the node",
        "boot/kexec: kexec: exit 3: kexec-tools is not installed on the node",
    ]
    assert two.variant == "pxe" and sim.node("node-2").system.startswith("root=/dev/sda3")


def test_a_changed_reference_is_patched_and_a_rewritten_one_gets_the_whole_image(sim: Sim) -> None:
    sim.files.set_faults({"node-1": ["reference_changed"], "node-2": ["reference_rewritten"]})
    result = sim.revert()
    assert result.state == "done"
    patched, rewritten = result.results["node-1"], result.results["node-2"]
    assert patched.fallbacks == ["verify/digest: the reference partition differs from the site's image in 1 of 3 blocks"]
    assert patched.variant == "pxe" and patched.step == "boot"
    assert rewritten.fallbacks == [
        "verify/digest: the reference partition differs from the site's image in 3 of 3 blocks",
        "verify/patch: too many blocks differ: the whole image instead",
    ]
    assert not sim.node("node-1").changed.get("/dev/sda2") and not sim.node("node-2").changed.get("/dev/sda2")
    assert result.results["node-3"].fallbacks == []


def test_reboot_into_each_target_and_power(sim: Sim) -> None:
    sim.deploy()
    operations = Operations(sim.user)
    assert operations.reboot("node-[1-2]", to="deploy").state == "done"
    assert sim.node("node-1").system.startswith("kasched.system=deploy")
    assert operations.reboot("node-[1-2]", RebootLevel.HARD, to="userenv").state == "done"
    assert sim.node("node-1").system.startswith("root=/dev/sda3")
    assert operations.reboot("node-[1-2]", to="reference").state == "done"
    assert sim.node("node-2").system.startswith("root=/dev/sda2")
    off = operations.power("node-3", "off")
    assert off.ok and not sim.node("node-3").powered
    assert operations.power("node-3", "status")["node-3"].value == "off"
    operations.power("node-3", "on")
    assert sim.node("node-3").powered


def test_a_system_that_ignores_its_reboot_gets_the_bmc(sim: Sim) -> None:
    sim.revert()  # trusted: the reboot starts soft
    sim.files.set_faults({"node-1": ["ignores_soft_reboot"]})
    result = Operations(sim.user).reboot("node-[1-2]", to="reference")
    assert result.state == "done"
    assert sim.node("node-1").boots == sim.node("node-2").boots  # node-1 was reset by its BMC instead


def test_cancel_stops_the_operation_and_leaves_every_node_known(sim: Sim) -> None:
    sim.files.update(calibration={"boot_network": 300.0})  # 0.3 s a boot here: time to cancel
    cancel = threading.Event()
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.update(r=Operations(sim.user, cancel=cancel).deploy("userenv", ALL)))
    thread.start()
    time.sleep(0.1)  # in the setup's reboot
    cancel.set()
    thread.join(30)
    result = box["r"]
    assert result.state == "cancelled" and result.failed, result  # type: ignore[attr-defined]
    assert all("cancelled" in (o.error or "") for o in result.results.values() if not o.ok), result  # type: ignore[attr-defined]
    assert not any(state in ("deploying", "reverting") for state in sim.states().values())
