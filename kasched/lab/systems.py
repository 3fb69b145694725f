"""The three systems a lab node can run, made from the cached base root filesystem.

* the **reference environment**: an ext4 image written to each node's reference partition;
* the **deployment system**: an initramfs (cpio newc, gzip) the node loads over TFTP; it runs sshd
  with the service's key and takes nothing from the disk;
* the **stateless image**: the same kind of initramfs, marked ``stateless``, for diskless runs.

Each system starts BusyBox ``init``, which runs sshd; ``/etc/kasched-system`` says which one it is so
tests can assert from the node side what booted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from kasched.lab.system import run

REFERENCE = "reference"
DEPLOY = "deploy"
STATELESS = "stateless"

_PASSWD = (
    "root:x:0:0:root:/root:/bin/dash\n"  # not BusyBox sh: it would run its applets before PATH
    "sshd:x:100:65534:sshd:/run/sshd:/usr/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_SHADOW = "root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
_INITTAB = "::sysinit:/etc/init.d/rcS\n::respawn:/usr/sbin/sshd -D -e\n"
_RCS = """#!/bin/sh
# Started by BusyBox init: prepare sshd, then say on the console which system is up.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# A namespace node's firmware mounted these; a VM's kernel did not (/dev: devtmpfs, maybe moved here).
for fs in proc:/proc sysfs:/sys devtmpfs:/dev tmpfs:/run tmpfs:/tmp; do
  grep -q " ${fs#*:} " /proc/mounts 2>/dev/null || mount -t "${fs%%:*}" "${fs%%:*}" "${fs#*:}"
done
# A VM's network card and disk drivers (kernel modules), where the system lists them.
[ -f /etc/kasched-modules ] && while read -r module; do insmod "$module" 2>/dev/null; done < /etc/kasched-modules
mkdir -p /run/sshd && chmod 755 /run/sshd
# This boot's own host key, from the initrd kaschedd served for it (kasched.bootkeys): kept in RAM.
if [ -d /kasched-boot ]; then mkdir -p /run/kasched && mv /kasched-boot /run/kasched/boot; fi
ip link set lo up
ip link set eth0 up  # a namespace node's firmware left it up, a VM's kernel did not
udhcpc -i eth0 -n -q -t 5 -T 1 -A 1 -s /etc/udhcpc.sh -O hostname >/dev/null 2>&1 ||
  echo "kasched-lab: no DHCP answer, keeping the firmware's address"
/usr/sbin/sshd -t || { echo "kasched-lab: sshd configuration is invalid"; sleep 5; }
echo "kasched-lab: $(cat /etc/kasched-system) system up on $(hostname)"
"""
_UDHCPC = """#!/bin/sh
# udhcpc hook: configure eth0 (and the hostname) from the lease.
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-16}" dev "$interface"
    ip link set "$interface" up
    [ -n "$hostname" ] && hostname "$hostname"
    ;;
esac
exit 0
"""
_SSHD_CONFIG = """# kasched lab node
Port 22
# The key kaschedd gave this boot first (kasched.bootkeys); the system's own when it has none.
HostKey /run/kasched/boot/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
StrictModes no
PidFile /run/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
Subsystem sftp internal-sftp
"""


@dataclass(frozen=True)
class SystemKeys:
    """The keys baked into a lab system: the node's host key and the service's public key."""

    host_key: Path  # private key file; its ``.pub`` sits next to it
    authorized_key: str  # one OpenSSH public key line


def make_tree(base: Path, dest: Path, role: str, keys: SystemKeys) -> Path:
    """Copy the base tree to ``dest`` and configure it as system ``role``."""
    shutil.rmtree(dest, ignore_errors=True)
    run(["cp", "-a", str(base), str(dest)], timeout=120)
    (dest / ".complete").unlink(missing_ok=True)
    etc = dest / "etc"
    files = {
        "passwd": _PASSWD,
        "group": _GROUP,
        "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
        "hosts": "127.0.0.1 localhost\n",
        "inittab": _INITTAB,
        "ssh/sshd_config": _SSHD_CONFIG,
        "kasched-system": role + "\n",
    }
    for name, text in files.items():
        (etc / name).parent.mkdir(parents=True, exist_ok=True)
        (etc / name).write_text(text)
    (etc / "shadow").write_text(_SHADOW)
    (etc / "shadow").chmod(0o600)
    (etc / "udhcpc.sh").write_text(_UDHCPC)
    (etc / "udhcpc.sh").chmod(0o755)
    rcs = etc / "init.d" / "rcS"
    rcs.parent.mkdir(parents=True, exist_ok=True)
    rcs.write_text(_RCS)
    rcs.chmod(0o755)
    host_key = etc / "ssh" / "ssh_host_ed25519_key"
    shutil.copyfile(keys.host_key, host_key)
    host_key.chmod(0o600)
    shutil.copyfile(keys.host_key.with_suffix(".pub"), host_key.with_suffix(".pub"))
    ssh_dir = dest / "root" / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    ssh_dir.chmod(0o700)
    (ssh_dir / "authorized_keys").write_text(keys.authorized_key.strip() + "\n")
    for directory in ("proc", "sys", "dev", "run", "tmp"):
        (dest / directory).mkdir(exist_ok=True)
    init = dest / "init"
    if not init.exists():
        init.symlink_to("/bin/busybox")
    return dest


def make_ext4_image(tree: Path, image: Path, size_mib: int) -> Path:
    """An ext4 file system image holding ``tree`` (``mkfs.ext4 -d``, no mount needed)."""
    image.unlink(missing_ok=True)
    run(["mkfs.ext4", "-q", "-F", "-L", "kasched-ref", "-d", str(tree), str(image), f"{size_mib}M"])
    return image


def make_initramfs(tree: Path, image: Path) -> Path:
    """A gzip'ed cpio (newc) archive of ``tree``: what a kernel unpacks as its initramfs."""
    tmp = image.with_name(image.name + ".tmp")
    run(["sh", "-c", f"cd '{tree}' && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > '{tmp}'"], timeout=120)
    tmp.replace(image)
    return image


def make_keys(directory: Path) -> tuple[Path, Path]:
    """The lab's keys: the service's SSH key (``id_ed25519``) and the nodes' host key."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    made = []
    for name in ("id_ed25519", "ssh_host_ed25519_key"):
        key = directory / name
        if not key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"kasched-lab-{name}", "-f", str(key)])
        made.append(key)
    return made[0], made[1]


def add_kasched_package(tree: Path) -> None:
    """Put the running kasched package (its .py files) where the tree's python3 finds it, for the
    transports' node-side programs (``python3 -m kasched.transports.relay``)."""
    import kasched

    source = Path(kasched.__file__).resolve().parent
    dest = tree / "usr" / "lib" / "python3" / "dist-packages" / "kasched"
    for path in source.rglob("*.py"):
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
