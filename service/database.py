"""Database engine and transactions (SQLite by default, PostgreSQL for scale-out)."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service.runtime import wakeup


def create_db_engine(url: str, *, pre_ping: bool = True) -> sa.Engine:
    """An engine configured for the service: WAL + IMMEDIATE writes on SQLite, pre-ping on PG.

    `hide_parameters`: a database error's message would otherwise carry the statement's bound
    values (signing secrets, API key hashes, tenants' prompts) into the log.
    `pre_ping=False` saves a round trip per checkout, for a caller that can afford a statement
    failing on a connection the server dropped (the pool then replaces it): the worker, whose
    tasks come back after a failure. A web request would answer 500 instead.
    """
    if url.startswith("postgresql:"):
        url = "postgresql+psycopg:" + url.removeprefix("postgresql:")
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
        _configure_sqlite(engine)
        return engine
    return sa.create_engine(
        url, pool_pre_ping=pre_ping, pool_size=10, max_overflow=20, hide_parameters=True
    )


def _configure_sqlite(engine: sa.Engine) -> None:
    # pysqlite's own transaction handling issues a deferred BEGIN; a deferred transaction
    # that later writes fails at once with "database is locked" if another connection wrote
    # in between. Writers therefore start with BEGIN IMMEDIATE and wait on busy_timeout.
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Store:
    """Owns the engine; hands out sessions whose transaction commits or rolls back as a unit."""

    def __init__(self, url: str, *, pre_ping: bool = True) -> None:
        self.engine = create_db_engine(url, pre_ping=pre_ping)
        self._writer = sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = self.engine.execution_options(sqlite_begin="DEFERRED")
        # PostgreSQL: one-statement reads need no BEGIN and COMMIT round trips.
        self._autocommit_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._reader = sessionmaker(self._read_engine, expire_on_commit=False)
        # Work a transaction asked for, done inside it just before it commits (e.g. the
        # admission pass after a slot was freed: service/generations/line.py). Registered before the
        # wake-up hook, so tasks these hooks queue are announced too.
        self.before_commit: dict[str, Callable[[Session], None]] = {}

        @sa.event.listens_for(self._writer, "before_commit")
        def _run_hooks(session: Session) -> None:
            for hook in list(self.before_commit.values()):
                hook(session)

        wakeup.install(self._writer)  # NOTIFY idle workers of tasks queued (PostgreSQL)
        # The connection `reusing_connection` holds for this thread (or task), if any.
        self._held: contextvars.ContextVar[sa.Connection | None] = contextvars.ContextVar(
            f"genrelay_store_{id(self)}", default=None
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def reusing_connection(self) -> Iterator[None]:
        """Let the transactions this thread opens inside the block share one pooled connection.

        Each transaction otherwise checks a connection out of the pool, and on PostgreSQL each
        checkout is a pre-ping round trip; an intake runs several in a row (its own, the
        inline submit's, its answer's). Transactions still begin and end as before, one after
        the other, each committed or rolled back on its own; one opened while another is open
        on this thread, or after the connection was lost, takes a pooled connection as usual.
        SQLite connections cost nothing to check out (and no ping): there it does nothing.
        """
        if self.dialect == "sqlite" or self._held.get() is not None:
            yield
            return
        with self.engine.connect() as connection:
            token = self._held.set(connection)
            try:
                yield
            finally:
                self._held.reset(token)

    def _free_held(self) -> sa.Connection | None:
        """The held connection when no transaction is open on it, else None."""
        connection = self._held.get()
        if connection is None or connection.invalidated or connection.in_transaction():
            return None
        return connection

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A read-write transaction: committed on success, rolled back on any exception."""
        connection = self._free_held()
        if connection is None:
            with self._writer.begin() as session:
                yield session
            return
        with self._writer(bind=connection) as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (never takes SQLite's write lock)."""
        connection = self._free_held()
        if connection is None:
            with self._reader.begin() as session:
                yield session
            return
        with self._reader(bind=connection) as session, session.begin():
            yield session

    @contextmanager
    def read_one(self) -> Iterator[sa.Connection]:
        """A plain connection for ONE Core read statement (the API key lookup of every
        request, the read of a batch of deliveries): no ORM session to set up, and on
        PostgreSQL no transaction around the statement (autocommit: a single statement is its
        own snapshot), which saves the BEGIN and COMMIT round trips. Several statements that
        must agree with each other belong in `read()`."""
        connection = self._free_held()  # only ever one on PostgreSQL
        if connection is not None:
            # The held connection in autocommit for the statement, then back: switching is a
            # setting of the driver's, with no round trip.
            connection.execution_options(isolation_level="AUTOCOMMIT")
            try:
                yield connection
            finally:
                if not connection.invalidated:
                    connection.rollback()  # ends SQLAlchemy's transaction; none is open
                    connection.execution_options(
                        isolation_level=self.engine.dialect.default_isolation_level
                    )
        elif self.dialect == "postgresql":
            with self._autocommit_engine.connect() as connection:
                yield connection
        else:
            with self._read_engine.begin() as connection:
                yield connection

    def dispose(self) -> None:
        self.engine.dispose()
