"""The front door both ways: the same calls through :class:`~kasched.local.LocalKasched` (in this
process, on the database) and :class:`~kasched.service.remote.RemoteKasched` (through a real kaschedd
on the same site) give the same answers, the same error kinds, and the same stream of events."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kasched.cli import main
from kasched.compose import open_local
from kasched.config import Config
from kasched.errors import InputError, KaschedError
from kasched.front import Event, KaschedFront, Started
from kasched.identity import Caller
from kasched.messages import StepEvent
from kasched.service import follow
from kasched.service.client import ServiceClient
from kasched.service.remote import RemoteKasched
from kasched.stats import StatsFilter
from tests.service.test_live_view import fake_deploy_steps
from tests.test_environments import env_yaml, make_image


@pytest.fixture
def fronts(service: tuple[Config, ServiceClient]) -> Iterator[tuple[KaschedFront, KaschedFront]]:
    """Root's front both ways on one site: in this process, and through kaschedd's socket."""
    config, client = service
    local: KaschedFront = open_local(config, Caller("root", is_admin=True))
    remote: KaschedFront = RemoteKasched(config, client)
    try:
        yield local, remote
    finally:
        local.close()


def error_kind(call: Callable[[KaschedFront], object], front: KaschedFront) -> type[KaschedError]:
    with pytest.raises(KaschedError) as raised:
        call(front)
    return type(raised.value)


def test_reads_and_refusals_are_the_same_both_ways(fronts: tuple[KaschedFront, KaschedFront], tmp_path: Path) -> None:
    local, remote = fronts
    make_image(tmp_path)
    local.add_environment(env_yaml(tmp_path, "tiny", "public"))
    remote.grant("root", "node-[1-2]", 1.0, job_id="both-ways")
    assert local.caller == remote.caller
    assert local.list_nodes("node-[1-3]") == remote.list_nodes("node-[1-3]")
    assert local.show_node("node-2") == remote.show_node("node-2")
    assert local.list_environments() == remote.list_environments() != []
    assert local.show_environment("tiny") == remote.show_environment("tiny")
    assert local.rights() == remote.rights() != []
    assert local.check(["node-1", "node-2"]) == remote.check(["node-1", "node-2"])
    assert local.stats(StatsFilter()) == remote.stats(StatsFilter())
    assert {a.name for a in local.scheduler_adapters()} == {a.name for a in remote.scheduler_adapters()}
    for call in (
        lambda front: front.show_node("node-99"),
        lambda front: front.status("no-such-operation"),
        lambda front: front.cancel("no-such-operation"),
        lambda front: front.console("node-1"),  # console_logs is not set
        lambda front: front.power(["node-1"], "sideways"),
        lambda front: front.reboot(["node-1"], to="no-such-environment"),
    ):
        assert error_kind(call, local) is error_kind(call, remote)
    with pytest.raises(KaschedError, match="beside the database"):
        remote.beside_database("runs beside the database")
    assert local.beside_database("unused").caller.user == "root"


def test_tokens_both_ways(fronts: tuple[KaschedFront, KaschedFront]) -> None:
    local, remote = fronts
    for issuer, revoker in ((local, remote), (remote, local)):
        issued = issuer.issue_token("root", 1.0)
        assert issued.user == "root" and issued.token and issued.expires > 0
        revoker.revoke_token(issued.id)


def test_a_deploy_gives_the_same_result_and_events_both_ways(
    fronts: tuple[KaschedFront, KaschedFront], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same deploy (node-1 falls back to PXE and succeeds, node-2 does not come back) run in this
    process and in kaschedd: the same outcome per node, the same step events, a Started event."""
    local, remote = fronts
    fake_deploy_steps(monkeypatch)
    monkeypatch.setattr(follow, "POLL", 0.05)
    make_image(tmp_path)
    local.add_environment(env_yaml(tmp_path, "tiny", "public"))
    local.grant("root", "node-[1-2]", 1.0)
    runs: dict[str, tuple[Any, list[Event]]] = {}
    for name, front in (("local", local), ("remote", remote)):
        events: list[Event] = []
        result = front.deploy("tiny", ["node-1", "node-2"], listener=events.append, stop=threading.Event())
        runs[name] = (result, events)
    (mine, my_events), (theirs, their_events) = runs["local"], runs["remote"]
    assert (mine.kind, mine.state, mine.succeeded, mine.failed) == (theirs.kind, theirs.state, theirs.succeeded, theirs.failed)
    assert (mine.ok, mine.succeeded, mine.failed) == (False, ["node-1"], ["node-2"])
    for node in ("node-1", "node-2"):
        a, b = mine.results[node], theirs.results[node]
        assert (a.ok, a.step, a.variant, a.error, a.fallbacks) == (b.ok, b.step, b.variant, b.error, b.fallbacks)
        assert set(a.durations) == set(b.durations)
    steps = [[(e.node, e.step, e.variant, e.ok, e.final) for e in run if isinstance(e, StepEvent)]
             for run in (my_events, their_events)]  # fmt: skip
    assert sorted(steps[0]) == sorted(steps[1]) != []
    started = [e for e in my_events if isinstance(e, Started)], [e for e in their_events if isinstance(e, Started)]
    assert [e.operation_id for e in started[0]] == [mine.deployment_id]
    assert [(e.operation_id, e.where) for e in started[1]] == [(theirs.deployment_id, "in kaschedd")]
    assert local.status(theirs.deployment_id) == remote.status(theirs.deployment_id)
    listed = [[op.id for op in front.operations(limit=10)] for front in (local, remote)]
    assert listed[0] == listed[1] and set(listed[0]) == {mine.deployment_id, theirs.deployment_id}
    assert local.operations(running=True) == remote.operations(running=True) == []
    other = open_local(local.api.config, Caller("kasched-bob", is_admin=False))  # type: ignore[attr-defined]
    try:
        assert other.operations(limit=10) == []  # an ordinary user lists only their own operations
    finally:
        other.close()
    for limit in (0, 10_001):  # one clear error, both ways
        assert error_kind(lambda front: front.operations(limit=limit), remote) is InputError  # noqa: B023


def test_the_cli_lists_the_same_operations_both_ways(
    fronts: tuple[KaschedFront, KaschedFront],
    service: tuple[Config, ServiceClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``kasched deploy --list`` in this process (KASCHED_DIRECT=1) and through kaschedd: the same
    operations, newest first; ``--running`` the running ones only (none once they ended)."""
    local, remote = fronts
    fake_deploy_steps(monkeypatch)
    monkeypatch.setattr(follow, "POLL", 0.05)
    make_image(tmp_path)
    local.add_environment(env_yaml(tmp_path, "tiny", "public"))
    local.grant("root", "node-[1-2]", 1.0)
    first = local.deploy("tiny", ["node-1"]).deployment_id
    second = remote.reboot(["node-2"], to="deploy").deployment_id
    config = service[0]
    config_file = tmp_path / "kasched.yaml"
    config_file.write_text(f"site: t\nstate_dir: {config.state_dir}\nadmin_group: kasched-test-admins\n")
    for name in ("KASCHED_URL", "KASCHED_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    listed = []
    for direct in ("1", "0"):
        monkeypatch.setenv("KASCHED_DIRECT", direct)
        capsys.readouterr()
        assert main(["--config", str(config_file), "deploy", "--list", "--json"]) == 0
        listed.append(
            [(d["id"], d["kind"], d["state"], sorted(d["nodes"])) for d in json.loads(capsys.readouterr().out)]
        )
        assert main(["--config", str(config_file), "deploy", "--list", "--running"]) == 0
        assert capsys.readouterr().out.split() == ["ID", "KIND", "USER", "STATE", "ENVIRONMENT", "STARTED", "NODES"]
    assert listed[0] == listed[1]
    assert [entry[:2] for entry in listed[0]] == [(second, "reboot"), (first, "deploy")]
