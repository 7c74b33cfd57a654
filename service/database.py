"""Database engine and transactions (SQLite by default, PostgreSQL for scale-out)."""

from __future__ import annotations

import contextvars
import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import IO, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service.config import ConfigError
from service.runtime import wakeup

log = logging.getLogger("genrelay.database")
T = TypeVar("T")

# Seconds a SQLite writer waits for the database before "database is locked".
SQLITE_BUSY_TIMEOUT = 30
# Seconds a new PostgreSQL connection may take (libpq's own default is to wait for ever: a
# server that stopped answering would hang each request until the kernel gave up on TCP,
# minutes later). A `connect_timeout` in GENRELAY_DATABASE_URL wins.
POSTGRES_CONNECT_TIMEOUT = 10
# SQLSTATEs of a transaction PostgreSQL aborted to resolve a conflict between transactions:
# deadlock_detected and serialization_failure. The transaction rolled back whole.
CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})
# How many times Store.retrying runs its work in all.
CONFLICT_ATTEMPTS = 3


def aborted_by_conflict(error: BaseException) -> bool:
    """Whether `error` is the database aborting a transaction to resolve a conflict with
    another one (a deadlock), which running the transaction again resolves."""
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    return getattr(error.orig, "sqlstate", None) in CONFLICT_SQLSTATES


SCHEMA_BEHIND = ("42P01", "42703")


def schema_behind(error: BaseException) -> bool:
    """Whether `error` says a table or column is missing: the database is not migrated."""
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    # PostgreSQL's undefined_table and undefined_column, or SQLite's words for them.
    if getattr(error.orig, "sqlstate", None) in SCHEMA_BEHIND:
        return True
    return str(error.orig).strip().startswith(("no such table", "no such column"))


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` says the database cannot be used just now (unreachable, the connection
    lost, the pool exhausted, the schema missing), rather than that a statement is wrong."""
    if isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)):
        return True  # (SQLite's "no such table" among them)
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    return error.connection_invalidated or schema_behind(error)


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
            directory = os.path.dirname(os.path.abspath(database))
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                # The URL is the operator's to fix: one line, not a traceback from every command.
                raise ConfigError(
                    f"GENRELAY_DATABASE_URL names a SQLite database in {directory}, a "
                    f"directory that cannot be made ({exc.strerror or exc})"
                ) from None
        engine = sa.create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT}, hide_parameters=True
        )
        _configure_sqlite(engine)
        return engine
    parsed = sa.engine.make_url(url)
    connect_args = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT
    return sa.create_engine(
        parsed,
        connect_args=connect_args,
        pool_pre_ping=pre_ping,
        pool_size=10,
        max_overflow=20,
        hide_parameters=True,
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
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT * 1000}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


class SqliteWriters:
    """SQLite: one write transaction at a time, the others waiting in line for it.

    SQLite has one writer at a time. A writer that finds the database locked sleeps and tries
    again, up to 100 ms between tries, so under load most of a wait is sleep and the last to
    come often goes first: an intake took 0.9 s at p99 and 3.5 s at worst on 2 cores with 16
    clients (bench/intake.py). Writers wait here instead and start the moment the last one is
    done: the threads of a process on a lock, and one thread per process on an flock of a file
    beside the database (`<database>-writers`), which the kernel gives to the next process at
    once and frees when a process dies. Waiting is bounded by SQLITE_BUSY_TIMEOUT: after that
    a writer goes on to SQLite's own wait, as if this were not here. A write transaction that
    a thread opens inside another meets SQLite directly, as before.
    """

    def __init__(self, lock_path: str | None) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._lock_path = lock_path
        self._file: IO[bytes] | None = None
        self._file_pid = 0

    @classmethod
    def of(cls, engine: sa.Engine) -> SqliteWriters | None:
        """Writers of `engine`'s database; None for PostgreSQL (it locks rows, not the
        database). An in-memory database has no file to lock: its threads alone wait in line."""
        if engine.dialect.name != "sqlite":
            return None
        database = engine.url.database or ":memory:"
        if database == ":memory:" or database.startswith("file:"):
            return cls(None)
        return cls(f"{os.path.abspath(database)}-writers")

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Be the one writer for the block (or give up waiting after SQLITE_BUSY_TIMEOUT)."""
        if getattr(self._local, "holding", False):
            yield
            return
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
        held = self._lock.acquire(timeout=SQLITE_BUSY_TIMEOUT)
        locked = None
        try:
            locked = self._lock_file(deadline) if held else None
            self._local.holding = True
            yield
        finally:
            self._local.holding = False
            if locked is not None:
                fcntl.flock(locked, fcntl.LOCK_UN)
            if held:
                self._lock.release()

    def _lock_file(self, deadline: float) -> IO[bytes] | None:
        """The lock file, flocked; waited for until `deadline` (tried every millisecond: one
        thread per process waits here). None when it could not be had."""
        if self._lock_path is None:
            return None
        try:
            file = self._opened()
        except OSError as exc:  # e.g. a directory we may not write to: SQLite alone decides
            log.warning("cannot open %s (%s); writers wait in SQLite", self._lock_path, exc)
            self._lock_path = None
            return None
        while True:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return file
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.001)

    def _opened(self) -> IO[bytes]:
        """The lock file, opened by this process (a file opened before a fork would be shared
        with the child, and an flock does not tell processes sharing a file apart)."""
        if self._file is None or self._file_pid != os.getpid():
            assert self._lock_path is not None
            self.close()  # the parent's, in a child: the parent keeps its own copy
            self._file = open(self._lock_path, "ab")  # noqa: SIM115 (kept until close())
            self._file_pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Store:
    """Owns the engine; hands out sessions whose transaction commits or rolls back as a unit."""

    def __init__(self, url: str, *, pre_ping: bool = True) -> None:
        self.engine = create_db_engine(url, pre_ping=pre_ping)
        self._writer = sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = self.engine.execution_options(sqlite_begin="DEFERRED")
        # PostgreSQL: one-statement reads need no BEGIN and COMMIT round trips.
        self._autocommit_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._reader = sessionmaker(self._read_engine, expire_on_commit=False)
        self._writers = writers = SqliteWriters.of(self.engine)
        self._one_writer: Callable[[], AbstractContextManager[None]] = (
            writers.hold if writers is not None else nullcontext
        )
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

    def retrying(self, work: Callable[[], T]) -> T:
        """`work()`, run again (up to CONFLICT_ATTEMPTS times in all) when the database
        aborted its transaction to break a deadlock.

        For work that is one transaction and nothing else: it rolled back whole, so running
        it again is safe. Transactions take the account's row lock at different points (the
        line's admission runs before the commit of any transaction that freed a slot), so a
        cycle of waits can form under load; PostgreSQL aborts one of them.
        """
        for attempt in range(1, CONFLICT_ATTEMPTS):
            try:
                return work()
            except sa.exc.DBAPIError as error:
                if not aborted_by_conflict(error):
                    raise
                state = getattr(error.orig, "sqlstate", None)
                log.warning("a transaction aborted by a conflict (%s); running it again", state)
                # apart from the transaction it conflicted with (jitter, not security)
                time.sleep(random.uniform(0.01, 0.05) * attempt)  # noqa: S311
        return work()  # the last attempt: its error is the caller's

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A read-write transaction: committed on success, rolled back on any exception."""
        with self._one_writer():
            connection = self._free_held()
            if connection is None:
                with self._writer.begin() as session:
                    yield session
                return
            with self._writer(bind=connection) as session, session.begin():
                yield session

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A read-write transaction on a plain connection, for Core statements."""
        with self._one_writer(), self.engine.begin() as connection:
            yield connection

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
        if self._writers is not None:
            self._writers.close()
