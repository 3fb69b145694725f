"""The small findings of issue 18 (audit F10, F11, F13): the database private whatever the umask and
``config check`` saying so, ``stats`` showing an ordinary user only their own operations, the client
keeping tokens off plain http and out of files others can read, and an over-long ``env=`` in a Slurm
comment. A real kaschedd; users run the CLI as ordinary Unix users."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kasched_slurm.plugin import SlurmAdapter

from kasched.compose import open_site
from kasched.errors import AuthenticationError
from kasched.identity import Caller
from kasched.models import utcnow
from kasched.service.client import ServiceClient, TokenAuth, read_token_file
from tests.conftest import write
from tests.service.tcpsite import Site, free_port, kasched_as, kaschedd, scratch
from tests.test_cli import unix_user
from tests.test_stats import event

KASCHED = Path(sys.executable).parent / "kasched"


@pytest.fixture
def site() -> Iterator[Site]:
    base = scratch()
    try:
        with kaschedd(base, {}) as running:
            yield running
    finally:
        shutil.rmtree(base, ignore_errors=True)


def modes(state: Path) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in state.glob("kasched.db*") if path.is_file()}


def test_database_files_are_mode_600_under_umask_022(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    config_file = write(tmp_path / "kasched.yaml", f"site: t\nstate_dir: {tmp_path / 'state'}\n")
    script = (
        "import os, sys; os.umask(0o022); from kasched.compose import open_site; from kasched.config import load; "
        "api = open_site(load(sys.argv[1]), load_entry_points=False); api.rights(); "
        "print(sorted(os.listdir(sys.argv[2])))"
    )  # the database open, with its -wal and -shm, when the modes are read
    opened = subprocess.run(
        [sys.executable, "-c", f"{script}; import json; print(json.dumps({{p: oct(os.stat(os.path.join(sys.argv[2], p)).st_mode & 0o777) for p in os.listdir(sys.argv[2]) if p.startswith('kasched.db')}}))",
         str(config_file), str(tmp_path / "state")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = json.loads(opened.stdout.splitlines()[-1])
    assert {"kasched.db", "kasched.db-wal", "kasched.db-shm"} <= found.keys(), found
    assert set(found.values()) == {"0o600"}, found
    checked = subprocess.run(
        ["sh", "-c", f"umask 022 && {KASCHED} config check"], capture_output=True, text=True,
        env={**os.environ, "KASCHED_CONFIG": str(config_file), "KASCHED_DIRECT": "1"},
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert set(modes(tmp_path / "state").values()) == {0o600}


def test_config_check_flags_a_database_others_may_read(site: Site) -> None:
    database = site.config.state_dir / "kasched.db"
    database.chmod(0o644)
    checked = kasched_as("root", site.client_config, "config", "check")
    assert checked.returncode != 0
    assert f"problem: database: {database} is readable by others (chmod 600 it" in checked.stdout, checked.stdout


def test_an_ordinary_users_stats_show_only_their_own(site: Site) -> None:
    admin = open_site(site.config, Caller("root", is_admin=True), load_entry_points=False)
    try:
        admin.record_step(event("node-1", "setup", user="kasched-alice", env="mine@kasched-alice:1"))
        admin.record_step(event("node-2", "setup", user="kasched-bob", env="secret@kasched-bob:1", ok=False))
    finally:
        admin.close()
    mine = kasched_as("kasched-alice", site.client_config, "stats", "--json")
    assert mine.returncode == 0, mine.stderr
    assert {op["user"] for op in json.loads(mine.stdout)} == {"kasched-alice"}
    assert "secret@kasched-bob" not in mine.stdout
    grouped = kasched_as("kasched-alice", site.client_config, "stats", "--by", "environment", "--json")
    assert [g["key"] for g in json.loads(grouped.stdout)] == ["mine@kasched-alice:1"], grouped.stdout
    other = kasched_as("kasched-alice", site.client_config, "stats", "-u", "kasched-bob")
    assert other.returncode == 5 and "only admins may see another user's operations" in other.stderr
    everyone = kasched_as("root", site.client_config, "stats", "--json")
    assert {op["user"] for op in json.loads(everyone.stdout)} == {"kasched-alice", "kasched-bob"}


def test_the_client_sends_a_token_over_plain_http_to_loopback_only(tmp_path: Path) -> None:
    for url in ("http://10.1.2.3:7878", "http://kaschedd.example.org:7878"):
        with pytest.raises(AuthenticationError, match="refusing to send a token over plain http"):
            ServiceClient(url=url, auth=TokenAuth("kst1.x.y"))
    for url in ("http://127.0.0.1:7878", "http://[::1]:7878", "http://localhost:7878", "https://10.1.2.3:7878"):
        ServiceClient(url=url, auth=TokenAuth("kst1.x.y"))
    home = tmp_path / "home"
    (home / ".config" / "kasched").mkdir(parents=True)
    config_file = write(tmp_path / "client.yaml", "site: t\nservice_url: http://10.1.2.3:7878\n")
    config_file.chmod(0o644)
    refused = kasched_as("root", config_file, "nodes", "list", KASCHED_TOKEN="kst1.x.y")
    assert refused.returncode == 10 and "refusing to send a token over plain http to 10.1.2.3" in refused.stderr


def test_a_token_file_others_can_read_is_refused() -> None:
    alice = unix_user("kasched-alice")
    tmp_path = scratch()
    home = tmp_path / "home"
    token = home / ".config" / "kasched" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("kst1.claims.signature\n")
    for path in (home, home / ".config", token.parent, token):
        os.chown(path, alice.pw_uid, alice.pw_gid)
    token.chmod(0o644)
    config_file = write(tmp_path / "client.yaml", f"site: t\nservice_url: http://127.0.0.1:{free_port()}\n")
    config_file.chmod(0o644)
    refused = kasched_as("kasched-alice", config_file, "nodes", "list", HOME=str(home))
    assert refused.returncode == 10, refused.stderr
    assert refused.stderr.startswith(f"kasched: error: {token}: readable by others or not yours (mode 644)")
    assert refused.stderr.count("\n") == 1
    token.chmod(0o600)
    unreachable = kasched_as("kasched-alice", config_file, "nodes", "list", HOME=str(home))
    assert "readable by others" not in unreachable.stderr  # read, sent, and nobody listens there
    with pytest.raises(AuthenticationError, match="not yours"):
        read_token_file(token)  # as root: the file is alice's
    shutil.rmtree(tmp_path, ignore_errors=True)


def slurm_environ(job_id: str, comment: str) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld",
        "SLURM_JOB_USER": "kasched-alice",
        "SLURM_JOB_NODELIST": "node-[1-2]",
        "SLURM_CLUSTER_NAME": "c1",
        "SLURM_JOB_CONSTRAINTS": "deploy",
        "SLURM_JOB_COMMENT": comment,
    }


def test_an_over_long_env_in_a_slurm_comment_is_one_line_and_the_job_keeps_its_grant(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    job = SlurmAdapter().read_job_start(slurm_environ("7", f"kasched:env={'a' * 300}"), [])
    assert job.environment is None
    assert (
        capsys.readouterr().err == "kasched: warning: job 7: env= of the comment ignored (longer than 200 characters)\n"
    )
    assert SlurmAdapter().read_job_start(slurm_environ("8", "env=\x1b[31mred"), []).environment is None
    assert SlurmAdapter().read_job_start(slurm_environ("9", "env=debian12@alice"), []).environment == "debian12@alice"
    environ = {**os.environ, **slurm_environ("70", f"env={'b' * 5000}"), "KASCHED_CONFIG": str(site.client_config)}
    started = subprocess.run([str(KASCHED), "job", "start", "--scheduler", "slurm"], capture_output=True, text=True,
                             env=environ, timeout=60)  # fmt: skip
    assert started.returncode == 0, started.stderr  # through kaschedd: the prolog does not fail
    assert started.stderr == "kasched: warning: job 70: env= of the comment ignored (longer than 200 characters)\n"
    admin = open_site(site.config, Caller("root", is_admin=True), load_entry_points=False)
    try:
        [grant] = admin.rights(nodes="node-1")
    finally:
        admin.close()
    assert grant.job_id == "70" and grant.environment_request is None and grant.expires_at > utcnow()
