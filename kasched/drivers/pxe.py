"""Boot profiles on the network: per-node iPXE, PXELINUX and GRUB files, and dnsmasq's configuration.

The boot directory (``boot_dir``, the TFTP root) holds:

* ``boot.ipxe``: what DHCP names for iPXE clients; chains to the node's own script;
* ``ipxe/<mac>.ipxe``, ``pxelinux.cfg/01-<mac>``, ``grub/grub.cfg-01-<mac>``: each node's profile
  for each boot loader (``<mac>`` as ``aa-bb-cc-dd-ee-ff``), all saying the same thing;
* the kernels and initramfs images the profiles name (paths relative to the boot directory).

A profile says one of: the deployment system (kernel + initramfs, nothing from the disk), a local
partition (kernel with ``root=`` the partition: ``/dev/sdaN``, ``/dev/nvme0n1pN``), or a stateless
environment (kernel + image in RAM).
Every file is written atomically (temporary file + rename): a node booting meanwhile reads the old
profile or the new one, never half of one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kasched import files
from kasched.drivers.base import BootDriver, BootFiles, BootTarget, NodeTarget
from kasched.errors import DriverError

BOOT_SCRIPT = "boot.ipxe"
_BOOT_IPXE = """#!ipxe
# kasched: every iPXE client starts here and chains to its own profile.
chain ipxe/${net0/mac:hexhyp}.ipxe || chain ipxe/default.ipxe || exit
"""


def mac_hexhyp(mac: str) -> str:
    return mac.lower().replace(":", "-")


@dataclass(frozen=True)
class Profile:
    """One boot profile, in the loader-neutral form the three files are written from."""

    label: str
    kernel: str
    initrd: str
    cmdline: str
    extra_initrds: tuple[str, ...] = ()  # loaded after ``initrd`` (a per-boot host key)

    @property
    def initrds(self) -> list[str]:
        return [path for path in (self.initrd, *self.extra_initrds) if path]

    def ipxe(self, base_url: str = "") -> str:
        kernel = f"{base_url}{self.kernel}"
        lines = ["#!ipxe", f"# kasched: {self.label}", f"kernel {kernel} {self.cmdline}".rstrip()]
        lines += [f"initrd {base_url}{path}" for path in self.initrds]
        return "\n".join([*lines, "boot", ""])

    def pxelinux(self) -> str:
        lines = ["DEFAULT kasched", f"# kasched: {self.label}", "LABEL kasched", f"  KERNEL {self.kernel}"]
        append = f"initrd={','.join(self.initrds)} {self.cmdline}" if self.initrds else self.cmdline
        lines.append(f"  APPEND {append}".rstrip())
        return "\n".join([*lines, ""])

    def grub(self) -> str:
        lines = [
            "set timeout=0",
            f"# kasched: {self.label}",
            'menuentry "kasched" {',
            f"  linux /{self.kernel} {self.cmdline}".rstrip(),
        ]
        if self.initrds:
            lines.append("  initrd " + " ".join(f"/{path}" for path in self.initrds))
        return "\n".join([*lines, "}", ""])


class PxeBootDriver(BootDriver):
    """Writes each node's iPXE, PXELINUX and GRUB profile under ``boot_dir``."""

    name = "pxe"

    def __init__(
        self,
        boot_dir: Path,
        *,
        deploy_kernel: str = "deploy/vmlinuz",
        deploy_initrd: str = "deploy/initrd.img",
        local_kernel: str = "reference/vmlinuz",
        local_initrd: str = "",
        kernel_args: str = "",
        base_url: str = "",
    ) -> None:
        self.boot_dir = Path(boot_dir)
        # Prefix of the kernel and initrd paths in iPXE profiles, e.g. "http://${next-server}/" to
        # load them over HTTP (much faster than TFTP for big images); empty: TFTP, relative paths.
        self.base_url = base_url
        self.deploy_kernel = deploy_kernel
        self.deploy_initrd = deploy_initrd
        self.local_kernel = local_kernel
        # The initramfs that mounts ``root=`` for a local partition's kernel, when the site's kernel
        # needs one (its disk driver is a module); empty: the kernel mounts the partition itself.
        self.local_initrd = local_initrd
        # Appended to every profile's command line (a site's console=ttyS0,115200, for example).
        self.kernel_args = kernel_args

    def validate(self, node: NodeTarget) -> None:
        if not node.mac or len(node.mac.split(":")) != 6:
            raise DriverError(f"no valid MAC address ({node.mac!r}) for a boot profile", node=node.name)

    def profile(
        self,
        node: NodeTarget,
        target: BootTarget,
        *,
        partition: int | None = None,
        kernel: str = "",
        initrd: str = "",
        cmdline: str = "",
    ) -> Profile:
        """The profile ``set_profile`` would write (also useful to show it)."""
        cmdline = f"{cmdline} {self.kernel_args}".strip()
        if target is BootTarget.DEPLOY:
            extra = f"kasched.system=deploy {cmdline}".strip()
            return Profile("deploy system", kernel or self.deploy_kernel, initrd or self.deploy_initrd, extra)
        if target is BootTarget.LOCAL:
            number = partition or node.reference_partition
            extra = f"root={node.partition_device(number)} ro {cmdline}".strip()
            return Profile(f"local partition {number}", kernel or self.local_kernel, initrd or self.local_initrd, extra)
        if target is BootTarget.STATELESS:
            if not kernel or not initrd:
                raise DriverError("a stateless boot needs a kernel and an image (initrd)", node=node.name)
            extra = f"kasched.system=stateless {cmdline}".strip()
            return Profile("stateless", kernel, initrd, extra)
        raise DriverError(f"unknown boot target {target!r}", node=node.name)

    def set_profile(
        self,
        node: NodeTarget,
        target: BootTarget,
        *,
        partition: int | None = None,
        kernel: str = "",
        initrd: str = "",
        cmdline: str = "",
        extra_initrds: Sequence[str] = (),
    ) -> None:
        self.validate(node)
        profile = self.profile(node, target, partition=partition, kernel=kernel, initrd=initrd, cmdline=cmdline)
        profile = replace(profile, extra_initrds=tuple(extra_initrds))
        mac = mac_hexhyp(node.mac)
        try:
            write_atomic(self.boot_dir / BOOT_SCRIPT, _BOOT_IPXE)
            write_atomic(self.boot_dir / "ipxe" / f"{mac}.ipxe", profile.ipxe(self.base_url))
            write_atomic(self.boot_dir / "pxelinux.cfg" / f"01-{mac}", profile.pxelinux())
            write_atomic(self.boot_dir / "grub" / f"grub.cfg-01-{mac}", profile.grub())
        except OSError as error:
            raise DriverError(f"cannot write its boot profile: {error}", node=node.name) from None

    def boot_files(self, node: NodeTarget, target: BootTarget) -> BootFiles | None:
        """The deployment system's kernel and initrd, under the boot directory, and its command line.
        (A local partition's kernel is on the node's disk; a stateless profile's files are the
        environment's.)"""
        if target is not BootTarget.DEPLOY:
            return None
        profile = self.profile(node, target)
        initrd = self.boot_dir / profile.initrd if profile.initrd else None
        return BootFiles(self.boot_dir / profile.kernel, initrd, profile.cmdline)

    def current_label(self, node: NodeTarget) -> str | None:
        """What the node's iPXE profile says it boots (``deploy system``...), or None."""
        try:
            text = (self.boot_dir / "ipxe" / f"{mac_hexhyp(node.mac)}.ipxe").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("# kasched: "):
                return line.removeprefix("# kasched: ")
        return None


def write_atomic(path: Path, text: str) -> None:
    """A boot file, atomically, in a directory the TFTP and HTTP servers can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)
    files.write_atomic(path, text)


def dnsmasq_config(
    nodes: Iterable[NodeTarget],
    *,
    interface: str,
    network: str,
    tftp_root: Path,
    lease_file: Path,
    pid_file: Path,
) -> str:
    """dnsmasq's configuration: DHCP for exactly the inventory's nodes (by MAC), TFTP of boot_dir."""
    net = ipaddress.ip_network(network, strict=False)
    lines = [
        "# written by kasched from the inventory; DNS off, DHCP + TFTP only",
        "port=0",
        f"interface={interface}",
        "bind-interfaces",
        f"dhcp-range={net.network_address},static,{net.netmask},12h",
        "dhcp-authoritative",
        f"dhcp-leasefile={lease_file}",
        f"pid-file={pid_file}",
        "dhcp-userclass=set:ipxe,iPXE",
        f"dhcp-boot=tag:ipxe,{BOOT_SCRIPT}",
        "dhcp-boot=tag:!ipxe,undionly.kpxe",
        "enable-tftp",
        f"tftp-root={tftp_root}",
        "user=root",
    ]
    for node in nodes:
        lines.append(f"dhcp-host={node.mac.lower()},{node.ip},{node.name}")
    return "\n".join(lines) + "\n"
