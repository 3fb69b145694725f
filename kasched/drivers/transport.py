"""The transport contracts a site may swap: how commands reach the nodes' own systems (an *exec
method*) and how an image reaches their disks (a *broadcast method*).

The built-in ones are SSH: the tree exec (:mod:`kasched.transports.tree`, named ``tree``) and the chain
broadcast (:func:`kasched.transports.chain_ssh.broadcast_over_ssh`, named ``chain``), used when the site's
``exec_method`` and ``broadcast_method`` keep their defaults. Plugins add others through the hooks
``kasched_exec_methods`` and ``kasched_broadcast_methods`` (the simulated hardware kind,
:mod:`kasched.simulated`, does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, BinaryIO, Protocol

from kasched.drivers.base import NodeTarget, PowerDriver
from kasched.results import GroupResult, NodeResult
from kasched.transports.chain import BroadcastOptions, ChainNode
from kasched.transports.ssh_session import SshAuth

BUILTIN_EXEC = "tree"
BUILTIN_BROADCAST = "chain"


class ExecMethod(ABC):
    """Runs shell commands as root on nodes; each node's result carries a
    :class:`~kasched.transports.ssh_session.CommandOutput` (or an error when the node was not reached)."""

    name: str = ""

    @abstractmethod
    def run(
        self, nodes: Sequence[str], command: str, timeout: float, pins: Mapping[str, str] | None
    ) -> GroupResult:
        """``command`` on every node; ``pins``: node -> the host key it must answer with (None: any)."""

    @abstractmethod
    def feed(self, node: str, command: str, data: Iterable[bytes], timeout: float, pin: str) -> NodeResult:
        """``command`` on one node with ``data`` on its stdin, the node answering with key ``pin``."""

    @abstractmethod
    def wait_up(self, node: NodeTarget, timeout: float, expect_down: bool) -> bool:
        """Whether the node's system went down (when ``expect_down``) and answers again within
        ``timeout`` (the check a reboot waits on)."""

    @abstractmethod
    def soft_power(self) -> PowerDriver:
        """The soft level of a reboot: the node's own system asked to reboot through this method."""


class BroadcastMethod(Protocol):
    """Sends one image to nodes (in a chain, ordered as given), each checking its sha256; one result
    per node. The signature of :func:`kasched.transports.chain_ssh.broadcast_over_ssh`."""

    def __call__(
        self,
        source: BinaryIO,
        nodes: Sequence[ChainNode],
        sink: dict[str, Any],
        ssh_addresses: Mapping[str, str],
        auth: SshAuth,
        *,
        expected_sha256: str | None = ...,
        options: BroadcastOptions | None = ...,
        prepare: Callable[[str], str] | None = ...,
        prepare_timeout: float = ...,
    ) -> GroupResult: ...
