"""What a simulated node answers to the shell commands the workflow sends it: the system probe, the
reboot token, the kexec setup and jump, the files pushed into /run, the reference partition's verify
and patch (the hashes of what its disk holds), the configure script. Each answer is the
:class:`~kasched.transports.ssh_session.CommandOutput` sshd would relay; its side effects change the node.
"""

from __future__ import annotations

import gzip
import hashlib
import shlex
from collections.abc import Iterable

from kasched.deploy.kexec import INSTALLED, KEXEC_FILES
from kasched.deploy.nodes import SYSTEM_PROBE
from kasched.deploy.steps import MOUNT, REBOOT_TOKEN
from kasched.simulated.node import SimulatedNode
from kasched.simulated.site import KEY_LINE, SimulatedSite
from kasched.transports import partition_node
from kasched.transports.ssh_session import CommandOutput

OK = CommandOutput("", "", 0)
NO_KEXEC = CommandOutput("", "kexec-tools is not installed on the node\n", 3)


def answer(site: SimulatedSite, node: SimulatedNode, command: str, stdin: Iterable[bytes] = ()) -> CommandOutput:
    """Run ``command`` on ``node`` (which answers: the caller checked it is up and its key)."""
    if command.startswith("python3 -I -S -c "):
        return partition_command(site, node, shlex.split(command), stdin)
    if "kexec -e" in command:
        return kexec_jump(site, node, command)
    if command == INSTALLED:
        return NO_KEXEC if "no_kexec" in node.faults else OK
    if command.startswith(f"cat {KEXEC_FILES}/bootkey >> "):
        key = KEY_LINE.search(gzip.decompress(node.received.get("bootkey", b"")) or b"")
        node.received["key"] = key.group() if key else b""
        return OK
    if command.startswith("mkdir -p ") and " && cat > " in command:
        name = shlex.split(command.rsplit(" && cat > ", 1)[1])[0].rsplit("/", 1)[-1]
        node.received[name] = b"".join(stdin)
        return OK
    if command.startswith(SYSTEM_PROBE):
        return probe(node, command)
    if command == f"touch {REBOOT_TOKEN}":
        node.token = True
        site.touch(node)
        return OK
    if command == "sync" or command.startswith(f"set -e; cd {MOUNT}"):
        return OK
    return CommandOutput("", f"simulated node: no answer to {command.split()[0]!r}\n", 127)


def probe(node: SimulatedNode, command: str) -> CommandOutput:
    """The kernel command line (which system runs); with the token check, whether it rebooted; with
    the tool check ("nomini"), whether the broadcast's tools are there."""
    if "for tool in" in command and "no_tools" in node.faults:
        return CommandOutput(node.system + "\n", "missing python3\n", 3)
    lines = [node.system]
    if "kasched-not-rebooted" in command and node.token:
        lines.append("kasched-not-rebooted")
    return CommandOutput("\n".join(lines) + "\n", "", 0)


def kexec_jump(site: SimulatedSite, node: SimulatedNode, command: str) -> CommandOutput:
    """Load a kernel and jump to it (detached, a second later): the deployment system sent into /run,
    or an environment's kernel from a partition (which must hold something)."""
    if "no_kexec" in node.faults:
        return NO_KEXEC
    load = next((line for line in command.splitlines() if line.startswith("kexec -l ")), "")
    argv = shlex.split(load.split(";")[0])
    append = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--append=")), "")
    key = None
    if f"{KEXEC_FILES}/kernel" in load:
        if "kernel" not in node.received:
            return CommandOutput("", "kexec could not load the deployment system\n", 5)
        key = node.received.get("key", b"").decode() or None
    else:
        device = append.split()[0].removeprefix("root=") if append.startswith("root=") else ""
        if device not in node.partitions:
            return CommandOutput("", f"mount: {device}: no filesystem\n", 5)
    site.boot(node, delay=1.0, kexec=append, key=key)
    return OK


def partition_command(
    site: SimulatedSite, node: SimulatedNode, argv: list[str], stdin: Iterable[bytes]
) -> CommandOutput:
    """:mod:`kasched.transports.partition_node`'s ``verify`` (one hash per block, as read from the disk)
    and ``patch`` (blocks written, each read back)."""
    mode, device, block = argv[5], argv[6], int(argv[8])
    hashes = site.verify_hashes(node, device, block)
    if hashes is None:
        return CommandOutput("", f"{device}: cannot read the partition\n", 1)
    size = int(argv[7])
    wanted = -(-size // block)
    if mode == "verify":
        site.clock.sleep(size / site.clock.calibration.median("disk_read_hash"))
        return CommandOutput("\n".join(hashes[:wanted]) + "\n", "", 0)
    data = b"".join(stdin)
    lines, offset = [], 0
    header = partition_node.RECORD.size
    while offset + header <= len(data):
        start, length = partition_node.RECORD.unpack_from(data, offset)
        chunk = data[offset + header : offset + header + length]
        offset += header + length
        value = hashlib.sha256(chunk).hexdigest()
        site.write_block(node, device, start // block, value, block)
        lines.append(f"{start} {value}")
    site.clock.sleep(len(data) / site.clock.calibration.median("disk_write"))
    return CommandOutput("\n".join(lines) + "\n", "", 0)
