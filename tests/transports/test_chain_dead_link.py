"""A successor that goes silent without a reset (powered off, cable pulled) is bypassed once what was
sent to it stays unacknowledged for the ack timeout, long before the stall timeout.

Real agents in their own network namespaces, wired to a Linux bridge through veth pairs, as lab nodes
are; the "cable" is the victim's bridge port, set down mid-stream. Needs root."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chain_agents import AgentGroup
from test_chain import random_image, sha256_file

from kasched.lab.system import inside_netns
from kasched.results import GroupResult
from kasched.transports.chain import BroadcastOptions, broadcast

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SUBNET = "10.213.77"


class Wiring:
    """A switch namespace holding bridge ``br0`` (the server's side, ``SUBNET.254``) and ``count``
    node namespaces, node i at ``SUBNET.<i+1>`` behind bridge port ``p<i+1>``."""

    def __init__(self, count: int) -> None:
        self.prefix = f"kdl{os.getpid() % 100000}"
        self.switch = f"{self.prefix}-sw"
        self.nodes = [f"{self.prefix}-n{index + 1}" for index in range(count)]

    def ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def up(self) -> Wiring:
        self.ip("netns", "add", self.switch)
        self.ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.switch, "addr", "add", f"{SUBNET}.254/24", "dev", "br0")
        self.ip("-n", self.switch, "link", "set", "br0", "up")
        self.ip("-n", self.switch, "link", "set", "lo", "up")
        for index, netns in enumerate(self.nodes, start=1):
            self.ip("netns", "add", netns)
            self.ip("-n", self.switch, "link", "add", f"p{index}", "type", "veth", "peer", "eth0", "netns", netns)
            self.ip("-n", self.switch, "link", "set", f"p{index}", "master", "br0", "up")
            self.ip("-n", netns, "addr", "add", f"{SUBNET}.{index}/24", "dev", "eth0")
            self.ip("-n", netns, "link", "set", "eth0", "up")
            self.ip("-n", netns, "link", "set", "lo", "up")
        return self

    def down(self) -> None:
        for netns in [self.switch, *self.nodes]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)

    def placement(self, index: int) -> tuple[list[str], str]:
        return ["ip", "netns", "exec", self.nodes[index]], f"{SUBNET}.{index + 1}"

    def pull_cable(self, index: int) -> None:
        self.ip("-n", self.switch, "link", "set", f"p{index + 1}", "down")

    def pin_neighbour(self, index: int, other: int) -> None:
        """A permanent ARP entry on node ``index`` for node ``other``: a connect to ``other`` behind a
        pulled cable then never fails on ARP, its SYNs just go unanswered."""
        shown = subprocess.run(["ip", "-n", self.nodes[other], "-o", "link", "show", "eth0"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        mac = shown.split("link/ether ")[1].split()[0]
        self.ip("-n", self.nodes[index], "neigh", "replace", f"{SUBNET}.{other + 1}", "lladdr", mac,
                "dev", "eth0", "nud", "permanent")  # fmt: skip


@pytest.fixture
def wiring() -> Iterator[Wiring]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces): run scripts/test.sh as root")
    wires = Wiring(5)
    try:
        yield wires.up()
    finally:
        wires.down()


def broadcast_pulling_two_cables(wiring: Wiring, tmp_path: Path) -> tuple[GroupResult, Path]:
    """Broadcast 24 MiB to 5 agents; pull a02's and a03's cables once a02 has 4 MiB."""
    image = random_image(tmp_path / "disk.img", 24)
    # the stall timeout alone (120 s) would outlast the whole broadcast's deadline (40 s)
    options = BroadcastOptions(
        timeout=40.0, stall_timeout=120.0, ack_timeout=1.0, reconnect_timeout=20.0, lost_grace=1.0,
        rate_limit=8 << 20,
    )  # fmt: skip
    return broadcast_pulling_cables_at_4_mib(wiring, tmp_path, image, options), image


def broadcast_pulling_cables_at_4_mib(
    wiring: Wiring, tmp_path: Path, image: Path, options: BroadcastOptions
) -> GroupResult:
    """Broadcast ``image`` to 5 agents writing raw files; pull a02's and a03's cables at once (a01
    must bypass both) once a02 has 4 MiB."""
    agents = AgentGroup(5, accept_timeout=60.0, placement=wiring.placement).start()
    victim = tmp_path / "a02.img"

    def pull() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (victim.exists() and victim.stat().st_size >= 4 << 20):
            time.sleep(0.02)
        wiring.pull_cable(1)
        wiring.pull_cable(2)

    puller = threading.Thread(target=pull, daemon=True)
    puller.start()
    try:
        with inside_netns(wiring.switch):
            return broadcast(image, agents.nodes, {"kind": "raw", "dest": str(tmp_path / "{node}.img")},
                             key=agents.key, options=options)  # fmt: skip
    finally:
        puller.join(35)
        agents.stop()


def test_nodes_behind_pulled_cables_are_bypassed_before_the_stall_timeout(wiring: Wiring, tmp_path: Path) -> None:
    result, image = broadcast_pulling_two_cables(wiring, tmp_path)
    assert result.failed == ["a02", "a03"], {name: result[name].error for name in result}
    assert "nothing acknowledged for 1s" in (result["a02"].error or ""), result["a02"].error
    for name in ["a01", "a04", "a05"]:
        assert sha256_file(tmp_path / f"{name}.img") == sha256_file(image)


def test_a_connect_at_a_bypass_gives_up_after_the_ack_timeout(wiring: Wiring, tmp_path: Path) -> None:
    """a01 bypasses a02 and connects to a03, whose cable is pulled too; a01 knows a03's MAC for good,
    so that connect cannot fail on ARP: only its own timeout (the ack timeout) ends it. Left to the
    stall timeout or TCP's SYN retries (2 min), a04 and a05 would miss the 40 s deadline."""
    for other in (2, 3):
        wiring.pin_neighbour(0, other)
    result, image = broadcast_pulling_two_cables(wiring, tmp_path)
    assert result.failed == ["a02", "a03"], {name: result[name].error for name in result}
    assert "cannot reach a03" in (result["a03"].error or "") and "timed out" in (result["a03"].error or ""), (
        result["a03"].error
    )
    for name in ["a01", "a04", "a05"]:
        assert sha256_file(tmp_path / f"{name}.img") == sha256_file(image)


def test_a_slow_reader_is_not_taken_for_a_dead_link(wiring: Wiring, tmp_path: Path) -> None:
    """A sink that stops reading for 4x the ack timeout closes the window: the kernel's window probes
    are answered, so the node stays in the chain."""
    image = random_image(tmp_path / "disk.img", 32)
    options = BroadcastOptions(timeout=60.0, stall_timeout=30.0, ack_timeout=1.0, reconnect_timeout=10.0)
    slow_sink = {"kind": "command", "argv": ["sh", "-c", "sleep 4; exec cat > /dev/null"]}
    agents = AgentGroup(3, accept_timeout=60.0, placement=wiring.placement).start()
    try:
        with inside_netns(wiring.switch):
            result = broadcast(image, agents.nodes, slow_sink, key=agents.key, options=options)
    finally:
        agents.stop()
    assert result.ok, {name: result[name].error for name in result}


def test_a_dead_successor_is_bypassed_while_sends_still_fit_in_the_socket_buffer(
    wiring: Wiring, tmp_path: Path
) -> None:
    """a01's socket buffer holds more than the whole image, so its sends never block: it must still
    look at its successor while the stream flows. Its replay buffer holds 8 MiB: noticed only at the
    end of the stream, a02's and a03's death would leave a04 (4 MiB in) beyond what a01 can resend."""
    image = random_image(tmp_path / "disk.img", 24)
    options = BroadcastOptions(
        timeout=40.0, stall_timeout=120.0, ack_timeout=1.0, reconnect_timeout=20.0, lost_grace=1.0,
        rate_limit=2 << 20, replay_bytes=8 << 20, socket_buffer=32 << 20,
    )  # fmt: skip
    result = broadcast_pulling_cables_at_4_mib(wiring, tmp_path, image, options)
    assert result.failed == ["a02", "a03"], {name: result[name].error for name in result}
    for name in ["a01", "a04", "a05"]:
        assert sha256_file(tmp_path / f"{name}.img") == sha256_file(image)
