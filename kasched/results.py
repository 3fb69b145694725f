"""Per-node results as data (after Fabric's ``GroupResult``): an operation on many nodes never stops
at the first failure; each node gets a :class:`NodeResult` saying ok or failed, why, and how long.
:class:`NodeResult` is kasched's one per-node result type (a transport's, a driver's, a step's and a
whole operation's); :meth:`GroupResult.grouped` folds nodes with identical outcomes into node sets, as
ClusterShell's ``clubak -b`` folds identical output."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kasched.errors import KaschedError


@dataclass
class NodeResult:
    """The outcome of one operation on one node."""

    node: str
    ok: bool
    step: str = ""
    error: str | None = None
    duration: float = 0.0
    value: Any = None  # what the operation returned (a power state, a CommandOutput, a ChainReport...)
    variant: str = ""  # the variant of ``step`` that ran last (an operation's workflow)
    fallbacks: list[str] = field(default_factory=list)  # "step/variant: error" of each failed attempt
    durations: dict[str, float] = field(default_factory=dict)  # seconds in each step (``duration``: all)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "ok": self.ok,
            "step": self.step,
            "error": self.error,
            "duration": round(self.duration, 3),
            "value": self.value,
            "variant": self.variant,
            "fallbacks": list(self.fallbacks),
            "durations": {step: round(seconds, 3) for step, seconds in self.durations.items()},
        }

    @property
    def outcome(self) -> tuple[bool, str, str | None]:
        """What nodes must share to be folded together: ok or not, the step, the error."""
        return self.ok, self.step, self.error


@dataclass(frozen=True)
class NodeGroup:
    """Nodes with the same outcome, folded (``node-[1-4,7]``)."""

    nodes: str
    count: int
    ok: bool
    step: str
    error: str | None


@dataclass
class GroupResult(Mapping[str, NodeResult]):
    """Results by node name, in the order the nodes were given."""

    results: dict[str, NodeResult] = field(default_factory=dict)

    def __getitem__(self, node: str) -> NodeResult:
        return self.results[node]

    def __iter__(self) -> Iterator[str]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def add(self, result: NodeResult) -> None:
        self.results[result.node] = result

    @property
    def succeeded(self) -> list[str]:
        return [name for name, result in self.results.items() if result.ok]

    @property
    def failed(self) -> list[str]:
        return [name for name, result in self.results.items() if not result.ok]

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results.values())

    def grouped(self) -> list[NodeGroup]:
        """One entry per distinct outcome (ok, step, error), its nodes folded, in the order each outcome
        first appears: 10,000 nodes that failed the same way are one line."""
        from kasched.nodeset import fold

        by_outcome: dict[tuple[bool, str, str | None], list[str]] = {}
        for result in self.results.values():
            by_outcome.setdefault(result.outcome, []).append(result.node)
        return [NodeGroup(fold(names), len(names), *outcome) for outcome, names in by_outcome.items()]


def run_on_node(node: str, step: str, action: Callable[[], Any]) -> NodeResult:
    """Run ``action`` for ``node``; a :class:`KaschedError` becomes a failed result, timed either way."""
    start = time.monotonic()
    try:
        value = action()
    except KaschedError as error:
        return NodeResult(node, False, step, str(error), time.monotonic() - start)
    return NodeResult(node, True, step, None, time.monotonic() - start, value)
