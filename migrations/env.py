"""Alembic environment: run by `genrelay migrate` (service.migrate), never from an .ini file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic import context

from service.database import create_db_engine
from service.models import Base

config = context.config
url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
if not url:
    raise RuntimeError("no database URL given to the migration environment")


# Held by a `migrate` on PostgreSQL while it runs (any number for genrelay's own lock).
MIGRATE_LOCK = 0x67656E72656C6179  # "genrelay"
LOCK_POLL = 0.5  # seconds between tries for it


def run_migrations_online() -> None:
    """Run every pending migration in one transaction (on SQLite, one per migration: Alembic
    does not treat its DDL as transactional).

    On PostgreSQL, two `migrate` runs at once (overlapping deploys) take turns: the second
    waits for the first, then finds the schema new. Without that, both read the same version
    and the second's first change failed on the first's (a column already there). The lock
    is the session's, on a connection of its own: migrations that build an index
    CONCURRENTLY commit on the way, and a transaction's lock would go with that.

    The second tries for the lock every LOCK_POLL seconds rather than waiting in
    `pg_advisory_lock`: a statement waiting there holds a snapshot, and a CONCURRENTLY build
    waits for every transaction with an older snapshot to end, so the first run's index build
    and the second run's wait for its lock waited for each other for ever.

    On SQLite the runs take turns on an flock of a file beside the database
    (`<database>-migrate`): without it both read the same version, and one failed on what
    the other had just made ("no such index", "table already exists")."""
    engine = create_db_engine(url)
    try:
        with contextlib.ExitStack() as held:
            if engine.dialect.name == "sqlite":
                held.enter_context(_sqlite_migration_lock(engine))
            if engine.dialect.name == "postgresql":
                lock = held.enter_context(engine.connect())
                lock = lock.execution_options(isolation_level="AUTOCOMMIT")
                take = sa.text("SELECT pg_try_advisory_lock(:key)")
                while not lock.execute(take, {"key": MIGRATE_LOCK}).scalar_one():
                    time.sleep(LOCK_POLL)
                # (Unlocked by closing its session, at dispose() below, if the migrations fail.)
            _run_migrations(engine)
            if engine.dialect.name == "postgresql":
                lock.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATE_LOCK})
    finally:
        engine.dispose()  # no connection with enforcement off goes back to anyone


@contextlib.contextmanager
def _sqlite_migration_lock(engine: sa.Engine) -> Iterator[None]:
    """Held while a `migrate` runs on this SQLite file; the kernel frees it if the process
    dies. An in-memory database is one process's alone: nothing to take."""
    database = engine.url.database or ":memory:"
    if database == ":memory:" or database.startswith("file:"):
        yield
        return
    with open(f"{os.path.abspath(database)}-migrate", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the run that holds it
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_migrations(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Before any transaction begins: inside one, SQLite ignores the pragma.
            _driver_execute(connection, "PRAGMA foreign_keys=OFF")
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=sqlite,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        if sqlite:
            _check_sqlite_foreign_keys(connection)


def _check_sqlite_foreign_keys(connection: sa.Connection) -> None:
    """Fail if the migrations left a reference to a row that is not there.

    The engine turns SQLite's foreign keys on for every connection, but a batch migration
    rebuilds a table by copying it, dropping the original and renaming the copy: with
    enforcement on, dropping a table that other rows refer to (tenants, once an API key
    exists) fails. So migrations run with enforcement off, and this checks afterwards what
    enforcement would have.
    """
    broken = _driver_execute(connection, "PRAGMA foreign_key_check")
    if broken:
        shown = ", ".join(f"{table} row {rowid} -> {parent}" for table, rowid, parent, _ in broken)
        raise RuntimeError(f"the migrated database has broken foreign keys: {shown}")


def _driver_execute(connection: sa.Connection, statement: str) -> list[Any]:
    """Run `statement` on the driver's connection, past SQLAlchemy's transaction handling
    (which would begin one first); the engine's SQLite connections are in autocommit mode."""
    driver = connection.connection.driver_connection
    assert driver is not None
    cursor = driver.cursor()
    try:
        cursor.execute(statement)
        return list(cursor.fetchall())
    finally:
        cursor.close()


if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
