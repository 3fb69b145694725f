"""The simulated hardware's timings: one table of figures, each with where it comes from, and the
models built on them (a boot, an exec round, the chain broadcast's critical path).

Durations are *simulated seconds*. A :class:`Clock` turns them into real time with a scale factor:
``scale=1`` runs at the hardware's pace (benches), ``scale=0.001`` makes a two-minute boot last 0.12 s
(tests). Every draw is from a distribution (uniform within ``spread`` of the median), seeded, so a
run is repeatable.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Figure:
    """One measured (or, where the lab cannot measure it, stated) figure."""

    name: str
    median: float
    spread: float  # draws fall uniformly in median * (1 +- spread)
    unit: str
    source: str


# fmt: off
FIGURES: tuple[Figure, ...] = (
    Figure("boot_network", 6.7, 0.3, "s", "docs/benchmarks.md, revert bench (revert_lab.py, 8 nodes): setup step "
           "median, power cycle + network boot of a lab node into the deployment system"),
    Figure("boot_local", 3.4, 0.3, "s", "docs/benchmarks.md, revert bench, 8 nodes: boot step median (local "
           "partition)"),
    Figure("firmware", 0.0, 0.0, "s", "added to every firmware boot (POST); 0 on the lab's simulated firmware; "
           "a server's POST is 60-180 s, not measured here: set it for a projection"),
    Figure("kexec", 1.0, 0.3, "s", "docs/deployment.md: kexec skips the firmware; the lab's namespace nodes cannot "
           "kexec, the QEMU VMs do (tests/lab/test_vm_kexec.py): stated, 1 s"),
    Figure("soft_shutdown", 1.0, 0.3, "s", "a system's own reboot before its firmware starts: stated"),
    Figure("bmc_call", 0.05, 0.5, "s", "one IPMI round trip (ipmi_sim on loopback answers in tens of ms)"),
    Figure("bmc_timeout", 15.0, 0.0, "s", "IpmiPowerDriver(timeout=15), docs/drivers.md: a silent BMC costs this"),
    Figure("exec_round", 0.05, 0.5, "s", "one SSH command round on connected nodes (tree exec, docs/benchmarks.md)"),
    Figure("agent_start", 0.15, 0.2, "s", "docs/benchmarks.md, prepare bench: a chain agent's start on a node, "
           "121-164 ms of CPU (the nodes start theirs in parallel)"),
    Figure("link_rate", 1e9, 0.0, "bit/s", "the lab's node links, 1 Gbit/s (revert bench); 10 GbE for a projection"),
    Figure("tcp_efficiency", 0.952, 0.0, "", "docs/benchmarks.md, 'Broadcast': TCP on 1500-byte frames "
           "carries 0.956 x 0.996 of a link"),
    Figure("chain_batch", 16384, 0.0, "B", "docs/benchmarks.md, 'Broadcast': a node forwards up to one "
           "16 KiB batch; 0.86 s over 63 hops at 10 Mbit/s is 13.7 ms a hop, one batch's time on the link (13.1 ms)"),
    Figure("hop_latency", 0.0005, 0.3, "s", "a node's own forwarding of a batch (the agent's loop): stated, 0.5 ms; "
           "below what the lab's 10 Mbit/s runs could tell apart"),
    Figure("disk_write", 500e6, 0.1, "B/s", "docs/benchmarks.md, verify rate: 'a SATA disk (500 MB/s)'"),
    Figure("disk_read_hash", 500e6, 0.1, "B/s", "docs/benchmarks.md, verify rate: SHA-256 at 1060 MiB/s a core "
           "outruns a SATA disk, so the disk's 500 MB/s sets the verify"),
    Figure("mkfs", 2.0, 0.3, "s", "docs/benchmarks.md, prepare bench: 'on a real disk mkfs.ext4 takes seconds'"),
    Figure("ack_timeout", 3.0, 0.0, "s", "broadcast_ack_timeout default: a node silent this long is bypassed"),
)
# fmt: on


@dataclass(frozen=True)
class Calibration:
    """The figures by name (a site may override any of them) and the time scale."""

    figures: Mapping[str, Figure]
    scale: float = 1.0

    @classmethod
    def default(cls, scale: float = 1.0, overrides: Mapping[str, float] | None = None) -> Calibration:
        figures = {figure.name: figure for figure in FIGURES}
        for name, value in (overrides or {}).items():
            if name not in figures:
                raise ValueError(f"no figure {name!r} (known: {', '.join(figures)})")
            figures[name] = replace(figures[name], median=float(value), source="set by the site")
        return cls(figures, scale)

    def median(self, name: str) -> float:
        return self.figures[name].median

    def worst(self, name: str) -> float:
        """The slowest draw: what the last of many nodes takes (a critical path waits for it)."""
        figure = self.figures[name]
        return figure.median * (1 + figure.spread)


class Clock:
    """Draws durations and sleeps them, scaled; also keeps the simulated critical path of the
    physical work it was asked to wait for (what a bench subtracts from its wall time)."""

    def __init__(self, calibration: Calibration, seed: int = 0) -> None:
        self.calibration = calibration
        self.random = random.Random(seed)
        self.lock = threading.Lock()

    @property
    def scale(self) -> float:
        return self.calibration.scale

    def draw(self, name: str) -> float:
        """A duration (simulated seconds) for figure ``name``."""
        figure = self.calibration.figures[name]
        with self.lock:
            factor = 1.0 + figure.spread * (2 * self.random.random() - 1)
        return figure.median * factor

    def real(self, seconds: float) -> float:
        return seconds * self.scale

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds * self.scale)

    def now(self) -> float:
        return time.monotonic()

    def at(self, seconds: float) -> float:
        """The real monotonic time ``seconds`` (simulated) from now."""
        return time.monotonic() + seconds * self.scale


def stream_seconds(calibration: Calibration, size: int, hops: int) -> float:
    """The chain's stream of ``size`` bytes through ``hops`` nodes: the slowest of the link (times
    TCP's efficiency) and the disk sets the rate; each hop adds its delay (one batch on the link,
    and the node's forwarding)."""
    link = calibration.median("link_rate") / 8 * calibration.median("tcp_efficiency")
    rate = min(link, calibration.median("disk_write"))
    hop = calibration.median("chain_batch") / link + calibration.median("hop_latency")
    return size / rate + max(0, hops - 1) * hop


def exec_seconds(calibration: Calibration, count: int) -> float:
    """One command on ``count`` nodes at once, as the nodes see it: one round each, in parallel. The
    server's own SSH work per node (23 ms a node in tree_exec_lab.py on the lab's 2 shared CPUs) is
    kaschedd's cost, not the hardware's: the simulated exec does none, so a bench does not count it."""
    return calibration.median("exec_round")


def start_seconds(calibration: Calibration, count: int) -> float:
    """The chain's agents started on ``count`` nodes (in parallel), each partition prepared meanwhile."""
    return max(calibration.median("mkfs"), calibration.median("agent_start"))


def verify_seconds(calibration: Calibration, size: int) -> float:
    return size / calibration.median("disk_read_hash")


@dataclass(frozen=True)
class Projection:
    """A deployment's physical critical path, step by step (simulated seconds)."""

    steps: tuple[tuple[str, float], ...]

    @property
    def total(self) -> float:
        return math.fsum(seconds for _, seconds in self.steps)


def deploy_projection(calibration: Calibration, nodes: int, size: int, *, kexec: bool = False) -> Projection:
    """The physical work of a deploy on ``nodes`` (the PXE setup, one chain, the configure, the boot):
    what no orchestration can make shorter."""
    firmware = calibration.median("firmware")
    setup = calibration.median("kexec") if kexec else firmware + calibration.median("boot_network")
    boot = calibration.median("kexec") if kexec else firmware + calibration.median("boot_local")
    return Projection(
        (
            ("setup", exec_seconds(calibration, nodes) + setup + exec_seconds(calibration, nodes)),
            ("broadcast", start_seconds(calibration, nodes) + stream_seconds(calibration, size, nodes)),
            ("configure", exec_seconds(calibration, nodes)),
            ("boot", 2 * exec_seconds(calibration, nodes) + boot),
        )
    )


# The variants of each operation's plan, in order (kasched.deploy.operations, kasched.deploy.revert).
PLANS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "deploy": (("setup", ("nomini", "kexec", "pxe")), ("broadcast", ("chain", "unicast")),
               ("configure", ("postinstall",)), ("boot", ("kexec", "pxe"))),
    "revert": (("check", ("trusted",)), ("setup", ("power-cycle",)), ("verify", ("digest", "patch", "rewrite")),
               ("boot", ("pxe",))),
}  # fmt: skip


def step_seconds(calibration: Calibration, step: str, variant: str, nodes: int, size: int, reference: int) -> float:
    """The physical time of one variant of one step on ``nodes`` at once (the model the simulated
    drivers follow): the commands' rounds, the boots, the chain's stream, the disks' reads."""
    median, ex = calibration.worst, calibration.worst("exec_round")
    network_boot = 2 * median("bmc_call") + median("firmware") + median("boot_network")
    table = {
        ("setup", "nomini"): ex,
        ("setup", "kexec"): 6 * ex + median("kexec"),
        ("setup", "pxe"): network_boot + ex,
        ("setup", "power-cycle"): network_boot + ex,
        ("broadcast", "chain"): start_seconds(calibration, nodes) + stream_seconds(calibration, size, nodes),
        ("broadcast", "unicast"): start_seconds(calibration, nodes) + stream_seconds(calibration, size, 1),
        ("configure", "postinstall"): ex,
        ("boot", "kexec"): 3 * ex + median("kexec"),
        ("boot", "pxe"): 2 * ex + median("soft_shutdown") + median("firmware") + median("boot_local"),
        ("check", "trusted"): ex,
        ("verify", "digest"): ex + verify_seconds(calibration, reference),
        ("verify", "patch"): 2 * ex + 2 * verify_seconds(calibration, reference),
        ("verify", "rewrite"): start_seconds(calibration, nodes) + stream_seconds(calibration, reference, nodes)
        + 2 * ex + verify_seconds(calibration, reference),
    }
    return table[(step, variant)]


def critical_path(
    calibration: Calibration, kind: str, used: Mapping[str, str], nodes: int, size: int, reference: int
) -> float:
    """The physical critical path of an operation whose nodes took, at each step, variant
    ``used[step]`` (a step no node reached is absent): what no orchestration can make shorter."""
    return math.fsum(
        step_seconds(calibration, step, used[step], nodes, size, reference) for step, _ in PLANS[kind] if step in used
    )
