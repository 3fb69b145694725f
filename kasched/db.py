"""Database access: one engine per URL, short transactions, and SQLite made safe for many processes.

SQLite is the embedded default. Many prolog processes may write at once, so every SQLite transaction
starts with ``BEGIN IMMEDIATE`` (it takes the write lock up front, so two writers never deadlock on a
lock upgrade), the file runs in WAL mode, and a busy connection waits instead of failing.
PostgreSQL (``postgresql+psycopg://``) and MariaDB (``mysql+pymysql://``) are used as they are.
"""

from __future__ import annotations

import fcntl
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.exc import DatabaseError as SqlDatabaseError
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kasched import deadline
from kasched.errors import DatabaseError

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest migration. Every command opens the database and checks its schema is current: reading the
# version row against this constant spares each hook importing alembic and its scripts (a test checks
# it names the head of kasched/migrations/versions).
HEAD_REVISION = "0006"
SQLITE_BUSY_MS = 60_000


class Database:
    """An engine, a session factory and the schema's migrations for one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = _make_engine(url)
        except (ArgumentError, NoSuchModuleError, ValueError) as error:
            raise DatabaseError(f"database {_safe(url)}: {error}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back on any error, and rolled back too
        when the request's deadline (:mod:`kasched.deadline`) passed before the commit."""
        try:
            with self._sessions.begin() as session:
                yield session
                deadline.check()
        except SqlIntegrityError:
            raise  # callers that race on a unique key catch it (e.g. two prologs of one job)
        except SqlDatabaseError as error:  # unreachable, locked, corrupt ("file is not a database")...
            left = deadline.remaining()
            if left is not None and left < 0.25:  # a wait the deadline ended (busy, lock or statement timeout)
                raise DatabaseError(f"{deadline.passed_message()} ({_first_line(error)})") from None
            raise DatabaseError(f"database {_safe(self.url)}: {_first_line(error)}") from None

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (creating it on an empty database)."""
        if self.is_current():
            return
        from alembic import command

        with self._migration_lock():
            if self.is_current():
                return
            try:
                with self.engine.begin() as connection:
                    alembic_config = _alembic_config()
                    alembic_config.attributes["connection"] = connection
                    command.upgrade(alembic_config, "head")
            except SQLAlchemyError as error:
                raise DatabaseError(f"database {_safe(self.url)}: migration failed: {_first_line(error)}") from None

    def is_current(self) -> bool:
        """Whether the schema is at the newest migration."""
        try:
            with self.engine.connect() as connection:
                if not self.engine.dialect.has_table(connection, "alembic_version"):
                    return False
                current = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        except SqlDatabaseError as error:
            raise DatabaseError(f"database {_safe(self.url)}: {_first_line(error)}") from None
        return current == [HEAD_REVISION]

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        # Several processes may open a new SQLite file at once: one migrates, the others wait.
        path = self.engine.url.database if self.engine.url.get_backend_name() == "sqlite" else None
        if not path or path == ":memory:":
            yield
            return
        try:
            descriptor = os.open(f"{path}.migrate-lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            lock = os.fdopen(descriptor, "a")  # held for the whole block
        except OSError as error:
            raise DatabaseError(f"database {path}: cannot migrate the schema: {error.strerror}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def dispose(self) -> None:
        self.engine.dispose()


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    engine = create_engine(url, pool_pre_ping=True)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        _bound_lock_waits(connection)

    return engine


def _bound_lock_waits(connection: Any) -> None:
    """PostgreSQL and MariaDB: a transaction of a request with a deadline waits for locks (and runs
    each statement) no longer than the deadline allows."""
    left = deadline.remaining()
    info = connection.info
    if left is None and not info.get("kasched_bounded"):
        return
    ms = 0 if left is None else deadline.wait_ms(SQLITE_BUSY_MS)
    if connection.dialect.name == "postgresql":
        if ms:  # SET LOCAL ends with the transaction: nothing to undo
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
            connection.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
        return
    if connection.dialect.name in ("mysql", "mariadb"):
        names = ("innodb_lock_wait_timeout", "lock_wait_timeout", "max_statement_time")
        if ms:  # session settings: undone at the next transaction without a deadline
            seconds = (max(1, math.ceil(ms / 1000)), max(1, math.ceil(ms / 1000)), f"{ms / 1000:.3f}")
            values = ", ".join(f"{name} = {value}" for name, value in zip(names, seconds, strict=True))
        else:
            values = ", ".join(f"{name} = DEFAULT" for name in names)
        connection.exec_driver_sql(f"SET SESSION {values}")
        info["kasched_bounded"] = bool(ms)


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})
    database = engine.url.database
    if database and database != ":memory:":
        _private_file(Path(database))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        busy_ms = deadline.wait_ms(SQLITE_BUSY_MS)  # the write lock is waited for no longer than the deadline
        if connection.info.get("kasched_busy_ms") != busy_ms:
            connection.exec_driver_sql(f"PRAGMA busy_timeout={busy_ms}")
            connection.info["kasched_busy_ms"] = busy_ms
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _private_file(database: Path) -> None:
    """Create the SQLite file mode 600 whatever the umask (SQLite gives its -wal and -shm files the
    database's mode), and make an existing one of ours private: it holds every private environment."""
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatabaseError(f"database {database}: cannot create its directory: {error.strerror}") from None
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return  # not ours to create (read-only place...): SQLite says what is wrong when it opens it
    # By path, never through a descriptor of our own: closing any descriptor of a file drops every
    # POSIX lock this process holds on it, and SQLite's connections in this process (kaschedd's, while
    # another Database opens the same file) hold theirs on these very files. The directory is the
    # site's state directory, not a user's, so nobody swaps a file between the lstat and the chmod.
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        try:
            status = os.lstat(path)
            if status.st_uid == os.geteuid() and stat.S_ISREG(status.st_mode) and status.st_mode & 0o077:
                os.chmod(path, 0o600)
        except OSError:
            continue  # absent (no -wal yet): nothing to change


def _alembic_config() -> Any:
    from alembic.config import Config as AlembicConfig

    alembic_config = AlembicConfig()
    alembic_config.set_main_option("script_location", str(MIGRATIONS))
    return alembic_config


def _safe(url: str) -> str:
    """The URL with its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparsable URL>"


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
