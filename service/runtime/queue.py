"""Durable task queue: rows in the `tasks` table, claimed with a lease.

A task is claimed by one conditional UPDATE that sets a fresh claim token and a lease expiry.
On PostgreSQL the candidate rows are locked with `FOR UPDATE SKIP LOCKED`, so many workers can
claim batches without waiting on each other; on SQLite (which renders no FOR UPDATE) the claim
runs inside a `BEGIN IMMEDIATE` transaction, which serialises claimers. A task whose holder
died is claimed again once its lease has run out; the holder's stale token can then no longer
finish or reschedule it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import random
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.database import Store
from service.ids import new_id
from service.models import Task, utcnow
from service.runtime import wakeup

Clock = Callable[[], dt.datetime]


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"  # gave up: kept for inspection, never deleted automatically


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a kind of task is retried (service/runtime/kinds.py).

    Exponential backoff from `base_delay` up to `max_delay`, or, with `schedule`, the delay
    before attempt n+1 is `schedule[n]` (its first entry is the first attempt's, due at once).
    Given up after `max_attempts`, or when the next attempt would come after `max_age`
    seconds of the task's life (None: no limit but the attempts).
    """

    max_attempts: int = 10
    base_delay: float = 1.0
    max_delay: float = 300.0
    max_age: float | None = 24 * 3600.0
    schedule: tuple[float, ...] = ()

    @classmethod
    def from_schedule(cls, schedule: tuple[float, ...]) -> RetryPolicy:
        """One attempt per entry of `schedule`, each after its delay, ±20 %."""
        return cls(max_attempts=len(schedule), max_age=None, schedule=tuple(schedule))

    def backoff(self, attempts: int, rng: random.Random) -> float:
        """The delay after `attempts` tries, with jitter."""
        if self.schedule:
            delay = self.schedule[min(attempts, len(self.schedule) - 1)]
            return delay * (0.8 + 0.4 * rng.random())
        delay = min(self.max_delay, self.base_delay * 2 ** max(0, attempts - 1))
        return delay / 2 + rng.random() * delay / 2


@dataclasses.dataclass(frozen=True)
class ClaimedTask:
    """A task this process holds until `lease_expires_at`."""

    id: str
    kind: str
    generation_id: str | None
    payload: dict[str, Any]
    attempts: int
    created_at: dt.datetime
    claim_token: str
    lease_expires_at: dt.datetime
    # What the claimer holds already of what the task serves, so its handler need not read it
    # again: intake passes the generation it has just stored to its inline submit. Never
    # stored: a task a worker claims has None.
    known: Any = dataclasses.field(default=None, compare=False, repr=False)


def _new_id() -> str:
    return new_id("task_")


def new_task_values(
    kind: str,
    payload: dict[str, Any] | None,
    generation_id: str | None,
    now: dt.datetime,
    *,
    delay: float = 0.0,
) -> dict[str, Any]:
    """The columns of a pending task, due after `delay` seconds."""
    return {
        "id": _new_id(),
        "kind": kind,
        "generation_id": generation_id,
        "payload": payload or {},
        "status": TaskStatus.PENDING.value,
        "attempts": 0,
        "run_at": now + dt.timedelta(seconds=delay),
        "created_at": now,
        "updated_at": now,
    }


def new_task_row(
    kind: str,
    payload: dict[str, Any] | None,
    generation_id: str | None,
    now: dt.datetime,
    *,
    delay: float = 0.0,
) -> Task:
    """A pending task row, due after `delay` seconds (add it to a session to enqueue it)."""
    return Task(**new_task_values(kind, payload, generation_id, now, delay=delay))


_INSERT_TASK = sa.insert(cast(sa.Table, Task.__table__))


def insert_task(
    session: Session,
    kind: str,
    payload: dict[str, Any] | None,
    generation_id: str | None,
    now: dt.datetime,
    *,
    delay: float = 0.0,
) -> str:
    """Queue a pending task in the caller's transaction with one Core INSERT (status changes
    and intake queue tasks on every request: no unit-of-work flush); return its id."""
    values = new_task_values(kind, payload, generation_id, now, delay=delay)
    session.connection().execute(_INSERT_TASK, values)
    if delay <= 0:
        wakeup.request_wake(session)
    return str(values["id"])


class TaskQueue:
    """Enqueue, claim, finish and reschedule tasks."""

    def __init__(
        self,
        store: Store,
        *,
        policies: dict[str, RetryPolicy] | None = None,
        lease_seconds: float = 300.0,
        short_leases: dict[str, float] | None = None,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        """`short_leases`: kinds whose runs take moments, held for fewer seconds than
        `lease_seconds`, so a holder that dies mid-run delays them only that long."""
        self.store = store
        self.policies = policies or {}
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.short_leases = {
            kind: dt.timedelta(seconds=seconds) for kind, seconds in (short_leases or {}).items()
        }
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._claims: dict[tuple[int, tuple[str, ...] | None], sa.Update] = {}
        self._held_updates: dict[tuple[tuple[str, ...], bool], sa.Update] = {}

    def policy(self, kind: str) -> RetryPolicy:
        return self.policies.get(kind, RetryPolicy())

    def lease_for(self, kind: str) -> dt.timedelta:
        """How long a claim (or a renewal) holds a task of `kind`."""
        return self.short_leases.get(kind, self.lease)

    def enqueue(
        self,
        session: Session,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        generation_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        """Add a pending task inside the caller's transaction; return its id."""
        return insert_task(session, kind, payload, generation_id, self.clock(), delay=delay)

    def enqueue_claimed(
        self,
        session: Session,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        generation_id: str | None = None,
    ) -> ClaimedTask:
        """Add a task already claimed by the caller, who runs its first attempt right away.

        Until the lease runs out no worker can take it, so the inline attempt and a worker never
        run it twice; if the caller dies, a worker picks it up after the lease.
        """
        now = self.clock()
        values = new_task_values(kind, payload, generation_id, now)
        values.update(
            status=TaskStatus.RUNNING.value,
            attempts=1,
            claim_token=uuid.uuid4().hex,
            lease_expires_at=now + self.lease_for(kind),
        )
        session.connection().execute(_INSERT_TASK, values)
        return ClaimedTask(
            id=values["id"],
            kind=kind,
            generation_id=generation_id,
            payload=dict(values["payload"]),
            attempts=1,
            created_at=now,
            claim_token=values["claim_token"],
            lease_expires_at=values["lease_expires_at"],
        )

    def ensure_singleton(self, task_id: str, kind: str) -> None:
        """Create the one task of `kind` (fixed id) if missing, or revive it if it ended.

        For the self-rescheduling tasks (housekeeping, the line): whichever worker claims it
        does the work, so there is never more than one run at a time. Workers call this as
        they start; two starting together race harmlessly.
        """
        now = self.clock()
        try:
            with self.store.transaction() as session:
                task = session.get(Task, task_id)
                if task is None:
                    row = new_task_row(kind, {}, None, now)
                    row.id = task_id
                    session.add(row)
                elif task.status in (TaskStatus.DEAD, TaskStatus.DONE):
                    task.status = TaskStatus.PENDING
                    task.run_at = now
                    task.attempts = 0
                    task.finished_at = None
        except IntegrityError:
            pass  # another worker created it at the same moment

    def retire_pending(self, session: Session, kind: str, generation_id: str, reason: str) -> int:
        """Mark a generation's pending tasks of `kind` done, inside the caller's transaction.

        For a task whose work another path has already done (a `poll` once the callback has
        come): no worker needs to claim it just to find nothing to do. A task a worker holds
        right now is left alone; its handler checks the state itself. Returns how many.
        """
        now = self.clock()
        done = {"status": TaskStatus.DONE, "finished_at": now, "last_error": reason}
        return _update_pending(session, kind, generation_id, now, **done)

    def hurry_pending(self, session: Session, kind: str, generation_id: str) -> int:
        """Make a generation's pending tasks of `kind` due now, inside the caller's transaction
        (their attempts unchanged); returns how many. A task a worker holds is left alone."""
        now = self.clock()
        return _update_pending(session, kind, generation_id, now, Task.run_at > now, run_at=now)

    def claim_due_tasks(
        self, limit: int = 1, kinds: Iterable[str] | None = None
    ) -> list[ClaimedTask]:
        """Claim up to `limit` due tasks (pending and due, or running with an expired lease)."""
        now = self.clock()
        statement = self._claim_statement(limit, None if kinds is None else tuple(kinds))
        params = {"now": now, "token": uuid.uuid4().hex, **self._lease_params(now)}
        # Core on a plain connection: claims run all the time, and need no ORM session.
        with self.store.begin() as connection:
            return [ClaimedTask(**row._mapping) for row in connection.execute(statement, params)]

    def _lease_until(self) -> Any:
        """Until when a claim or a renewal holds a task: its kind's short lease, else the
        common one; bound per call (`_lease_params`)."""
        lease_type = TASKS.c.lease_expires_at.type
        common = sa.bindparam("lease_until", type_=lease_type)
        if not self.short_leases:
            return common
        return sa.case(
            {
                kind: sa.bindparam(f"lease_{index}", type_=lease_type)
                for index, kind in enumerate(self.short_leases)
            },
            value=TASKS.c.kind,
            else_=common,
        )

    def _lease_params(self, now: dt.datetime) -> dict[str, dt.datetime]:
        """The values of `_lease_until`'s parameters at `now`."""
        params = {"lease_until": now + self.lease}
        for index, lease in enumerate(self.short_leases.values()):
            params[f"lease_{index}"] = now + lease
        return params

    def _claim_statement(self, limit: int, kinds: tuple[str, ...] | None) -> sa.Update:
        """The claim UPDATE for `limit` and `kinds`, built once (values are bound per call)."""
        key = (limit, kinds)
        cached = self._claims.get(key)
        if cached is not None:
            return cached
        t = TASKS.c
        now = sa.bindparam("now", type_=t.run_at.type)
        pending = sa.and_(t.status == TaskStatus.PENDING.value, t.run_at <= now)
        expired = sa.and_(t.status == TaskStatus.RUNNING.value, t.lease_expires_at < now)
        due = sa.or_(pending, expired)
        if kinds is not None:
            pending = sa.and_(pending, t.kind.in_(kinds))
            expired = sa.and_(expired, t.kind.in_(kinds))
            due = sa.and_(due, t.kind.in_(kinds))

        # Each branch is its own ordered, limited index scan: one `pending OR expired` query
        # would fetch and sort every due row to keep a few (48 ms with 100 k due tasks).
        # MATERIALIZED: each CTE runs once. As `id IN (subquery)` PostgreSQL may plan a
        # semi-join that re-runs the subquery per row, and with SKIP LOCKED each run returns a
        # row not yet taken: one claim would then take the whole backlog.
        def branch(condition: sa.ColumnElement[bool], order: Any, name: str) -> Any:
            return (
                sa.select(t.id)
                .where(condition)
                .order_by(order)
                .limit(limit)
                .with_for_update(skip_locked=True)
                .cte(name)
                .prefix_with("MATERIALIZED")
            )

        expired_ids = branch(expired, t.lease_expires_at, "expired")
        pending_ids = branch(pending, t.run_at, "pending")
        # Tasks whose holder died first, then the longest due.
        candidates = (
            sa.union_all(sa.select(expired_ids.c.id), sa.select(pending_ids.c.id))
            .limit(limit)
            .cte("candidates")
        )
        statement = (
            sa.update(TASKS)
            # `due` again: the UPDATE itself is the guard, whatever the CTE saw.
            .where(t.id == candidates.c.id, due)
            .values(
                status=TaskStatus.RUNNING.value,
                claim_token=sa.bindparam("token", type_=t.claim_token.type),
                lease_expires_at=self._lease_until(),
                attempts=t.attempts + 1,
                updated_at=now,
            )
            .returning(*(TASKS.c[column] for column in CLAIMED_COLUMNS))
        )
        self._claims[key] = statement
        return statement

    # What becomes of a held task. Each runs in the caller's transaction (the runner's, which
    # applies the task's outcome in the same one) and is False when the lease was lost: then
    # another claimer holds the task, and the task row is left to it.

    def finish_in(self, session: Session, task: ClaimedTask) -> bool:
        """Mark the task done."""
        return self._update_held_in(
            session,
            task,
            status=TaskStatus.DONE,
            finished_at=self.clock(),
            claim_token=None,
            lease_expires_at=None,
        )

    def finish_all_in(self, session: Session, tasks: Sequence[ClaimedTask]) -> set[str]:
        """Mark tasks done in one statement; return the ids of those still held (the others'
        leases were lost: their rows are left to their new holders)."""
        if not tasks:
            return set()
        if len(tasks) == 1:
            # The common case, without the lists' "expanding" parameters: SQLAlchemy renders
            # those into the SQL again on every execution.
            [task] = tasks
            return {task.id} if self.finish_in(session, task) else set()
        now = self.clock()
        result = session.connection().execute(
            _FINISH_HELD,
            {
                "now": now,
                "ids": [task.id for task in tasks],
                "held": [(task.id, task.claim_token) for task in tasks],
            },
        )
        return {row.id for row in result}

    def continue_in(
        self,
        session: Session,
        task: ClaimedTask,
        kind: str,
        payload: dict[str, Any],
        delay: float,
    ) -> bool:
        """The task's work is done and goes on as a pending task of `kind`, due after `delay`
        seconds, as if it had been finished and the next one queued: the same row, with a new
        kind, payload and creation time, and no attempts. If the lease was lost (the row is
        another claimer's), the next task is queued as a new row all the same."""
        now = self.clock()
        held = self._update_held_in(
            session,
            task,
            kind=kind,
            payload=payload,
            status=TaskStatus.PENDING,
            attempts=0,
            run_at=now + dt.timedelta(seconds=delay),
            created_at=now,
            last_error=None,
            claim_token=None,
            lease_expires_at=None,
        )
        if not held:
            insert_task(session, kind, payload, task.generation_id, now, delay=delay)
        elif delay <= 0:
            wakeup.request_wake(session)
        return held

    def later_in(
        self,
        session: Session,
        task: ClaimedTask,
        delay: float,
        reason: str,
        *,
        payload: dict[str, Any] | None = None,
    ) -> bool:
        """Run it again after `delay` seconds; not a failure, so the attempt is not counted."""
        changes: dict[str, Any] = {} if payload is None else {"payload": payload}
        return self._update_held_in(
            session,
            task,
            **changes,
            status=TaskStatus.PENDING,
            run_at=self.clock() + dt.timedelta(seconds=delay),
            uncount=True,
            last_error=reason[:2000] or None,
            claim_token=None,
            lease_expires_at=None,
        )

    def retry_in(
        self, session: Session, task: ClaimedTask, run_at: dt.datetime, error: str
    ) -> bool:
        """Run a failed task again at `run_at` (the failed attempt counts)."""
        return self._update_held_in(
            session,
            task,
            status=TaskStatus.PENDING,
            run_at=run_at,
            last_error=error[:2000],
            claim_token=None,
            lease_expires_at=None,
        )

    def bury_in(self, session: Session, task: ClaimedTask, error: str) -> bool:
        """Mark the task dead: given up, kept for inspection."""
        return self._update_held_in(
            session,
            task,
            status=TaskStatus.DEAD,
            last_error=error[:2000],
            finished_at=self.clock(),
            claim_token=None,
            lease_expires_at=None,
        )

    def retry_at(self, task: ClaimedTask) -> dt.datetime | None:
        """After a failed attempt: when to try again, or None to give up.

        The one decision about a retry, made once (one jitter draw): out of the kind's
        attempts, or the next run would come after the kind's max age, means give up.
        """
        policy = self.policy(task.kind)
        if self.exhausted(task):
            return None
        run_at = self.clock() + dt.timedelta(seconds=policy.backoff(task.attempts, self.rng))
        if policy.max_age is not None and (
            (run_at - task.created_at).total_seconds() > policy.max_age
        ):
            return None
        return run_at

    def exhausted(self, task: ClaimedTask) -> bool:
        """Whether the task has used every attempt its kind's policy allows."""
        return task.attempts >= self.policy(task.kind).max_attempts

    def release(self, task: ClaimedTask, *, ran: bool = False) -> bool:
        """Hand a task back, due now. One never run (a worker shutting down) has its attempt
        not counted; one whose attempt `ran` and was cut short (a web process exiting during
        an inline store) keeps it counted, so that the next attempt knows it may find part
        of the work done (a store's uploaded object, say)."""
        return self._update_held(
            task,
            status=TaskStatus.PENDING,
            run_at=self.clock(),
            uncount=not ran,
            claim_token=None,
            lease_expires_at=None,
        )

    def renew(self, tasks: Iterable[ClaimedTask]) -> set[str]:
        """Extend the leases of tasks still held; return the ids of those (lost ones left out).
        `renew_leases` also tells which of them were extended now."""
        return self.renew_leases(tasks)[0]

    def renew_leases(self, tasks: Iterable[ClaimedTask]) -> tuple[set[str], set[str]]:
        """Extend the leases of tasks still held: the ids of those still held (lost ones left
        out), and of those whose lease was extended now (the held ones less those skipped).

        The worker calls this every third of a lease for the tasks it is running, so a task
        that runs longer than a lease is not claimed again. One transaction of two statements
        for all of them, and it never waits for a task's row: one that another transaction
        holds (its own outcome being written right now, or a claim taking it over) is skipped
        (held, not renewed) and tried again on the keeper's next look, its lease still two
        thirds long. Waiting there closed
        cycles of row locks: with a batch of outcomes that locks the same tasks' rows in
        another order, or through the account's lock (a submit's outcome holding it while it
        waits for its own task's row, which the renewal holds while it waits for a row whose
        outcome waits for the account). PostgreSQL breaks a cycle by aborting one of them, and
        an aborted outcome is run again: for a submit, a second job at Deep-Image.

        A lease is renewed for as long as a claim of the task's kind holds it: a kind with a
        short lease (the line's pass) keeps it short, so a holder that dies after a renewal
        still delays the task only that long.
        """
        claims = [(task.id, task.claim_token) for task in tasks]
        if not claims:
            return set(), set()
        now = self.clock()
        ours = sa.and_(
            sa.tuple_(TASKS.c.id, TASKS.c.claim_token).in_(claims),
            TASKS.c.status == TaskStatus.RUNNING.value,
        )
        with self.store.transaction() as session:
            connection = session.connection()
            # Still ours, as last committed: a held row counts too (its lease has time left).
            held = set(connection.scalars(sa.select(TASKS.c.id).where(ours)))
            free = sa.select(TASKS.c.id).where(ours).with_for_update(skip_locked=True)
            renewed = set(
                connection.scalars(
                    sa.update(TASKS)
                    .where(TASKS.c.id.in_(free))
                    .values(updated_at=now, lease_expires_at=self._lease_until())
                    .returning(TASKS.c.id),
                    self._lease_params(now),
                )
            )
        return held, renewed

    def _update_held(self, task: ClaimedTask, **values: Any) -> bool:
        with self.store.transaction() as session:
            return self._update_held_in(session, task, **values)

    def _update_held_in(
        self, session: Session, task: ClaimedTask, *, uncount: bool = False, **values: Any
    ) -> bool:
        """The guarded UPDATE of a task this claim still holds (`uncount`: the attempt is
        handed back). Statements are built once per set of columns; values are bound."""
        key = (tuple(sorted(values)), uncount)
        statement = self._held_updates.get(key)
        if statement is None:
            t = TASKS.c
            sets: dict[str, Any] = {
                name: sa.bindparam(f"new_{name}", type_=t[name].type)
                for name in (*key[0], "updated_at")
            }
            if uncount:
                sets["attempts"] = t.attempts - 1
            statement = (
                sa.update(TASKS)
                .where(
                    t.id == sa.bindparam("task_id"),
                    t.claim_token == sa.bindparam("held_token"),
                    t.status == TaskStatus.RUNNING.value,
                )
                .values(sets)
            )
            self._held_updates[key] = statement
        params = {f"new_{name}": value for name, value in values.items()}
        params.update(new_updated_at=self.clock(), task_id=task.id, held_token=task.claim_token)
        result = session.connection().execute(statement, params)
        return bool(getattr(result, "rowcount", 0) == 1)


TASKS: sa.Table = Task.__table__  # type: ignore[assignment]
# `finish_in` for several tasks: each guarded by its own claim token, as the pair (id, token).
# `id IN` as well: SQLite scans the whole table for the pair test alone.
_FINISH_HELD = (
    sa.update(TASKS)
    .where(
        TASKS.c.id.in_(sa.bindparam("ids", expanding=True)),
        sa.tuple_(TASKS.c.id, TASKS.c.claim_token).in_(sa.bindparam("held", expanding=True)),
        TASKS.c.status == TaskStatus.RUNNING.value,
    )
    .values(
        status=TaskStatus.DONE.value,
        finished_at=sa.bindparam("now", type_=TASKS.c.finished_at.type),
        updated_at=sa.bindparam("now", type_=TASKS.c.updated_at.type),
        claim_token=None,
        lease_expires_at=None,
    )
    .returning(TASKS.c.id)
)
# What a claim returns: the fields of ClaimedTask.
CLAIMED_COLUMNS = (
    "id",
    "kind",
    "generation_id",
    "payload",
    "attempts",
    "created_at",
    "claim_token",
    "lease_expires_at",
)


def _update_pending(
    session: Session,
    kind: str,
    generation_id: str,
    now: dt.datetime,
    *where: sa.ColumnElement[bool],
    **values: Any,
) -> int:
    """Set `values` (and updated_at) on a generation's pending tasks of `kind` that match
    `where`, in the caller's transaction; how many."""
    result = session.execute(
        sa.update(Task)
        .where(
            Task.generation_id == generation_id,
            Task.kind == kind,
            Task.status == TaskStatus.PENDING,
            *where,
        )
        .values(updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _claimed(row: Task) -> ClaimedTask:
    assert row.claim_token is not None and row.lease_expires_at is not None
    return ClaimedTask(
        id=row.id,
        kind=row.kind,
        generation_id=row.generation_id,
        payload=dict(row.payload),
        attempts=row.attempts,
        created_at=row.created_at,
        claim_token=row.claim_token,
        lease_expires_at=row.lease_expires_at,
    )
