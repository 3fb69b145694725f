"""The deployment workflow as an explicit state machine (Kadeploy's model).

A workflow is an ordered list of macro-steps (set up the deployment system, broadcast the image, boot
the new environment...). Each macro-step is an ordered list of variants (PXE reboot, then kexec...),
each with a timeout that may grow with the node count, and a number of retries. Nodes move through the
steps together; a node that fails a variant is retried, then falls to the next variant; a node that
fails every variant of a step leaves the workflow as failed, with the step and the reason. The others
go on. Every node ends with a :class:`~kasched.results.NodeResult` (the last step it reached, the variant
that ran, every failed attempt, how long): data, never an exception that loses the others.

Before each attempt (each variant, each retry, each macro-step) the workflow asks its *guard* whether
it may go on (an operation's guard: is its grant still active?); a reason to stop cancels the rest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kasched.errors import KaschedError
from kasched.messages import StepEvent
from kasched.models import utcnow
from kasched.results import GroupResult, NodeResult

CANCELLED = "cancelled"
FINISHED = "finished"  # a NodeResult value: the node is done, ok, and skips the steps after this one
GRACE = 5.0  # seconds an action may overrun its deadline before its nodes are declared timed out


@dataclass(frozen=True)
class Timeout:
    """``base + per_node * n`` seconds for a variant run on ``n`` nodes (at most ``ceiling``)."""

    base: float
    per_node: float = 0.0
    ceiling: float = 3600.0

    def for_nodes(self, count: int) -> float:
        return min(self.ceiling, self.base + self.per_node * count)


# An action runs a variant on nodes and returns one result per node. It must honour ``deadline``
# (a time.monotonic() value) and ``cancel``; a node it leaves out of its result is taken as failed.
Action = Callable[[Sequence[str], float, threading.Event], GroupResult]


@dataclass(frozen=True)
class Variant:
    name: str
    action: Action
    timeout: Timeout
    retries: int = 0


@dataclass(frozen=True)
class MacroStep:
    name: str
    variants: tuple[Variant, ...]


@dataclass(frozen=True)
class TransferReport:
    """How much of the image the server has sent in a step so far, for the live view's rate."""

    step: str
    sent: int  # bytes
    elapsed: float  # seconds since the step's stream started
    done: bool = False  # a stream ended (every image byte was read)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0


Listener = Callable[[StepEvent], None]
AttemptListener = Callable[[list[StepEvent]], None]  # every node's report of one attempt, at once
ProgressListener = Callable[[StepEvent | TransferReport], None]
Guard = Callable[[], str | None]  # why the workflow must stop now, or None


class Workflow:
    """Runs macro-steps over nodes; see the module docstring."""

    def __init__(
        self,
        steps: Sequence[MacroStep],
        *,
        listener: Listener | None = None,
        cancel: threading.Event | None = None,
        guard: Guard | None = None,
        on_attempt: AttemptListener | None = None,
    ) -> None:
        if not steps or any(not step.variants for step in steps):
            raise ValueError("a workflow needs steps, each with at least one variant")
        self.steps = list(steps)
        self.listener = listener or (lambda report: None)
        self.cancel = cancel or threading.Event()
        self.guard = guard or (lambda: None)
        self.on_attempt = on_attempt or (lambda reports: None)
        self.stopped: str = CANCELLED  # the error of the nodes a cancel stopped
        self.finished: set[str] = set()  # nodes done before the last step (an action said FINISHED)

    def run(self, nodes: Sequence[str]) -> GroupResult:
        outcomes = GroupResult({node: NodeResult(node, False) for node in nodes})
        alive = list(nodes)
        self.finished = set()
        for step in self.steps:
            if not alive:
                break
            alive = [node for node in self._run_step(step, alive, outcomes) if node not in self.finished]
        for node in [*alive, *self.finished]:
            outcomes[node].ok = True
        return outcomes

    def _run_step(self, step: MacroStep, nodes: list[str], outcomes: GroupResult) -> list[str]:
        pending: list[str] = list(nodes)
        done: list[str] = []
        for node in nodes:
            outcomes[node].step = step.name
        for variant in step.variants:
            for attempt in range(1, variant.retries + 2):
                if not pending:
                    break
                if self._must_stop():
                    self._fail(pending, outcomes, self.stopped)
                    pending = []
                    break
                last = variant is step.variants[-1] and attempt == variant.retries + 1
                succeeded = set(self._attempt(step, variant, attempt, pending, outcomes, last))
                done.extend(succeeded)
                pending = [node for node in pending if node not in succeeded]
        # Nodes still pending failed every variant (their outcome holds the last error). The others go
        # on in the order they came in.
        finished = set(done)
        return [node for node in nodes if node in finished]

    def _attempt(
        self,
        step: MacroStep,
        variant: Variant,
        attempt: int,
        nodes: list[str],
        outcomes: GroupResult,
        last: bool = True,
    ) -> list[str]:
        started_at, start = utcnow(), time.monotonic()
        budget = variant.timeout.for_nodes(len(nodes))
        results = _run_with_deadline(variant.action, nodes, start + budget, self.cancel)
        elapsed = time.monotonic() - start
        succeeded = []
        reports = []
        for node in nodes:
            result = results.get(node) or NodeResult(node, False, step.name, f"timeout after {budget:.0f}s")
            outcome = outcomes[node]
            outcome.variant = variant.name
            spent = result.duration or elapsed
            outcome.durations[step.name] = outcome.durations.get(step.name, 0.0) + spent
            outcome.duration += spent
            outcome.error = None if result.ok else result.error
            if not result.ok:
                outcome.fallbacks.append(f"{step.name}/{variant.name}: {result.error}")
            if result.ok:
                succeeded.append(node)
                if result.value == FINISHED:
                    self.finished.add(node)
            report = StepEvent(
                node, step.name, variant.name, attempt, started_at, result.duration or elapsed, result.ok, result.error,
                last,
            )  # fmt: skip
            reports.append(report)
            self.listener(report)
        self.on_attempt(reports)
        return succeeded

    def _must_stop(self) -> bool:
        """Cancelled, or the guard gives a reason to stop (which cancels the rest of the workflow)."""
        if self.cancel.is_set():
            return True
        try:
            reason = self.guard()
        except KaschedError:  # the database is away for a moment: the next attempt asks again
            return False
        if reason is None:
            return False
        self.stopped = f"{CANCELLED}: {reason}"
        self.cancel.set()
        return True

    @staticmethod
    def _fail(nodes: list[str], outcomes: GroupResult, reason: str) -> None:
        for node in nodes:
            outcomes[node].error = reason


def _run_with_deadline(action: Action, nodes: list[str], deadline: float, cancel: threading.Event) -> GroupResult:
    """Run ``action`` in a thread; past its deadline (plus a grace) its missing nodes are timed out."""
    box: dict[str, GroupResult] = {}
    failure: list[str] = []

    def target() -> None:
        try:
            box["result"] = action(list(nodes), deadline, cancel)
        except KaschedError as error:
            failure.append(str(error))
        except Exception as error:  # a bug in a step must not lose the other nodes' state
            failure.append(f"internal error: {type(error).__name__}: {error}")

    thread = threading.Thread(target=target, name="kasched-step", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()) + GRACE)
    if failure:
        group = GroupResult()
        for node in nodes:
            group.add(NodeResult(node, False, error=failure[0]))
        return group
    return box.get("result", GroupResult())
