"""SQLite's writers wait in line (service/database.py, SqliteWriters): threads on a lock,
processes on an flock beside the database, never longer than SQLite's own busy timeout."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import database
from service.database import SqliteWriters, Store
from service.models import Tenant, utcnow

# Holds the flock on argv[1] until its stdin closes; says "held" once it has it.
HOLDER = """
import fcntl, sys
file = open(sys.argv[1], "ab")
fcntl.flock(file, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def store(tmp_path: Path, sqlite_template: Path) -> Store:
    path = tmp_path / "genrelay.db"
    path.write_bytes(sqlite_template.read_bytes())
    made = Store(f"sqlite:///{path}")
    yield made  # type: ignore[misc]
    made.dispose()


def _hold_in_another_process(lock_path: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, lock_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    return holder


def _release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.close()
    holder.wait(timeout=10)
    holder.stdout.close()


def _add_tenant(store: Store, name: str) -> None:
    with store.transaction() as session:
        session.add(Tenant(id=f"ten_{name}", name=name, weight=1, created_at=utcnow()))


def test_a_write_waits_for_the_writer_of_another_process_and_goes_when_it_is_done(
    store: Store, tmp_path: Path
) -> None:
    holder = _hold_in_another_process(str(tmp_path / "genrelay.db-writers"))
    done = threading.Event()
    writer = threading.Thread(target=lambda: (_add_tenant(store, "waited"), done.set()))
    writer.start()
    try:
        assert not done.wait(0.5), "the write did not wait for the other process"
    finally:
        released_at = time.monotonic()
        _release(holder)
    assert done.wait(10)
    assert time.monotonic() - released_at < 1.0
    writer.join()
    with store.read_one() as connection:
        assert connection.scalar(sa.select(Tenant.name)) == "waited"


def test_waiting_ends_after_the_busy_timeout_and_the_write_goes_to_sqlite(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that never lets go (a stuck process) costs the busy timeout, as SQLite's own
    lock would, not a write that never happens."""
    monkeypatch.setattr(database, "SQLITE_BUSY_TIMEOUT", 0.3)
    holder = _hold_in_another_process(str(tmp_path / "genrelay.db-writers"))
    try:
        started = time.monotonic()
        _add_tenant(store, "late")
        waited = time.monotonic() - started
    finally:
        _release(holder)
    assert 0.3 <= waited < 5
    with store.read_one() as connection:
        assert connection.scalar(sa.select(Tenant.name)) == "late"


def test_the_threads_of_a_process_write_one_at_a_time(store: Store) -> None:
    inside = 0
    most_inside = 0
    count = threading.Lock()

    def write(index: int) -> None:
        nonlocal inside, most_inside
        with store.transaction() as session:
            with count:
                inside += 1
                most_inside = max(most_inside, inside)
            session.add(Tenant(id=f"ten_{index}", name=f"t{index}", weight=1))
            session.flush()
            time.sleep(0.01)
            with count:
                inside -= 1

    threads = [threading.Thread(target=write, args=(index,)) for index in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert most_inside == 1
    with store.read_one() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(Tenant)) == 12


def test_a_write_transaction_inside_another_on_the_same_thread_does_not_wait_for_itself(
    tmp_path: Path,
) -> None:
    writers = SqliteWriters(str(tmp_path / "db-writers"))
    started = time.monotonic()
    try:
        with writers.hold(), writers.hold():
            pass
        with writers.hold():  # and the lock was given back
            pass
    finally:
        writers.close()
    assert time.monotonic() - started < 1


def test_postgresql_and_in_memory_databases_take_no_file() -> None:
    assert SqliteWriters.of(sa.create_engine("postgresql+psycopg://u@127.0.0.1/db")) is None
    memory = SqliteWriters.of(sa.create_engine("sqlite://"))
    assert memory is not None
    with memory.hold():  # the threads' lock alone
        pass


def test_a_lock_file_that_cannot_be_opened_leaves_the_waiting_to_sqlite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writers = SqliteWriters(str(tmp_path / "missing-directory" / "db-writers"))
    try:
        with writers.hold():
            pass
        with writers.hold():  # the thread lock was given back; the file is not tried again
            pass
    finally:
        writers.close()
    warnings = [r for r in caplog.records if "writers wait in SQLite" in r.getMessage()]
    assert len(warnings) == 1
