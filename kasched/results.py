"""Per-node results as data (after Fabric's ``GroupResult``): an operation on many nodes never stops
at the first failure; each node gets a :class:`NodeResult` saying ok or failed, why, and how long."""

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
    value: Any = None  # what the operation returned (a power state, an exit code...)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "ok": self.ok,
            "step": self.step,
            "error": self.error,
            "duration": round(self.duration, 3),
            "value": self.value,
        }


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


def run_on_node(node: str, step: str, action: Callable[[], Any]) -> NodeResult:
    """Run ``action`` for ``node``; a :class:`KaschedError` becomes a failed result, timed either way."""
    start = time.monotonic()
    try:
        value = action()
    except KaschedError as error:
        return NodeResult(node, False, step, str(error), time.monotonic() - start)
    return NodeResult(node, True, step, None, time.monotonic() - start, value)
