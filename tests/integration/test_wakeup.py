"""Idle workers woken by PostgreSQL NOTIFY when a task is queued (SQLite workers poll)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from service.database import Store
from service.runtime.queue import ClaimedTask, TaskQueue
from service.runtime.wakeup import CHANNEL, libpq_url
from service.runtime.worker import TaskRunner, Worker

POLL_INTERVAL = 30.0  # so long that only a wake-up can explain a prompt run


def postgres_only(database_url: str) -> str:
    url = libpq_url(database_url)
    if url is None:
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; on SQLite workers poll (tested elsewhere)")
    return url


@pytest.fixture
def listening(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_only(database_url), autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        yield conn


def enqueue(queue: TaskQueue, count: int = 1, delay: float = 0.0) -> None:
    with queue.store.transaction() as session:
        for _ in range(count):
            queue.enqueue(session, "job", delay=delay)


def test_one_notification_per_committed_transaction_that_queued_due_tasks(
    store: Store, listening: psycopg.Connection
) -> None:
    queue = TaskQueue(store)
    enqueue(queue, count=3)
    assert [n.channel for n in listening.notifies(timeout=2, stop_after=2)] == [CHANNEL]


def test_no_notification_for_a_rollback_or_for_tasks_due_later(
    store: Store, listening: psycopg.Connection
) -> None:
    queue = TaskQueue(store)
    with pytest.raises(RuntimeError), store.transaction() as session:
        queue.enqueue(session, "job")
        raise RuntimeError("rolled back")
    with store.transaction() as session:  # the rolled-back request must not leak into this
        session.execute(sa.text("SELECT 1"))
    enqueue(queue, delay=60)
    assert list(listening.notifies(timeout=1)) == []


class RecordingHandler:
    def __init__(self) -> None:
        self.ran = threading.Event()

    def run(self, task: ClaimedTask) -> None:
        self.ran.set()

    def on_exhausted(self, task: ClaimedTask, error: str) -> None:
        raise AssertionError("not expected")


@contextlib.contextmanager
def listening_worker(
    database_url: str, store: Store, handler: RecordingHandler, threads: int
) -> Iterator[None]:
    """A worker that polls only every POLL_INTERVAL, LISTENing; ready when this yields."""
    worker_store = Store(database_url)
    worker = Worker(
        TaskRunner(TaskQueue(worker_store), {"job": handler}),
        threads=threads,
        poll_interval=POLL_INTERVAL,
        wake_url=postgres_only(database_url),
    )
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        listening = "SELECT count(*) FROM pg_stat_activity WHERE query = :q"
        while time.monotonic() < deadline:
            with store.read() as session:
                if session.scalar(sa.text(listening), {"q": f"LISTEN {CHANNEL}"}):
                    break
            time.sleep(0.05)
        time.sleep(0.3)  # the threads have taken the wake-up the listener gives as it starts
        yield
    finally:
        worker.stop()
        thread.join(timeout=10)
        worker_store.dispose()
    assert not thread.is_alive()


def test_a_task_queued_by_another_process_wakes_an_idle_worker_at_once(
    database_url: str, store: Store
) -> None:
    handler = RecordingHandler()
    with listening_worker(database_url, store, handler, threads=2):
        queued_at = time.monotonic()
        enqueue(TaskQueue(store))  # "another process": its own engine and connection
        assert handler.ran.wait(5), "the idle worker was not woken"
        assert time.monotonic() - queued_at < 5 < POLL_INTERVAL


class SlowHandler(RecordingHandler):
    def __init__(self) -> None:
        super().__init__()
        self.started: list[float] = []

    def run(self, task: ClaimedTask) -> None:
        self.started.append(time.monotonic())
        time.sleep(1.0)


def test_tasks_queued_together_spread_over_the_idle_threads(
    database_url: str, store: Store
) -> None:
    """One NOTIFY for 4 tasks: the first thread to claim wakes the next, and so on."""
    handler = SlowHandler()
    with listening_worker(database_url, store, handler, threads=4):
        queued_at = time.monotonic()
        enqueue(TaskQueue(store), count=4)
        deadline = time.monotonic() + 10
        while len(handler.started) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    # On one thread the fourth would start 3 s in; on four threads they start together.
    assert len(handler.started) == 4
    assert max(handler.started) - queued_at < 2.0


def test_the_listener_makes_its_connection_anew_now_and_then(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection cut silently never raises: the listener does not keep one for ever."""
    from service.runtime import wakeup

    url = postgres_only(database_url)
    monkeypatch.setattr(wakeup, "LISTEN_RECYCLE", 0.3)
    connects: list[dict[str, object]] = []
    real_connect = psycopg.connect

    def counted(*args: object, **kwargs: object) -> psycopg.Connection:
        connects.append(kwargs)
        return real_connect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(psycopg, "connect", counted)
    stopping = threading.Event()
    thread = threading.Thread(target=wakeup.Listener(url, lambda: None).run, args=(stopping,))
    thread.start()
    time.sleep(2.0)
    stopping.set()
    thread.join(timeout=5)
    assert len(connects) >= 2
    assert connects[0]["keepalives_idle"] == 10  # and a dead peer is noticed by TCP itself


def test_a_sqlite_url_has_no_listener() -> None:
    assert libpq_url("sqlite:///var/genrelay.db") is None
    assert libpq_url("postgresql+psycopg://u:p@127.0.0.1:5432/db") == (
        "postgresql://u:p@127.0.0.1:5432/db"
    )
