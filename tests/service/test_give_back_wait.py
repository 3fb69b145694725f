"""A user's deployment that finds its nodes still being given back after their previous job (the revert
of that job's end) waits for it, saying so, instead of failing; a node busy with any other operation
is refused at once; the wait is bounded by ``revert_wait``.

A real kaschedd (the ``service`` fixture, in this process) and the real ``kasched deploy`` command run
as a real ordinary Unix user through kaschedd's socket; the nodes' step bodies are stand-ins that take a
moment (no lab: see tests/service/test_grant_race.py), the give-back revert is a real operation record
that this test ends."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kasched.api import Kasched
from kasched.compose import open_site
from kasched.config import Config
from kasched.deploy import records
from kasched.identity import Caller
from kasched.imagestore import ImageStore
from kasched.models import NodeState
from kasched.service.client import ServiceClient
from tests.conftest import write
from tests.service.test_cli_through_service import kasched_as
from tests.service.test_grant_race import USER, race_site  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow
NODES = ["node-1", "node-2"]
GIVE_BACK_SECONDS = 4.0


def _user_config(config: Config, revert_wait: float) -> Path:
    path = write(config.state_dir.parent / f"user-{revert_wait:g}.yaml", f"site: t\nstate_dir: {config.state_dir}\n"
                 f"admin_group: kasched-test-admins\nrevert_wait: {revert_wait}\n")  # fmt: skip
    path.chmod(0o644)
    return path


def _take(admin: Kasched, nodes: list[str], *, gives_back: bool) -> str:
    with admin.database.session() as session:
        return records.start(
            session, "revert", "root", None, nodes, NodeState.REVERTING, is_admin=True, gives_back=gives_back
        )


def _release(admin: Kasched, operation: str, nodes: list[str]) -> None:
    with admin.database.session() as session:
        records.finish(session, operation, dict.fromkeys(nodes, NodeState.REFERENCE))


@pytest.fixture
def admin(race_site: tuple[Config, ServiceClient, Path]) -> Kasched:  # noqa: F811
    config, _, _ = race_site
    api = open_site(config, Caller("root", is_admin=True), load_entry_points=False)
    api.grant(USER, "node-[1-4]", 1.0)
    return api


def test_a_deploy_waits_for_its_nodes_given_back_after_the_previous_job(
    race_site: tuple[Config, ServiceClient, Path],  # noqa: F811
    admin: Kasched,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, _, _ = race_site
    checksums: list[str] = []
    verify = ImageStore.verify
    monkeypatch.setattr(ImageStore, "verify", lambda store, *a: checksums.append(a[0]) or verify(store, *a))
    back = _take(admin, NODES, gives_back=True)
    timer = threading.Timer(GIVE_BACK_SECONDS, _release, (admin, back, NODES))
    timer.start()
    started = time.monotonic()
    try:
        done = kasched_as(USER, _user_config(config, 60), "deploy", "-e", "big", "-m", "node-[1-2]")
    finally:
        timer.cancel()
    waited = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert f"node-[1-2]: still being given back after their previous job ({back}): waiting for it" in done.stderr
    assert waited >= GIVE_BACK_SECONDS
    assert "deploy " in done.stdout and "ok node-[1-2]" in done.stdout
    assert len(checksums) == 1, "the image is hashed once the nodes are free, not at every try while waiting"


def test_a_node_busy_otherwise_is_refused_at_once_and_the_wait_is_bounded(
    race_site: tuple[Config, ServiceClient, Path],  # noqa: F811
    admin: Kasched,
) -> None:
    config, _, _ = race_site
    _take(admin, ["node-1"], gives_back=True)
    other = _take(admin, ["node-3"], gives_back=False)
    started = time.monotonic()
    refused = kasched_as(USER, _user_config(config, 60), "deploy", "-e", "big", "-m", "node-1,node-3")
    assert refused.returncode == 4, refused.stderr
    assert "node-[1,3]: busy (reverting) in" in refused.stderr and f"{other} of root" in refused.stderr
    assert "waiting" not in refused.stderr
    assert time.monotonic() - started < 30  # at once: no wait of 60 s
    started = time.monotonic()
    bounded = kasched_as(USER, _user_config(config, 2), "deploy", "-e", "big", "-m", "node-1")
    assert bounded.returncode == 4, bounded.stderr
    assert "still being given back after their previous job" in bounded.stderr
    assert "waited for 2 s (revert_wait); try again later" in bounded.stderr
    assert time.monotonic() - started >= 2
