"""The live view of an operation run by kaschedd is the in-process one: a failed attempt with another
variant left is shown as such (not as a failure), and the image's broadcast rate reaches the client.

No lab: the service runs in this process (the ``service`` fixture), so the step bodies of
kasched.deploy.steps are replaced by stand-ins that answer at once; everything around them (the
workflow, the history, the service's routes, the CLI following the operation) is the real code."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from kasched.cli import main
from kasched.cli.progress import ProgressView
from kasched.config import Config
from kasched.deploy import kexec, steps
from kasched.results import GroupResult, NodeResult
from kasched.service import follow
from kasched.service.client import ServiceClient
from kasched.service.live import TransferBoard
from tests.conftest import write
from tests.test_environments import env_yaml, make_image

MIB = 1 << 20
Step = Callable[[Any, Sequence[str], float, threading.Event], GroupResult]


def results(names: Sequence[str], failing: dict[str, str] | None = None) -> GroupResult:
    failing = failing or {}
    return GroupResult({n: NodeResult(n, n not in failing, "", failing.get(n), 0.01) for n in names})


def stand_in(failing: dict[str, str] | None = None, before: Callable[[Any], None] | None = None) -> Step:
    def step(ctx: Any, names: Sequence[str], deadline: float, cancel: threading.Event) -> GroupResult:
        if before is not None:
            before(ctx)
        return results(names, failing)

    return step


def fake_deploy_steps(monkeypatch: pytest.MonkeyPatch, broadcast: Step | None = None) -> None:
    """node-1 has no python3 (nomini fails, PXE follows); node-2 has no kexec-tools (kexec fails, PXE
    follows) and then does not come back (the last variant fails: a failure)."""
    monkeypatch.setattr(steps, "use_running_reference", stand_in({"node-1": "missing python3"}))
    monkeypatch.setattr(steps, "setup_deploy_system", lambda levels: stand_in())
    monkeypatch.setattr(steps, "broadcast_chain", broadcast or stand_in())
    monkeypatch.setattr(steps, "configure", stand_in())
    monkeypatch.setattr(kexec, "setup_deploy_system_kexec", stand_in({"node-1": "no kexec-tools"}))
    monkeypatch.setattr(kexec, "boot_environment_kexec", stand_in({"node-2": "no kexec-tools"}))
    monkeypatch.setattr(steps, "boot_environment", lambda levels: stand_in({"node-2": "did not come back"}))


def deploy_through_service(
    service: tuple[Config, ServiceClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str, dict[str, Any]]:
    """``kasched deploy`` of node-[1-2] as root through kaschedd's socket: exit code, stderr, the record."""
    config, root = service
    make_image(tmp_path)
    environment = env_yaml(tmp_path, "tiny", "public")
    root.call("POST", "/v1/environments", body={"path": str(environment), "text": environment.read_text()})
    root.call("POST", "/v1/rights", body={"user": "root", "nodes": "node-[1-2]", "hours": 1})
    config_file = write(
        tmp_path / "kasched.yaml", f"site: t\nstate_dir: {config.state_dir}\nadmin_group: kasched-test-admins\n"
    )
    for name in ("KASCHED_DIRECT", "KASCHED_URL", "KASCHED_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(follow, "POLL", 0.05)
    capsys.readouterr()
    code = main(["--config", str(config_file), "deploy", "-e", "tiny", "-m", "node-[1-2]"])
    err = capsys.readouterr().err
    operation_id = next(line.split()[1] for line in err.splitlines() if "started in kaschedd" in line)
    return code, err, root.call("GET", f"/v1/deployments/{operation_id}")


def test_a_failed_attempt_with_a_variant_left_is_not_a_failure_through_the_service(
    service: tuple[Config, ServiceClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_deploy_steps(monkeypatch)
    code, err, shown = deploy_through_service(service, tmp_path, monkeypatch, capsys)
    assert code == 1 and shown["state"] == "partial"
    history = {(s["node"], s["step"]): (s["ok"], s["final"]) for s in shown["steps"]}
    assert history[("node-1", "setup/nomini")] == (False, False)
    assert history[("node-1", "setup/kexec")] == (False, False)
    assert history[("node-2", "boot/kexec")] == (False, False)
    assert history[("node-2", "boot/pxe")] == (False, True)
    lines = err.splitlines()
    nomini = next(line for line in lines if "(node-1:" in line)
    assert "nomini did not work, trying the next way: missing python3" in nomini and "failed 0" in nomini
    kexec = next(line for line in lines if "(node-2: kexec" in line)
    assert "kexec did not work, trying the next way: no kexec-tools" in kexec and "failed 0" in kexec
    boot = next(line for line in lines if "(node-2: did not come back)" in line)
    assert "failed 1" in boot


def test_the_broadcast_rate_reaches_the_client_through_the_service(
    service: tuple[Config, ServiceClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The stand-in broadcast reports 8 MiB sent in 2 s the way the real step's meter does (the
    context's ``on_transfer``), then waits until the service has answered a poll with it."""
    answered = threading.Event()
    latest = TransferBoard.latest

    def watched(board: TransferBoard, deployment_id: str) -> dict[str, Any] | None:
        found = latest(board, deployment_id)
        if found is not None:
            answered.set()
        return found

    def stream(ctx: Any) -> None:
        ctx.on_transfer(8 * MIB, 2.0, False)
        assert answered.wait(10), "no poll of the client was answered with the transfer"

    monkeypatch.setattr(TransferBoard, "latest", watched)
    fake_deploy_steps(monkeypatch, broadcast=stand_in(before=stream))
    code, err, shown = deploy_through_service(service, tmp_path, monkeypatch, capsys)
    assert code == 1 and shown["transfer"] is None  # not kept once the operation ended
    rate = [line for line in err.splitlines() if "sent " in line]
    assert rate and "broadcast" in rate[0] and "sent 8.0 MiB at 4.0 MiB/s" in rate[0], err


def test_old_answers_and_stale_transfers() -> None:
    """An answer without ``final`` (an older service) shows a failed attempt as a failure; a transfer
    of a step the view has left is not shown again."""
    out = io.StringIO()
    view, seen = ProgressView(1, out), follow.Seen()
    entry = {"node": "n1", "step": "setup/nomini", "ok": False, "error": "no", "duration": 0.1}
    transfer = {"step": "broadcast", "sent": 4 * MIB, "elapsed": 1.0, "done": True, "rate": 4 * MIB}
    follow.feed({"steps": [entry], "nodes": {}, "transfer": None}, view, seen)
    assert "failed 1" in out.getvalue().splitlines()[-1]
    follow.feed({"steps": [entry], "nodes": {}, "transfer": transfer}, view, seen)
    assert "sent 4.0 MiB at 4.0 MiB/s" in out.getvalue().splitlines()[-1]
    boot = {"node": "n1", "step": "boot/pxe", "ok": True, "error": None, "duration": 0.1}
    changed = {**transfer, "sent": 5 * MIB}
    follow.feed({"steps": [entry, boot], "nodes": {}, "transfer": changed}, view, seen)
    assert view.step == "boot" and "sent" not in out.getvalue().splitlines()[-1]
