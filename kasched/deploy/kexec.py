"""Booting by kexec (kexec-tools): the running system loads a kernel and jumps to it, with no firmware,
BMC or network boot on the way (Kadeploy's kexec variants). Two uses:

* **setup**: from the running (reference) system into the deployment system. Its kernel and initrd,
  the files the boot driver's network profile names, are sent to the node over SSH (into
  ``/run/kasched-kexec``, a tmpfs), loaded with the profile's command line, and jumped to;
* **boot**: from the deployment system into the environment just written, its kernel and initrd
  read from the environment's partition.

Each checks first that the node has ``kexec`` (exit 3 otherwise: the next variant reboots through the
firmware). The boot profile is set as for a network boot, so that a later reboot boots the same system,
and the check is the same: the token in /run is gone and the command line says what was booted.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kasched.bootkeys import BootKey
from kasched.deploy.nodes import checked
from kasched.deploy.steps import (
    UNTRUSTED,
    StepContext,
    chain_phases,
    check_system,
    forget,
    leave_token,
    ordered,
    partition_device,
    per_partition,
    set_profiles,
)
from kasched.drivers.base import BootFiles, BootTarget, NodeTarget
from kasched.drivers.reboot import port_cycle
from kasched.results import GroupResult, NodeResult

KEXEC_MOUNT = "/mnt/kasched-kexec"
WAIT_WINDOW = 1024  # nodes waited for at once after their jump (32 made 100 nodes come back in 4 turns)
KEXEC_FILES = "/run/kasched-kexec"  # where the deployment system's kernel and initrd are sent
INSTALLED = "command -v kexec >/dev/null || { echo 'kexec-tools is not installed on the node' >&2; exit 3; }"
# Detached in plain shell: no nohup (a coreutils program; busybox-static has none, so a deployment
# system built on it never jumped) and no setsid needed; SIGHUP stays ignored across the exec.
JUMP = "sync; (trap '' HUP; sleep 1; exec kexec -e) </dev/null >/dev/null 2>&1 &"


def kexec_command(ctx: StepContext, node: NodeTarget, partition: int) -> str:
    """Load the environment's kernel (and initrd) from partition N and jump to it. The jump is detached
    and delayed, so the SSH command returns first; ``kexec -e`` then replaces the running kernel.
    Exit 3: no kexec-tools on the node; 4: the environment names no kernel; 5: the kernel or initrd
    cannot be loaded (the next variant reboots through the firmware instead)."""
    env = ctx.env
    if not env.kernel:
        return f"{INSTALLED}\necho 'the environment names no kernel (boot.kernel) to kexec' >&2; exit 4"
    device = node.partition_device(partition)
    root = f"root={device} ro {env.cmdline}".strip()
    load = ["kexec", "-l", shlex.quote(f"{KEXEC_MOUNT}/{env.kernel.lstrip('/')}"), f"--append={shlex.quote(root)}"]
    if env.initrd:
        load.insert(3, f"--initrd={shlex.quote(f'{KEXEC_MOUNT}/{env.initrd.lstrip(chr(47))}')}")
    return "\n".join(
        [
            INSTALLED,
            f"mkdir -p {KEXEC_MOUNT} && mount -o ro {device} {KEXEC_MOUNT} || exit 5",
            f"{' '.join(load)}; loaded=$?; umount {KEXEC_MOUNT}",
            "[ $loaded -eq 0 ] || { echo 'kexec could not load the kernel' >&2; exit 5; }",
            JUMP,
        ]
    )


def kexec_setup_command(files: BootFiles) -> str:
    """Load the deployment system sent into :data:`KEXEC_FILES` and jump to it; the files are removed
    once loaded (the kernel keeps its copy). Exit 5: they cannot be loaded."""
    load = ["kexec", "-l", f"{KEXEC_FILES}/kernel", f"--append={shlex.quote(files.cmdline)}"]
    if files.initrd is not None:
        load.insert(3, f"--initrd={KEXEC_FILES}/initrd")
    return "\n".join(
        [
            INSTALLED,
            f"{' '.join(load)}; loaded=$?; rm -rf {KEXEC_FILES}",
            "[ $loaded -eq 0 ] || { echo 'kexec could not load the deployment system' >&2; exit 5; }",
            JUMP,
        ]
    )


def kexec_into(ctx: StepContext, names: Sequence[str], command_for: Callable[[str], str]) -> GroupResult:
    """Run each node's kexec command, then wait for each node to go down and come back."""
    started = checked(ctx.shell.run_each(names, command_for, ctx.command_timeout), "kexec")
    wait_up = ctx.wait_up or port_cycle()

    def back(name: str) -> NodeResult:
        if not wait_up(ctx.targets[name], ctx.reboot_timeout, True):
            return NodeResult(name, False, "kexec", f"kexec: not back {ctx.reboot_timeout:.0f} s after kexec -e")
        return NodeResult(name, True, "kexec")

    results = GroupResult()
    alive = [name for name, result in started.items() if result.ok]
    with ThreadPoolExecutor(max_workers=max(1, min(WAIT_WINDOW, len(alive)))) as pool:  # waits, not commands
        for result in pool.map(back, alive):
            results.add(result)
    for result in started.values():
        if not result.ok:
            results.add(result)
    return ordered(results, names)


def boot_environment_kexec(
    ctx: StepContext, names: Sequence[str], deadline: float, cancel: threading.Event
) -> GroupResult:
    """The boot step without a firmware reboot: the boot profile is set (later reboots boot the same
    partition), then the running system kexecs the environment's kernel; checked from the node."""

    def boot(partition: int, group: list[str]) -> GroupResult:
        booted = f"root={partition_device(ctx, group[0])}"  # the same device for the whole group
        return chain_phases(
            group,
            [
                lambda alive: set_profiles(ctx, alive, BootTarget.LOCAL, partition=partition, cmdline=ctx.env.cmdline),
                lambda alive: leave_token(ctx, alive),
                lambda alive: kexec_into(ctx, alive, lambda n: kexec_command(ctx, ctx.targets[n], partition)),
                lambda alive: forget_then(ctx, alive),
                lambda alive: check_system(ctx, alive, booted, f"partition {partition}"),
            ],
        )

    return per_partition(ctx, names, boot)


def forget_then(ctx: StepContext, names: Sequence[str]) -> GroupResult:
    """The nodes jumped to the user's environment: nothing pinned is left for them."""
    forget(ctx, names)
    results = GroupResult()
    for name in names:
        results.add(NodeResult(name, True, "kexec"))
    return results


def setup_deploy_system_kexec(
    ctx: StepContext, names: Sequence[str], deadline: float, cancel: threading.Event
) -> GroupResult:
    """The setup step without a firmware reboot: the running system must have kexec-tools; the
    deployment system's files are sent to each node, the boot profile set to it, and each node kexecs
    it; checked from the node as after a network boot."""
    files: dict[str, BootFiles] = {}
    keys: dict[str, BootKey] = {}

    def send(alive: list[str]) -> GroupResult:
        results = GroupResult()
        for name in alive:
            found = ctx.boot.boot_files(ctx.targets[name], BootTarget.DEPLOY)
            if found is None:
                results.add(NodeResult(name, False, "kexec", "kexec: the boot driver names no deployment system files"))
            else:
                files[name] = found
        sendable = [name for name in alive if name in files]
        for result in send_boot_files(ctx, sendable, files).values():
            results.add(result)
        return ordered(results, alive)

    def send_keys(alive: list[str]) -> GroupResult:
        assert ctx.keys is not None
        for node in ctx.nodes(alive):
            keys[node.name] = ctx.keys.issue(node.name, node.mac)
        return send_boot_keys(ctx, alive, keys)

    def check(alive: list[str]) -> GroupResult:
        ctx.shell.pins.update({name: keys[name].public for name in alive})
        return check_system(ctx, alive, "kasched.system=deploy", "deployment system", pinned=True)

    untrusted = GroupResult()
    for name in names:  # the deployment system and its key go only to a system kasched vouches for
        if name not in ctx.trusted or ctx.keys is None:
            untrusted.add(NodeResult(name, False, "kexec", f"kexec: {UNTRUSTED}"))
    results = chain_phases(
        [name for name in names if name not in untrusted],
        [
            lambda alive: checked(ctx.shell.run(alive, INSTALLED, 30), "kexec"),
            send,
            send_keys,
            lambda alive: set_profiles(ctx, alive, BootTarget.DEPLOY),
            lambda alive: kexec_into(ctx, alive, lambda n: kexec_setup_command(files[n])),
            check,
        ],
    )
    for node in ctx.nodes(names):
        if ctx.keys is not None:
            ctx.keys.withdraw(node.mac)
        if node.name in results and not results[node.name].ok:
            forget(ctx, [node.name])
    for result in untrusted.values():
        results.add(result)
    return ordered(results, names)


def send_boot_keys(ctx: StepContext, names: Sequence[str], keys: dict[str, BootKey]) -> GroupResult:
    """Each node's per-boot key archive, appended on the node to the deployment system's initrd
    (concatenated gzip'd cpio archives are one initramfs to the kernel)."""
    results = GroupResult()

    def push(name: str) -> NodeResult:
        assert ctx.keys is not None
        archive = (ctx.keys.boot_dir / keys[name].initrd).read_bytes()
        return ctx.shell.push([name], {"bootkey": archive}, KEXEC_FILES, ctx.command_timeout)[name]

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(names)))) as pool:
        for result in pool.map(push, names):
            results.add(result)
    appended = ctx.shell.run(
        [name for name in names if results[name].ok],
        f"cat {KEXEC_FILES}/bootkey >> {KEXEC_FILES}/initrd && rm -f {KEXEC_FILES}/bootkey",
        ctx.command_timeout,
    )
    for result in checked(appended, "kexec: sending the boot key").values():
        results.add(result)
    return ordered(results, names)


def send_boot_files(
    ctx: StepContext, names: Sequence[str], files: dict[str, BootFiles], directory: str = KEXEC_FILES
) -> GroupResult:
    """Each node's kernel (and initrd) into ``directory`` on it, over SSH: one push per set of files
    (nodes in parallel, the shell's window at once), each file read once."""
    groups: dict[BootFiles, list[str]] = {}
    for name in names:
        groups.setdefault(files[name], []).append(name)
    results = GroupResult()
    for boot_files, group in groups.items():
        wanted = {"kernel": boot_files.kernel, "initrd": boot_files.initrd}
        try:
            payload = {label: path.read_bytes() for label, path in wanted.items() if path is not None}
        except OSError as error:
            for name in group:
                results.add(NodeResult(name, False, "kexec", f"kexec: cannot read the deployment system: {error}"))
            continue
        sent = ctx.shell.push(group, payload, directory, ctx.command_timeout)
        for result in checked(sent, "kexec: sending the deployment system").values():
            results.add(result)
    return ordered(results, names)
