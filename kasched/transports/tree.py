"""Run one command on many nodes over SSH, directly or through a tree of relays (TakTuk /
ClusterShell tree mode), with per-node results as data.

``fanout=0`` is direct mode: the caller connects to every node, at most ``window`` at a time. With
``fanout=k`` the nodes are cut into ``k`` contiguous groups; the caller connects to the first node
of each group (its *head*) and starts a relay there (:mod:`kasched.transports.relay`), which runs the
command on the head and does the same for the rest of the group, recursively: depth ~ log_k(N). Each
relay streams one JSON line per node back up. A head that cannot be reached is reported failed and
its group is handled by its parent; a relay that dies leaves its missing nodes reported failed.
Whatever the mode, the caller gets the same :class:`~kasched.results.GroupResult` whose values are
:class:`~kasched.transports.ssh_session.CommandOutput`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import paramiko

from kasched.errors import DriverError, DriverTimeout, KaschedError
from kasched.results import GroupResult, NodeResult
from kasched.transports.ssh_session import CommandOutput, HostKeyPolicy, SshAuth, SshSession, load_private_key

STEP = "exec"
DEFAULT_RELAY_COMMAND = "python3 -m kasched.transports.relay"
RELAY_MARGIN = 1.0  # seconds a relay keeps in hand to report its own timeouts before its parent does

Emit = Callable[[NodeResult, str], None]  # a node's result and the host key line seen for it


@dataclass(frozen=True)
class ExecRequest:
    """Everything a level of the tree needs; serialised as JSON to relays."""

    command: str
    auth: SshAuth
    addresses: Mapping[str, str] = field(default_factory=dict)
    fanout: int = 0
    window: int = 32
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    relay_command: str = DEFAULT_RELAY_COMMAND

    def address(self, node: str) -> str:
        return self.addresses.get(node, node)

    def to_json(self, nodes: Sequence[str], head: str, remaining: float) -> str:
        fields = asdict(self)
        fields["auth"]["policy"] = str(self.auth.policy)
        fields["addresses"] = {node: self.address(node) for node in nodes}
        return json.dumps({"request": fields, "nodes": list(nodes), "head": head, "remaining": remaining})

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> ExecRequest:
        auth = fields.pop("auth")
        auth["policy"] = HostKeyPolicy(auth["policy"])
        return cls(auth=SshAuth(**auth), **fields)


def run(
    nodes: Sequence[str],
    command: str,
    *,
    key_file: str,
    user: str = "root",
    addresses: Mapping[str, str] | None = None,
    fanout: int = 0,
    window: int = 32,
    connect_timeout: float = 10.0,
    command_timeout: float = 60.0,
    timeout: float | None = None,
    host_key_policy: HostKeyPolicy = HostKeyPolicy.ACCEPT,
    known_hosts_file: str | None = None,
    relay_command: str = DEFAULT_RELAY_COMMAND,
    known_hosts: str = "",
) -> GroupResult:
    """Run ``command`` on every node; never raises for a node's failure.

    ``addresses`` maps a node name to ``host[:port]`` (default: the name, port 22). Each node gets
    ``connect_timeout + command_timeout`` from the moment its turn comes (plus a margin per tree level
    below it); ``timeout``, if given, also bounds the whole run. With the
    ``accept`` policy, host keys seen are appended to ``known_hosts_file`` if given; with ``strict``,
    they must be in it (or in ``known_hosts``, the same lines as text: pinned keys).
    """
    known_hosts = "\n".join(filter(None, [_read_known_hosts(known_hosts_file), known_hosts]))
    auth = SshAuth.from_key_file(user, key_file, host_key_policy, known_hosts)
    request = ExecRequest(
        command, auth, dict(addresses or {}), fanout, window, connect_timeout, command_timeout, relay_command
    )
    deadline = time.monotonic() + timeout if timeout else math.inf
    results: dict[str, NodeResult] = {}
    host_keys: list[str] = []
    lock = threading.Lock()

    def emit(result: NodeResult, host_key: str) -> None:
        with lock:
            results[result.node] = result
            if host_key:
                host_keys.append(host_key)

    run_level(request, list(nodes), deadline, emit)
    if known_hosts_file and host_key_policy == HostKeyPolicy.ACCEPT:
        _record_host_keys(known_hosts_file, known_hosts, host_keys)
    group = GroupResult()
    for node in nodes:
        group.add(results.get(node) or NodeResult(node, False, STEP, "no result (internal error)"))
    return group


def plan_subtrees(nodes: Sequence[str], fanout: int) -> list[tuple[str, list[str]]]:
    """Cut ``nodes`` into at most ``fanout`` contiguous groups: (head, rest of its group) pairs.
    ``fanout <= 0``, or no more nodes than ``fanout``: every node is its own head (direct)."""
    if fanout <= 0 or len(nodes) <= fanout:
        return [(node, []) for node in nodes]
    size, extra = divmod(len(nodes), fanout)
    groups, start = [], 0
    for index in range(fanout):
        end = start + size + (1 if index < extra else 0)
        groups.append((nodes[start], list(nodes[start + 1 : end])))
        start = end
    return groups


def subtree_budget(request: ExecRequest, count: int) -> float:
    """Seconds a head and the ``count - 1`` nodes under it get, once the head's turn comes."""
    return request.connect_timeout + request.command_timeout + 2 * RELAY_MARGIN * (_depth(count, request.fanout) + 1)


def _depth(count: int, fanout: int) -> int:
    depth = 0
    while fanout > 0 and count > fanout:
        count = -(-count // fanout) - 1
        depth += 1
    return depth


def run_level(request: ExecRequest, nodes: list[str], deadline: float, emit: Emit) -> None:
    """Run the request on ``nodes`` from here: directly, or through relays on the heads."""
    heads = plan_subtrees(nodes, request.fanout)
    if not heads:
        return
    workers = min(len(heads), max(1, request.window))
    pkey = load_private_key(request.auth.private_key)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tree") as pool:
        futures = [pool.submit(_run_head, request, pkey, head, rest, deadline, emit) for head, rest in heads]
        for future in futures:
            future.result()


def _run_head(
    request: ExecRequest, pkey: paramiko.PKey, head: str, rest: list[str], overall: float, emit: Emit
) -> None:
    """Run on ``head`` and, through a relay there, on ``rest``; if the head is unreachable, run on
    ``rest`` from here."""
    start = time.monotonic()
    deadline = min(overall, start + subtree_budget(request, 1 + len(rest)))
    try:
        session = SshSession(head, request.address(head), request.auth, pkey, _left(request, deadline))
    except KaschedError as error:
        emit(NodeResult(head, False, STEP, str(error), time.monotonic() - start), "")
        run_level(request, rest, overall, emit)
        return
    with session:
        if rest:
            _run_relay(request, session, rest, deadline, emit)
            return
        host_key = session.host_key_line()
        command_deadline = min(deadline, time.monotonic() + request.command_timeout)
        try:
            output = session.run(request.command, max(0.0, command_deadline - time.monotonic()))
        except KaschedError as error:
            emit(NodeResult(head, False, STEP, str(error), time.monotonic() - start), host_key)
            return
        emit(command_result(head, output, time.monotonic() - start), host_key)


def command_result(node: str, output: CommandOutput, duration: float) -> NodeResult:
    error = None if output.exit_status == 0 else f"{node}: command exited with status {output.exit_status}"
    return NodeResult(node, output.exit_status == 0, STEP, error, duration, output)


def _left(request: ExecRequest, deadline: float) -> float:
    return max(0.1, min(request.connect_timeout, deadline - time.monotonic()))


def _run_relay(request: ExecRequest, session: SshSession, rest: list[str], deadline: float, emit: Emit) -> None:
    """Start a relay on the head for [head] + rest and turn its JSON lines into results."""
    start = time.monotonic()
    expected = [session.node, *rest]
    seen: set[str] = set()
    host_key = session.host_key_line()
    remaining = deadline - time.monotonic() - RELAY_MARGIN
    reason = "relay did not report this node"
    try:
        channel = session.open_command(request.relay_command)
        channel.sendall((request.to_json(rest, session.node, remaining) + "\n").encode())
        channel.shutdown_write()
        reason = _read_relay_lines(channel, deadline, session.node, seen, emit, host_key)
    except (DriverTimeout, TimeoutError) as error:
        reason = f"relay timed out ({error or 'no answer before the deadline'})"
    except (DriverError, paramiko.SSHException, OSError, EOFError, ValueError) as error:
        reason = f"relay failed: {error}"
    for node in expected:
        if node not in seen:
            emit(NodeResult(node, False, STEP, f"{node}: {reason}", time.monotonic() - start), "")


def _read_relay_lines(
    channel: paramiko.Channel, deadline: float, head: str, seen: set[str], emit: Emit, head_key: str
) -> str:
    """Emit each result line as it comes; return why nodes that were not reported are missing."""
    stream = channel.makefile("rb")
    channel.settimeout(max(0.1, deadline - time.monotonic()))
    for raw in stream:
        message = json.loads(raw)
        result = result_from_message(message)
        seen.add(result.node)
        emit(result, head_key if result.node == head else message.get("host_key", ""))
        channel.settimeout(max(0.1, deadline - time.monotonic()))
    stderr = channel.makefile_stderr("rb").read().decode(errors="replace").strip()
    status = channel.recv_exit_status()
    tail = stderr.splitlines()[-1] if stderr else "no message"
    return f"relay on {head} exited with status {status} ({tail})"


def result_message(result: NodeResult, host_key: str) -> dict[str, Any]:
    message = result.as_dict()
    message["value"] = asdict(result.value) if isinstance(result.value, CommandOutput) else None
    message["duration"] = result.duration
    message["host_key"] = host_key
    return message


def result_from_message(message: dict[str, Any]) -> NodeResult:
    value = message.get("value")
    output = CommandOutput(**value) if isinstance(value, dict) else None
    return NodeResult(
        message["node"], bool(message["ok"]), STEP, message.get("error"), float(message["duration"]), output
    )


def _read_known_hosts(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""
    except OSError as error:
        raise DriverError(f"cannot read known hosts {path}: {error.strerror}") from error


def _record_host_keys(path: str, known: str, seen: list[str]) -> None:
    known_lines = set(known.splitlines())
    new = sorted({line for line in seen if line not in known_lines})
    if new:
        with open(path, "a", encoding="ascii") as handle:
            handle.write("".join(f"{line}\n" for line in new))
