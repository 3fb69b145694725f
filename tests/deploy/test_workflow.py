"""The workflow state machine: retries, fallbacks to the next variant, timeouts, cancel, per-node data.

The actions here are plain functions standing for steps; the state machine is what is under test.
The real steps (PXE, IPMI, chain broadcast) are tested on the lab.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from kasched.deploy.workflow import MacroStep, Timeout, Variant, Workflow
from kasched.errors import DriverError
from kasched.messages import StepEvent
from kasched.results import GroupResult, NodeResult

NODES = [f"n{i}" for i in range(1, 7)]


def action(
    fail: dict[str, int] | None = None,
    *,
    record: list[tuple[str, ...]] | None = None,
    sleep: float = 0.0,
    error: str = "boom",
):  # type: ignore[no-untyped-def]
    """An action failing each node of ``fail`` that many times before it succeeds."""
    remaining = dict(fail or {})

    def run(nodes: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
        if record is not None:
            record.append(tuple(nodes))
        time.sleep(sleep)
        group = GroupResult()
        for node in nodes:
            if remaining.get(node, 0) > 0:
                remaining[node] -= 1
                group.add(NodeResult(node, False, error=error, duration=0.01))
            else:
                group.add(NodeResult(node, True, duration=0.01))
        return group

    return run


def test_all_nodes_pass_every_step() -> None:
    reports: list[StepEvent] = []
    workflow = Workflow(
        [
            MacroStep("setup", (Variant("pxe", action(), Timeout(5)),)),
            MacroStep("boot", (Variant("pxe", action(), Timeout(5)),)),
        ],
        listener=reports.append,
    )
    outcomes = workflow.run(NODES)
    assert all(o.ok and o.step == "boot" and o.error is None for o in outcomes.values())
    assert len(reports) == 12 and set(outcomes["n1"].durations) == {"setup", "boot"}


def test_retry_then_fallback_then_failure_keeps_the_others() -> None:
    calls: list[tuple[str, ...]] = []
    kexec_calls: list[tuple[str, ...]] = []
    setup = MacroStep(
        "setup",
        (
            Variant("pxe", action({"n2": 1, "n3": 5, "n4": 5}, record=calls), Timeout(5), retries=1),
            Variant("kexec", action({"n4": 5}, record=kexec_calls, error="kexec failed"), Timeout(5)),
        ),
    )
    boot_calls: list[tuple[str, ...]] = []
    boot = MacroStep("boot", (Variant("pxe", action(record=boot_calls), Timeout(5)),))
    outcomes = Workflow([setup, boot]).run(NODES)
    assert calls == [tuple(NODES), ("n2", "n3", "n4")]  # one retry of the failed ones only
    assert kexec_calls == [("n3", "n4")]  # then the next variant
    assert boot_calls == [("n1", "n2", "n3", "n5", "n6")]  # the failed node does not go on; order kept
    assert outcomes["n3"].ok and outcomes["n3"].variant == "pxe"  # boot's variant
    assert not outcomes["n4"].ok
    assert (outcomes["n4"].step, outcomes["n4"].variant, outcomes["n4"].error) == ("setup", "kexec", "kexec failed")


def test_a_step_past_its_deadline_times_out_its_nodes() -> None:
    slow = MacroStep("broadcast", (Variant("chain", action(sleep=3), Timeout(base=0.2)),))
    start = time.monotonic()
    from kasched.deploy import workflow as module

    old, module.GRACE = module.GRACE, 0.3
    try:
        outcomes = Workflow([slow]).run(["a", "b"])
    finally:
        module.GRACE = old
    assert time.monotonic() - start < 2.5
    assert [o.error for o in outcomes.values()] == ["timeout after 0s", "timeout after 0s"]


def test_timeout_grows_with_node_count() -> None:
    assert Timeout(base=60, per_node=2).for_nodes(10) == 80
    assert Timeout(base=60, per_node=2, ceiling=100).for_nodes(1000) == 100


def test_an_exception_in_an_action_fails_its_nodes_only() -> None:
    def broken(nodes: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
        raise DriverError("BMC unreachable", node=nodes[0])

    steps = [MacroStep("setup", (Variant("ipmi", broken, Timeout(5)), Variant("ssh", action(), Timeout(5))))]
    outcomes = Workflow(steps).run(["a", "b"])
    assert all(o.ok and o.variant == "ssh" for o in outcomes.values())


def test_cancel_stops_before_the_next_step() -> None:
    cancel = threading.Event()

    def setup(nodes: Sequence[str], deadline: float, event: threading.Event) -> GroupResult:
        cancel.set()  # Ctrl-C arrives during the first step
        return action()(nodes, deadline, event)

    boot_calls: list[tuple[str, ...]] = []
    steps = [
        MacroStep("setup", (Variant("pxe", setup, Timeout(5)),)),
        MacroStep("boot", (Variant("pxe", action(record=boot_calls), Timeout(5)),)),
    ]
    outcomes = Workflow(steps, cancel=cancel).run(["a", "b"])
    assert boot_calls == []
    assert all(not o.ok and o.step == "boot" and o.error == "cancelled" for o in outcomes.values())


def test_the_guard_is_asked_before_each_attempt_and_stops_the_rest() -> None:
    """An operation's guard (is its grant still active?) says stop after the first step: the next
    attempt (a retry, a variant or a macro-step) never runs; the nodes say why."""
    ran: list[tuple[str, ...]] = []
    asked: list[int] = []

    def guard() -> str | None:
        asked.append(len(ran))
        return "the grant of job slurm:c:1 ended" if ran else None

    workflow = Workflow(
        [
            MacroStep("setup", (Variant("a", action(record=ran), Timeout(5)),)),
            MacroStep("boot", (Variant("b", action(record=ran), Timeout(5)),)),
        ],
        guard=guard,
    )
    outcomes = workflow.run(["n1", "n2"])
    assert ran == [("n1", "n2")], "the boot step did not run"
    assert asked == [0, 1]
    assert {o.error for o in outcomes.values()} == {"cancelled: the grant of job slurm:c:1 ended"}
    assert not any(o.ok for o in outcomes.values()) and workflow.cancel.is_set()
