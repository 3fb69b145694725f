"""The CLI as a client of kaschedd: ordinary users, with no access to the database, get exactly the
rights their grants and the visibility of environments give them, and refusals with a reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kasched.config import Config
from kasched.service.client import ServiceClient
from tests.conftest import ROOT, write
from tests.test_cli import unix_user
from tests.test_environments import make_image


def kasched_as(user: str, config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    entry = unix_user(user)
    env = {
        "PATH": "/usr/bin:/bin",
        "KASCHED_CONFIG": str(config_file),
        "HOME": "/tmp",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
    }
    prefix = (
        [] if user == "root" else ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
    )
    return subprocess.run(
        [*prefix, sys.executable, "-m", "kasched", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture
def site(service: tuple[Config, ServiceClient]) -> tuple[Config, Path]:
    config, _ = service
    database = config.state_dir / "kasched.db"
    for path in config.state_dir.glob("kasched.db*"):
        path.chmod(0o600)  # only root (the service) may open the database
    assert database.exists()
    config_file = write(
        config.state_dir.parent / "kasched.yaml",
        f"site: t\nstate_dir: {config.state_dir}\nadmin_group: kasched-test-admins\n",
    )
    config_file.chmod(0o644)
    return config, config_file


def test_users_work_through_the_service_without_the_database(site: tuple[Config, Path]) -> None:
    config, config_file = site
    listed = kasched_as("kasched-alice", config_file, "nodes", "list", "-m", "node-[1-2]")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["node-1", "node-2"]
    direct = subprocess.run(
        [
            "setpriv",
            f"--reuid={unix_user('kasched-alice').pw_uid}",
            "--clear-groups",
            sys.executable,
            "-c",
            f"open('{config.state_dir / 'kasched.db'}')",
        ],
        capture_output=True,
        text=True,
    )
    assert direct.returncode != 0 and "Permission denied" in direct.stderr


def test_environments_through_the_service(site: tuple[Config, Path]) -> None:
    config, config_file = site
    work = config.state_dir.parent / "alice"
    work.mkdir()
    make_image(work)
    os.chown(work, unix_user("kasched-alice").pw_uid, -1)
    (work / "root.tar.gz").chmod(0o644)
    desc = write(work / "env.yaml", "name: mine\nvisibility: private\nimage: {file: root.tar.gz}\n")
    desc.chmod(0o644)
    added = kasched_as("kasched-alice", config_file, "env", "add", str(desc))
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("added mine@kasched-alice:1")
    hidden = kasched_as("kasched-bob", config_file, "env", "show", "mine@kasched-alice")
    assert hidden.returncode == 3 and "that you (kasched-bob) may use" in hidden.stderr
    public = write(work / "pub.yaml", "name: pub\nvisibility: public\nimage: {file: root.tar.gz}\n")
    public.chmod(0o644)
    refused = kasched_as("kasched-alice", config_file, "env", "add", str(public))
    assert refused.returncode == 5 and "only admins may make an environment public" in refused.stderr
    # An image bob cannot read himself: the service (root) must not read it for him.
    (work / "root.tar.gz").chmod(0o600)
    stolen = write(config.state_dir.parent / "bob.yaml", f"name: stolen\nimage: {{file: {work / 'root.tar.gz'}}}\n")
    stolen.chmod(0o644)
    theft = kasched_as("kasched-bob", config_file, "env", "add", str(stolen))
    assert theft.returncode == 5 and "you may not read" in theft.stderr


def test_operations_need_a_grant_through_the_service(site: tuple[Config, Path]) -> None:
    _, config_file = site
    for command in (
        ["deploy", "-e", "x", "-m", "node-1"],
        ["reboot", "-m", "node-1"],
        ["revert", "-m", "node-1"],
        ["power", "off", "-m", "node-1"],
    ):
        refused = kasched_as("kasched-alice", config_file, *command)
        assert refused.returncode == 5, (command, refused.stderr)
        assert "kasched-alice may not deploy these nodes: node-1: no active grant" in refused.stderr
    granted = kasched_as("root", config_file, "rights", "grant", "-u", "kasched-bob", "-m", "node-1")
    assert granted.returncode == 0, granted.stderr
    other = kasched_as("kasched-alice", config_file, "power", "status", "-m", "node-1")
    assert other.returncode == 5 and "node-1: granted to kasched-bob" in other.stderr
    check = kasched_as("kasched-bob", config_file, "rights", "check", "-m", "node-1")
    assert check.returncode == 0, check.stdout + check.stderr
