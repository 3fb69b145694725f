"""Shared fixtures: a site on each database backend, API handles for admins and users, the CLI."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import ProgrammingError

from kasched.api import Kasched
from kasched.compose import open_site
from kasched.config import Config
from kasched.identity import Caller

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
_server_urls: dict[str, str] = {}


def server_url(backend: str) -> str:
    """The admin URL of a database server on loopback, started by scripts/start-databases.sh."""
    if backend not in _server_urls:
        if os.geteuid() != 0:
            pytest.fail("database tests need root to start PostgreSQL/MariaDB (run scripts/test.sh as root)")
        result = subprocess.run(
            ["bash", str(ROOT / "scripts/start-databases.sh"), backend], capture_output=True, text=True, timeout=180
        )
        if result.returncode != 0:
            pytest.fail(f"could not start {backend}: {result.stderr.strip()} (scripts/setup.sh installs it)")
        _server_urls[backend] = result.stdout.split()[-1]
    return _server_urls[backend]


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.db), pytest.param("mariadb", marks=pytest.mark.db)]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend: a file for SQLite, a scratch database on the servers."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kasched.db'}"
        return
    admin_url = server_url(request.param)
    name = f"kt_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        _drop_database(admin, name, request.param)
        admin.dispose()


def _drop_database(admin: Engine, name: str, backend: str) -> None:
    """PostgreSQL's ``WITH (FORCE)`` ends the database's sessions, but our role (its owner, not a
    superuser) may not end an autovacuum worker that happens to be in it (``must be a member of the
    role whose process is being terminated or member of pg_signal_backend``; seen once in CI): such a
    worker is done within seconds, so try again for up to 30 s."""
    statement = f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if backend == "postgresql" else "")
    deadline = time.monotonic() + 30
    while True:
        try:
            with admin.connect() as connection:
                connection.execute(text(statement))
            return
        except ProgrammingError as error:
            if "pg_signal_backend" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def config(tmp_path: Path, database_url: str) -> Config:
    return Config(
        site="test",
        state_dir=tmp_path / "state",
        database=database_url,
        credentials_file=tmp_path / "credentials.yaml",
        admin_group="kasched-test-admins",
    )


@pytest.fixture
def sqlite_config(tmp_path: Path) -> Config:
    """A site on the embedded default, for tests that are about something other than the backend."""
    return Config(
        site="test",
        state_dir=tmp_path / "state",
        credentials_file=tmp_path / "credentials.yaml",
        admin_group="kasched-test-admins",
    )


@pytest.fixture
def admin(config: Config) -> Iterator[Kasched]:
    api = open_site(config, Caller("root", is_admin=True), load_entry_points=False)
    yield api
    api.close()


@pytest.fixture
def as_user(admin: Kasched) -> Callable[[str], Kasched]:
    """``as_user("alice")``: the same site seen by an ordinary user."""
    return lambda user: admin.as_caller(Caller(user, is_admin=False))


@pytest.fixture
def cluster(admin: Kasched) -> Kasched:
    """The admin API with the sample inventory (node-[1-8] on two switches) imported."""
    admin.import_nodes(EXAMPLES / "cluster.yaml")
    return admin


def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path
