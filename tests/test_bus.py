"""The plugin bus: every hook documented and typed, built-ins are plugins, entry points load."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

from kasched import hookspecs
from kasched.api import Kasched
from kasched.bus import Bus
from kasched.compose import open_site
from kasched.hookspecs import hookimpl
from kasched.messages import JobEnd, JobInfo, Notification
from kasched.views import GrantView

REPO = Path(__file__).resolve().parents[1]
SPECS = [getattr(hookspecs, name) for name in dir(hookspecs) if name.startswith("kasched_")]


def test_every_hook_is_prefixed_documented_and_typed() -> None:
    assert len(SPECS) >= 9
    for spec in SPECS:
        doc = inspect.getdoc(spec) or ""
        assert doc, f"{spec.__name__} has no docstring"
        assert "Return" in doc, f"{spec.__name__}: the docstring must say what a return value means"
        signature = inspect.signature(spec)
        assert signature.return_annotation is not inspect.Signature.empty, spec.__name__
        for parameter in signature.parameters.values():
            assert parameter.annotation is not inspect.Parameter.empty, f"{spec.__name__}({parameter.name})"
    # Every hook has a typed front method on the Bus.
    front = {name for name, _ in inspect.getmembers(Bus, inspect.isfunction)}
    for spec in SPECS:
        short = spec.__name__.removeprefix("kasched_")
        assert short in front, f"Bus has no method for {spec.__name__}"


def test_every_hook_is_called() -> None:
    """A documented hook that kasched never calls is a promise to plugin authors that nothing keeps:
    each front method of the Bus is called from kasched or a scheduler plugin."""
    sources = [
        path.read_text()
        for root in (REPO / "kasched", REPO / "plugins")
        for path in root.rglob("*.py")
        if path.name not in ("bus.py", "hookspecs.py")
    ]
    for spec in SPECS:
        short = spec.__name__.removeprefix("kasched_")
        assert any(f"bus.{short}(" in source for source in sources), f"nothing calls Bus.{short} ({spec.__name__})"


def test_builtins_are_plugins(sqlite_config: Any) -> None:
    api = open_site(sqlite_config, load_entry_points=False)
    try:
        assert {"grant-keeper", "history", "journal"} <= set(api.bus.plugin_names())
    finally:
        api.close()


class Recorder:
    """A third-party plugin that watches grants."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    @hookimpl
    def kasched_grant_created(self, grant: GrantView) -> None:
        self.seen.append(("created", grant.id, ""))

    @hookimpl
    def kasched_grant_revoked(self, grant: GrantView, reason: str) -> None:
        self.seen.append(("revoked", grant.id, reason))

    @hookimpl
    def kasched_notify(self, notification: Notification) -> None:
        self.seen.append(("notify", 0, notification.subject))


def test_plugins_hear_grant_events_once(cluster: Kasched) -> None:
    recorder = Recorder()
    cluster.bus.register(recorder, "recorder")
    grant = cluster.record_job_start(JobInfo("oar", "c", "1", "alice", ("node-1",), walltime=60))
    cluster.record_job_start(JobInfo("oar", "c", "1", "alice", ("node-1",), walltime=60))  # prolog run twice
    cluster.record_job_end(JobEnd("oar", "c", "1", reason="cancelled"))
    cluster.record_job_end(JobEnd("oar", "c", "1", reason="cancelled"))
    cluster.bus.notify(Notification("hello", "world"))
    # once each (the job's end also tells that it gives node-1 back: every node of a job goes back)
    grant_events = [event for event in recorder.seen if event[0] != "notify"]
    assert grant_events == [("created", grant.id, ""), ("revoked", grant.id, "cancelled")]
    notes = [event[2] for event in recorder.seen if event[0] == "notify"]
    assert notes[-1] == "hello" and all(note.startswith("job oar:c:1 ended") for note in notes[:-1])


def test_disabled_plugin_is_not_loaded(sqlite_config: Any) -> None:
    from dataclasses import replace

    api = open_site(replace(sqlite_config, disabled_plugins=("journal",)), load_entry_points=False)
    try:
        assert "journal" not in api.bus.plugin_names()
    finally:
        api.close()


def test_scheduler_plugins_register_through_entry_points() -> None:
    # Needs the package installed (scripts/setup.sh does `pip install -e .`): entry points are metadata.
    code = "from kasched.bus import Bus; print(' '.join(Bus().plugin_names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {"slurm", "oar", "pbs"} <= set(out), out
    adapters = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kasched.bus import Bus; print(' '.join(a.name for a in Bus().scheduler_adapters()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert set(adapters) == {"slurm", "oar", "pbs"}
