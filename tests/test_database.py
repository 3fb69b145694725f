"""The schema comes from alembic migrations that match the models, on every backend; the database
layer turns server errors into one-line DatabaseErrors."""

from __future__ import annotations

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
