"""The kexec variant of the boot step: the command it runs on a node, and the fallback to the PXE
reboot as data in the node's outcome. (A real ``kexec -e`` cannot run on the lab's namespace nodes:
the lab tests see it fail there and fall back, see tests/e2e/test_operations_lab.py; the commands
jump for real in a QEMU VM in tests/lab/test_vm_kexec.py.)"""

from __future__ import annotations

import dataclasses
import subprocess
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from kasched.bootkeys import BootKeys
from kasched.deploy.kexec import (
    INSTALLED,
    JUMP,
    KEXEC_FILES,
    KEXEC_MOUNT,
    kexec_command,
    kexec_setup_command,
    setup_deploy_system_kexec,
)
from kasched.deploy.nodes import NodeShell
from kasched.deploy.steps import UNTRUSTED, StepContext
from kasched.deploy.workflow import MacroStep, Timeout, Variant, Workflow
from kasched.drivers.base import BootDriver, BootFiles, BootTarget, NodeTarget
from kasched.drivers.pxe import PxeBootDriver
from kasched.results import GroupResult, NodeResult
from kasched.transports.ssh_session import CommandOutput
from kasched.views import EnvironmentView

NODE = NodeTarget("node-1", "02:00:00:00:00:01", "10.0.0.1", disk_device="/dev/vdb")
ENV = EnvironmentView(
    name="debian", version=1, owner="alice", description="", visibility="private", image_kind="tar",
    compression="zst", image_location="/dev/null", image_size=0, sha256="0" * 64, kernel="/boot/vmlinuz",
    initrd="/boot/initrd.img", cmdline="console=ttyS0 quiet", postinstall=[], destructive=False,
    reference=False, created_at=datetime.now(UTC),
)  # fmt: skip


def context(env: EnvironmentView) -> StepContext:
    return StepContext(
        targets={NODE.name: NODE},
        placement={NODE.name: ("sw1", "r1")},
        power={},
        soft=None,  # type: ignore[arg-type]
        boot=None,  # type: ignore[arg-type]
        shell=NodeShell(Path("/nonexistent"), {NODE.name: NODE.ip}),
        environment=env,
        partition=lambda node: node.deploy_partition,
    )


def test_kexec_command_loads_the_kernel_from_the_partition_and_jumps_detached() -> None:
    command = kexec_command(context(ENV), NODE, 3)
    assert subprocess.run(["sh", "-n", "-c", command], check=False).returncode == 0  # valid shell
    lines = command.splitlines()
    assert f"mount -o ro /dev/vdb3 {KEXEC_MOUNT}" in lines[1]
    assert lines[2].startswith(
        f"kexec -l {KEXEC_MOUNT}/boot/vmlinuz --initrd={KEXEC_MOUNT}/boot/initrd.img "
        "--append='root=/dev/vdb3 ro console=ttyS0 quiet'; loaded=$?; umount"
    ), lines[2]
    assert lines[-1] == JUMP == "sync; (trap '' HUP; sleep 1; exec kexec -e) </dev/null >/dev/null 2>&1 &"


def test_kexec_command_without_kexec_tools_or_kernel_fails_with_its_reason() -> None:
    command = kexec_command(context(ENV), NODE, 3)
    done = subprocess.run(["/bin/sh", "-c", command], env={"PATH": "/nonexistent"}, capture_output=True, text=True)
    assert done.returncode == 3 and done.stderr.strip() == "kexec-tools is not installed on the node"
    no_kernel = kexec_command(context(dataclasses.replace(ENV, kernel="", initrd="")), NODE, 3)
    assert "exit 4" in no_kernel and "kexec -l" not in no_kernel


def step(ok: bool, error: str = "") -> Variant:
    def run(nodes: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
        group = GroupResult()
        for node in nodes:
            group.add(NodeResult(node, ok or node == "n2", error=None if ok or node == "n2" else error))
        return group

    return Variant("kexec" if not ok else "pxe", run, Timeout(5))


def test_a_failed_kexec_falls_back_to_pxe_and_says_so_in_the_outcome() -> None:
    error = "kexec: exit 3: kexec-tools is not installed on the node"
    outcomes = Workflow([MacroStep("boot", (step(False, error), step(True)))]).run(["n1", "n2"])
    assert outcomes["n1"].ok and outcomes["n1"].variant == "pxe" and outcomes["n1"].error is None
    assert outcomes["n1"].fallbacks == [f"boot/kexec: {error}"]
    assert outcomes["n2"].ok and outcomes["n2"].variant == "kexec" and outcomes["n2"].fallbacks == []


def test_the_result_table_names_the_variants_that_failed_first() -> None:
    from kasched.cli.deploy import _variant

    outcomes = Workflow(
        [
            MacroStep("setup", (step(False, "no python3"), step(True))),
            MacroStep("boot", (step(False, "no"), step(True))),
        ]
    ).run(["n1", "n2"])
    assert (_variant(outcomes["n1"]), _variant(outcomes["n2"])) == ("pxe (after kexec)", "kexec")


def test_kexec_setup_command_loads_the_sent_deployment_system_and_jumps_detached() -> None:
    files = BootFiles(Path("/srv/boot/deploy/vmlinuz"), Path("/srv/boot/deploy/initrd.img"), "kasched.system=deploy")
    lines = kexec_setup_command(files).splitlines()
    assert "exit 3" in lines[0] and "command -v kexec" in lines[0]
    assert lines[1] == (
        f"kexec -l {KEXEC_FILES}/kernel --initrd={KEXEC_FILES}/initrd --append=kasched.system=deploy; "
        f"loaded=$?; rm -rf {KEXEC_FILES}"
    )
    assert "exit 5" in lines[2] and lines[3] == JUMP
    for shell in ("sh", "bash"):
        assert subprocess.run([shell, "-n", "-c", "\n".join(lines)], check=False).returncode == 0
    no_initrd = kexec_setup_command(BootFiles(Path("/k"), None, "kasched.system=deploy console=ttyS0"))
    assert "--initrd" not in no_initrd and "--append='kasched.system=deploy console=ttyS0'" in no_initrd


def test_the_pxe_driver_names_the_deployment_systems_files(tmp_path: Path) -> None:
    driver = PxeBootDriver(tmp_path, deploy_kernel="deploy/vmlinuz", deploy_initrd="deploy/initrd.img")
    files = driver.boot_files(NODE, BootTarget.DEPLOY)
    assert files == BootFiles(tmp_path / "deploy/vmlinuz", tmp_path / "deploy/initrd.img", "kasched.system=deploy")
    assert driver.boot_files(NODE, BootTarget.LOCAL) is None  # its kernel is on the node's disk


def test_a_driver_that_names_no_files_fails_the_kexec_setup_with_its_reason(tmp_path: Path) -> None:
    ctx = context(ENV)
    ctx.boot = FilelessBootDriver()
    ctx.trusted, ctx.keys = {NODE.name}, BootKeys(tmp_path)
    shell_stand_in = RecordingShell()
    ctx.shell = shell_stand_in  # type: ignore[assignment]
    result = setup_deploy_system_kexec(ctx, [NODE.name], 0.0, threading.Event())
    assert result[NODE.name].error == "kexec: the boot driver names no deployment system files"
    assert shell_stand_in.commands == [INSTALLED]  # checked for kexec, then nothing sent, no profile, no jump


def test_the_kexec_setup_sends_nothing_to_a_system_kasched_does_not_vouch_for(tmp_path: Path) -> None:
    """The deployment system and its per-boot key go only to the verified reference no user held
    since: any other running system (a user's) could keep the key and answer in its place."""
    ctx = context(ENV)
    ctx.boot = FilelessBootDriver()
    ctx.keys = BootKeys(tmp_path)  # ctx.trusted is empty: the node's last system was a user's
    shell_stand_in = RecordingShell()
    ctx.shell = shell_stand_in  # type: ignore[assignment]
    result = setup_deploy_system_kexec(ctx, [NODE.name], 0.0, threading.Event())
    assert result[NODE.name].error == f"kexec: {UNTRUSTED}"
    assert shell_stand_in.commands == []
    assert not (tmp_path / "bootkeys").exists()  # no key made


class FilelessBootDriver(BootDriver):
    """A boot driver that writes nothing and, like BootDriver by default, names no files."""

    def validate(self, node: NodeTarget) -> None:
        pass

    def set_profile(self, node: NodeTarget, target: BootTarget, **profile: object) -> None:  # type: ignore[override]
        raise AssertionError("no profile may be set when the files are missing")


class RecordingShell:
    """A stand-in for NodeShell (no node is reached): records the commands, and every node has kexec."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.pins: dict[str, str] = {}

    def run(self, nodes: Sequence[str], command: str, timeout: float, *, trust_any: bool = False) -> GroupResult:
        self.commands.append(command)
        group = GroupResult()
        for node in nodes:
            group.add(NodeResult(node, True, value=CommandOutput("", "", 0)))
        return group
