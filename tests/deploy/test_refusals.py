"""Operations refuse bad requests before they touch any node, with the reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kasched.api import Kasched
from kasched.deploy import records
from kasched.deploy.operations import Operations
from kasched.errors import ConfigError, ConflictError, InputError, IntegrityError, PermissionDenied
from kasched.models import NodeState
from tests.test_environments import env_yaml, make_image, tamper


@pytest.fixture
def with_env(cluster: Kasched, tmp_path: Path) -> Path:
    make_image(tmp_path)
    return Path(cluster.add_environment(env_yaml(tmp_path, "tiny", "public")).image_location)


def test_no_grant_no_deploy(cluster: Kasched, as_user: Callable[[str], Kasched], with_env: Path) -> None:
    alice = as_user("alice")
    with pytest.raises(PermissionDenied, match=r"alice may not deploy these nodes: node-\[1-2\]: no active grant"):
        Operations(alice).deploy("tiny", "node-[1-2]")
    cluster.grant("bob", "node-2", hours=1)
    with pytest.raises(PermissionDenied, match="node-2: granted to bob"):
        Operations(alice).deploy("tiny", "node-2")
    for action in (
        lambda ops: ops.revert("node-2"),
        lambda ops: ops.reboot("node-2"),
        lambda ops: ops.power("node-2", "off"),
    ):
        with pytest.raises(PermissionDenied):
            action(Operations(alice))
    assert cluster.show_node("node-2").state == "reference"


def test_changed_image_is_refused_before_any_reboot(
    cluster: Kasched, as_user: Callable[[str], Kasched], with_env: Path
) -> None:
    cluster.grant("alice", "node-1", hours=1)
    tamper(str(with_env))  # kaschedd's copy changed (the user's file is never read again)
    with pytest.raises(InputError, match="not an OpenSSH public key"):
        Operations(as_user("alice")).deploy("tiny", "node-1", user_key="hello")
    with pytest.raises(IntegrityError, match="has sha256"):
        Operations(as_user("alice")).deploy("tiny", "node-1")
    assert cluster.show_node("node-1").state == "reference"


def test_busy_node_is_refused(
    cluster: Kasched, as_user: Callable[[str], Kasched], with_env: Path, tmp_path: Path
) -> None:
    cluster.grant("alice", "node-[1-2]", hours=1)
    with cluster.database.session() as session:
        running = records.start(session, "deploy", "alice", "tiny@root:1", ["node-2"], NodeState.DEPLOYING)
    (tmp_path / "credentials.yaml").write_text(
        "lab-bmc: {user: admin, password: pw}\ndemo-bmc: {user: a, password: b}\n"
    )
    with pytest.raises(ConflictError, match=rf"node-2: busy \(deploying\) in {running}"):
        Operations(as_user("alice")).deploy("tiny", "node-[1-2]")
    assert cluster.show_node("node-1").state == "reference"


def test_missing_credentials_and_reference(cluster: Kasched, as_user: Callable[[str], Kasched], with_env: Path) -> None:
    cluster.grant("alice", "node-1", hours=1)
    with pytest.raises(ConfigError, match="node node-1: credentials 'demo-bmc' are not in"):
        Operations(as_user("alice")).deploy("tiny", "node-1")
    with pytest.raises(ConfigError, match="no reference environment"):
        Operations(as_user("alice")).revert("node-1")
    assert cluster.show_node("node-1").state == "reference"
