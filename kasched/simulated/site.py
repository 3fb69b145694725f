"""The simulated site: one state machine per node (power, the system it runs, its disk's content, its
host key), its faults, and the clock they share.

A site lives in the process that drives its nodes (kaschedd, or a test's own process), one per state
directory. It reads ``<state_dir>/simulated.json`` (written by :mod:`kasched.simulated.builder`):
the time scale, the seed, figures overriding the calibration, the reference image the nodes' reference
partitions start with, an image size for the timings, and the faults of each node. The file is read
again when it changes, so a test can inject a fault between two operations.
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import json
import lzma
import math
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from kasched.config import Config
from kasched.drivers.base import BootTarget, NodeTarget
from kasched.errors import ConfigError
from kasched.simulated import persist
from kasched.simulated.calibration import Calibration, Clock
from kasched.simulated.node import Content, SimulatedNode

SETTINGS = "simulated.json"
# The faults a node can be given (docs/simulated.md says what the workflow does with each).
FAULTS = {
    "never_back": "the node never comes back from a reboot (a dead disk, a firmware hang)",
    "silent_bmc": "the BMC never answers (each call costs the driver's timeout)",
    "checksum_mismatch": "the image reaches the disk with other bytes (the node's sha256 differs)",
    "dies_mid_broadcast": "the node powers off in the middle of the broadcast",
    "wrong_host_key": "something else answers on the node's address (not the key of its boot)",
    "ignores_soft_reboot": "the running system ignores its own reboot (a user's system may)",
    "reference_changed": "one block of the reference partition differs (what a boot of it writes)",
    "reference_rewritten": "every block of the reference partition differs",
    "no_kexec": "the running system has no kexec-tools",
    "no_tools": "the running system lacks the tools the broadcast needs (no 'nomini')",
}
KEY_LINE = re.compile(rb"ssh-ed25519 [A-Za-z0-9+/=]+")
NEVER = math.inf
SAVE_EVERY = 0.5  # seconds between two saves of the nodes' state


def random_key() -> str:
    """A host key nobody pinned (a system kasched did not boot)."""
    return "ssh-ed25519 SIM" + secrets.token_hex(16)


def key_from_archive(path: Path) -> str | None:
    """The public key a per-boot key archive (:mod:`kasched.bootkeys`) carries."""
    try:
        found = KEY_LINE.search(gzip.decompress(path.read_bytes()))
    except (OSError, gzip.BadGzipFile, EOFError):
        return None
    return found.group().decode() if found else None


class SimulatedSite:
    """Every simulated node of one state directory; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = config.state_dir / SETTINGS
        self.lock = threading.RLock()
        self.nodes: dict[str, SimulatedNode] = {}
        self.contents: dict[str, Content] = {}
        self.stamp: float | None = None
        self.settings: dict[str, Any] = {}
        self.clock = Clock(Calibration.default())
        self.reference: Content | None = None
        self.image_size: int | None = None
        self.nodes_path = config.state_dir / persist.NODES
        self.nodes_stamp: int | None = None  # of the nodes' file as this process last read or wrote it
        self.dirty = threading.Event()
        self.reload()
        self._load_nodes()
        threading.Thread(target=self._save_loop, name="kasched-simulated-save", daemon=True).start()
        atexit.register(self.save)

    # --- settings ------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the settings again if the file changed (a test injects faults between operations)."""
        try:
            stamp = self.path.stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp == self.stamp and self.settings:
            return
        with self.lock:
            try:
                self.settings = json.loads(self.path.read_text()) if stamp is not None else {}
            except (OSError, ValueError) as error:
                raise ConfigError(f"{self.path}: cannot read the simulated site's settings: {error}") from None
            self.stamp = stamp
            scale = float(self.settings.get("scale", 1.0))
            calibration = Calibration.default(scale, self.settings.get("calibration"))
            if self.clock.calibration != calibration:
                self.clock = Clock(calibration, int(self.settings.get("seed", 0)))
            size = self.settings.get("image_size")
            self.image_size = int(size) if size else None
            reference = self.settings.get("reference_image")
            if reference and self.reference is None:
                self.reference = self.content(Path(reference).read_bytes(), raw=True)
            faults = self.settings.get("faults", {})
            for name, node in self.nodes.items():
                new = frozenset(faults.get(name, ()))
                self._disk_faults(node, new - node.faults)
                node.faults = new

    # --- the nodes' state shared with other processes (kasched.simulated.persist) -----------------------

    def touch(self, node: SimulatedNode) -> None:
        """``node`` changed: a newer version, saved soon."""
        node.version = time.time_ns()
        self.dirty.set()

    def _load_nodes(self) -> None:
        """Merge the nodes another process saved (newer versions win), if the file changed."""
        try:
            stamp = self.nodes_path.stat().st_mtime_ns
        except OSError:
            return
        if stamp == self.nodes_stamp:
            return
        with self.lock:
            self._merge(persist.read(self.nodes_path))
            self.nodes_stamp = stamp

    def _merge(self, saved: dict[str, dict[str, Any]]) -> None:
        now, wall = time.monotonic(), time.time()
        for name, data in saved.items():
            mine = self.nodes.get(name)
            if mine is None or data["version"] > mine.version:
                node = persist.restore(self.contents, data, now, wall)
                node.faults = frozenset(self.settings.get("faults", {}).get(name, ()))
                self.nodes[name] = node

    def save(self) -> None:
        """Write every node (merged with what another process saved meanwhile)."""
        if not self.dirty.is_set():
            return
        with self.lock:
            self.dirty.clear()
            self._load_nodes()  # what another process saved meanwhile, merged (newer versions win)
            now, wall = time.monotonic(), time.time()
            saved = {name: persist.record(node, now, wall) for name, node in self.nodes.items()}
        stamp = persist.write(self.nodes_path, saved)  # written outside the lock: the nodes go on
        with self.lock:
            self.nodes_stamp = stamp

    def _save_loop(self) -> None:
        """Save when dirty, at most every SAVE_EVERY seconds, and spending at most a twentieth of the
        time saving (10,000 nodes take a third of a second to write: every 0.5 s, that was most of
        kaschedd's CPU in bench/scale.py, which counts it as kasched's own)."""
        pause = SAVE_EVERY
        while True:
            self.dirty.wait()
            time.sleep(pause)
            started = time.monotonic()
            try:
                self.save()
            except OSError:  # the site's directory is gone (a test ended): nothing to keep
                return
            pause = max(SAVE_EVERY, 20 * (time.monotonic() - started))

    def content(self, data: bytes, *, raw: bool) -> Content:
        """The shared content object of ``data``."""
        digest = hashlib.sha256(data).hexdigest()
        with self.lock:
            if digest not in self.contents:
                self.contents[digest] = Content(digest, data if raw else None)
            return self.contents[digest]

    # --- nodes ---------------------------------------------------------------------------------------

    def node(self, target: NodeTarget) -> SimulatedNode:
        """The node ``target`` names, made on first use: on, running the reference partition, which
        holds the site's reference image (but for the faults that change it)."""
        with self.lock:
            node = self.nodes.get(target.name)
            if node is None:
                node = self._new_node(target)
                self.nodes[target.name] = node
                self.touch(node)
            return node

    def by_name(self, name: str) -> SimulatedNode | None:
        return self.nodes.get(name)

    def _new_node(self, target: NodeTarget) -> SimulatedNode:
        device = target.partition_device(target.reference_partition)
        faults = frozenset(self.settings.get("faults", {}).get(target.name, ()))
        node = SimulatedNode(target, system=f"root={device} ro", host_key=random_key(), faults=faults)
        if self.reference is not None:
            node.partitions[device] = self.reference
        self._disk_faults(node, faults)
        return node

    def _disk_faults(self, node: SimulatedNode, faults: frozenset[str]) -> None:
        """Blocks of the reference partition changed, as a user's system (root on it) may."""
        target = node.target
        device = target.partition_device(target.reference_partition)
        content = node.partitions.get(device)
        count = len(content.hashes(4 << 20)) if content is not None else 0
        if "reference_changed" in faults:
            node.changed[device] = {index: "0" * 64 for index in range(min(1, count))}
        if "reference_rewritten" in faults:
            node.changed[device] = {index: "0" * 64 for index in range(count)}

    def boot(
        self, node: SimulatedNode, *, delay: float = 0.0, kexec: str | None = None, key: str | None = None
    ) -> None:
        """The node restarts now: down at once, up after its boot (firmware + network or local boot,
        or a kexec into ``kexec``'s command line), running what its profile (or the kexec) says."""
        draw = self.clock.draw
        with self.lock:
            node.boots += 1
            self.touch(node)
            node.went_down = True
            node.token = False
            node.received = {} if kexec is None else node.received
            if kexec is not None:
                system, seconds, new_key = kexec, draw("kexec"), key
            else:
                system, seconds, new_key = self._firmware_boot(node)
            if not system or "never_back" in node.faults:
                node.system, node.up_at = system or "none", NEVER
                return
            node.system = system
            node.host_key = "ssh-ed25519 SIMimpostor" if "wrong_host_key" in node.faults else new_key or random_key()
            node.up_at = self.clock.at(delay + seconds)

    def _firmware_boot(self, node: SimulatedNode) -> tuple[str, float, str | None]:
        firmware = self.clock.draw("firmware")
        profile = node.profile
        target = node.target
        if not node.network_boot or profile is None or profile.target is BootTarget.LOCAL:
            partition = profile.partition if profile is not None and node.network_boot else None
            number = partition or target.reference_partition
            device = target.partition_device(number)
            if device not in node.partitions:
                return "", 0.0, None  # nothing to boot on that partition: the node hangs
            cmdline = profile.cmdline if profile is not None and node.network_boot else ""
            system = f"root={device} ro {cmdline}".strip()
            key = profile.key if profile is not None and node.network_boot else None
            return system, firmware + self.clock.draw("boot_local"), key
        system = f"kasched.system={profile.target.value} {profile.cmdline}".strip()
        return system, firmware + self.clock.draw("boot_network"), profile.key

    def power_off(self, node: SimulatedNode) -> None:
        with self.lock:
            node.powered, node.system, node.up_at = False, "", NEVER
            self.touch(node)

    def verify_hashes(self, node: SimulatedNode, device: str, block: int) -> tuple[str, ...] | None:
        """What reading the partition back block by block gives, or None (nothing written there)."""
        content = node.partitions.get(device)
        if content is None or content.raw is None:
            return None
        hashes = list(content.hashes(block))
        for index, value in node.changed.get(device, {}).items():
            if index < len(hashes):
                hashes[index] = value
        return tuple(hashes)

    def write_block(self, node: SimulatedNode, device: str, index: int, value: str, block: int) -> None:
        content = node.partitions.get(device)
        with self.lock:
            self.touch(node)
            changed = node.changed.setdefault(device, {})
            if content is not None and index < len(content.hashes(block)) and content.hashes(block)[index] == value:
                changed.pop(index, None)
            else:
                changed[index] = value

    def write_image(self, node: SimulatedNode, device: str, content: Content) -> None:
        with self.lock:
            node.partitions[device] = content
            node.changed.pop(device, None)
            self.touch(node)


_sites: dict[Path, SimulatedSite] = {}
_sites_lock = threading.Lock()


def site_of(config: Config) -> SimulatedSite:
    """The simulated site of ``config``'s state directory in this process (its settings re-read if
    they changed)."""
    with _sites_lock:
        site = _sites.get(config.state_dir)
        if site is None:
            site = _sites[config.state_dir] = SimulatedSite(config)
    site.reload()
    site._load_nodes()
    return site


def save_sites() -> None:
    """Save the nodes of every site of this process now (another process is about to drive them)."""
    with _sites_lock:
        sites = list(_sites.values())
    for site in sites:
        site.save()


def forget_sites() -> None:
    """Drop every site of this process (a test starting anew)."""
    with _sites_lock:
        _sites.clear()


def decompressed(data: bytes, compression: str) -> bytes | None:
    if compression in ("none", ""):
        return data
    if compression == "gz":
        return gzip.decompress(data)
    if compression == "xz":
        return lzma.decompress(data)
    return None  # zstd: not in the standard library; the partition's blocks are then unknown
