"""The server's report collector: how long it waits for a node said lost (no timing asserted), its
answers to nodes asking how a successor's start goes, and the reports it does not record (not signed
with the broadcast's key, or about another node), over real loopback connections."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

from kasched.transports.chain import ReportCollector
from kasched.transports.chain_agent import Reporter
from kasched.transports.chain_ssh import new_key
from kasched.transports.chain_wire import (
    HEADER,
    NONCE_BYTES,
    PROOF,
    SERVER,
    STARTING,
    ProtocolError,
    recv_frame,
    send_frame,
    sign,
    split_address,
)

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


def forged_results(collector: ReportCollector) -> None:
    """Reports of a node that got nothing, right session, ok, the image's sha256: one sent as before
    reports were signed, one by a machine with a key of its own, one by another node of the broadcast."""
    message = {"type": "result", "session": collector.session, "node": "n2", "ok": True, "error": None,
               "bytes": 1 << 20, "sha256": "ab" * 32, "sink_status": None, "lost": []}  # fmt: skip
    with socket.create_connection(split_address(collector.address), timeout=5) as sock:
        send_frame(sock, HEADER, json.dumps(message).encode())
    Reporter(collector.address, 5.0, os.urandom(32), "n2").send(message)
    Reporter(collector.address, 5.0, KEY, "n1").send(message)  # n1 holds the key, but speaks for n1 only


def test_a_report_not_signed_by_its_node_is_not_recorded() -> None:
    collector = ReportCollector("127.0.0.1", "s5", KEY)
    try:
        forged_results(collector)
        Reporter(collector.address, 5.0, KEY, "n3").send({"type": "result", "session": "s5", "node": "n3", "ok": True})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ("n3" not in collector.results or collector.refused < 3):
            time.sleep(0.02)
        assert list(collector.results) == ["n3"]  # the genuine one, after the three forged ones
        assert collector.refused == 3 and collector.lost == {}
    finally:
        collector.close()


def test_a_node_does_not_believe_an_answer_from_a_server_without_the_key() -> None:
    """A machine that took the server's report address answers the handshake under a key of its own,
    then says the successor asked about is ready: the node takes that for no answer."""
    fake = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = fake.accept()
        with conn:
            _, challenge = recv_frame(conn)
            nonce, peer, ours = challenge[:NONCE_BYTES], challenge[NONCE_BYTES:].decode(), os.urandom(NONCE_BYTES)
            send_frame(conn, PROOF, ours + sign(os.urandom(32), "listener", peer, SERVER, nonce, ours))
            with contextlib.suppress(OSError, ProtocolError):
                recv_frame(conn)  # the node's proof, if it sends one
                recv_frame(conn)  # its question
            with contextlib.suppress(OSError):
                send_frame(conn, HEADER, json.dumps({"state": "ready"}).encode())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        address = f"127.0.0.1:{fake.getsockname()[1]}"
        question = {"type": "start", "session": "s6", "node": "n2", "by": "n1"}
        assert Reporter(address, 5.0, KEY, "n1").ask(question) is None
    finally:
        server.join(10)
        fake.close()
