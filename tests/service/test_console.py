"""``kasched console -m NODE`` through kaschedd: the holder of a grant on the node (or an admin) reads
its console log, from where it stood when the grant began (never the previous job's output); anyone
else is refused with the reason. Users run the CLI as ordinary Unix users."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from kasched.compose import open_site
from kasched.identity import Caller
from kasched.service.access import console_read
from kasched.service.client import ServiceClient
from tests.service.tcpsite import ROOT, Site, kasched_as, kaschedd, scratch
from tests.test_cli import unix_user

pytestmark = pytest.mark.slow
LINES = [f"node-1 boot line {i}" for i in range(1, 11)]
PREVIOUS = "node-1 console line of the previous job: root password is s3cr3t"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    base = scratch()
    consoles = base / "consoles"
    for node, lines in (("node-1", [PREVIOUS]), ("node-2", ["node-2 up"])):
        (consoles / node).mkdir(parents=True)
        (consoles / node / "console.log").write_text("".join(f"{line}\n" for line in lines))
    try:
        with kaschedd(base, {}, console_logs=consoles) as running:
            granted = kasched_as("root", running.client_config, "rights", "grant", "-u", "kasched-alice", "-m", "node-1")
            assert granted.returncode == 0, granted.stderr
            with open(consoles / "node-1" / "console.log", "a") as log:  # what alice's job printed
                log.write("".join(f"{line}\n" for line in LINES))
            yield running
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_holder_of_a_grant_reads_the_console(site: Site) -> None:
    shown = kasched_as("kasched-alice", site.client_config, "console", "-m", "node-1", "-n", "3")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == LINES[-3:]


def test_a_new_grant_shows_nothing_of_the_previous_job(site: Site) -> None:
    shown = kasched_as("kasched-alice", site.client_config, "console", "-m", "node-1", "-n", "1000")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == LINES  # and not the line written before the grant
    client = ServiceClient(site.config.service_socket)
    status, data = client.request("GET", "/v1/nodes/node-1/console", {"offset": "0"})
    assert status == 200, data  # as root: an admin reads it all
    assert PREVIOUS in data["text"]
    alice = open_site(site.config, Caller("kasched-alice"), load_entry_points=False)
    try:
        from_start = console_read(alice, "node-1", offset="0")
    finally:
        alice.close()
    assert from_start["text"] == "".join(f"{line}\n" for line in LINES)  # offset 0 starts at the grant's


def test_others_are_refused_with_a_reason(site: Site) -> None:
    other = kasched_as("kasched-bob", site.client_config, "console", "-m", "node-1")
    assert other.returncode == 5
    assert "kasched-bob may not see the console of node-1: node-1: granted to kasched-alice" in other.stderr
    nothing = kasched_as("kasched-alice", site.client_config, "console", "-m", "node-2")
    assert nothing.returncode == 5 and "node-2: no active grant" in nothing.stderr
    assert "node-2 up" not in nothing.stdout


def test_admins_read_any_console(site: Site) -> None:
    shown = kasched_as("root", site.client_config, "console", "-m", "node-2")
    assert shown.returncode == 0 and shown.stdout == "node-2 up\n", shown.stderr


def test_unknown_nodes_and_nodes_without_a_console(site: Site) -> None:
    unknown = kasched_as("root", site.client_config, "console", "-m", "node-99")
    assert unknown.returncode == 3 and "node-99" in unknown.stderr
    absent = kasched_as("root", site.client_config, "console", "-m", "node-3")
    assert absent.returncode == 3 and "node-3: no console kaschedd can serve" in absent.stderr


def test_the_api_reads_from_an_offset(site: Site) -> None:
    client = ServiceClient(site.config.service_socket)
    first = client.call("GET", "/v1/nodes/node-2/console", {"lines": "5"})
    assert first == {"node": "node-2", "text": "node-2 up\n", "offset": len("node-2 up\n")}
    with open(site.base / "consoles" / "node-2" / "console.log", "a") as log:
        log.write("node-2 more\n")
    after = client.call("GET", "/v1/nodes/node-2/console", {"offset": str(first["offset"])})
    assert after["text"] == "node-2 more\n"
    status, data = client.request("GET", "/v1/nodes/node-2/console", {"offset": "-1"})
    assert status == 400 and "not a whole number" in data["error"]


def test_follow_prints_what_comes(site: Site) -> None:
    entry = unix_user("kasched-alice")
    env = {
        "PATH": "/usr/bin:/bin",
        "KASCHED_CONFIG": str(site.client_config),
        "HOME": "/nonexistent",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
    }
    command = [
        "setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
        sys.executable, "-m", "kasched", "console", "-m", "node-1", "-n", "1", "--follow", "--interval", "0.2",
    ]  # fmt: skip
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout or []], daemon=True).start()
    try:
        assert lines.get(timeout=120) == LINES[-1] + "\n"
        with open(site.base / "consoles" / "node-1" / "console.log", "a") as log:
            log.write("node-1 new line\n")
        assert lines.get(timeout=120) == "node-1 new line\n"
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(60) == 0, follower.stderr.read() if follower.stderr else ""
