"""The simulated hardware kind's drivers: a BMC (power), the node's own reboot (soft power), the
network boot profiles, the exec method and the broadcast method. Each acts on the nodes of
:mod:`kasched.simulated.site` and takes the time the calibration says, scaled by the site's clock.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from kasched.config import Config
from kasched.drivers.base import BootDevice, BootDriver, BootFiles, BootTarget, NodeTarget, PowerDriver, PowerState
from kasched.drivers.transport import ExecMethod
from kasched.errors import DriverError, DriverTimeout
from kasched.results import GroupResult, NodeResult
from kasched.simulated import commands
from kasched.simulated.calibration import exec_seconds, start_seconds, stream_seconds
from kasched.simulated.node import Profile, SimulatedNode
from kasched.simulated.site import SimulatedSite, decompressed, key_from_archive, site_of
from kasched.transports import tree
from kasched.transports.chain import BroadcastOptions, ChainNode
from kasched.transports.ssh_session import SshAuth

CONNECT_TIMEOUT = 10.0  # simulated seconds a node that does not answer costs a command (NodeShell's)
DOWN_GRACE = 10.0  # port_cycle's: a node not seen going down within this did not reboot


class SimulatedPower(PowerDriver):
    """A node's BMC: on, off, reset, boot device; a silent BMC times out as IPMI's driver does."""

    name = "simulated"

    def __init__(self, site: SimulatedSite) -> None:
        self.site = site

    def validate(self, node: NodeTarget) -> None:
        self.site.node(node)

    def _bmc(self, target: NodeTarget) -> SimulatedNode:
        node = self.site.node(target)
        if "silent_bmc" in node.faults:
            self.site.clock.sleep(self.site.clock.draw("bmc_timeout"))
            raise DriverTimeout(f"BMC {target.bmc_address or target.name} did not answer", node=target.name)
        self.site.clock.sleep(self.site.clock.draw("bmc_call"))
        return node

    def status(self, node: NodeTarget) -> PowerState:
        return PowerState.ON if self._bmc(node).powered else PowerState.OFF

    def on(self, node: NodeTarget) -> None:
        simulated = self._bmc(node)
        if not simulated.powered:
            simulated.powered = True
            self.site.boot(simulated)

    def off(self, node: NodeTarget) -> None:
        self.site.power_off(self._bmc(node))

    def reset(self, node: NodeTarget) -> None:
        simulated = self._bmc(node)
        if simulated.powered:
            self.site.boot(simulated)

    def set_boot_device(self, node: NodeTarget, device: BootDevice) -> None:
        simulated = self._bmc(node)
        simulated.network_boot = device is BootDevice.NETWORK
        self.site.touch(simulated)


class SimulatedSoftPower(PowerDriver):
    """The soft level: the node's own system asked to reboot (which a user's system may ignore)."""

    name = "simulated-soft"

    def __init__(self, site: SimulatedSite) -> None:
        self.site = site

    def validate(self, node: NodeTarget) -> None:
        self.site.node(node)

    def _running(self, target: NodeTarget) -> SimulatedNode:
        node = self.site.node(target)
        if not node.up(self.site.clock.now()) or (target.host_key and target.host_key != node.host_key):
            raise DriverError("the node's system does not answer (or not with its key)", node=target.name)
        return node

    def status(self, node: NodeTarget) -> PowerState:
        return PowerState.ON if self.site.node(node).up(self.site.clock.now()) else PowerState.OFF

    def on(self, node: NodeTarget) -> None:
        raise DriverError("a system cannot power itself on", node=node.name)

    def off(self, node: NodeTarget) -> None:
        self.site.power_off(self._running(node))

    def reset(self, node: NodeTarget) -> None:
        simulated = self._running(node)
        if "ignores_soft_reboot" not in simulated.faults:
            self.site.boot(simulated, delay=self.site.clock.draw("soft_shutdown"))


class SimulatedBoot(BootDriver):
    """Boot profiles kept with each simulated node (the per-boot key read from its archive, as the
    node's firmware would load it); the deployment system's files for a kexec are small stand-ins."""

    name = "simulated"

    def __init__(self, site: SimulatedSite, boot_dir: Path, files_dir: Path) -> None:
        self.site, self.boot_dir, self.files_dir = site, boot_dir, files_dir

    def validate(self, node: NodeTarget) -> None:
        self.site.node(node)

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
        keys = [key_from_archive(self.boot_dir / path) for path in extra_initrds]
        key = next((k for k in keys if k), None)
        simulated = self.site.node(node)
        with self.site.lock:
            simulated.profile = Profile(target, partition, cmdline, key)
            self.site.touch(simulated)

    def boot_files(self, node: NodeTarget, target: BootTarget) -> BootFiles | None:
        if target is not BootTarget.DEPLOY:
            return None
        self.files_dir.mkdir(parents=True, exist_ok=True)
        kernel, initrd = self.files_dir / "vmlinuz", self.files_dir / "initrd.img"
        for path in (kernel, initrd):
            if not path.exists():
                path.write_bytes(b"simulated " + path.name.encode())
        return BootFiles(kernel, initrd, "kasched.system=deploy")


class SimulatedExec(ExecMethod):
    """Commands on simulated nodes: one round for the whole group (the server's SSH work per node,
    then the command's answer), a node that is down costs the connect timeout."""

    name = "simulated"

    def __init__(self, site: SimulatedSite, targets: Callable[[str], NodeTarget | None]) -> None:
        self.site, self.targets = site, targets

    def _node(self, name: str) -> SimulatedNode | None:
        node = self.site.by_name(name)
        if node is None:
            target = self.targets(name)
            node = self.site.node(target) if target is not None else None
        return node

    def reach(self, name: str, pin: str | None) -> tuple[SimulatedNode | None, str | None]:
        """The node, if it answers (with ``pin`` when given); else why not."""
        node = self._node(name)
        if node is None or not node.up(self.site.clock.now()):
            return None, f"{name}: connection timed out"
        if pin is not None and pin != node.host_key:
            return None, f"{name}: host key mismatch: the node answered with another key than the one pinned"
        return node, None

    def run(
        self, nodes: Sequence[str], command: str, timeout: float, pins: Mapping[str, str] | None
    ) -> GroupResult:
        answers: list[NodeResult] = []
        unreachable = False
        for name in nodes:
            node, error = self.reach(name, None if pins is None else pins.get(name, ""))
            if node is None:
                unreachable = True
                answers.append(NodeResult(name, False, tree.STEP, error))
                continue
            with self.site.lock:
                output = commands.answer(self.site, node, command)
            answers.append(tree.command_result(name, output, 0.0))
        seconds = exec_seconds(self.site.clock.calibration, len(nodes)) + (CONNECT_TIMEOUT if unreachable else 0.0)
        self.site.clock.sleep(seconds)
        group = GroupResult()
        for result in answers:
            result.duration = self.site.clock.real(seconds)
            group.add(result)
        return group

    def feed(self, node: str, command: str, data: Iterable[bytes], timeout: float, pin: str) -> NodeResult:
        simulated, error = self.reach(node, pin)
        seconds = exec_seconds(self.site.clock.calibration, 1)
        self.site.clock.sleep(seconds)
        if simulated is None:
            return NodeResult(node, False, tree.STEP, error, self.site.clock.real(seconds))
        output = commands.answer(self.site, simulated, command, data)
        return tree.command_result(node, output, self.site.clock.real(seconds))

    def wait_up(self, node: NodeTarget, timeout: float, expect_down: bool) -> bool:
        simulated = self.site.node(node)
        clock = self.site.clock
        with self.site.lock:
            went_down, simulated.went_down = simulated.went_down, False
        if expect_down and not went_down:  # it never went down: this level did nothing
            clock.sleep(min(DOWN_GRACE, timeout))
            return False
        wait = simulated.up_at - clock.now()
        if not simulated.powered or wait > clock.real(timeout):
            clock.sleep(timeout)
            return False
        if wait > 0:
            threading.Event().wait(wait)
        return True

    def soft_power(self) -> PowerDriver:
        return SimulatedSoftPower(self.site)


class SimulatedBroadcast:
    """The chain broadcast on simulated nodes: the agents start (each node's partition prepared),
    the image is read once from kaschedd's copy and each node checks its sha256; it takes the
    chain's time (:func:`~kasched.simulated.calibration.stream_seconds`) for the image's size (or
    the site's ``image_size``). A node that dies mid-stream is bypassed after the ack timeout."""

    def __init__(self, site: SimulatedSite, exec_method: SimulatedExec) -> None:
        self.site, self.exec = site, exec_method

    def __call__(
        self,
        source: BinaryIO,
        nodes: Sequence[ChainNode],
        sink: dict[str, Any],
        ssh_addresses: Mapping[str, str],
        auth: SshAuth,
        *,
        expected_sha256: str | None = None,
        options: BroadcastOptions | None = None,
        prepare: Callable[[str], str] | None = None,
        prepare_timeout: float = 600.0,
    ) -> GroupResult:
        results = GroupResult()
        ready: list[tuple[ChainNode, SimulatedNode, str]] = []
        for chain_node in nodes:
            node, error = self.exec.reach(chain_node.name, _pinned_key(auth, ssh_addresses[chain_node.name]))
            device = _device(sink, prepare(chain_node.name) if prepare else "")
            if node is None:
                results.add(NodeResult(chain_node.name, False, "broadcast", f"agent did not start: {error}"))
            else:
                ready.append((chain_node, node, device))
        clock = self.site.clock
        calibration = clock.calibration
        clock.sleep(start_seconds(calibration, len(nodes)))
        data = source.read()
        size = self.site.image_size or len(data)
        digest = hashlib.sha256(data).hexdigest()
        raw = decompressed(data, sink.get("compression", _compression(sink))) if sink["kind"] != "tar" else None
        content = self.site.content(raw if raw is not None else data, raw=raw is not None)
        clock.sleep(stream_seconds(calibration, size, len(ready)))
        for _, node, device in ready:
            results.add(self._deliver(node, device, content, digest, expected_sha256))
        return _ordered(results, nodes)

    def _deliver(
        self, node: SimulatedNode, device: str, content: Any, digest: str, expected: str | None
    ) -> NodeResult:
        if "dies_mid_broadcast" in node.faults:
            self.site.power_off(node)
            seconds = self.site.clock.draw("ack_timeout")
            return NodeResult(node.name, False, "broadcast", f"{node.name}: no acknowledgement for {seconds:.0f} s: "
                              "bypassed")  # fmt: skip
        if "checksum_mismatch" in node.faults:
            written = self.site.content(b"garbled " + node.name.encode(), raw=False)
            self.site.write_image(node, device, written)
            error = f"{node.name}: sha256 mismatch: got {written.sha256}, the server sent {digest}"
            return NodeResult(node.name, False, "broadcast", error)
        if expected is not None and digest != expected.lower():
            return NodeResult(node.name, False, "broadcast", f"{node.name}: sha256 mismatch: got {digest}, expected "
                              f"{expected}")  # fmt: skip
        self.site.write_image(node, device, content)
        return NodeResult(node.name, True, "broadcast", None, 0.0, digest)


def _pinned_key(auth: SshAuth, address: str) -> str:
    """The key ``auth``'s known_hosts pins for ``address`` ("" when none: the node is refused)."""
    for line in (auth.known_hosts or "").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and (parts[0] == address or parts[0].startswith(f"[{address}]:")):
            return parts[1]
    return ""


def _device(sink: dict[str, Any], prepared: str) -> str:
    """The partition the stream goes to: a raw sink's, or the one the preparation formatted."""
    if sink["kind"] == "raw":
        return str(sink["dest"])
    words = (" ".join(sink.get("argv", [])) + " " + prepared).split()
    return next((word for word in words if word.startswith("/dev/")), "")


def _compression(sink: dict[str, Any]) -> str:
    command = " ".join(sink.get("argv", []))
    return next((kind for kind, tool in (("gz", "gzip"), ("xz", "xz"), ("zst", "zstd")) if tool in command), "none")


def _ordered(results: GroupResult, nodes: Sequence[ChainNode]) -> GroupResult:
    group = GroupResult()
    for node in nodes:
        group.add(results[node.name])
    return group


def power(config: Config) -> PowerDriver:
    return SimulatedPower(site_of(config))


def boot(config: Config) -> BootDriver:
    return SimulatedBoot(site_of(config), config.boot_dir, config.state_dir / "simulated-boot")


def exec_method(config: Config) -> SimulatedExec:
    return SimulatedExec(site_of(config), lambda name: None)


def broadcast_method(config: Config) -> SimulatedBroadcast:
    site = site_of(config)
    return SimulatedBroadcast(site, SimulatedExec(site, lambda name: None))
