"""Start chain agents on nodes over SSH, shipping the agent itself: ``python3 - --listen ...`` with
the source of :mod:`kasched.engine.chain_agent` sent on stdin, so nodes need only python3. Then
broadcast to the agents that started; the others are failed results."""

from __future__ import annotations

import shlex
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import paramiko

from kasched.engine import chain_agent
from kasched.engine.chain import STEP, BroadcastOptions, ChainNode, broadcast
from kasched.engine.ssh_session import SshAuth, SshSession, load_private_key
from kasched.errors import DriverError, KaschedError
from kasched.results import GroupResult, NodeResult

AGENT_SOURCE = Path(chain_agent.__file__).read_bytes()
AGENT_FLAGS = "-I -S"  # isolated, no site: the standard library only; 1.32x less CPU to start (bench/agent_start.py)


@dataclass
class AgentLaunch:
    """Agents running over open SSH sessions; close() waits for them and ends the sessions."""

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
    connect_timeout: float = 10.0,
    window: int = 32,
) -> AgentLaunch:
    """Start one agent per node, listening on the node's ``address``; wait until each says ready."""
    launch = AgentLaunch()
    pkey = load_private_key(auth.private_key)

    def start(node: ChainNode) -> tuple[ChainNode, Any]:
        try:
            return node, _start_one(node, ssh_addresses.get(node.name, node.name), auth, pkey, python,
                                    accept_timeout, connect_timeout)  # fmt: skip
        except KaschedError as error:
            return node, NodeResult(node.name, False, STEP, str(error))

    with ThreadPoolExecutor(max_workers=max(1, min(window, len(nodes)))) as pool:
        for node, outcome in pool.map(start, nodes):
            if isinstance(outcome, NodeResult):
                launch.failed[node.name] = outcome
            else:
                launch.ready.append(ChainNode(node.name, outcome[2], node.switch, node.rack))
                launch.sessions.append(outcome[:2])
    return launch


def _start_one(
    node: ChainNode, ssh_address: str, auth: SshAuth, pkey: paramiko.PKey, python: str,
    accept_timeout: float, timeout: float,
) -> tuple[SshSession, paramiko.Channel, str]:  # fmt: skip
    session = SshSession(node.name, ssh_address, auth, pkey, timeout)
    command = (
        f"{shlex.quote(python)} {AGENT_FLAGS} - --listen {shlex.quote(node.address)} --name {shlex.quote(node.name)}"
        f" --accept-timeout {accept_timeout:g}"
    )
    try:
        channel = session.open_command(command)
        channel.sendall(AGENT_SOURCE)
        channel.shutdown_write()
        channel.settimeout(timeout)
        line = channel.makefile("rb").readline().decode(errors="replace").split()
        if len(line) != 2 or line[0] != "ready":
            error = channel.makefile_stderr("rb").read().decode(errors="replace").strip()
            raise DriverError(f"chain agent did not start: {error[-300:] or 'no message'}", node=node.name)
    except (OSError, paramiko.SSHException, EOFError) as error:
        session.close()
        raise DriverError(f"chain agent did not start: {error}", node=node.name) from error
    except KaschedError:
        session.close()
        raise
    return session, channel, line[1]


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
) -> GroupResult:
    """Start the agents over SSH, broadcast to those that started, stop them; one result per node."""
    with start_agents(nodes, ssh_addresses, auth, python=python) as launch:
        sent = broadcast(source, launch.ready, sink, expected_sha256=expected_sha256, options=options)
        launch.close(failed=set(sent.failed))
    group = GroupResult()
    for node in nodes:
        group.add(launch.failed.get(node.name) or sent[node.name])
    return group
