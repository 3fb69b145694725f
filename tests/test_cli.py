"""The CLI: every command, and every refusal as one clear line with a non-zero exit."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kasched.cli import main
from tests.conftest import EXAMPLES, ROOT, write
from tests.test_environments import make_image, tamper

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A site configuration on the SQLite default, in a directory every test user can reach."""
    base = Path(tempfile.mkdtemp(prefix="kasched-cli-"))
    base.chmod(0o755)
    directory = base / "site"
    directory.mkdir()
    directory.chmod(0o777)
    config = write(
        directory / "kasched.yaml", f"site: t\nstate_dir: {directory / 'state'}\nadmin_group: kasched-test-admins\n"
    )
    monkeypatch.setenv("KASCHED_CONFIG", str(config))
    monkeypatch.delenv("KASCHED_DEBUG", raising=False)
    yield directory
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def run(site: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    def _run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def one_line_error(err: str, text: str) -> None:
    assert err.count("\n") == 1, f"expected one line, got: {err!r}"
    assert err.startswith("kasched: error: ") and text in err, err
    assert "Traceback" not in err


def test_nodes_commands(run: Run) -> None:
    code, out, _ = run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    assert code == 0 and "added: 8 node(s) node-[1-8]" in out
    code, out, _ = run("nodes", "list", "-m", "node-[2-3]")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "CLUSTER", "STATE"]
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["node-2", "node-3"]
    code, out, _ = run("nodes", "show", "node-5", "--json")
    assert code == 0 and json.loads(out)["switch"] == "sw2"
    assert run("nodes", "set-state", "-m", "node-8", "down")[0] == 0
    code, out, _ = run("nodes", "list", "--state", "down", "--json")
    assert [n["name"] for n in json.loads(out)] == ["node-8"]
    code, out, _ = run("nodes", "remove", "-m", "node-[7-8]")
    assert code == 0 and "removed: 2 node(s) node-[7-8]" in out


@pytest.mark.parametrize(
    ("content", "text", "exit_code"),
    [
        ("site: [x", "not valid YAML", 2),
        (
            "site: s\nclusters:\n  - name: c\n    nodes: [{name: 'n[1-', mac: 'aa:00:00:00:00:01', ip: 10.0.0.1}]\n",
            "nodes[0].name",
            2,
        ),
        ("site: s\nclusters:\n  - name: c\n    size: 3\n    nodes: []\n", "unknown field(s) size", 2),
    ],
)
def test_import_refusals(run: Run, tmp_path: Path, content: str, text: str, exit_code: int) -> None:
    code, out, err = run("nodes", "import", str(write(tmp_path / "bad.yaml", content)))
    assert code == exit_code and out == ""
    one_line_error(err, text)


def test_unknown_node_and_bad_range(run: Run) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    code, _, err = run("nodes", "show", "node-99")
    assert code == 3
    one_line_error(err, "unknown node node-99")
    code, _, err = run("nodes", "list", "-m", "node-[1-")
    assert code == 2
    one_line_error(err, "bad node range")
    code, _, err = run("rights", "grant", "-u", "alice", "-m", "node-[1-2],ghost")
    assert code == 3
    one_line_error(err, "unknown node(s) ghost")


def test_env_commands_and_refusals(run: Run, tmp_path: Path) -> None:
    image = make_image(tmp_path)
    desc = write(tmp_path / "env.yaml", "name: tiny\nvisibility: public\nimage: {file: root.tar.gz}\n")
    code, out, _ = run("env", "add", str(desc))
    assert code == 0 and out.startswith("added tiny@root:1 (public")
    code, out, _ = run("env", "list")
    assert code == 0 and out.splitlines()[1].split()[:5] == ["tiny", "1", "root", "public", "tar.gz"]
    code, out, _ = run("env", "show", "tiny@root:1", "--json")
    stored = json.loads(out)["image_location"]
    assert stored.endswith(f"/images/store/{json.loads(out)['sha256']}") and stored != str(image)
    image.write_bytes(b"changed")  # the user's file is not read after env add
    assert run("env", "check", "tiny")[0] == 0
    tamper(stored)
    code, _, err = run("env", "check", "tiny")
    assert code == 6
    one_line_error(err, "recorded")
    code, _, err = run("env", "show", "tiny@root:x")
    assert code == 2
    one_line_error(err, "version 'x' is not a whole number")
    code, _, err = run("env", "add", str(write(tmp_path / "evil.yaml", "name: ../../etc\nimage: {file: x}\n")))
    assert code == 2
    one_line_error(err, "is not a valid environment name")
    code, _, err = run("env", "add", str(write(tmp_path / "gone.yaml", "name: gone\nimage: {file: none.tgz}\n")))
    assert code == 3
    one_line_error(err, "does not exist")
    assert run("env", "remove", "tiny")[0] == 0
    assert run("env", "list", "--all", "--json")[1].strip() == "[]"


def test_rights_and_stats_commands(run: Run) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    code, out, _ = run("rights", "grant", "-u", "alice", "-m", "node-[1-2]", "--hours", "2", "--job", "j1")
    assert code == 0 and out.startswith("grant 1: alice may deploy node-[1-2]")
    code, out, _ = run("rights")
    assert code == 0 and "admin job j1" in out and "active" in out
    code, out, _ = run("rights", "check", "-u", "alice", "-m", "node-[1-3]")
    assert code == 5 and "node-3: no active grant for alice" in out
    assert run("rights", "check", "-u", "alice", "-m", "node-[1-2]")[0] == 0
    code, out, _ = run("rights", "revoke", "1", "--reason", "maintenance")
    assert code == 0 and "revoked" in out
    code, out, _ = run("rights", "--all", "--json")
    assert json.loads(out)[0]["revoke_reason"] == "maintenance (root)"
    code, out, _ = run("stats", "--since", "1h", "--json")
    assert code == 0 and json.loads(out) == []
    code, _, err = run("stats", "--since", "last tuesday")
    assert code == 2
    one_line_error(err, "since: 'last tuesday' is neither a date")


def test_config_commands(run: Run, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run("config", "show")
    settings = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and settings["database"] == f"sqlite:///{site / 'state' / 'kasched.db'}"
    code, out, _ = run("config", "check")
    assert code == 0 and "ok (database sqlite" in out and "warning: admin_group" in out
    assert run("db", "upgrade") == (0, "database schema is up to date\n", "")
    bad = write(site / "bad.yaml", "site: t\ndatabse: sqlite:///x\n")
    code, _, err = run("--config", str(bad), "config", "check")
    assert code == 2
    one_line_error(err, "unknown setting 'databse'")
    monkeypatch.setenv("KASCHED_CONFIG", str(site / "missing.yaml"))
    code, _, err = run("nodes", "list")
    assert code == 2
    one_line_error(err, "missing.yaml does not exist")


def test_unreachable_database_is_one_line(run: Run, site: Path) -> None:
    bad = write(site / "pg.yaml", "database: postgresql+psycopg://nobody:x@127.0.0.1:1/none\n")
    code, _, err = run("--config", str(bad), "nodes", "list")
    assert code == 7
    one_line_error(err, "database postgresql+psycopg://nobody:***@127.0.0.1:1/none")


def test_no_command_prints_help(run: Run) -> None:
    code, _, err = run()
    assert code == 2 and "usage: kasched" in err


# --- As ordinary Unix users, in real processes --------------------------------------------------------


def unix_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        if os.geteuid() != 0:
            pytest.fail("these tests need root to create test users (run scripts/test.sh as root)")
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


def run_as(user: str, *args: str) -> subprocess.CompletedProcess[str]:
    entry = unix_user(user)
    env = {
        "PATH": "/usr/bin:/bin",
        "KASCHED_CONFIG": os.environ["KASCHED_CONFIG"],
        "HOME": "/tmp",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
    }
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            sys.executable,
            "-m",
            "kasched",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_ordinary_users_in_real_processes(run: Run, site: Path) -> None:
    work = site / "work"
    work.mkdir()
    work.chmod(0o755)
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    (site / "state" / "kasched.db").chmod(0o666)
    for extra in ("-wal", "-shm"):
        path = site / "state" / f"kasched.db{extra}"
        if path.exists():
            path.chmod(0o666)
    (site / "state").chmod(0o777)
    make_image(work)
    desc = write(work / "env.yaml", "name: mine\nvisibility: private\nimage: {file: root.tar.gz}\n")
    added = run_as("kasched-alice", "env", "add", str(desc))
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("added mine@kasched-alice:1")
    other = run_as("kasched-bob", "env", "show", "mine@kasched-alice")
    assert other.returncode == 3 and "that you (kasched-bob) may use" in other.stderr
    denied = run_as("kasched-bob", "nodes", "import", str(EXAMPLES / "cluster.yaml"))
    assert denied.returncode == 5 and denied.stderr.count("\n") == 1
    assert "only admins may import nodes (you are kasched-bob" in denied.stderr
    public = write(work / "pub.yaml", "name: pub\nvisibility: public\nimage: {file: root.tar.gz}\n")
    refused = run_as("kasched-bob", "env", "add", str(public))
    assert refused.returncode == 5 and "only admins may make an environment public" in refused.stderr
    check = run_as("kasched-bob", "rights", "check", "-m", "node-1")
    assert check.returncode == 5 and "kasched-bob may not deploy node-1: node-1: no active grant" in check.stdout


def test_prolog_and_epilog_scripts_grant_and_revoke(run: Run, site: Path) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "KASCHED_CONFIG": os.environ["KASCHED_CONFIG"],
        "KASCHED": str(Path(sys.executable).parent / "kasched"),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_USER": "alice",
        "SLURM_JOB_NODELIST": "node-[1-2]",
        "SLURM_CLUSTER_NAME": "demo",
        "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld",
        "SLURM_JOB_CONSTRAINTS": "deploy",
    }
    if not Path(env["KASCHED"]).exists():
        pytest.fail("the kasched command is not installed in this Python's environment (run scripts/setup.sh)")
    started = subprocess.run([str(ROOT / "prolog/kasched-prolog")], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    assert "alice may deploy node-[1-2] for slurm job 7" in started.stdout
    assert run("rights", "check", "-u", "alice", "-m", "node-[1-2]")[0] == 0
    ended = subprocess.run(
        [str(ROOT / "epilog/kasched-epilog")],
        capture_output=True,
        text=True,
        env={**env, "SLURM_SCRIPT_CONTEXT": "epilog_slurmctld"},
    )
    assert ended.returncode == 0, ended.stderr
    assert run("rights", "check", "-u", "alice", "-m", "node-1")[0] == 5


def test_job_commands_refuse_unknown_scheduler(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith(("SLURM_", "PBS_"))]:
        monkeypatch.delenv(key)
    code, _, err = run("job", "start")
    assert code == 2
    one_line_error(err, "cannot tell which scheduler runs this hook")
    code, _, err = run("job", "end", "--scheduler", "lsf")
    assert code == 2
    one_line_error(err, "no plugin for scheduler 'lsf'")


def test_job_start_grants_deploy_jobs_only(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    run("nodes", "import", str(EXAMPLES / "cluster.yaml"))
    for key, value in {
        "SLURM_JOB_ID": "8",
        "SLURM_JOB_USER": "alice",
        "SLURM_JOB_NODELIST": "node-1",
        "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld",
        "SLURM_JOB_CONSTRAINTS": "gpu",
    }.items():
        monkeypatch.setenv(key, value)
    code, out, _ = run("job", "start")
    assert code == 0 and "slurm job 8 is not a deploy job: no grant" in out
    assert run("rights", "--all", "--json")[1].strip() == "[]"
