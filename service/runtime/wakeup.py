"""Waking idle workers when a task is queued: PostgreSQL LISTEN/NOTIFY.

An idle worker thread polls for due tasks every `--poll-interval` (0.5 s), so a task queued by
another process (a callback's `store`, a status change's `deliver`) waited up to that long.
On PostgreSQL a transaction that queues a task due now sends `NOTIFY genrelay_tasks` as it
commits (once per transaction, however many tasks), and each worker process keeps one
connection LISTENing: a notification wakes one idle thread at once (which wakes the next
once it has claimed a task: `service.runtime.worker.Wakeups`). Polling stays as the
fallback (for delayed tasks, and for a notification lost while the listener reconnects), so
nothing depends on a notification arriving. SQLite has no such channel; there the workers
poll as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("genrelay.wakeup")

CHANNEL = "genrelay_tasks"
_PENDING = "genrelay_wake"
RECONNECT_DELAY = 2.0
LISTEN_TIMEOUT = 1.0  # how often the listener looks at its stop flag
# A listening connection is idle: one cut silently (a NAT, a proxy that stops relaying) would
# never raise. TCP keepalives find a dead peer within about 25 s; a path that still answers
# them but delivers nothing is left when the connection is made anew, every LISTEN_RECYCLE s.
LISTEN_RECYCLE = 300.0


def request_wake(session: Session) -> None:
    """Ask for a NOTIFY when `session` commits (a task due now was queued in it)."""
    session.info[_PENDING] = True


def install(factory: sessionmaker[Session]) -> None:
    """Make sessions of `factory` send the NOTIFY asked for by `request_wake` as they commit."""

    @sa.event.listens_for(factory, "before_commit")
    def _notify(session: Session) -> None:
        asked = session.info.pop(_PENDING, False)
        if asked and session.get_bind().dialect.name == "postgresql":
            # Delivered to listeners when (and only if) this transaction commits.
            session.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})

    @sa.event.listens_for(factory, "after_rollback")
    def _forget(session: Session) -> None:
        session.info.pop(_PENDING, None)


def libpq_url(url: str) -> str | None:
    """The plain libpq URL of a PostgreSQL SQLAlchemy URL, or None for another database."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    """Calls `wake()` on every notification on CHANNEL, until `stopping` is set."""

    def __init__(self, url: str, wake: Callable[[], None]) -> None:
        self.url = url
        self.wake = wake

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                self._listen(stopping)
            except Exception as exc:  # the database away, a bad URL: never end the thread
                log.warning(
                    "task wake-up listener lost its connection (%s); polling meanwhile, "
                    "reconnecting in %.0f s",
                    type(exc).__name__,
                    RECONNECT_DELAY,
                )
                stopping.wait(RECONNECT_DELAY)

    def _listen(self, stopping: threading.Event) -> None:
        import psycopg  # only worker processes on PostgreSQL listen; SQLite never loads it

        with psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=10,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        ) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.wake()  # anything queued while we were not listening
            recycle_at = time.monotonic() + LISTEN_RECYCLE
            while not stopping.is_set() and time.monotonic() < recycle_at:
                for _ in conn.notifies(timeout=LISTEN_TIMEOUT, stop_after=1):
                    self.wake()
