"""Running commands on a deployment's nodes, and telling which system a node runs.

The command runner is the transports' tree exec (direct or through relays): the steps see one function
that runs a command on nodes and returns per-node results, whichever way it travels.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kasched.drivers.transport import ExecMethod
from kasched.errors import KaschedError
from kasched.results import GroupResult, NodeResult
from kasched.transports import tree
from kasched.transports.ssh_session import (
    CommandOutput,
    HostKeyPolicy,
    SshAuth,
    SshSession,
    known_host_name,
    load_private_key,
    split_address,
)

# Which system a node booted, from the node side: the kernel command line says kasched.system=...
# (the lab's simulated firmware records its command line in /run/kasched/cmdline).
SYSTEM_PROBE = "cat /run/kasched/cmdline 2>/dev/null || cat /proc/cmdline"


NO_PIN = "no host key: kasched gave this node's running system none (it does not vouch for it)"


@dataclass
class NodeShell:
    """Runs shell commands as root on nodes, authenticated with the service's key, each node's host
    key pinned: the key kaschedd gave the system the node booted (:mod:`kasched.bootkeys`). A node
    without a pinned key is not contacted, unless the caller says ``trust_any`` (a system kasched
    does not vouch for, to which it sends nothing that matters: a reboot token, a probe)."""

    key_file: Path
    addresses: Mapping[str, str]  # node name -> IP address
    fanout: int = 0
    window: int = 32
    connect_timeout: float = 10.0
    pins: dict[str, str] = field(default_factory=dict)  # node name -> "ssh-ed25519 AAAA..."
    method: ExecMethod | None = None  # another exec method than SSH (the site's exec_method), if any

    def known_hosts(self, nodes: Sequence[str]) -> str:
        """The pinned keys of ``nodes`` as ``known_hosts`` lines (by address)."""
        lines = []
        for node in nodes:
            if node in self.pins:
                host, port = split_address(self.addresses.get(node, node))
                lines.append(f"{known_host_name(host, port)} {self.pins[node]}")
        return "\n".join(lines)

    def auth(self, nodes: Sequence[str]) -> SshAuth:
        """How to log in to ``nodes``, their pinned keys required."""
        return SshAuth.from_key_file("root", str(self.key_file), HostKeyPolicy.STRICT, self.known_hosts(nodes))

    def run(self, nodes: Sequence[str], command: str, timeout: float, *, trust_any: bool = False) -> GroupResult:
        """The same command on every node."""
        pinned = list(nodes) if trust_any else [node for node in nodes if node in self.pins]
        if self.method is not None:
            pins = None if trust_any else {node: self.pins[node] for node in pinned}
            return self._each_node(nodes, self.method.run(pinned, command, timeout, pins))
        group = tree.run(
            pinned,
            command,
            key_file=str(self.key_file),
            addresses=self.addresses,
            fanout=self.fanout,
            window=self.window,
            connect_timeout=self.connect_timeout,
            command_timeout=timeout,
            host_key_policy=HostKeyPolicy.ACCEPT if trust_any else HostKeyPolicy.STRICT,
            known_hosts="" if trust_any else self.known_hosts(pinned),
        )
        return self._each_node(nodes, group)

    @staticmethod
    def _each_node(nodes: Sequence[str], group: GroupResult) -> GroupResult:
        results = GroupResult()
        for node in nodes:
            results.add(group[node] if node in group else NodeResult(node, False, tree.STEP, NO_PIN))
        return results

    def run_each(
        self, nodes: Sequence[str], command_for: Callable[[str], str], timeout: float, *, trust_any: bool = False
    ) -> GroupResult:
        """A command of its own on each node (hostname, agent name...), at most ``window`` at once."""
        group = GroupResult()
        if not nodes:
            return group
        with ThreadPoolExecutor(max_workers=min(self.window, len(nodes))) as pool:
            futures = {
                node: pool.submit(self.run, [node], command_for(node), timeout, trust_any=trust_any) for node in nodes
            }
        for node, future in futures.items():
            group.add(future.result()[node])
        return group

    def push(self, nodes: Sequence[str], files: Mapping[str, bytes], directory: str, timeout: float) -> GroupResult:
        """Write ``files`` (name -> content) into ``directory`` on each node over SSH (``mkdir -p``,
        then one ``cat >`` per file on one connection), at most ``window`` nodes at once. A node's
        result is its last command's, as for :meth:`run`."""

        if self.method is not None:
            method = self.method
            commands = {name: f"mkdir -p {shlex.quote(directory)} && cat > {shlex.quote(f'{directory}/{name}')}"
                        for name in files}  # fmt: skip

            def push_method(node: str) -> NodeResult:
                result = NodeResult(node, True, tree.STEP)
                for name, content in files.items():
                    result = method.feed(node, commands[name], [content], timeout, self.pins[node])
                    if not result.ok:
                        break
                return result

            return self._per_node(nodes, push_method)

        def push_one(node: str, session: SshSession) -> CommandOutput:
            output = CommandOutput("", "", 0)
            for name, content in files.items():
                target = shlex.quote(f"{directory}/{name}")
                output = session.run(f"mkdir -p {shlex.quote(directory)} && cat > {target}", timeout, content)
                if output.exit_status != 0:
                    break
            return output

        return self._per_session(nodes, push_one)

    def feed(
        self, nodes: Sequence[str], command_for: Callable[[str], str],
        data_for: Callable[[str], Iterable[bytes]], timeout: float,
    ) -> GroupResult:  # fmt: skip
        """A command of its own on each node with its own data streamed on its stdin (one SSH session
        per node, at most ``window`` at once). A node's result is its command's, as for :meth:`run`."""
        deadline = time.monotonic() + timeout
        if self.method is not None:
            method = self.method
            return self._per_node(
                nodes, lambda node: method.feed(node, command_for(node), data_for(node), timeout, self.pins[node])
            )
        return self._per_session(
            nodes, lambda node, session: session.stream(command_for(node), deadline, data_for(node))
        )

    def _per_session(self, nodes: Sequence[str], work: Callable[[str, SshSession], CommandOutput]) -> GroupResult:
        """``work`` on one SSH session per node (pinned; a node without a pinned key is not contacted),
        at most ``window`` nodes at once; each node's result is its last command's."""
        auth = self.auth(nodes)
        pkey = load_private_key(auth.private_key)

        def one(node: str) -> NodeResult:
            started = time.monotonic()
            if node not in self.pins:
                return NodeResult(node, False, tree.STEP, NO_PIN)
            try:
                with SshSession(node, self.addresses[node], auth, pkey, self.connect_timeout) as session:
                    output = work(node, session)
            except KaschedError as error:
                return NodeResult(node, False, tree.STEP, str(error), time.monotonic() - started)
            return tree.command_result(node, output, time.monotonic() - started)

        return self._per_node(nodes, one)

    def _per_node(self, nodes: Sequence[str], one: Callable[[str], NodeResult]) -> GroupResult:
        """``one(node)`` for each node, at most ``window`` at once; a node without a pinned key is not
        contacted."""

        def pinned(node: str) -> NodeResult:
            return one(node) if node in self.pins else NodeResult(node, False, tree.STEP, NO_PIN)

        group = GroupResult()
        if nodes:
            with ThreadPoolExecutor(max_workers=min(self.window, len(nodes))) as pool:
                for result in pool.map(pinned, nodes):
                    group.add(result)
        return group


def checked(results: GroupResult, what: str) -> GroupResult:
    """Name what failed in each failed result, with the last line the command wrote on stderr."""
    group = GroupResult()
    for node, result in results.items():
        if not result.ok:
            output = result.value
            if isinstance(output, CommandOutput):
                lines = output.stderr.strip().splitlines()
                detail = f"exit {output.exit_status}: {lines[-1] if lines else 'no message'}"
            else:
                detail = result.error or "failed"
            result = NodeResult(node, False, result.step, f"{what}: {detail}", result.duration, output)
        group.add(result)
    return group


def stdout_of(result: NodeResult) -> str:
    output = result.value
    return output.stdout if isinstance(output, CommandOutput) else ""
