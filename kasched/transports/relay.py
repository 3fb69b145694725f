"""The relay of tree exec, started over SSH on a head node: ``python3 -m kasched.transports.relay``.

It reads one JSON request line on stdin (the command, the SSH credentials held in memory only, the
nodes of its subtree and their addresses, the time left), runs the command on this node and, at the
same time, on its subtree through :func:`kasched.transports.tree.run_level` (which may start further
relays), and writes one JSON result line per node on stdout as soon as it is known. The node needs
python3 with paramiko and the kasched package importable (in the lab, node namespaces share the
host's filesystem; on a cluster, the deployment environment provides them).
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from typing import Any, TextIO

from kasched.errors import DriverTimeout
from kasched.results import NodeResult
from kasched.transports.ssh_session import CommandOutput
from kasched.transports.tree import STEP, ExecRequest, command_result, result_message, run_level


def login_shell() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    except KeyError:
        return "/bin/sh"


def run_local(node: str, command: str, timeout: float) -> NodeResult:
    """Run the command on this node as sshd would (``$SHELL -c``), killing its process group on
    timeout."""
    start = time.monotonic()
    process = subprocess.Popen(
        [login_shell(), "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        error = DriverTimeout("command timed out", node=node)
        return NodeResult(node, False, STEP, str(error), time.monotonic() - start)
    output = CommandOutput(stdout.decode(errors="replace"), stderr.decode(errors="replace"), process.returncode)
    return command_result(node, output, time.monotonic() - start)


def serve(stdin: TextIO, stdout: TextIO) -> None:
    message: dict[str, Any] = json.loads(stdin.readline())
    request = ExecRequest.from_json(message["request"])
    head: str = message["head"]
    deadline = time.monotonic() + float(message["remaining"])
    lock = threading.Lock()

    def emit(result: NodeResult, host_key: str) -> None:
        line = json.dumps(result_message(result, host_key))
        with lock:
            stdout.write(line + "\n")
            stdout.flush()

    local_timeout = min(request.command_timeout, deadline - time.monotonic())
    local = threading.Thread(target=lambda: emit(run_local(head, request.command, local_timeout), ""))
    local.start()
    run_level(request, list(message["nodes"]), deadline, emit)
    local.join()


def main() -> int:
    serve(sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
