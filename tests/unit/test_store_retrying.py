"""Store.retrying: work whose transaction the database aborted to break a deadlock runs
again; any other error does not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from service.database import CONFLICT_ATTEMPTS, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'retrying.db'}")
    yield store
    store.engine.dispose()


def aborted(orig: Exception) -> sa.exc.OperationalError:
    return sa.exc.OperationalError("UPDATE upstream_accounts ...", {}, orig)


def test_work_aborted_by_a_deadlock_or_a_serialization_failure_runs_again(store: Store) -> None:
    conflicts = [
        aborted(psycopg.errors.DeadlockDetected("deadlock detected")),
        aborted(psycopg.errors.SerializationFailure("could not serialize access")),
    ]
    calls = []

    def work() -> str:
        calls.append(1)
        if conflicts:
            raise conflicts.pop(0)
        return "done"

    assert store.retrying(work) == "done"
    assert len(calls) == 3


def test_it_gives_up_after_its_attempts_with_the_last_error(store: Store) -> None:
    calls = []

    def work() -> None:
        calls.append(1)
        raise aborted(psycopg.errors.DeadlockDetected(f"deadlock {len(calls)}"))

    with pytest.raises(sa.exc.OperationalError, match=f"deadlock {CONFLICT_ATTEMPTS}"):
        store.retrying(work)
    assert len(calls) == CONFLICT_ATTEMPTS


def test_any_other_error_is_raised_at_once(store: Store) -> None:
    calls = []

    def work() -> None:
        calls.append(1)
        raise aborted(psycopg.errors.UndefinedTable("no such table"))

    with pytest.raises(sa.exc.OperationalError, match="no such table"):
        store.retrying(work)
    assert len(calls) == 1
