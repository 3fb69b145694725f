"""The server's report collector: how long it waits for a node said lost (no timing asserted)."""

from __future__ import annotations

import time

from kasched.engine.chain import ReportCollector


def test_lost_node_not_waited_for_once_the_others_reported() -> None:
    collector = ReportCollector("127.0.0.1", "s1")
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
    collector = ReportCollector("127.0.0.1", "s2")
    try:
        collector.record({"type": "lost", "session": "s2", "node": "b", "by": "a", "error": "reset"})
        deadline = time.monotonic() + 0.5
        collector.wait(["a", "b"], deadline, grace=3600, settle=0.0)  # a has not reported: wait
        assert time.monotonic() >= deadline
    finally:
        collector.close()
