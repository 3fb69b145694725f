"""Starting a chain agent as the SSH launcher does: its source on stdin, ``python3 -I -S -``. Every node
of a chain starts one when the broadcast starts, so what it imports is CPU time on every node."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from kasched.transports import chain_agent
from kasched.transports.chain_agent import SESSION_GONE
from kasched.transports.chain_ssh import AGENT_FLAGS, AGENT_SOURCE, agent_program, bundled_agent_source, new_key

PROGRAM = agent_program(new_key())  # the program shipped to a node: the source and a broadcast's key

#: loaded only for the sinks that run a program (tar, command), or not at all
NOT_AT_START = {"argparse", "typing", "subprocess", "site"}


def start_agent(*args: str) -> subprocess.CompletedProcess[str]:
    argv = ["python3", *AGENT_FLAGS.split(), "-X", "importtime", "-", *args]
    return subprocess.run(argv, input=PROGRAM.decode(), capture_output=True, text=True, timeout=30)


def test_the_agent_starts_isolated_on_the_standard_library_it_needs() -> None:
    done = start_agent("--listen", "127.0.0.1:0", "--name", "n1", "--accept-timeout", "0.01")
    assert done.stdout.startswith("ready 127.0.0.1:")
    assert done.returncode == 2 and "nobody connected within 0.01s" in done.stderr
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.MULTILINE))
    assert {"socket", "hashlib", "json", "threading"} <= imported  # the pattern does match the log
    assert imported.isdisjoint(NOT_AT_START), imported & NOT_AT_START


def test_bad_arguments_get_the_usage_line_not_a_traceback() -> None:
    for args in (["--name", "n1"], ["--listen", "127.0.0.1:0", "--name"], ["--listen", "x:0", "--nme", "n1"],
                 ["--listen", "127.0.0.1:0", "--name", "n1", "--accept-timeout", "soon"]):  # fmt: skip
        done = start_agent(*args)
        assert done.returncode == 2, args
        assert "Traceback" not in done.stderr
        assert "usage: chain_agent --listen HOST:PORT --name NODE" in done.stderr
        assert not done.stdout
    assert "--accept-timeout 'soon' is not a number of seconds" in done.stderr


def test_an_address_it_cannot_listen_on_gets_one_line() -> None:
    for address, message in (("nohost", "--listen 'nohost' is not HOST:PORT"),
                             ("127.0.0.1:99999", "--listen '127.0.0.1:99999' is not HOST:PORT"),
                             ("10.9.9.9:0", "chain agent n1: cannot listen on 10.9.9.9:0: ")):  # fmt: skip
        done = start_agent("--listen", address, "--name", "n1")
        assert done.returncode == 2, address
        assert message in done.stderr and "Traceback" not in done.stderr
        assert not done.stdout


def test_the_agent_listens_on_ipv6_too() -> None:
    done = start_agent("--listen", "[::1]:0", "--name", "n1", "--accept-timeout", "0.01")
    assert done.stdout.startswith("ready ::1:"), done.stderr[-500:]
    assert "nobody connected within 0.01s" in done.stderr


def test_the_shipped_program_is_the_wire_then_the_agent_in_one_file() -> None:
    """chain_wire's source, then chain_agent's without its import of kasched: nothing else is needed."""
    source = AGENT_SOURCE.decode()
    assert not re.search(r"^\s*(from|import) kasched", source, re.MULTILINE)
    assert source.count("from __future__ import annotations") == 1
    assert source.index("class Forwarder") < source.index("class Agent") < source.index('if __name__ == "__main__"')


def test_an_agent_module_without_its_bundle_lines_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = tmp_path / "chain_agent.py"
    agent.write_text(Path(chain_agent.__file__).read_text().replace("# bundle: end", "# end"))
    monkeypatch.setattr(chain_agent, "__file__", str(agent))
    with pytest.raises(RuntimeError, match=re.escape("no '# bundle: begin' ... '# bundle: end' lines")):
        bundled_agent_source()


def spawn_agent(*args: str) -> subprocess.Popen[bytes]:
    """An agent as over SSH, its stdout a pipe this test reads (as sshd's session does)."""
    argv = ["python3", *AGENT_FLAGS.split(), "-", *args]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(PROGRAM)
    process.stdin.close()
    return process


def test_an_agent_ends_when_nobody_reads_its_stdout_any_more() -> None:
    """What sshd does to a session it closes: the pipe to the agent's stdout loses its reader."""
    process = spawn_agent("--listen", "127.0.0.1:0", "--name", "n1", "--accept-timeout", "60")
    try:
        assert process.stdout is not None and process.stdout.readline().startswith(b"ready 127.0.0.1:")
        process.stdout.close()
        assert process.wait(10) == SESSION_GONE  # not after its 60 s accept timeout
    finally:
        process.kill()
        process.wait()
        process.stderr.close()  # type: ignore[union-attr]


def test_an_agent_waits_a_moment_for_its_address_to_be_freed() -> None:
    """An agent of an earlier try still ending holds the port for a moment."""
    held = socket.create_server(("127.0.0.1", 0))
    port = held.getsockname()[1]
    threading.Timer(0.5, held.close).start()
    done = start_agent("--listen", f"127.0.0.1:{port}", "--name", "n1", "--accept-timeout", "0.01")
    assert done.stdout.startswith(f"ready 127.0.0.1:{port}"), done.stderr[-300:]
    assert done.returncode == 2 and "nobody connected within 0.01s" in done.stderr


def test_an_address_that_stays_taken_gets_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        done = start_agent("--listen", f"127.0.0.1:{port}", "--name", "n1")
    assert done.returncode == 2 and not done.stdout and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]  # after -X importtime's lines
    assert last.startswith(f"chain agent n1: cannot listen on 127.0.0.1:{port}: Address already in use"), last
