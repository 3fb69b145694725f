"""Alembic environment: kasched passes the connection to migrate in ``config.attributes``."""

from alembic import context
from sqlalchemy import create_engine

from kasched.models import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    # Used by `alembic revision --autogenerate` during development, against a scratch SQLite file.
    url = config.get_main_option("sqlalchemy.url") or "sqlite:///scratch-migrations.db"
    with create_engine(url).connect() as dev_connection:
        context.configure(connection=dev_connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
