"""Per-boot SSH host keys: how a booted system proves to kaschedd that it is the system kaschedd booted.

Before each boot kaschedd trusts (the deployment system, the verified reference environment),
kaschedd makes a fresh Ed25519 host key for that node and that boot, and serves it only in that boot's
files: a small gzip'd cpio archive, ``bootkeys/<mac>/<random>.cpio.gz`` under the boot directory, that
the node's boot profile loads as one more initrd (iPXE ``initrd``; the kernel unpacks every initrd
into the same initramfs). It holds ``kasched-boot/ssh_host_ed25519_key``; the system's early boot
moves it to ``/run/kasched/boot/`` (a tmpfs: gone at the next boot) and its sshd presents it. kaschedd
then connects to that node with this one key pinned (:mod:`kasched.transports.ssh_session`, strict): a
machine that took the node's address, or a system that stayed up instead of rebooting, cannot present
it, and fails with ``host key mismatch``. As soon as the boot is checked (or failed), the file is
removed and the profile rewritten without it, so a later boot, or a user on the node afterwards,
cannot fetch it again.

The key's name is random (an unguessable path, not only a per-MAC one), the file is readable by the
TFTP/HTTP servers only while the boot lasts, and its public half is what kaschedd records
(``nodes.host_key``) and pins.
"""

from __future__ import annotations

import gzip
import io
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kasched import files

DIRECTORY = "bootkeys"
ARCHIVE_ROOT = "kasched-boot"  # where the key lands in the initramfs; moved to RUN_DIR by the system
RUN_DIR = "/run/kasched/boot"
KEY_NAME = "ssh_host_ed25519_key"


@dataclass(frozen=True)
class BootKey:
    """A host key made for one boot of one node: the initrd path that carries it (relative to the
    boot directory) and its public half (``ssh-ed25519 AAAA...``)."""

    node: str
    initrd: str
    public: str


def make_key() -> tuple[bytes, str]:
    """A new Ed25519 host key: its private half (OpenSSH format) and its public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


def cpio_archive(entries: list[tuple[str, int, bytes | None]]) -> bytes:
    """A cpio (newc) archive of ``(path, mode, content)`` entries (content None: a directory)."""
    out = io.BytesIO()
    now = int(time.time())
    for inode, (path, mode, content) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        data = content or b""
        kind = 0o040000 if content is None else 0o100000
        name = path.encode() + b"\0"
        fields = [inode, kind | mode if path != "TRAILER!!!" else 0, 0, 0, 1 if content is not None else 2,
                  now, len(data), 0, 0, 0, 0, len(name), 0]  # fmt: skip
        out.write(b"070701" + b"".join(b"%08X" % value for value in fields) + name)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


def key_archive(private: bytes, public: str) -> bytes:
    """The initrd that carries one boot's host key (gzip'd cpio)."""
    archive = cpio_archive(
        [
            (ARCHIVE_ROOT, 0o700, None),
            (f"{ARCHIVE_ROOT}/{KEY_NAME}", 0o600, private),
            (f"{ARCHIVE_ROOT}/{KEY_NAME}.pub", 0o644, (public + "\n").encode()),
        ]
    )
    return gzip.compress(archive, 6)


class BootKeys:
    """Issues and withdraws per-boot host keys under a boot directory."""

    def __init__(self, boot_dir: Path) -> None:
        self.boot_dir = Path(boot_dir)

    def node_dir(self, mac: str) -> Path:
        return self.boot_dir / DIRECTORY / mac.lower().replace(":", "-")

    def issue(self, node: str, mac: str) -> BootKey:
        """A new key for the next boot of ``node``; any earlier one of that node is withdrawn."""
        self.withdraw(mac)
        private, public = make_key()
        directory = self.node_dir(mac)
        directory.mkdir(parents=True, exist_ok=True)
        for level in (directory.parent, directory):
            level.chmod(0o755)  # dnsmasq's TFTP serves only world-readable files (docs/security.md)
        name = f"{secrets.token_hex(16)}.cpio.gz"
        files.write_atomic(directory / name, key_archive(private, public), mode=0o644)
        return BootKey(node, f"{DIRECTORY}/{directory.name}/{name}", public)

    def withdraw(self, mac: str) -> None:
        """Remove every key file of the node with ``mac`` (its boot was checked, or failed)."""
        shutil.rmtree(self.node_dir(mac), ignore_errors=True)
