"""The chain agent's low-water mark: a node wakes up to forward only once a batch has arrived (fewer
wake-ups, far less CPU on a slow link), but never waits for more than its predecessor must send.
Over real loopback TCP sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kasched.engine.chain import LOW_WATER_RANGE, low_water_for
from kasched.engine.chain_agent import CHUNK, Agent


@pytest.fixture
def agent() -> Iterator[tuple[Agent, socket.socket]]:
    """An agent whose upstream is a real TCP connection; yields it and the predecessor's end."""
    listener = socket.create_server(("127.0.0.1", 0))
    predecessor = socket.create_connection(listener.getsockname())
    upstream, _ = listener.accept()
    agent = Agent(listener, "node-1")
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
