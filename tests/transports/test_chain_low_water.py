"""The chain agent's low-water mark: a node wakes up to forward only once a batch has arrived (fewer
wake-ups, far less CPU on a slow link), but never waits for more than its predecessor must send.
Over real loopback TCP sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kasched.transports.chain import LOW_WATER_RANGE, low_water_for
from kasched.transports.chain_agent import BATCH_RANGE, BATCH_SECONDS, CHUNK, RATE_WINDOW, Agent, Pacer


@pytest.fixture
def agent() -> Iterator[tuple[Agent, socket.socket]]:
    """An agent whose upstream is a real TCP connection; yields it and the predecessor's end."""
    listener = socket.create_server(("127.0.0.1", 0))
    predecessor = socket.create_connection(listener.getsockname())
    upstream, _ = listener.accept()
    agent = Agent(listener, "node-1", bytes(32))
    agent.upstream = upstream
    agent.config = {"low_water": 64 << 10}
    agent.deadline = time.monotonic() + 30
    try:
        yield agent, predecessor
    finally:
        predecessor.close()
        agent.close()


def test_a_read_waits_for_the_low_water_mark(agent: tuple[Agent, socket.socket]) -> None:
    node, predecessor = agent
    node.pacer.batch = BATCH_RANGE[1]  # a fast stream: the session's 64 KiB is the bound
    predecessor.sendall(b"x" * 1000)

    def rest() -> None:
        time.sleep(0.3)
        predecessor.sendall(b"y" * ((64 << 10) - 1000))

    threading.Thread(target=rest).start()
    data = node.read_some(CHUNK)
    assert len(data) == 64 << 10  # one wake-up for the whole batch, not one for the first 1000 bytes
    assert node.upstream is not None
    assert node.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 64 << 10


def test_a_read_never_waits_for_more_than_it_asked(agent: tuple[Agent, socket.socket]) -> None:
    node, predecessor = agent
    predecessor.sendall(b"z" * 100)  # the end of a frame: nothing more is bound to come
    assert node.read_exact(100) == b"z" * 100
    assert node.upstream is not None
    assert node.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 100


def test_an_old_server_without_a_low_water_mark_gets_every_byte_at_once(agent: tuple[Agent, socket.socket]) -> None:
    node, predecessor = agent
    node.config = {}
    predecessor.sendall(b"x" * 1000)
    assert len(node.read_some(CHUNK)) == 1000


def test_low_water_keeps_the_per_hop_delays_to_a_share_of_the_stream() -> None:
    low, high = LOW_WATER_RANGE
    assert low_water_for(None, 8) == low  # a stream of unknown size: the smallest batches
    assert low_water_for(48 << 20, 8) == high
    assert low_water_for(48 << 20, 64) == low  # 48 MiB / 64 hops: batches would be tiny, floor
    assert low_water_for(1 << 30, 64) == high
    middle = low_water_for(48 << 20, 24)
    assert low < middle < high and middle * 24 == pytest.approx(0.05 * (48 << 20), rel=0.01)


def test_the_first_batch_is_the_smallest_until_the_rate_is_known(agent: tuple[Agent, socket.socket]) -> None:
    node, predecessor = agent
    node.config = {"low_water": 256 << 10}
    predecessor.sendall(b"x" * (BATCH_RANGE[0] + 10))
    assert len(node.read_some(CHUNK)) >= BATCH_RANGE[0]
    assert node.upstream is not None
    assert node.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == BATCH_RANGE[0]


def arrive_at(pacer: Pacer, rate: float, seconds: float, now: float = 1000.0, step: float = 0.01) -> float:
    """Feed the pacer ``rate`` bytes/s for ``seconds`` from ``now`` on, in arrivals ``step`` apart
    (the times are given, not read from the clock); the time after the last arrival."""
    for _ in range(int(seconds / step) + 1):
        pacer.arrived(int(rate * step), now)
        now += step
    return now


def test_batches_follow_the_rate_the_stream_arrives_at() -> None:
    low, high = BATCH_RANGE
    slow, fast, faster = Pacer(), Pacer(), Pacer()
    arrive_at(slow, 10e6 / 8, 2 * RATE_WINDOW)  # a 10 Mbit/s link: 10 ms are 12.5 kB, under the floor
    later = arrive_at(fast, 100e6 / 8, 2 * RATE_WINDOW)
    arrive_at(faster, 10e9 / 8, 2 * RATE_WINDOW)
    assert slow.batch == low
    assert fast.batch == pytest.approx(100e6 / 8 * BATCH_SECONDS, rel=0.1)
    assert faster.batch == high
    arrive_at(fast, 10e6 / 8, 2 * RATE_WINDOW, now=later)  # the same stream slowed down: smaller batches again
    assert fast.batch == low


def test_a_session_can_ask_for_longer_batches() -> None:
    from kasched.transports.chain import BroadcastOptions, _session_config

    config = _session_config("s", {"kind": "discard"}, BroadcastOptions(batch_seconds=0.04), ":1")
    assert config["batch_seconds"] == 0.04  # what each agent's header carries
    default, longer = Pacer(), Pacer(config["batch_seconds"])
    arrive_at(default, 100e6 / 8, 2 * RATE_WINDOW)
    arrive_at(longer, 100e6 / 8, 2 * RATE_WINDOW)
    assert longer.batch == pytest.approx(4 * default.batch, rel=0.1)
    assert _session_config("s", {}, BroadcastOptions(), ":1")["batch_seconds"] == BATCH_SECONDS
