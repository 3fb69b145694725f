"""The live view's broadcast rate: the bytes the server reads from the image reach the view as
transfer reports, between the step results; a real file is read through the counting reader."""

from __future__ import annotations

import io
from pathlib import Path

from kasched.cli.progress import ProgressView
from kasched.deploy.transfer import CountingReader, TransferMeter
from kasched.deploy.workflow import TransferReport
from kasched.messages import StepEvent
from kasched.models import utcnow


def report(node: str, step: str, ok: bool = True, error: str | None = None) -> StepEvent:
    return StepEvent(node, step, "v", 1, utcnow(), 0.1, ok, error)


def test_counting_reader_reports_every_byte_and_the_end(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"x" * (3 << 20))
    seen: list[tuple[int, float, bool]] = []
    meter = TransferMeter(lambda sent, elapsed, done: seen.append((sent, elapsed, done)), every=0.0)
    with image.open("rb") as handle:
        reader = CountingReader(handle, meter)
        while reader.read(1 << 20):
            pass
    assert [s[0] for s in seen] == [1 << 20, 2 << 20, 3 << 20, 3 << 20]
    assert [s[2] for s in seen] == [False, False, False, True] and all(s[1] >= 0 for s in seen)


def test_meter_reports_at_most_every_period_but_always_the_end() -> None:
    seen: list[int] = []
    meter = TransferMeter(lambda sent, elapsed, done: seen.append(sent), every=3600)
    for _ in range(100):
        meter.add(10)
    meter.add(0, final=True)
    assert seen == [10, 1000]  # the first read, then the end
    TransferMeter(None).add(5, final=True)  # no listener: nothing to tell, no error


def test_view_shows_the_sent_bytes_and_rate_of_the_broadcast() -> None:
    out = io.StringIO()
    view = ProgressView(2, out)
    view(report("n1", "setup"))
    view(report("n2", "setup"))
    view(TransferReport("broadcast", 8 << 20, 2.0))
    view(TransferReport("broadcast", 9 << 20, 2.1))  # within the period: no new line (not a terminal)
    view(TransferReport("broadcast", 64 << 20, 8.0, done=True))
    view(report("n1", "broadcast"))
    view(report("n2", "broadcast", ok=False, error="lost"))
    view(report("n1", "boot"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 7, lines
    assert "setup" in lines[1] and "ok 2/2" in lines[1] and "sent" not in lines[1]
    assert "broadcast" in lines[2] and "sent 8.0 MiB at 4.0 MiB/s" in lines[2] and "in progress 2" in lines[2]
    assert "sent 64.0 MiB at 8.0 MiB/s" in lines[3]
    assert "ok 1/2" in lines[4] and "sent 64.0 MiB" in lines[4]
    assert "failed 1" in lines[5] and lines[5].endswith("(n2: lost)")
    assert "boot" in lines[-1] and "sent" not in lines[-1]  # a new step has no stream


def test_a_failed_attempt_with_a_fallback_left_is_not_a_failure() -> None:
    """The kexec or nomini variant failing on a node is not the node failing: the next variant runs."""
    out = io.StringIO()
    view = ProgressView(1, out)
    view(StepEvent("n1", "setup", "nomini", 1, utcnow(), 0.1, False, "missing python3", final=False))
    view(StepEvent("n1", "setup", "pxe", 1, utcnow(), 5.0, True, None))
    lines = out.getvalue().splitlines()
    assert "failed 0" in lines[0] and "nomini did not work, trying the next way: missing python3" in lines[0]
    assert "ok 1/1" in lines[1] and "failed 0" in lines[1]
    view(StepEvent("n1", "boot", "pxe", 2, utcnow(), 5.0, False, "did not come back", final=True))
    assert "failed 1" in out.getvalue().splitlines()[-1]


def test_workflow_marks_only_the_last_chance_final() -> None:
    from kasched.deploy.workflow import MacroStep, Timeout, Variant, Workflow
    from kasched.results import GroupResult, NodeResult

    def fails(nodes: list[str], deadline: float, cancel: object) -> GroupResult:
        return GroupResult({n: NodeResult(n, False, "setup", "no") for n in nodes})

    seen: list[StepEvent] = []
    steps = [MacroStep("setup", (Variant("a", fails, Timeout(5, 0), retries=1), Variant("b", fails, Timeout(5, 0))))]
    Workflow(steps, listener=lambda r: seen.append(r) if isinstance(r, StepEvent) else None).run(["n1"])
    assert [(r.variant, r.attempt, r.final) for r in seen] == [("a", 1, False), ("a", 2, False), ("b", 1, True)]
