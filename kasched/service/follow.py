"""Following an operation kaschedd runs: poll its record, turn what happened since the last poll into
the front's events (:data:`kasched.front.Event`, the same stream the local front gives), ask for the
cancel when the caller stops, and rebuild the operation's result from its record at the end."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kasched.deploy.operations import OperationResult
from kasched.deploy.workflow import TransferReport
from kasched.errors import DatabaseError
from kasched.front import Listener, Waiting
from kasched.messages import StepEvent
from kasched.models import utcnow
from kasched.results import GroupResult, NodeResult

POLL = 1.0
RESTART_WAIT = 180.0  # how long a client waits for a kaschedd that stopped answering (a restart)

Call = Callable[..., Any]


def follow(call: Call, operation_id: str, listener: Listener, stop: threading.Event) -> dict[str, Any]:
    """Poll the operation's record until it ends, feeding ``listener``; ``stop`` set: ask kaschedd
    once to cancel it (it stops after its current step). The last record."""
    seen, asked = Seen(), False
    while True:
        shown = poll(call, operation_id, listener)
        feed(shown, listener, seen)
        if shown["state"] != "running":
            return shown
        if stop.is_set() and not asked:
            call("POST", f"/v1/deployments/{operation_id}/cancel")
            asked = True
        time.sleep(POLL)


def poll(call: Call, operation_id: str, listener: Listener) -> dict[str, Any]:
    """The operation's record. While kaschedd does not answer (it is restarting), keep asking for a
    while: after a crash, the restarted service marks the operation interrupted, and that is shown."""
    deadline, warned = time.monotonic() + RESTART_WAIT, False
    while True:
        try:
            shown: dict[str, Any] = call("GET", f"/v1/deployments/{operation_id}")
            return shown
        except DatabaseError as error:
            if time.monotonic() > deadline:
                raise
            if not warned:
                listener(Waiting(f"{error}; waiting for it to come back"))
                warned = True
            time.sleep(POLL)


@dataclass
class Seen:
    """What the listener was fed already, from the previous polls of the operation's record."""

    history: int = 0  # entries of the step history
    nodes: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # without a history: each node's last state
    steps: set[str] = field(default_factory=set)  # the steps shown
    transfer: dict[str, Any] | None = None
    step: str = ""  # the step of the last event fed


def feed(shown: dict[str, Any], listener: Listener, seen: Seen) -> None:
    """Feed the listener (the same events as without the service) what happened since the last poll:
    every attempt the operation's history recorded (``final`` false: the node had another retry or
    variant, so it did not fail; older services leave it out: final); without a history, each node's
    last finished step; then the image's broadcast progress, if it streams."""
    history = shown.get("steps") or []
    for entry in history[seen.history :]:
        step, _, variant = str(entry["step"]).partition("/")
        final = entry.get("final") is not False
        seen.steps.add(step)
        seen.step = step
        listener(StepEvent(entry["node"], step, variant, 0, utcnow(), entry["duration"], entry["ok"],
                            entry["error"], final))  # fmt: skip
    seen.history = len(history)
    if not history:
        _feed_nodes(shown, listener, seen)
    _feed_transfer(shown.get("transfer"), listener, seen)


def _feed_nodes(shown: dict[str, Any], listener: Listener, seen: Seen) -> None:
    for node, detail in shown["nodes"].items():
        state = (detail["step"], detail["error"], detail["ok"])
        if not detail["step"] or seen.nodes.get(node) == state:
            continue
        seen.nodes[node] = state
        seen.steps.add(detail["step"])
        seen.step = detail["step"]
        ok = detail["error"] is None if detail["ok"] is None else bool(detail["ok"])
        listener(StepEvent(node, detail["step"], "", 0, utcnow(), detail["duration"] or 0.0, ok, detail["error"]))


def _feed_transfer(transfer: dict[str, Any] | None, listener: Listener, seen: Seen) -> None:
    """The service's latest report of the image's stream (not stored: ``transfer``), once per change.
    A stream of a step the listener has left is not fed again (a poll may see the service's report of
    it just before the service forgets it)."""
    if not transfer or transfer == seen.transfer:
        return
    seen.transfer = transfer
    step = str(transfer["step"])
    if step != seen.step and step in seen.steps:
        return
    seen.steps.add(step)
    seen.step = step
    listener(TransferReport(step, int(transfer["sent"]), float(transfer["elapsed"]), bool(transfer["done"])))


def result(shown: dict[str, Any]) -> OperationResult:
    """The operation's result as the local front gives it, from its record: each node's last step
    and outcome, and from its history the variant that ran last, the time spent in each step and
    every failed attempt (``step/variant: error``)."""
    results: dict[str, NodeResult] = {}
    for node, detail in shown["nodes"].items():
        results[node] = NodeResult(node, bool(detail["ok"]), str(detail["step"] or ""), detail["error"])
    for entry in shown.get("steps") or []:
        outcome = results.get(entry["node"]) or results.setdefault(entry["node"], NodeResult(entry["node"], False))
        step, _, variant = str(entry["step"]).partition("/")
        outcome.variant = variant
        outcome.durations[step] = outcome.durations.get(step, 0.0) + float(entry["duration"] or 0.0)
        if not entry["ok"]:
            outcome.fallbacks.append(f"{step}/{variant}: {entry['error']}")
    for node, detail in shown["nodes"].items():  # a node without a history: its record's duration
        outcome = results[node]
        if not outcome.durations and detail["duration"]:
            outcome.durations[outcome.step] = float(detail["duration"])
        outcome.duration = sum(outcome.durations.values())
    return OperationResult(shown["id"], shown["kind"], shown["state"], GroupResult(results))
