"""The server's report collector: how long it waits for a node said lost (no timing asserted), and
its answers to nodes asking how a successor's start goes, over a real loopback connection."""

from __future__ import annotations

import time

from kasched.engine.chain import ReportCollector
from kasched.engine.chain_agent import Reporter
from kasched.engine.chain_ssh import new_key
from kasched.engine.chain_wire import STARTING

KEY = new_key()


def test_lost_node_not_waited_for_once_the_others_reported() -> None:
    collector = ReportCollector("127.0.0.1", "s1", KEY)
    try:
        collector.record({"type": "result", "session": "s1", "node": "a", "ok": True})
        collector.record({"type": "lost", "session": "s1", "node": "b", "by": "a", "error": "reset"})
        collector.record({"type": "result", "session": "s1", "node": "c", "ok": True})
        deadline = time.monotonic() + 60
        collector.wait(["a", "b", "c"], deadline, grace=3600, settle=0.05)
        assert time.monotonic() < deadline  # returned on settle, not on the deadline
        assert "b" in collector.lost and "b" not in collector.results
    finally:
        collector.close()


def test_lost_node_waited_for_while_others_stream() -> None:
    collector = ReportCollector("127.0.0.1", "s2", KEY)
    try:
        collector.record({"type": "lost", "session": "s2", "node": "b", "by": "a", "error": "reset"})
        deadline = time.monotonic() + 0.5
        collector.wait(["a", "b"], deadline, grace=3600, settle=0.0)  # a has not reported: wait
        assert time.monotonic() >= deadline
    finally:
        collector.close()


def test_a_node_asking_how_a_start_goes_gets_the_servers_answer() -> None:
    states = {"n2": STARTING, "n3": "ssh: connection refused"}
    collector = ReportCollector("127.0.0.1", "s3", KEY, states.get)
    try:
        reporter = Reporter(collector.address, 5.0, KEY, "n1")
        assert reporter.ask({"type": "start", "session": "s3", "node": "n2", "by": "n1"}) == {"state": STARTING}
        assert reporter.ask({"type": "start", "session": "s3", "node": "n3", "by": "n1"}) == {"state": "ssh: connection refused"}
        assert reporter.ask({"type": "start", "session": "s3", "node": "n9", "by": "n1"}) == {"state": None}
        assert reporter.ask({"type": "start", "session": "other", "node": "n2", "by": "n1"}) == {"state": None}
        assert collector.results == {} and collector.lost == {}  # a question is not a report
    finally:
        collector.close()
    assert Reporter(collector.address, 1.0, KEY, "n1").ask({"type": "start", "session": "s3", "node": "n2", "by": "n1"}) is None  # gone


def test_a_collector_without_start_states_does_not_know() -> None:
    collector = ReportCollector("127.0.0.1", "s4", KEY)
    try:
        assert Reporter(collector.address, 5.0, KEY, "n1").ask({"type": "start", "session": "s4", "node": "n1", "by": "n1"}) == {"state": None}
    finally:
        collector.close()
