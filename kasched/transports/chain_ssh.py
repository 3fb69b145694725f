"""Start chain agents on nodes over SSH, shipping the agent itself: ``python3 - --listen ...`` with
the source of :mod:`kasched.transports.chain_agent` sent on stdin, so nodes need only python3. Then
broadcast to the agents that started; the others are failed results. The program sent holds the
broadcast's key (:func:`agent_program`): it reaches each node only over that node's SSH session (with
pinned host keys, the genuine node), and every chain connection proves it (``chain_wire.connect_as``).

A node may have to be prepared before it receives (its partition made and mounted): ``prepare`` gives
each node a shell command that runs in the same SSH session, while its agent starts. The agent's start
(the interpreter's, mostly) and the preparation overlap, and the node costs one SSH session instead of
two. A node whose preparation fails has its agent stopped before the broadcast and a failed result
with the command's exit status and last line on stderr.

Where the agents listen on known ports, the stream need not wait for the last agent (``overlap``):
:func:`broadcast_over_ssh` then starts them in chain order and sends at once, each node waiting for
a successor still starting (``BroadcastOptions.start_wait``) and asking the server whether that
start failed. Off by default: on the lab, where every node shares the host's CPUs, the nodes already
streaming slowed the later starts by more than the overlap hid (docs/benchmarks.md, "Broadcast")."""

from __future__ import annotations

import os
import shlex
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import paramiko

from kasched.errors import DriverError, KaschedError
from kasched.results import GroupResult, NodeResult
from kasched.transports import chain_agent, chain_wire
from kasched.transports.chain import STEP, BroadcastOptions, ChainNode, broadcast, check_options, order_chain
from kasched.transports.chain_wire import KEY_BYTES, STARTING, split_address
from kasched.transports.ssh_session import SshAuth, SshSession, load_private_key

BUNDLE_BEGIN, BUNDLE_END = "# bundle: begin", "# bundle: end"


def bundled_agent_source() -> bytes:
    """The agent as one program: :mod:`~kasched.transports.chain_wire`'s source, then
    :mod:`~kasched.transports.chain_agent`'s without its import of chain_wire (between its ``# bundle:``
    lines) and its ``from __future__`` line (chain_wire's, first in the program, holds for all)."""
    wire = Path(chain_wire.__file__).read_text()
    agent = Path(chain_agent.__file__).read_text()
    head, begin, rest = agent.partition(BUNDLE_BEGIN)
    _, end, tail = rest.partition(BUNDLE_END)
    if not (begin and end):
        raise RuntimeError(f"{chain_agent.__file__}: no {BUNDLE_BEGIN!r} ... {BUNDLE_END!r} lines")
    agent = (head + tail.partition("\n")[2]).replace("from __future__ import annotations\n", "", 1)
    return f"{wire}\n\n# --- {Path(chain_agent.__file__).name} ---\n\n{agent}".encode()


AGENT_SOURCE = bundled_agent_source()
KEY_LINE = b'\nBROADCAST_KEY = ""\n'  # chain_agent's, where agent_program() writes the key


def agent_program(key: bytes) -> bytes:
    """The program shipped to a node: :data:`AGENT_SOURCE` with the broadcast's ``key`` written in
    (``chain_agent.BROADCAST_KEY``). Sent on the SSH session's stdin, it is seen by the node's sshd
    and python3 only, not on any command line."""
    if AGENT_SOURCE.count(KEY_LINE) != 1:
        raise RuntimeError(f"{chain_agent.__file__}: not one {KEY_LINE.strip().decode()!r} line")
    return AGENT_SOURCE.replace(KEY_LINE, f'\nBROADCAST_KEY = "{key.hex()}"\n'.encode())


def new_key() -> bytes:
    """A broadcast's key: random, one per broadcast."""
    return os.urandom(KEY_BYTES)


AGENT_FLAGS = "-I -S"  # isolated, no site: the standard library only; 1.32x less CPU to start (bench/agent_start.py)
PREPARE_FAILED = 3  # the session's exit status when the preparation failed (the agent was stopped)
PREPARE_KILL_AFTER = 5.0  # seconds a timed-out preparation has to end on SIGTERM before SIGKILL
TIMED_OUT = "124"  # coreutils timeout's exit status when the command ran out of time
CONNECT_TIMEOUT = 10.0  # seconds for a node's SSH connection, and again for its agent to say ready
START_SLACK = 5.0  # seconds a node waiting for a successor's start allows beyond the launcher's own timeouts


@dataclass
class AgentLaunch:
    """Agents running over open SSH sessions, holding ``key``; close() waits for them and ends the
    sessions."""

    key: bytes
    ready: list[ChainNode] = field(default_factory=list)
    failed: dict[str, NodeResult] = field(default_factory=dict)
    sessions: list[tuple[SshSession, paramiko.Channel]] = field(default_factory=list)

    def close(self, timeout: float = 10.0, failed: Collection[str] = ()) -> None:
        """Wait (bounded) for the agents to exit, then end the sessions; agents of ``failed`` nodes
        (dead, unplugged: their channel may never close) are not waited for."""
        deadline = time.monotonic() + timeout
        for session, channel in self.sessions:
            while session.node not in failed and not channel.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            channel.close()
            session.close()
        self.sessions.clear()

    def __enter__(self) -> AgentLaunch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_agents(
    nodes: Sequence[ChainNode],
    ssh_addresses: Mapping[str, str],
    auth: SshAuth,
    *,
    python: str = "python3",
    accept_timeout: float = 120.0,
    connect_timeout: float = CONNECT_TIMEOUT,
    window: int = 32,
    prepare: Callable[[str], str] | None = None,
    prepare_timeout: float = 600.0,
    agent_after: bool = False,
    on_started: Callable[[str, str], None] | None = None,
    key: bytes | None = None,
) -> AgentLaunch:
    """Start one agent per node, listening on the node's ``address``, in the order of ``nodes`` (at
    most ``window`` at once); wait until each says ready (and, with ``prepare``, until the command
    ``prepare(node name)`` has succeeded on it: run meanwhile, or first with ``agent_after``).
    ``on_started(node, state)`` hears of each node as soon as it is done: ``"ready"``, or why not.
    The agents hold ``key`` (None: a new one), the launch's ``key``: broadcast to them with it."""
    launch = AgentLaunch(key or new_key())
    program = agent_program(launch.key)
    pkey = load_private_key(auth.private_key)

    def start(node: ChainNode) -> tuple[ChainNode, Any]:
        preparation = prepare(node.name) if prepare else None
        command = session_command(node, python, accept_timeout, preparation, prepare_timeout, agent_after)
        outcome: Any
        try:
            outcome = _start_one(node, ssh_addresses.get(node.name, node.name), auth, pkey, command, program,
                                 connect_timeout, prepare_timeout if prepare else None)  # fmt: skip
        except KaschedError as error:
            outcome = NodeResult(node.name, False, STEP, str(error))
        if on_started is not None:
            on_started(node.name, str(outcome.error) if isinstance(outcome, NodeResult) else "ready")
        return node, outcome

    with ThreadPoolExecutor(max_workers=max(1, min(window, len(nodes)))) as pool:
        for node, outcome in pool.map(start, nodes):
            if isinstance(outcome, NodeResult):
                launch.failed[node.name] = outcome
            else:
                launch.ready.append(ChainNode(node.name, outcome[2], node.switch, node.rack))
                launch.sessions.append(outcome[:2])
    return launch


def session_command(
    node: ChainNode, python: str, accept_timeout: float, prepare: str | None = None, prepare_timeout: float = 600.0,
    agent_after: bool = False,
) -> str:  # fmt: skip
    """The command an SSH session runs: the agent reading its source on stdin; with ``prepare``, a
    shell that starts the agent in the background (on the session's stdin, saved as fd 3: a background
    command's stdin is /dev/null otherwise), runs the preparation (ended by the node itself after
    ``prepare_timeout`` seconds) with its output on stderr, says ``prepared STATUS`` on stdout, and
    stops the agent if the preparation failed: nothing is left listening on the node. With
    ``agent_after``, the agent starts only once the preparation has succeeded: where the stream may
    come as soon as the agent listens, nothing is written before the partition is ready."""
    agent = (
        f"{shlex.quote(python)} {AGENT_FLAGS} - --listen {shlex.quote(node.address)} --name {shlex.quote(node.name)}"
        f" --accept-timeout {accept_timeout:g}"
    )
    if prepare is None:
        return agent
    run_prepare = (
        f"timeout -k {PREPARE_KILL_AFTER:g} {prepare_timeout:g} sh -c {shlex.quote(prepare)} </dev/null >&2; "
        "status=$?; echo prepared $status\n"
    )
    if agent_after:
        return f"{run_prepare}if [ $status -ne 0 ]; then exit {PREPARE_FAILED}; fi; exec {agent}"
    return (
        f"exec 3<&0; {agent} <&3 3<&- & agent=$!; exec 3<&-\n{run_prepare}"
        f"if [ $status -ne 0 ]; then kill $agent 2>/dev/null; wait $agent; exit {PREPARE_FAILED}; fi; wait $agent"
    )


def _start_one(
    node: ChainNode, ssh_address: str, auth: SshAuth, pkey: paramiko.PKey, command: str, program: bytes,
    timeout: float, prepare_timeout: float | None,
) -> tuple[SshSession, paramiko.Channel, str]:  # fmt: skip
    """Open the session, ship the agent (``program``), read its ``ready HOST:PORT`` within ``timeout`` seconds (and,
    when the command prepares the node, ``prepared 0`` within the preparation's time too)."""
    session = SshSession(node.name, ssh_address, auth, pkey, timeout)
    preparing = prepare_timeout is not None
    said: dict[str, str] = {}
    try:
        channel = session.open_command(command)
        channel.sendall(program)
        channel.shutdown_write()
        channel.settimeout(timeout + (prepare_timeout + PREPARE_KILL_AFTER if prepare_timeout is not None else 0.0))
        _read_said(channel.makefile("rb"), preparing, said)
        if said.get("prepared") == TIMED_OUT:
            raise DriverError(f"preparation timed out after {prepare_timeout:g} s", node=node.name)
        if said.get("prepared", "0") != "0":
            raise DriverError(f"preparation failed: exit {said['prepared']}: {_last_error(channel)}", node=node.name)
        if "ready" not in said:
            raise DriverError(f"chain agent did not start: {_last_error(channel)}", node=node.name)
    except (OSError, paramiko.SSHException, EOFError) as error:
        session.close()
        what = "preparation did not finish" if preparing and "prepared" not in said else "chain agent did not start"
        raise DriverError(f"{what}: {error or type(error).__name__}", node=node.name) from error
    except KaschedError:
        session.close()
        raise
    return session, channel, said["ready"]


def _read_said(stdout: Any, preparing: bool, said: dict[str, str]) -> None:
    """``ready`` and ``prepared`` from the session's first lines into ``said``, until both are in, or
    the agent or the preparation gave up (EOF, a failed preparation)."""
    while "ready" not in said or (preparing and "prepared" not in said):
        words = stdout.readline().decode(errors="replace").split()
        if not words:
            break
        if len(words) == 2 and words[0] in ("ready", "prepared"):
            said[words[0]] = words[1]
        if said.get("prepared", "0") != "0":
            break


def _last_error(channel: paramiko.Channel) -> str:
    """The last line the session wrote on stderr (it has ended, or is ending)."""
    lines = channel.makefile_stderr("rb").read().decode(errors="replace").strip().splitlines()
    return lines[-1][-300:] if lines else "no message"


class StartStates:
    """How each node's agent start goes, for a broadcast that streams while the agents start:
    ``STARTING``, then ``"ready"`` or why it failed. Written by the launcher's threads, read by the
    broadcast's (the server's own forwarder, and its answers to nodes waiting for a successor)."""

    def __init__(self, nodes: Iterable[str]) -> None:
        self.lock = threading.Lock()
        self.states = dict.fromkeys(nodes, STARTING)

    def set(self, node: str, state: str) -> None:
        with self.lock:
            self.states[node] = state

    def fail_starting(self, why: str) -> None:
        """Every start not done yet failed (the launcher itself did)."""
        with self.lock:
            for node, state in self.states.items():
                if state == STARTING:
                    self.states[node] = why

    def get(self, node: str) -> str | None:
        with self.lock:
            return self.states.get(node, "not a node of this broadcast")


def broadcast_over_ssh(
    source: str | Path | BinaryIO,
    nodes: Sequence[ChainNode],
    sink: dict[str, Any],
    ssh_addresses: Mapping[str, str],
    auth: SshAuth,
    *,
    expected_sha256: str | None = None,
    options: BroadcastOptions | None = None,
    python: str = "python3",
    prepare: Callable[[str], str] | None = None,
    prepare_timeout: float = 600.0,
    overlap: bool = False,
    window: int = 32,
) -> GroupResult:
    """Start the agents over SSH (preparing each node, with ``prepare``), broadcast to those that
    started, stop them; one result per node. The stream leaves once every agent is ready; with
    ``overlap``, where every agent listens on a known port (not 0), while they still start
    (:func:`stream_while_starting`; measured slower on the lab, see the module's docstring)."""
    options = options or BroadcastOptions()
    check_options(options)  # before anything starts on the nodes

    def launcher(chain: Sequence[ChainNode], **extra: Any) -> AgentLaunch:
        return start_agents(chain, ssh_addresses, auth, python=python, window=window, prepare=prepare,
                            prepare_timeout=prepare_timeout, **extra)  # fmt: skip

    if overlap and all(split_address(node.address)[1] for node in nodes):
        wait = 2 * CONNECT_TIMEOUT + (prepare_timeout + PREPARE_KILL_AFTER if prepare else 0.0) + START_SLACK
        waiting = replace(options, start_wait=max(options.start_wait, wait))
        launch, sent = stream_while_starting(
            source, nodes, sink, launcher, expected_sha256=expected_sha256, options=waiting
        )
    else:
        with launcher(nodes) as launch:
            sent = broadcast(source, launch.ready, sink, key=launch.key, expected_sha256=expected_sha256,
                             options=options)  # fmt: skip
            launch.close(failed=set(sent.failed))
    group = GroupResult()
    for node in nodes:
        group.add(launch.failed.get(node.name) or sent[node.name])
    return group


def stream_while_starting(
    source: str | Path | BinaryIO,
    nodes: Sequence[ChainNode],
    sink: dict[str, Any],
    launcher: Callable[..., AgentLaunch],
    *,
    expected_sha256: str | None,
    options: BroadcastOptions,
) -> tuple[AgentLaunch, GroupResult]:
    """Start the agents in chain order (``launcher(chain, agent_after=..., on_started=...)``, in a
    thread) and broadcast at once: each node, and the server, waits for a successor still starting
    (``options.start_wait``) and bypasses one as soon as the server knows its start failed. A
    preparation runs before its node's agent listens. The agents are stopped before this returns."""
    chain = order_chain(nodes)
    states = StartStates(node.name for node in chain)
    key = new_key()

    def launch_all() -> AgentLaunch:
        try:
            return launcher(chain, agent_after=True, on_started=states.set, key=key)
        except BaseException as error:  # then no start will say anything more: nobody waits for one
            states.fail_starting(str(error) or type(error).__name__)
            raise

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="chain-start") as pool:
        starting = pool.submit(launch_all)
        sent: GroupResult | None = None
        try:
            sent = broadcast(source, chain, sink, key=key, expected_sha256=expected_sha256, options=options,
                             start_state=states.get)  # fmt: skip
        finally:
            launch = starting.result()
            launch.close(failed=set(sent.failed) if sent is not None else {node.name for node in chain})
    return launch, sent
