"""SimulatedFirmware: what a namespace lab node does between power-on and its system's ``init``.

This is the **only simulated part of the lab**. A namespace node has no BIOS, no network boot ROM
and no kernel of its own: it shares the host's kernel. Everything around this module is real (the
BMC, the DHCP and TFTP server, the boot profiles, the disk and its partition table, sshd), so the
firmware does for real what a PXE ROM running iPXE would do on the wire, and stands in only for the
steps a namespace cannot do (loading a kernel):

1. if the BMC's boot device is the network: a DHCP request (BusyBox ``udhcpc``, announcing the iPXE
   user class), then the boot file over TFTP, interpreted as an iPXE script (``chain``, ``kernel``,
   ``initrd``, ``boot``, ``exit``, ``||``, ``${net0/mac}``, ``${next-server}``);
2. ``kernel ... root=/dev/sdaN`` boots partition N of the local disk; ``kernel`` + ``initrd`` without
   ``root=`` boots the initramfs in RAM (deployment system, stateless image); the kernel file is
   fetched (it must exist) but not run; ``exit`` (or no profile) falls back to the disk;
3. boot from disk: the partition marked bootable in the partition table;
4. the chosen root is mounted (a partition of the node's loop device, or a tmpfs holding the unpacked
   initramfs), given /proc, /dev (the loop device appears as ``/dev/sda``), /run and /tmp, and the
   firmware ``chroot``s into it and ``exec``s its ``/init`` or ``/sbin/init`` as PID 1 of the node.

Runs as PID 1 of the node's fresh PID/mount/UTS namespaces (see :mod:`kasched.lab.power`):
``python -m kasched.lab.firmware <node-dir>``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kasched.lab.disk import DEPLOY_PARTITION
from kasched.lab.nodedir import BOOT_NETWORK, NodeDir

BOOT_FILES = "kasched-boot"  # a per-boot initrd's directory (kasched.bootkeys.ARCHIVE_ROOT)
IPXE_USER_CLASS = "69505845"  # "iPXE", DHCP option 77
TFTP_BLOCK_SIZE = "16384"
_UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc hook of the simulated firmware: configure eth0, record the lease for the firmware.
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-16}" dev "$interface"
    ip link set "$interface" up
    printf 'ip=%s\\nsiaddr=%s\\nserverid=%s\\nboot_file=%s\\nhostname=%s\\n' \\
      "$ip" "$siaddr" "$serverid" "$boot_file" "$hostname" > "$KASCHED_LEASE"
    ;;
esac
exit 0
"""


class BootFailure(Exception):
    """A boot step failed; the firmware reports it on the console and tries the next device."""


@dataclass
class BootSpec:
    """What the boot profile asked for."""

    kernel: str = ""
    initrds: list[str] = field(default_factory=list)  # in order; the kernel unpacks them all
    cmdline: str = ""
    local_disk: bool = False  # ``exit``/``sanboot``: go on to the disk

    @property
    def root_partition(self) -> int | None:
        match = re.search(r"\broot=/dev/[a-z]+?(\d+)\b", self.cmdline)
        return int(match.group(1)) if match else None


@dataclass
class Lease:
    values: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> str:
        return self.values.get(key, "")


class SimulatedFirmware:
    """A namespace node's stand-in for BIOS + iPXE: network boot for real, then ``chroot`` + ``exec``."""

    def __init__(self, node: NodeDir) -> None:
        self.node = node
        self.facts = node.facts()
        self.scratch = node.root_mount
        self.downloads = self.scratch / "downloads"
        self.newroot = self.scratch / "newroot"
        self.lease = Lease()

    def log(self, message: str) -> None:
        print(f"firmware[{self.facts.name}]: {message}", flush=True)

    # -- power-on ---------------------------------------------------------------------------------
    def power_on(self) -> None:
        """Boot; returns only if nothing is bootable (the node then hangs, as a real one would)."""
        self._mount("tmpfs", self.scratch, "tmpfs", "mode=755,size=256m")
        self.downloads.mkdir()
        self.newroot.mkdir()
        spec: BootSpec | None = None
        if self.node.bootdev() == BOOT_NETWORK:
            try:
                spec = self.network_boot()
            except BootFailure as error:
                self.log(f"network boot failed: {error}; trying the disk")
        try:
            if spec is None or spec.local_disk:
                self.boot_partition(self.bootable_partition(), "")
            elif spec.root_partition is not None:
                self.boot_partition(spec.root_partition, spec.cmdline, spec.initrds)
            else:
                self.boot_ram(spec)
        except BootFailure as error:
            self.log(f"no bootable device: {error}")

    # -- network ----------------------------------------------------------------------------------
    def network_boot(self) -> BootSpec:
        self.dhcp()
        boot_file = self.lease["boot_file"]
        if not boot_file:
            raise BootFailure("the DHCP answer names no boot file")
        return self.run_ipxe(self.fetch_text(boot_file), depth=0)

    def dhcp(self) -> None:
        script = self.scratch / "udhcpc.sh"
        script.write_text(_UDHCPC_SCRIPT)
        script.chmod(0o755)
        lease_file = self.scratch / "lease"
        self.log(f"DHCP request from {self.facts.mac}")
        done = subprocess.run(
            ["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-A", "1",
             "-s", str(script), "-O", "hostname", "-x", f"0x4d:{IPXE_USER_CLASS}"],
            env={**os.environ, "KASCHED_LEASE": str(lease_file)},
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if done.returncode != 0 or not lease_file.exists():
            raise BootFailure(f"no DHCP answer ({done.stderr.strip()[-200:]})")
        lines = lease_file.read_text().splitlines()
        self.lease = Lease(dict(line.split("=", 1) for line in lines if "=" in line))
        self.log(f"DHCP: {self.lease['ip']} from {self.lease['serverid']}, boot file {self.lease['boot_file']}")

    def next_server(self) -> str:
        return self.lease["siaddr"] if self.lease["siaddr"] not in ("", "0.0.0.0") else self.lease["serverid"]

    def fetch(self, url: str) -> Path:
        """Download ``url`` (``tftp://``, ``http://`` or a path on the next server) into RAM."""
        local = self.downloads / re.sub(r"[^A-Za-z0-9._-]", "_", url)[-100:]
        if url.startswith("http://"):
            return self._fetch_http(url, local)
        else:
            server, path = self.next_server(), url
            match = re.match(r"^tftp://([^/]+)/(.*)$", url)
            if match:
                server, path = match.group(1), match.group(2)
            command = ["busybox", "tftp", "-g", "-b", TFTP_BLOCK_SIZE, "-r", path, "-l", str(local), server]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            local.unlink(missing_ok=True)
            raise BootFailure(f"cannot fetch {url}: {done.stderr.strip()[-200:] or 'failed'}")
        self.log(f"loaded {url} ({local.stat().st_size} bytes)")
        return local

    def _fetch_http(self, url: str, local: Path) -> Path:
        """HTTP GET (BusyBox's static wget crashes in glibc's resolver, so Python's client)."""
        try:
            with urllib.request.urlopen(url, timeout=30) as answer, open(local, "wb") as out:
                shutil.copyfileobj(answer, out, 1 << 20)
        except (OSError, ValueError) as error:
            local.unlink(missing_ok=True)
            raise BootFailure(f"cannot fetch {url}: {error}") from None
        self.log(f"loaded {url} ({local.stat().st_size} bytes)")
        return local

    def fetch_text(self, url: str) -> str:
        path = self.fetch(url)
        text = path.read_text(errors="replace")
        path.unlink()
        return text

    def expand(self, text: str) -> str:
        values = {
            "net0/mac": self.facts.mac,
            "net0/mac:hexhyp": self.facts.mac.replace(":", "-"),
            "mac": self.facts.mac,
            "net0/ip": self.lease["ip"],
            "ip": self.lease["ip"],
            "next-server": self.next_server(),
            "hostname": self.lease["hostname"] or self.facts.name,
        }
        return re.sub(r"\$\{([^}]+)\}", lambda m: values.get(m.group(1), ""), text)

    def run_ipxe(self, script: str, depth: int) -> BootSpec:
        """Interpret the iPXE commands a boot profile uses."""
        if depth > 4:
            raise BootFailure("too many chained scripts")
        spec = BootSpec()
        for raw in script.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            for index, alternative in enumerate(part.strip() for part in self.expand(line).split("||")):
                try:
                    result = self._ipxe_command(alternative, spec, depth)
                    break
                except BootFailure as error:
                    if index == line.count("||"):
                        raise
                    self.log(f"{alternative}: {error}; trying the alternative")
            if result is not None:
                return result
        raise BootFailure("the boot script ended without boot or exit")

    def _ipxe_command(self, command: str, spec: BootSpec, depth: int) -> BootSpec | None:
        words = command.split()
        verb, args = words[0], words[1:]
        if verb == "chain" and args:
            return self.run_ipxe(self.fetch_text(args[0]), depth + 1)
        if verb in ("kernel", "imgexec"):
            spec.kernel = str(self.fetch(args[0]))
            spec.cmdline = " ".join(args[1:])
        elif verb == "initrd" and args:
            spec.initrds.append(str(self.fetch(args[0])))
        elif verb == "boot":
            if not spec.kernel:
                raise BootFailure("boot without a kernel")
            return spec
        elif verb in ("exit", "sanboot"):
            return BootSpec(local_disk=True)
        elif verb == "echo":
            self.log(" ".join(args))
        else:
            self.log(f"ignoring unsupported command {verb!r}")
        return None

    # -- disk -------------------------------------------------------------------------------------
    def bootable_partition(self) -> int:
        done = subprocess.run(["sfdisk", "--dump", self.facts.disk_device], capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            match = re.match(r"^\S+?p(\d+)\s*:.*\bbootable\b", line)
            if match:
                return int(match.group(1))
        raise BootFailure(f"no partition marked bootable on {self.facts.disk_device}")

    def boot_partition(self, number: int, cmdline: str, initrds: list[str] | None = None) -> None:
        """Boot partition ``number``. The initrds a profile loads with it stand for the site's
        initramfs; what they carry in ``kasched-boot/`` (a per-boot host key) is moved to
        ``/run/kasched/boot`` of the booted system, as the site's initramfs hook does on a machine."""
        device = f"{self.facts.disk_device}p{number}"
        self.log(f"booting partition {number} of the local disk ({device})")
        boot_files = self.scratch / "initramfs"
        boot_files.mkdir(exist_ok=True)
        for initrd in initrds or []:
            self._unpack(initrd, boot_files)
        self._mount(device, self.newroot, "", "rw")  # any file system the host kernel reads
        self.start_init(cmdline or f"root=/dev/sda{number}", boot_files / BOOT_FILES)

    def boot_ram(self, spec: BootSpec) -> None:
        if not spec.initrds:
            raise BootFailure("a network boot without root= needs an initrd")
        self.log("booting the initramfs in RAM")
        self._mount("tmpfs", self.newroot, "tmpfs", "mode=755,size=512m")
        for initrd in spec.initrds:  # in order, as a kernel unpacks concatenated archives
            self._unpack(initrd, self.newroot)
        for name in os.listdir(self.downloads):
            os.unlink(self.downloads / name)
        self.start_init(spec.cmdline, self.newroot / BOOT_FILES)

    @staticmethod
    def _unpack(initrd: str, directory: Path) -> None:
        unpack = f"gzip -dc '{initrd}' | busybox cpio -i -d -m 2>/dev/null"
        subprocess.run(["sh", "-c", unpack], cwd=directory, check=True, timeout=120)

    # -- handing over -----------------------------------------------------------------------------
    def start_init(self, cmdline: str, boot_files: Path | None = None) -> None:
        root = self.newroot
        self._mount("proc", root / "proc", "proc", "nosuid,nodev,noexec")
        self._populate_dev(root / "dev")
        self._mount("tmpfs", root / "run", "tmpfs", "mode=755,size=32m")
        self._mount("tmpfs", root / "tmp", "tmpfs", "mode=1777,size=64m")
        (root / "run" / "kasched").mkdir()
        (root / "run" / "kasched" / "cmdline").write_text(cmdline + "\n")
        if boot_files is not None and boot_files.is_dir():  # this boot's files (its host key), in RAM only
            shutil.move(boot_files, root / "run" / "kasched" / "boot")
        socket.sethostname(self.lease["hostname"] or self.facts.name)
        init = next((p for p in ("/init", "/sbin/init") if os.path.lexists(root / p.lstrip("/"))), None)
        if init is None:
            raise BootFailure("the root file system has no /init or /sbin/init")
        self.log(f"starting {init} ({cmdline})")
        os.chroot(root)
        os.chdir("/")
        os.execve(init, ["init"], {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "TERM": "dumb"})

    def _populate_dev(self, dev: Path) -> None:
        self._mount("tmpfs", dev, "tmpfs", "mode=755,size=64k")
        chars = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
                 "tty": (5, 0)}  # fmt: skip
        for name, (major, minor) in chars.items():
            os.mknod(dev / name, 0o666 | 0o020000, os.makedev(major, minor))
        disks = {"sda": self.facts.disk_device}
        disks.update({f"sda{n}": f"{self.facts.disk_device}p{n}" for n in range(1, DEPLOY_PARTITION + 1)})
        for name, source in disks.items():
            info = os.stat(source)
            os.mknod(dev / name, 0o660 | 0o060000, info.st_rdev)
        (dev / "pts").mkdir()
        self._mount("devpts", dev / "pts", "devpts", "newinstance,ptmxmode=0666,mode=620")
        os.symlink("pts/ptmx", dev / "ptmx")
        os.symlink("/proc/self/fd", dev / "fd")
        for number, name in enumerate(("stdin", "stdout", "stderr")):
            os.symlink(f"/proc/self/fd/{number}", dev / name)

    @staticmethod
    def _mount(source: str, target: Path, fstype: str, options: str) -> None:
        target.mkdir(parents=True, exist_ok=True)
        command = ["mount", *(["-t", fstype] if fstype else []), "-o", options, source, str(target)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BootFailure(f"mount {source} on {target}: {done.stderr.strip()}")


def main(argv: list[str]) -> int:
    firmware = SimulatedFirmware(NodeDir(Path(argv[0])))
    firmware.power_on()
    while True:  # nothing bootable: the node hangs until its BMC cuts the power
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
