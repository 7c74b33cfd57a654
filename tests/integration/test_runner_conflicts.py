"""An outcome whose transaction the database aborted to break a conflict with another one (a
deadlock, a serialization failure) is written again, as decided, on SQLite and PostgreSQL.

Left unwritten, its task would stay held until its lease ended and then run again: for a
submit, a second job at Deep-Image for one generation.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
import threading
from typing import Any

import psycopg
import pytest
import requests
import sqlalchemy as sa

from service.config import Config
from service.database import CONFLICT_ATTEMPTS, Store
from service.models import Generation, Task, utcnow
from service.runtime.kinds import POLL, SUBMIT
from service.runtime.outcomes import Apply, Done, Failed, Next, Outcome, after_commit
from service.runtime.queue import ClaimedTask, RetryPolicy, TaskQueue, TaskStatus
from service.runtime.runner import TaskRunner
from tests.helpers import deadlocked_on_the_account, seed_examples, set_simulator

TEXT_ONLY = seed_examples()["text_only"]
START = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


def aborted(error: type[psycopg.Error] = psycopg.errors.DeadlockDetected) -> sa.exc.DBAPIError:
    """What SQLAlchemy raises when PostgreSQL aborts a transaction to break a conflict."""
    return sa.exc.OperationalError("UPDATE generations ...", {}, error("aborted by a conflict"))


class Conflicts:
    """The outcome's change: writes a note row and counts it once committed, and is aborted
    by a conflict the first `times` times (after its writes, as PostgreSQL would)."""

    def __init__(self, times: int, error: type[psycopg.Error] = psycopg.errors.DeadlockDetected):
        self.times = times
        self.error = error
        self.calls = 0
        self.counted: list[str] = []

    def change(self, note: str) -> Apply:
        def apply(session: sa.orm.Session) -> None:
            self.calls += 1
            session.add(
                Task(id=f"note_{note}", kind="note", payload={}, status="done", run_at=START)
            )
            session.flush()
            after_commit(session, lambda: self.counted.append(note))
            if self.calls <= self.times:
                raise aborted(self.error)

        return apply


class Handler:
    """Returns each task's outcome from `outcomes`, by its payload's "n"; runs together."""

    def __init__(self, outcomes: dict[int, Outcome]) -> None:
        self.outcomes = outcomes
        self.runs: list[str] = []

    def run(self, task: ClaimedTask) -> Outcome:
        return self.run_batch([task])[0]

    def run_batch(
        self, tasks: list[ClaimedTask], *, stopping: threading.Event | None = None
    ) -> list[Outcome]:
        self.runs += [task.id for task in tasks]
        return [self.outcomes[task.payload["n"]] for task in tasks]

    def on_exhausted(self, task: ClaimedTask, error: str) -> None:
        return None


class Batches(Handler):
    def apply_together(self, session: sa.orm.Session, changes: list[Apply]) -> None:
        for change in changes:
            change(session)


@pytest.fixture
def queue(store: Store) -> TaskQueue:
    policy = RetryPolicy(max_attempts=3, base_delay=10.0, max_delay=100.0)
    return TaskQueue(store, policies={"job": policy}, lease_seconds=60, rng=random.Random(1))


def claim(queue: TaskQueue, *numbers: int) -> list[ClaimedTask]:
    ids = []
    for n in numbers:
        with queue.store.transaction() as session:
            ids.append(queue.enqueue(session, "job", {"n": n}))
    tasks = queue.claim_due_tasks(limit=len(ids))
    return sorted(tasks, key=lambda task: ids.index(task.id))


def notes(store: Store) -> list[str]:
    with store.read() as session:
        return sorted(session.scalars(sa.select(Task.id).where(Task.kind == "note")))


def row(store: Store, task_id: str) -> Task:
    with store.read() as session:
        task = session.get(Task, task_id)
    assert task is not None
    return task


@pytest.mark.parametrize(
    "error", [psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure]
)
def test_an_outcome_aborted_by_a_conflict_is_written_again_and_counted_once(
    queue: TaskQueue, error: type[psycopg.Error], caplog: pytest.LogCaptureFixture
) -> None:
    conflicts = Conflicts(times=1, error=error)

    def going_on(session: sa.orm.Session) -> Next:
        conflicts.change("done")(session)
        return Next(POLL, {"delay": 30.0}, 30.0)

    handler = Handler({1: Done(going_on)})
    [task] = claim(queue, 1)

    assert TaskRunner(queue, {"job": handler}).execute(task) is TaskStatus.DONE

    assert conflicts.calls == 2  # aborted once, then written again
    assert f"a transaction aborted by a conflict ({error.sqlstate})" in caplog.text
    assert notes(queue.store) == ["note_done"]  # once: the aborted write rolled back
    assert conflicts.counted == ["done"]  # what the aborted session left is dropped with it
    assert handler.runs == [task.id]  # the work itself ran once
    follow = row(queue.store, task.id)
    assert (follow.kind, follow.status, follow.attempts) == (POLL, "pending", 0)


def test_a_failed_attempt_aborted_by_a_conflict_keeps_its_one_decision(
    store: Store,
) -> None:
    queue = TaskQueue(
        store,
        policies={"job": RetryPolicy(max_attempts=3, base_delay=10.0, max_delay=100.0)},
        rng=random.Random(1),
    )
    conflicts = Conflicts(times=1)
    told: list[dt.datetime | None] = []

    def record(session: sa.orm.Session, next_at: dt.datetime | None) -> None:
        told.append(next_at)
        conflicts.change("failed")(session)

    [task] = claim(queue, 1)
    runner = TaskRunner(queue, {"job": Handler({1: Failed("503", record)})})

    assert runner.execute(task) is TaskStatus.PENDING

    assert len(told) == 2 and told[0] == told[1]  # the next run, drawn once, told again
    retried = row(store, task.id)
    assert retried.status == TaskStatus.PENDING
    assert retried.run_at == told[0]
    assert notes(store) == ["note_failed"]
    assert conflicts.counted == ["failed"]


def test_outcomes_of_a_batch_aborted_by_conflicts_are_each_written_again(
    queue: TaskQueue,
) -> None:
    # The batch's transaction is aborted, then the first outcome's own: it is written again.
    conflicts = Conflicts(times=2)
    handler = Batches({1: Done(conflicts.change("one")), 2: Done(conflicts.change("two"))})
    tasks = claim(queue, 1, 2)
    runner = TaskRunner(queue, {"job": handler})
    assert runner.batchable("job")

    assert runner.execute_batch(tasks) == [TaskStatus.DONE, TaskStatus.DONE]

    assert notes(queue.store) == ["note_one", "note_two"]
    assert sorted(conflicts.counted) == ["one", "two"]  # each once
    assert [row(queue.store, task.id).status for task in tasks] == ["done", "done"]


def test_an_outcome_aborted_every_time_leaves_its_task_held_after_a_few_tries(
    queue: TaskQueue,
) -> None:
    conflicts = Conflicts(times=CONFLICT_ATTEMPTS)
    [task] = claim(queue, 1)

    runner = TaskRunner(queue, {"job": Handler({1: Done(conflicts.change("x"))})})
    assert runner.execute(task) is None

    assert conflicts.calls == CONFLICT_ATTEMPTS  # not for ever: the lease brings it back
    assert (notes(queue.store), conflicts.counted) == ([], [])
    assert row(queue.store, task.id).status == TaskStatus.RUNNING


# The submit, on the inline path of intake and through a worker.


def jobs_created(simulator: Any) -> int:
    return int(requests.get(f"{simulator.url}/_sim/stats", timeout=5).json()["jobs_created"])


def submit_state(services: Any, generation_id: str) -> tuple[Any, ...]:
    with services.store.read() as session:
        generation = session.get(Generation, generation_id)
        task = session.scalars(sa.select(Task).where(Task.generation_id == generation_id)).one()
        return generation.status, generation.upstream_job is not None, task.kind, task.status


def test_an_inline_submit_whose_outcome_is_aborted_by_a_deadlock_records_its_job_once(
    config: Config, make_client: Any, simulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.generations.submit as submit

    set_simulator(simulator.url, processing_time=60.0)
    services, client, auth = make_client(config.replace(upstream_concurrency=2))
    real = submit.change_status
    calls: list[str] = []

    def aborted_once(session: sa.orm.Session, generation_id: str, *args: Any, **kw: Any) -> Any:
        calls.append(generation_id)
        moved = real(session, generation_id, *args, **kw)  # its event and deliveries too
        if len(calls) == 1:
            raise aborted()
        return moved

    monkeypatch.setattr(submit, "change_status", aborted_once)
    response = client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth)

    assert response.status_code == 202, response.json
    created = response.json
    assert len(calls) == 2
    # The answer shows the change the inline attempt committed (seen once it committed).
    assert (created["status"], created["upstream"]["job"] is not None) == ("processing", True)
    assert submit_state(services, created["id"]) == ("processing", True, POLL, "pending")
    assert jobs_created(simulator) == 1
    with services.store.read() as session:
        events = session.scalars(
            sa.text("SELECT type FROM events WHERE generation_id = :id"), {"id": created["id"]}
        ).all()
    assert events.count("generation.processing") == 1, events


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_submit_whose_outcome_is_aborted_by_a_real_deadlock_records_its_job_once(
    config: Config, make_client: Any, simulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The submit's outcome moves its generation (row lock), then, while the limit is probed,
    # locks the account. A transaction holding the account that then writes the generation
    # closes a cycle, and PostgreSQL aborts the one that waited first: the outcome's.
    services, client, auth = make_client(config)  # no configured limit: probing
    set_simulator(simulator.url, upstream_error_rate=1.0)
    created = client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth).json
    # The inline attempt failed (a 5xx); the retry is due now, with Deep-Image back.
    assert submit_state(services, created["id"]) == ("queued", False, SUBMIT, "pending")
    set_simulator(simulator.url, upstream_error_rate=0.0, processing_time=60.0)
    with services.store.transaction() as session:
        session.execute(
            sa.update(Task)
            .where(Task.generation_id == created["id"])
            .values(run_at=utcnow() - dt.timedelta(seconds=1))
        )
    [task] = services.queue.claim_due_tasks(kinds=[SUBMIT])
    run = functools.partial(services.runner.execute, task)
    status = deadlocked_on_the_account(services, created["id"], run)
    assert status == TaskStatus.DONE
    assert "a transaction aborted by a conflict (40P01)" in caplog.text
    assert submit_state(services, created["id"]) == ("processing", True, POLL, "pending")
    assert jobs_created(simulator) == 1
