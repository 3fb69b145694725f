"""What one request may cost kaschedd (issue 18, audit F8 and F13): a total time per request on the
Unix socket and over TCP, caps on connections in all and per user, the caller known before any body
is read over TCP, node ranges counted before they are expanded, deep JSON a 400, a hang-up one log
line, control characters escaped in the log. A real kaschedd; the misbehaving clients run as an
ordinary Unix user (tests/service/rawclient.py with the system's Python)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kasched.errors import InputError
from kasched.nodeset import count, expand
from kasched.service.client import ServiceClient, _UnixConnection
from tests.service.tcpsite import Site, free_port, kasched_as, kaschedd, scratch
from tests.test_cli import unix_user

RAWCLIENT = Path(__file__).parent / "rawclient.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def as_user(user: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    entry = unix_user(user)
    command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", SYSTEM_PYTHON]
    return subprocess.run([*command, str(RAWCLIENT), *args], capture_output=True, text=True, timeout=timeout)


@contextmanager
def tight_site(total: int = 40) -> Iterator[Site]:
    """kaschedd with 2 s per request, 8 connections per user, ``total`` in all, on its socket and on TCP."""
    base = scratch()
    settings = {
        "service_request_timeout": 2.0,
        "service_max_connections_per_user": 8,
        "service_max_connections": total,
        "service_tcp": f"127.0.0.1:{free_port()}",
    }
    try:
        with kaschedd(base, {}, **settings) as site:
            yield site
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tight() -> Iterator[Site]:
    with tight_site() as site:
        yield site


def test_half_sent_requests_are_cut_off_and_capped_per_user(tight: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kaschedd")
    threads_before = threading.active_count()
    most = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            most[0] = max(most[0], threading.active_count())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        attack = subprocess.Popen(
            ["setpriv", f"--reuid={unix_user('kasched-alice').pw_uid}", f"--regid={unix_user('kasched-alice').pw_gid}",
             "--clear-groups", SYSTEM_PYTHON, str(RAWCLIENT), "halfsent", str(tight.config.service_socket), "60", "8"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)
        started = time.monotonic()
        status, health = ServiceClient(tight.config.service_socket).request("GET", "/v1/health")
        assert status == 200 and health["user"] == "root", health  # others are served meanwhile
        assert time.monotonic() - started < 1.0
        out, _ = attack.communicate(timeout=30)
    finally:
        done.set()
        watcher.join()
    results = json.loads(out)
    held = [r for r in results if r["status"] is None]
    refused = [r for r in results if r["status"] == 429]
    assert len(held) == 8 and len(refused) == 52, results
    assert all(r["closed_after"] is not None and r["closed_after"] < 1.0 for r in refused), refused
    assert all(r["closed_after"] is not None and 1.5 < r["closed_after"] < 4.0 for r in held), held
    assert most[0] <= threads_before + 8 + 2, (threads_before, most[0])  # the watcher and the health request
    refusal_lines = [r.getMessage() for r in caplog.records if "connection refused with 429" in r.getMessage()]
    assert len(refusal_lines) == 1, refusal_lines
    assert refusal_lines[0].startswith(f"unix uid {unix_user('kasched-alice').pw_uid}: "), refusal_lines
    timed_out = [r for r in caplog.records if "time is up" in r.getMessage()]
    assert len(timed_out) == 8 and all(r.exc_info is None for r in timed_out)


def halfsent_as(user: str, site: Site, count: int) -> subprocess.Popen[str]:
    entry = unix_user(user)
    command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", SYSTEM_PYTHON]
    halfsent = [str(RAWCLIENT), "halfsent", str(site.config.service_socket), str(count), "6"]
    return subprocess.Popen([*command, *halfsent], stdout=subprocess.PIPE, text=True)


def test_past_the_total_cap_connections_get_503(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kaschedd")
    with tight_site(total=12) as site:
        alice = halfsent_as("kasched-alice", site, 8)
        time.sleep(1.0)  # alice holds 8 of the 12
        bob = halfsent_as("kasched-bob", site, 8)
        alice_results, bob_results = (json.loads(p.communicate(timeout=30)[0]) for p in (alice, bob))
    assert [r["status"] for r in alice_results] == [None] * 8, alice_results
    assert sorted(r["status"] or 0 for r in bob_results) == [0] * 4 + [503] * 4, bob_results
    lines = [r.getMessage() for r in caplog.records if "connection refused with 503" in r.getMessage()]
    assert len(lines) == 1 and "12 connections open in all (service_max_connections)" in lines[0], lines


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_a_slow_drip_is_cut_off_at_the_request_deadline(tight: Site, where: str) -> None:
    address = str(tight.config.service_socket) if where == "unix" else tight.config.service_tcp
    done = as_user("kasched-alice", "drip", address, "0.5", "10")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["sent"] < result["of"], result  # it never got to finish its request
    assert 1.5 < result["cut_after"] < 3.5, result  # 2 s in all, though a byte came every 0.5 s


def test_over_tcp_no_body_is_read_before_authentication(tight: Site) -> None:
    host, port = tight.config.service_tcp.split(":")
    for authorization in ("", "Authorization: Bearer kst1.forged.token\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = (
                "POST /v1/rights HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {1 << 20}\r\n{authorization}\r\n"
            )
            sock.sendall(head.encode() + b"[" * 1000)  # and never the rest of the 1 MiB
            started = time.monotonic()
            answer = sock.recv(4096)
            assert time.monotonic() - started < 1.0
        assert answer.startswith(b"HTTP/1.1 401 "), answer


def test_huge_node_ranges_are_refused_before_expansion(tight: Site) -> None:
    client = ServiceClient(tight.config.service_socket)
    for pattern in ("x[1-100000000]", "x[1-200000]", "a[1-1000]b[1-1000]", "n[1-9][1-9][1-9][1-9][1-9]"):
        started = time.monotonic()
        status, data = client.request("GET", "/v1/rights/check", {"nodes": pattern})
        assert time.monotonic() - started < 0.5, pattern
        assert status == 400 and "more than the inventory holds" in data["error"], data
        assert "\n" not in data["error"]
    status, data = client.request("GET", "/v1/rights/check", {"nodes": "node-[1-4]"})
    assert status == 200, data
    started = time.monotonic()
    with pytest.raises(InputError, match="names 100000000 nodes"):
        expand("x[1-100000000]")
    assert time.monotonic() - started < 0.05
    assert count("x[1-100000000]") == 100_000_000 and count("n[01-10/3],m,o[1-2]p[1-3]") == 11
    refused = kasched_as("kasched-alice", tight.client_config, "nodes", "list", "-m", "x[1-100000000]")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "names 100000000 nodes" in refused.stderr


def raw_unix(site: Site, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(site.config.service_socket))
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_deep_json_is_a_400(tight: Site) -> None:
    connection = _UnixConnection(tight.config.service_socket, 10)
    connection.request("POST", "/v1/nodes/state", body=b"[" * 200_000, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    data = json.loads(response.read())
    assert response.status == 400 and "nested too deeply" in data["error"], data


def test_a_hang_up_mid_request_is_one_log_line(
    tight: Site, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="kaschedd")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(tight.config.service_socket))
        sock.sendall(b"POST /v1/rights HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("hung up" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    lines = [r for r in caplog.records if "hung up" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in caplog.records]
    assert lines[0].getMessage() == "unix client hung up during POST /v1/rights, 10 of 100 body bytes sent"
    assert "Traceback" not in capfd.readouterr().err


def test_control_characters_are_escaped_in_the_log_and_in_printed_output(
    tight: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kaschedd")
    answer = raw_unix(tight, b"GET /v1/nodes/\x1b[2J\x1b[31mFAKE-ENTRY\rforged HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer  # bad syntax (the CR), logged all the same
    lines = [r.getMessage() for r in caplog.records if "FAKE-ENTRY" in r.getMessage()]
    assert lines and all("\x1b" not in line and "\n" not in line and "\r" not in line for line in lines), lines
    assert any("\\x1b[2J\\x1b[31mFAKE-ENTRY" in line for line in lines), lines
    client = ServiceClient(tight.config.service_socket)
    job = "\x1b]0;owned\x07"
    status, data = client.request("POST", "/v1/rights", body={"user": "kasched-alice", "nodes": "node-1", "job": job})
    assert status in (200, 201), data
    listed = kasched_as("kasched-alice", tight.client_config, "rights")
    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout and "\\x1b]0;owned\\x07" in listed.stdout
    shown = kasched_as("kasched-alice", tight.client_config, "nodes", "show", "\x1b[31mnode\rX")
    assert shown.returncode != 0 and "\x1b" not in shown.stderr and "\r" not in shown.stderr, shown.stderr
    assert "\\x1b[31mnode\\x0dX" in shown.stderr
