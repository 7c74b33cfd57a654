"""The durable task queue on real SQLite and PostgreSQL: leases, backoff, dead tasks."""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections import Counter
from typing import Any, cast

import pytest
import sqlalchemy as sa

from service.database import Store
from service.errors import TransientError
from service.models import Task
from service.runtime.outcomes import DONE, Apply, Done, Failed, Later, Next, Outcome
from service.runtime.queue import ClaimedTask, RetryPolicy, TaskQueue, TaskStatus
from service.runtime.runner import TaskRunner
from service.runtime.worker import Worker

START = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(store: Store, clock: FakeClock) -> TaskQueue:
    policy = RetryPolicy(max_attempts=3, base_delay=10.0, max_delay=100.0, max_age=3600.0)
    return TaskQueue(
        store, policies={"job": policy}, lease_seconds=60, clock=clock, rng=random.Random(1)
    )


def enqueue(queue: TaskQueue, kind: str = "job", delay: float = 0.0) -> str:
    with queue.store.transaction() as session:
        return queue.enqueue(session, kind, {"n": 1}, delay=delay)


def finish(queue: TaskQueue, task: ClaimedTask) -> bool:
    with queue.store.transaction() as session:
        return queue.finish_in(session, task)


def retry_later(queue: TaskQueue, task: ClaimedTask, error: str) -> TaskStatus | None:
    """What the runner does with a failed attempt that records nothing."""
    return TaskRunner(queue, {task.kind: RecordingHandler(Failed(error))}).execute(task)


def row(store: Store, task_id: str) -> Task:
    with store.read() as session:
        task = session.get(Task, task_id)
    assert task is not None
    return task


def test_a_claimed_task_is_held_until_its_lease_runs_out(queue: TaskQueue) -> None:
    task_id = enqueue(queue)
    [task] = queue.claim_due_tasks()
    assert (task.id, task.attempts, task.payload) == (task_id, 1, {"n": 1})
    assert queue.claim_due_tasks() == []


def test_a_delayed_task_is_claimed_only_when_due(queue: TaskQueue, clock: FakeClock) -> None:
    enqueue(queue, delay=30)
    assert queue.claim_due_tasks() == []
    clock.advance(30)
    assert len(queue.claim_due_tasks()) == 1


def test_a_task_whose_holder_died_runs_again_and_the_old_holder_cannot_finish_it(
    queue: TaskQueue, clock: FakeClock
) -> None:
    task_id = enqueue(queue)
    [first] = queue.claim_due_tasks()
    clock.advance(61)  # the holder died: its lease runs out
    [second] = queue.claim_due_tasks()
    assert second.id == task_id
    assert second.attempts == 2
    assert second.claim_token != first.claim_token
    assert finish(queue, first) is False  # stale holder
    assert retry_later(queue, first, "late") is None
    assert finish(queue, second) is True
    assert row(queue.store, task_id).status == TaskStatus.DONE


def test_a_failed_attempt_is_rescheduled_with_backoff(queue: TaskQueue, clock: FakeClock) -> None:
    task_id = enqueue(queue)
    [task] = queue.claim_due_tasks()
    assert retry_later(queue, task, "upstream 503") is TaskStatus.PENDING
    stored = row(queue.store, task_id)
    assert stored.status == TaskStatus.PENDING
    assert stored.last_error == "upstream 503"
    delay = (stored.run_at - clock.now).total_seconds()
    assert 5.0 <= delay <= 10.0  # first retry: base 10 s, jitter in the upper half
    assert queue.claim_due_tasks() == []
    clock.advance(delay)
    assert [t.attempts for t in queue.claim_due_tasks()] == [2]


def test_a_task_out_of_attempts_is_dead_and_kept(queue: TaskQueue, clock: FakeClock) -> None:
    task_id = enqueue(queue)
    for _ in range(3):
        clock.advance(1000)
        [task] = queue.claim_due_tasks()
        outcome = retry_later(queue, task, "still down")
    assert outcome is TaskStatus.DEAD
    stored = row(queue.store, task_id)
    assert (stored.status, stored.attempts, stored.last_error) == ("dead", 3, "still down")
    clock.advance(10_000)
    assert queue.claim_due_tasks() == []


def test_a_task_past_its_max_age_is_dead(queue: TaskQueue, clock: FakeClock) -> None:
    task_id = enqueue(queue)
    clock.advance(3599)  # max age 3600 s: the next attempt (>= 5 s away) would be too late
    [task] = queue.claim_due_tasks()
    assert retry_later(queue, task, "slow") is TaskStatus.DEAD
    assert row(queue.store, task_id).status == TaskStatus.DEAD


def test_a_released_task_is_due_at_once_and_the_attempt_is_not_counted(queue: TaskQueue) -> None:
    enqueue(queue)
    [task] = queue.claim_due_tasks()
    assert queue.release(task) is True
    [again] = queue.claim_due_tasks()
    assert again.attempts == 1


def test_a_task_handed_back_after_it_ran_keeps_its_attempt_counted(queue: TaskQueue) -> None:
    """An inline store cut short at exit may have uploaded its object: its next attempt must
    know it is not the first, to look for what it left."""
    task_id = enqueue(queue)
    [task] = queue.claim_due_tasks()
    assert queue.release(task, ran=True) is True
    [again] = queue.claim_due_tasks()
    assert (again.id, again.attempts) == (task_id, 2)


def test_a_task_enqueued_claimed_is_invisible_to_workers_until_its_lease_ends(
    queue: TaskQueue, clock: FakeClock
) -> None:
    with queue.store.transaction() as session:
        held = queue.enqueue_claimed(session, "job")
    assert held.attempts == 1
    assert queue.claim_due_tasks() == []
    clock.advance(61)
    [taken] = queue.claim_due_tasks()
    assert taken.id == held.id


def test_concurrent_claimers_never_get_the_same_task(store: Store) -> None:
    queue = TaskQueue(store, lease_seconds=600)
    with store.transaction() as session:
        ids = {queue.enqueue(session, "job") for _ in range(120)}
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all() -> None:
        while batch := queue.claim_due_tasks(limit=5):
            with lock:
                claimed.extend(t.id for t in batch)

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Counter(claimed).most_common(1)[0][1] == 1
    assert set(claimed) == ids


class RecordingHandler:
    """Returns `outcome` (or raises it), recording its runs and what it was told at the end."""

    def __init__(self, outcome: Outcome | Exception = DONE) -> None:
        self.outcome = outcome
        self.runs: list[str] = []
        self.exhausted: list[tuple[str, str]] = []

    def run(self, task: ClaimedTask) -> Outcome:
        self.runs.append(task.id)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def on_exhausted(self, task: ClaimedTask, error: str) -> Apply | None:
        self.exhausted.append((task.id, error))
        return None


def test_the_runner_completes_a_task_whose_handler_returns(queue: TaskQueue) -> None:
    handler = RecordingHandler()
    task_id = enqueue(queue)
    [task] = queue.claim_due_tasks()
    assert TaskRunner(queue, {"job": handler}).execute(task) is TaskStatus.DONE
    assert handler.runs == [task_id]
    assert row(queue.store, task_id).status == TaskStatus.DONE


@pytest.mark.parametrize(
    "error", [Failed("503"), TransientError("503"), ValueError("bug")], ids=repr
)
def test_the_runner_retries_failures_and_reports_exhaustion_once(
    queue: TaskQueue, clock: FakeClock, error: Failed | Exception
) -> None:
    handler = RecordingHandler(error)
    runner = TaskRunner(queue, {"job": handler})
    task_id = enqueue(queue)
    outcomes = []
    for _ in range(3):
        clock.advance(1000)
        [task] = queue.claim_due_tasks()
        outcomes.append(runner.execute(task))
    assert outcomes == [TaskStatus.PENDING, TaskStatus.PENDING, TaskStatus.DEAD]
    assert len(handler.runs) == 3
    assert [tid for tid, _ in handler.exhausted] == [task_id]
    assert "503" in handler.exhausted[0][1] or "bug" in handler.exhausted[0][1]


def test_a_task_of_unknown_kind_is_dead_not_retried(queue: TaskQueue) -> None:
    task_id = enqueue(queue, kind="mystery")
    [task] = queue.claim_due_tasks()
    assert TaskRunner(queue, {}).execute(task) is TaskStatus.DEAD
    assert "no handler" in (row(queue.store, task_id).last_error or "")


def test_a_task_reclaimed_after_too_many_lost_leases_is_given_up(
    queue: TaskQueue, clock: FakeClock
) -> None:
    handler = RecordingHandler()
    enqueue(queue)
    for _ in range(4):  # max_attempts is 3: the fourth claim finds it exhausted
        [task] = queue.claim_due_tasks()
        clock.advance(61)
    assert TaskRunner(queue, {"job": handler}).execute(task) is TaskStatus.DEAD
    assert handler.runs == []
    assert len(handler.exhausted) == 1


def test_the_worker_threads_drain_the_queue_and_stop_on_request(store: Store) -> None:
    queue = TaskQueue(store)
    handler = RecordingHandler()
    with store.transaction() as session:
        ids = {queue.enqueue(session, "job") for _ in range(20)}
    worker = Worker(TaskRunner(queue, {"job": handler}), threads=3, poll_interval=0.05)
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)
    while len(handler.runs) < len(ids) and dt.datetime.now(dt.UTC) < deadline:
        threading.Event().wait(0.05)
    worker.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert sorted(handler.runs) == sorted(ids)
    with store.read() as session:
        statuses = set(session.scalars(sa.select(Task.status)))
    assert statuses == {TaskStatus.DONE}


def test_a_task_told_later_runs_again_without_using_an_attempt(
    queue: TaskQueue, clock: FakeClock
) -> None:
    handler = RecordingHandler(Later(30, "not yet"))
    runner = TaskRunner(queue, {"job": handler})
    enqueue(queue)
    for _ in range(5):  # more than max_attempts (3): `Later` never exhausts the task
        [task] = queue.claim_due_tasks()
        assert task.attempts == 1
        assert runner.execute(task) is TaskStatus.PENDING
        assert queue.claim_due_tasks() == []
        clock.advance(30)
    assert len(handler.runs) == 5
    assert handler.exhausted == []


@pytest.mark.parametrize("limit", [1, 3])
def test_a_claim_never_takes_more_than_its_limit(store: Store, limit: int) -> None:
    # On PostgreSQL an `id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` can be planned as
    # a semi-join that re-runs the subquery per row, each run skipping what the statement
    # already locked: one claim then takes the whole backlog.
    queue = TaskQueue(store)
    with store.transaction() as session:
        for _ in range(200):
            queue.enqueue(session, "job")
    claimed = queue.claim_due_tasks(limit=limit)
    assert len(claimed) == limit
    with store.read() as session:
        running = session.scalar(
            sa.select(sa.func.count()).select_from(Task).where(Task.status == "running")
        )
    assert running == limit


class FlakyExhaustionHandler(RecordingHandler):
    """Fails every run; recording the dead outcome fails the first time."""

    def __init__(self) -> None:
        super().__init__(TransientError("down"))
        self.recording_failures = 1

    def on_exhausted(self, task: ClaimedTask, error: str) -> Apply | None:
        if self.recording_failures:
            self.recording_failures -= 1
            raise RuntimeError("database briefly away")
        return super().on_exhausted(task, error)


def test_a_task_whose_outcome_could_not_be_recorded_comes_back_until_it_is(
    queue: TaskQueue, clock: FakeClock
) -> None:
    handler = FlakyExhaustionHandler()
    runner = TaskRunner(queue, {"job": handler})
    task_id = enqueue(queue)
    for _ in range(3):  # max_attempts 3: the third failure is the last
        clock.advance(1000)
        [task] = queue.claim_due_tasks()
        outcome = runner.execute(task)
    assert outcome is None  # nothing recorded: the task stays held until its lease ends
    assert row(queue.store, task_id).status == TaskStatus.RUNNING
    assert handler.exhausted == []
    clock.advance(61)
    [again] = queue.claim_due_tasks()
    assert runner.execute(again) is TaskStatus.DEAD
    assert [tid for tid, _ in handler.exhausted] == [task_id]
    assert len(handler.runs) == 3  # the work itself was not run again
    assert row(queue.store, task_id).status == TaskStatus.DEAD


def test_renew_extends_the_leases_still_held_and_reports_the_lost_ones(
    queue: TaskQueue, clock: FakeClock
) -> None:
    kept_id, lost_id = enqueue(queue), enqueue(queue)
    held = {task.id: task for task in queue.claim_due_tasks(limit=2)}
    clock.advance(50)
    assert queue.renew([held[kept_id]]) == {kept_id}  # kept_id's lease now ends at 110 s
    clock.advance(11)  # 61 s: lost_id's lease (60 s) ran out, kept_id's has not
    [other] = queue.claim_due_tasks(limit=2)
    assert other.id == lost_id
    assert queue.renew(held.values()) == {kept_id}
    assert row(queue.store, kept_id).lease_expires_at == START + dt.timedelta(seconds=121)
    assert finish(queue, held[kept_id]) is True
    assert finish(queue, held[lost_id]) is False  # the new holder's now


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_renew_never_waits_for_a_task_row_another_transaction_holds(
    queue: TaskQueue, clock: FakeClock
) -> None:
    # Waiting there would join cycles of row locks (see TaskQueue.renew): here the row of
    # one running task is held by another transaction, as when its outcome is being written.
    free_id, busy_id = enqueue(queue), enqueue(queue)
    held = list(queue.claim_due_tasks(limit=2))
    clock.advance(30)
    renewed: list[set[str]] = []
    with queue.store.engine.connect() as other:
        other.execute(sa.select(Task.id).where(Task.id == busy_id).with_for_update())
        renewal = threading.Thread(target=lambda: renewed.append(queue.renew(held)))
        renewal.start()
        renewal.join(timeout=10)
        assert not renewal.is_alive(), "renew waited for the held row"
        other.rollback()
    # Both still ours; the free one's lease is extended now, the busy one's on the next pass.
    assert renewed == [{free_id, busy_id}]
    assert row(queue.store, free_id).lease_expires_at == START + dt.timedelta(seconds=90)
    assert row(queue.store, busy_id).lease_expires_at == START + dt.timedelta(seconds=60)
    clock.advance(10)
    assert queue.renew(held) == {free_id, busy_id}
    assert row(queue.store, busy_id).lease_expires_at == START + dt.timedelta(seconds=100)


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_lease_skipped_for_its_locked_row_is_tried_again_at_the_keepers_next_look(
    queue: TaskQueue, clock: FakeClock
) -> None:
    from service.runtime.worker import LeaseKeeper

    task_id = enqueue(queue)
    [held] = queue.claim_due_tasks()
    keeper = LeaseKeeper(queue)
    with keeper.holding(held):
        keeper._renewed[task_id] -= queue.lease.total_seconds()  # a third of its lease is past
        clock.advance(30)
        with queue.store.engine.connect() as other:
            other.execute(sa.select(Task.id).where(Task.id == task_id).with_for_update())
            assert keeper.renew_once(only_due=True) == 1  # still ours, but skipped
            other.rollback()
        assert row(queue.store, task_id).lease_expires_at == START + dt.timedelta(seconds=60)
        # Not a third of a lease later: the next look renews it.
        assert keeper.renew_once(only_due=True) == 1
    assert row(queue.store, task_id).lease_expires_at == START + dt.timedelta(seconds=90)


class SlowHandler(RecordingHandler):
    """Runs for `seconds`, longer than the lease, while another claimer keeps trying."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def run(self, task: ClaimedTask) -> Outcome:
        outcome = super().run(task)
        threading.Event().wait(self.seconds)
        return outcome


def test_a_task_running_longer_than_its_lease_is_not_claimed_by_another_worker(
    store: Store,
) -> None:
    queue = TaskQueue(store, lease_seconds=1.0)  # renewed every 1/3 s while it runs
    handler = SlowHandler(seconds=3.0)
    task_id = enqueue(queue)
    worker = Worker(TaskRunner(queue, {"job": handler}), threads=1, poll_interval=0.05)
    thread = threading.Thread(target=worker.run)
    thread.start()
    rival = TaskQueue(store, lease_seconds=1.0)
    stolen: list[ClaimedTask] = []
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)
    while not handler.runs and dt.datetime.now(dt.UTC) < deadline:
        threading.Event().wait(0.01)  # the worker has claimed it and is running it
    while row(store, task_id).status != TaskStatus.DONE and dt.datetime.now(dt.UTC) < deadline:
        stolen += rival.claim_due_tasks()
        threading.Event().wait(0.1)
    worker.stop()
    thread.join(timeout=10)
    assert stolen == []
    assert handler.runs == [task_id]
    finished = row(store, task_id)
    assert (finished.status, finished.attempts) == (TaskStatus.DONE, 1)


def test_a_short_lease_is_renewed_every_third_of_it_while_its_task_runs(
    store: Store,
) -> None:
    from service.runtime.kinds import LINE, SHORT_LEASES
    from service.runtime.worker import LeaseKeeper

    queue = TaskQueue(store, lease_seconds=300.0, short_leases=SHORT_LEASES)
    queue.ensure_singleton("task_line", LINE)
    [held] = queue.claim_due_tasks()
    keeper = LeaseKeeper(queue)
    stopping = threading.Event()
    thread = threading.Thread(target=keeper.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        with keeper.holding(held):  # the line's pass runs past its 3 s lease...
            threading.Event().wait(SHORT_LEASES[LINE] + 1.5)
            assert queue.claim_due_tasks() == []  # ...and no other worker takes it meanwhile
    finally:
        stopping.set()
        thread.join(timeout=10)


def mark(note: str) -> Apply:
    """An outcome's change: writes `note` into a row the test reads back."""

    def apply(session: sa.orm.Session) -> None:
        session.add(Task(id=f"note_{note}", kind="note", payload={}, status="done", run_at=START))

    return apply


def notes(store: Store) -> set[str]:
    with store.read() as session:
        return set(session.scalars(sa.select(Task.id).where(Task.kind == "note")))


def test_an_outcome_and_the_task_update_commit_in_one_transaction(queue: TaskQueue) -> None:
    handler = RecordingHandler(Done(mark("done")))
    task_id = enqueue(queue)
    [task] = queue.claim_due_tasks()
    commits: list[object] = []

    def count(connection: object) -> None:
        commits.append(connection)

    sa.event.listen(queue.store.engine, "commit", count)
    try:
        assert TaskRunner(queue, {"job": handler}).execute(task) is TaskStatus.DONE
    finally:
        sa.event.remove(queue.store.engine, "commit", count)
    assert len(commits) == 1
    assert notes(queue.store) == {"note_done"}
    done = row(queue.store, task_id)
    assert (done.status, done.claim_token) == (TaskStatus.DONE, None)


def test_an_outcome_whose_change_fails_leaves_the_task_held_and_nothing_half_written(
    queue: TaskQueue, clock: FakeClock
) -> None:
    def broken(session: sa.orm.Session) -> None:
        mark("half")(session)
        session.flush()
        raise RuntimeError("constraint violated")

    task_id = enqueue(queue)
    [task] = queue.claim_due_tasks()
    assert TaskRunner(queue, {"job": RecordingHandler(Done(broken))}).execute(task) is None
    assert notes(queue.store) == set()  # rolled back with the task's update
    assert row(queue.store, task_id).status == TaskStatus.RUNNING
    clock.advance(61)  # its lease ends: another run records it
    [again] = queue.claim_due_tasks()
    assert TaskRunner(queue, {"job": RecordingHandler(DONE)}).execute(again) is TaskStatus.DONE


def test_a_failed_attempt_is_told_its_next_run_and_then_that_it_was_given_up(
    queue: TaskQueue, clock: FakeClock
) -> None:
    told: list[dt.datetime | None] = []
    handler = RecordingHandler(Failed("503", lambda session, next_run: told.append(next_run)))
    runner = TaskRunner(queue, {"job": handler})
    task_id = enqueue(queue)
    for _ in range(3):  # max_attempts 3
        clock.advance(1000)
        [task] = queue.claim_due_tasks()
        runner.execute(task)
    # Told the run time the runner chose (5-10 s, then 10-20 s after the attempt), then None.
    assert len(told) == 3 and told[2] is None
    first, second = told[0], told[1]
    assert first is not None and second is not None
    assert START + dt.timedelta(seconds=1005) <= first <= START + dt.timedelta(seconds=1010)
    assert START + dt.timedelta(seconds=2010) <= second <= START + dt.timedelta(seconds=2020)
    assert row(queue.store, task_id).status == TaskStatus.DEAD
    assert [tid for tid, _ in handler.exhausted] == [task_id]


def test_a_handler_that_lost_its_lease_records_what_it_did_but_not_the_task(
    queue: TaskQueue, clock: FakeClock
) -> None:
    enqueue(queue)
    [stale] = queue.claim_due_tasks()
    clock.advance(61)
    [fresh] = queue.claim_due_tasks()  # another worker holds it now
    handler = RecordingHandler(Done(mark("sent")))
    assert TaskRunner(queue, {"job": handler}).execute(stale) is None
    assert notes(queue.store) == {"note_sent"}  # what happened is recorded
    assert row(queue.store, fresh.id).status == TaskStatus.RUNNING  # the holder's task


class ScriptedJitter(random.Random):
    """Jitter draws taken from a script, so a test can pin what each draw says."""

    def __init__(self, draws: list[float]) -> None:
        super().__init__(0)
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


@pytest.mark.parametrize("draws", [[0.0, 1.0], [1.0, 0.0]])
def test_a_failed_attempt_is_decided_once_and_a_task_given_up_records_its_outcome(
    store: Store, clock: FakeClock, draws: list[float]
) -> None:
    # Backoff after the first attempt is 5 s (draw 0.0) or 10 s (draw 1.0); the task may
    # not run later than 7 s after its creation. Deciding twice with two draws could say
    # "retry" and then "too old", killing the task without recording the outcome.
    policy = RetryPolicy(max_attempts=5, base_delay=10.0, max_delay=100.0, max_age=7.0)
    queue = TaskQueue(store, policies={"job": policy}, clock=clock, rng=ScriptedJitter(draws))
    handler = RecordingHandler(TransientError("upstream 503"))
    task_id = enqueue(queue)
    [task] = queue.claim_due_tasks()
    outcome = TaskRunner(queue, {"job": handler}).execute(task)
    if draws[0] == 0.0:
        assert outcome is TaskStatus.PENDING
        assert handler.exhausted == []
        assert row(store, task_id).run_at == START + dt.timedelta(seconds=5)
    else:
        assert outcome is TaskStatus.DEAD
        assert handler.exhausted == [(task_id, "upstream 503")]
    assert row(store, task_id).status == outcome


def test_kinds_with_a_short_lease_are_held_only_that_long(store: Store, clock: FakeClock) -> None:
    queue = TaskQueue(store, lease_seconds=60, short_leases={"tick": 3.0}, clock=clock)
    enqueue(queue, "tick")
    enqueue(queue, "job")
    claimed = {task.kind: task for task in queue.claim_due_tasks(limit=5)}
    assert claimed["tick"].lease_expires_at == START + dt.timedelta(seconds=3)
    assert claimed["job"].lease_expires_at == START + dt.timedelta(seconds=60)
    clock.advance(4)  # the tick's holder died: another worker may take it, not the job
    assert [task.kind for task in queue.claim_due_tasks(limit=5)] == ["tick"]


def test_genrelay_submit_max_age_shortens_the_submit_policy(config: Any, store: Store) -> None:
    from service.adapters.blobstore import BlobStore
    from service.bootstrap import build_services
    from service.runtime.kinds import SUBMIT, retry_policies

    SUBMIT_POLICY = retry_policies(config)[SUBMIT]

    blobs = cast(BlobStore, object())  # never used: only the queue's policies are looked at
    default = build_services(config, store=store, blobs=blobs)
    short = build_services(config.replace(submit_max_age=60.0), store=store, blobs=blobs)
    try:
        assert default.queue.policy(SUBMIT) == SUBMIT_POLICY
        assert short.queue.policy(SUBMIT).max_age == 60.0
        shortened = short.queue.policy(SUBMIT)
        assert (shortened.base_delay, shortened.max_delay) == (
            SUBMIT_POLICY.base_delay,
            SUBMIT_POLICY.max_delay,
        )
    finally:
        for services in (default, short):
            services.deepimage.close()
            services.downloads.close()
            services.webhooks.close()


def _one_held_one_lost(queue: TaskQueue, clock: FakeClock) -> tuple[dict[str, Any], str, Any]:
    """Two claimed tasks, the first still held, the second's lease lost to another worker:
    (our claims by task id, the kept task's id, the other worker's claim of the lost one)."""
    kept_id, lost_id = enqueue(queue), enqueue(queue)
    held = {task.id: task for task in queue.claim_due_tasks(limit=2)}
    clock.advance(50)
    queue.renew([held[kept_id]])
    clock.advance(11)  # lost_id's lease ran out: another worker claims it
    [other] = queue.claim_due_tasks(limit=2)
    assert other.id == lost_id
    return held, kept_id, other


def _assert_kept_done_and_lost_left(
    queue: TaskQueue, clock: FakeClock, kept_id: str, other: Any
) -> None:
    kept, lost = row(queue.store, kept_id), row(queue.store, other.id)
    assert (kept.status, kept.claim_token, kept.finished_at) == (TaskStatus.DONE, None, clock.now)
    assert (lost.status, lost.claim_token) == (TaskStatus.RUNNING, other.claim_token)


def test_finishing_tasks_together_finishes_only_those_still_held(
    queue: TaskQueue, clock: FakeClock
) -> None:
    held, kept_id, other = _one_held_one_lost(queue, clock)
    with queue.store.transaction() as session:
        assert queue.finish_all_in(session, list(held.values())) == {kept_id}
    _assert_kept_done_and_lost_left(queue, clock, kept_id, other)


def test_finishing_one_task_finishes_it_only_while_it_is_held(
    queue: TaskQueue, clock: FakeClock
) -> None:
    held, kept_id, other = _one_held_one_lost(queue, clock)
    with queue.store.transaction() as session:
        assert queue.finish_all_in(session, [held[other.id]]) == set()
        assert queue.finish_all_in(session, [held[kept_id]]) == {kept_id}
    _assert_kept_done_and_lost_left(queue, clock, kept_id, other)


def _going_on_as_a_poll(ran: list[str]) -> Done:
    """A Done whose change records that it ran, then has the task go on as a `poll`."""

    def apply(session: sa.orm.Session) -> Next:
        ran.append("applied")
        return Next("poll", {"delay": 30.0}, 30.0)

    return Done(apply)


def test_a_task_whose_change_returns_next_goes_on_as_that_kind_in_its_own_row(
    queue: TaskQueue, clock: FakeClock
) -> None:
    task_id = enqueue(queue)
    [task] = queue.claim_due_tasks()
    clock.advance(5)
    ran: list[str] = []
    runner = TaskRunner(queue, {"job": RecordingHandler(_going_on_as_a_poll(ran))})
    assert runner.execute(task) is TaskStatus.DONE  # the task's own work is done
    assert ran == ["applied"]
    with queue.store.read() as session:
        [follow] = session.scalars(sa.select(Task)).all()  # no second row
    assert follow.id == task_id
    assert (follow.kind, follow.payload, follow.status) == ("poll", {"delay": 30.0}, "pending")
    assert (follow.attempts, follow.claim_token, follow.lease_expires_at) == (0, None, None)
    assert follow.last_error is None and follow.finished_at is None
    # Its age, for its own retry policy, counts from now, not from the task it was.
    assert (follow.created_at, follow.run_at) == (clock.now, clock.now + dt.timedelta(seconds=30))
    clock.advance(30)
    [polled] = queue.claim_due_tasks()
    assert (polled.id, polled.kind, polled.attempts) == (task_id, "poll", 1)


def test_a_next_after_a_lost_lease_is_queued_as_a_new_task_and_the_claimers_row_is_left(
    queue: TaskQueue, clock: FakeClock
) -> None:
    held, _kept_id, other = _one_held_one_lost(queue, clock)
    ran: list[str] = []
    runner = TaskRunner(queue, {"job": RecordingHandler(_going_on_as_a_poll(ran))})
    assert runner.execute(held[other.id]) is None  # the lease was lost
    assert ran == ["applied"]  # what the change records happened: it is kept
    lost = row(queue.store, other.id)
    assert (lost.kind, lost.status, lost.claim_token) == ("job", "running", other.claim_token)
    with queue.store.read() as session:
        [follow] = session.scalars(sa.select(Task).where(Task.kind == "poll")).all()
    assert follow.id not in held
    assert (follow.status, follow.payload, follow.attempts) == ("pending", {"delay": 30.0}, 0)


class BatchHandler(RecordingHandler):
    """Runs tasks together: each task's outcome from `outcomes` (by its payload's "n"); applies
    their changes in turn, then fails the first `failures` times."""

    def __init__(self, outcomes: dict[int, Outcome], failures: int = 0) -> None:
        super().__init__()
        self.outcomes = outcomes
        self.failures = failures
        self.applied: list[list[Apply]] = []

    def run_batch(
        self, tasks: list[ClaimedTask], *, stopping: threading.Event | None = None
    ) -> list[Outcome]:
        self.runs += [task.id for task in tasks]
        return [self.outcomes[task.payload["n"]] for task in tasks]

    def apply_together(self, session: sa.orm.Session, changes: list[Apply]) -> None:
        self.applied.append(changes)
        for change in changes:
            change(session)
        if self.failures:
            self.failures -= 1
            session.flush()
            raise RuntimeError("constraint violated")


def test_a_batch_recorded_again_one_by_one_keeps_each_decision(
    store: Store, clock: FakeClock
) -> None:
    """The batch's transaction fails; each outcome is then recorded alone, as decided: the
    failed task's next run was drawn once (a second draw would find no jitter left)."""
    queue = TaskQueue(
        store,
        policies={"job": RetryPolicy(max_attempts=3, base_delay=10.0, max_delay=100.0)},
        clock=clock,
        rng=ScriptedJitter([0.0]),
    )
    told: list[dt.datetime | None] = []
    handler = BatchHandler(
        {
            1: Done(mark("one")),
            2: Failed("503", lambda session, next_run: told.append(next_run)),
            3: Later(30.0, "not yet", apply=mark("three")),
        },
        failures=1,
    )
    ids = []
    for n in (1, 2, 3):
        with store.transaction() as session:
            ids.append(queue.enqueue(session, "job", {"n": n}))
    tasks = sorted(queue.claim_due_tasks(limit=3), key=lambda task: ids.index(task.id))
    runner = TaskRunner(queue, {"job": handler})
    assert runner.batchable("job")

    statuses = runner.execute_batch(tasks)

    assert statuses == [TaskStatus.DONE, TaskStatus.PENDING, TaskStatus.PENDING]
    # Together once (failed), then one by one.
    assert [len(changes) for changes in handler.applied] == [3, 1, 1, 1]
    # Told twice (together, then alone), the same run both times.
    assert told == [START + dt.timedelta(seconds=5)] * 2
    assert notes(store) == {"note_one", "note_three"}  # each once: the first try rolled back
    assert handler.runs == ids  # the work itself ran once
    done, retried, later = (row(store, task_id) for task_id in ids)
    assert done.status == TaskStatus.DONE
    assert (retried.status, retried.run_at) == (TaskStatus.PENDING, START + dt.timedelta(seconds=5))
    assert (later.status, later.run_at) == (TaskStatus.PENDING, START + dt.timedelta(seconds=30))


def test_a_short_lease_is_renewed_as_short_and_the_others_as_long(
    store: Store, clock: FakeClock
) -> None:
    # The line's pass holds its task for seconds (SHORT_LEASES): renewed while it runs, it
    # must not become held for the common lease, or a holder dying then would stop the line
    # for minutes.
    queue = TaskQueue(store, lease_seconds=60, short_leases={"tick": 3.0}, clock=clock)
    tick_id, job_id = enqueue(queue, "tick"), enqueue(queue, "job")
    held = queue.claim_due_tasks(limit=5)
    clock.advance(2)
    assert queue.renew(task for task in held) == {tick_id, job_id}
    assert row(store, tick_id).lease_expires_at == START + dt.timedelta(seconds=5)
    assert row(store, job_id).lease_expires_at == START + dt.timedelta(seconds=62)
    clock.advance(4)  # 6 s: the tick's holder died after renewing; the job is still held
    assert [task.kind for task in queue.claim_due_tasks(limit=5)] == ["tick"]
