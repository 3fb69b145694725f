"""The schema comes from alembic migrations that match the models, on every backend; the database
layer turns server errors into one-line DatabaseErrors."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from kasched.db import Database
from kasched.errors import DatabaseError
from kasched.models import Base


def test_migrations_create_exactly_the_models(database_url: str) -> None:
    database = Database(database_url)
    try:
        assert not database.is_current()
        database.upgrade()
        assert database.is_current()
        database.upgrade()  # a second run changes nothing
        with database.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": False})
            differences = compare_metadata(context, Base.metadata)
        assert differences == []
    finally:
        database.dispose()


def test_bad_urls_are_clear() -> None:
    with pytest.raises(DatabaseError, match="database"):
        Database("nosuchdb://x/y")
    database = Database("postgresql+psycopg://u:secret@127.0.0.1:1/x")
    with pytest.raises(DatabaseError) as error:
        database.upgrade()
    assert "secret" not in str(error.value) and "***" in str(error.value)


def test_head_revision_constant_is_the_newest_migration() -> None:
    """kasched.db checks the schema against HEAD_REVISION without loading alembic's scripts."""
    from alembic.script import ScriptDirectory

    from kasched.db import HEAD_REVISION, _alembic_config

    assert ScriptDirectory.from_config(_alembic_config()).get_current_head() == HEAD_REVISION


def test_opening_the_database_again_keeps_this_process_s_locks(tmp_path: Path) -> None:
    """kaschedd's connections hold POSIX locks on the SQLite file, its -wal and its -shm; closing any
    descriptor of those files in the same process drops every one of them. Opening a second Database on
    the same file (making it private) must not: another process still finds the write lock taken."""
    path = tmp_path / "kasched.db"
    Database(f"sqlite:///{path}").upgrade()
    holder = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("CREATE TABLE held (x INTEGER)")
        Database(f"sqlite:///{path}")  # in the same process, as a hook's API beside kaschedd's thread
        other = subprocess.run(
            [sys.executable, "-c", f"import sqlite3; sqlite3.connect({str(path)!r}, timeout=0).execute('BEGIN IMMEDIATE')"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other.returncode != 0 and "database is locked" in other.stderr, other.stderr
    finally:
        holder.execute("ROLLBACK")
        holder.close()
