"""Running the host's tools for the lab: commands, network namespaces, processes.

Every failure becomes a :class:`~kasched.errors.LabError` naming the command, so ``lab up`` and
``lab down`` report what went wrong in one line.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from kasched.errors import LabError
from kasched.processes import pid_alive

NETNS_DIR = Path("/var/run/netns")
_CLONE_NEWNET = 0x40000000


def run(command: Sequence[str], *, check: bool = True, timeout: float = 60, input: str | None = None) -> str:
    """Run ``command``, return its stdout; a failure (when ``check``) raises a LabError."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, input=input, check=False)
    except FileNotFoundError:
        raise LabError(f"{command[0]}: command not found (see scripts/packages/lab.txt)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(command)}: no answer after {timeout:.0f} s") from None
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(f"{' '.join(command)}: {detail[-1] if detail else f'exit {done.returncode}'}")
    return done.stdout


def require(*tools: str) -> None:
    """Fail with the Debian package to install when a tool the lab needs is missing."""
    from shutil import which

    packages = {
        "ipmi_sim": "openipmi",
        "dnsmasq": "dnsmasq-base",
        "busybox": "busybox-static",
        "sshd": "openssh-server",
        "ssh-keygen": "openssh-client",
        "mkfs.ext4": "e2fsprogs",
        "sfdisk": "fdisk",
        "partx": "util-linux",
        "unshare": "util-linux",
        "tc": "iproute2",
        "ip": "iproute2",
        "apt-get": "apt",
        "dpkg-deb": "dpkg",
    }
    for tool in tools:
        if which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise LabError(f"{tool} is missing: install the Debian package {packages.get(tool, tool)}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, loop devices)")


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_list(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (found through /proc, as ``ip netns pids``)."""
    try:
        target = os.stat(NETNS_DIR / name)
    except OSError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            info = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry.name))
    return pids


@contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run the calling thread (and the threads it starts) inside network namespace ``name``.

    Sockets opened meanwhile stay in that namespace; the thread returns to its own one on exit.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as own, open(NETNS_DIR / name, "rb") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            raise LabError(f"cannot enter network namespace {name}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            libc.setns(own.fileno(), _CLONE_NEWNET)


def kill_and_wait(pids: Sequence[int], timeout: float = 5.0) -> None:
    """SIGKILL ``pids`` and wait (bounded) until they are gone."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.02)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
