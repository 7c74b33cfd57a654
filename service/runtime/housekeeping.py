"""Housekeeping: deletes what nothing reads any more, so tables do not grow without bound.

- idempotency keys past their expiry (24 h): intake ignores them already;
- `done` tasks finished more than DONE_TASK_RETENTION ago;
- `dead` tasks finished more than DEAD_TASK_RETENTION ago (kept longer: someone may want to
  know why they died; their generation or delivery keeps its outcome either way);
- trigger events that made no generation (`rejected`, `skipped`) received more than
  UNACCEPTED_EVENT_RETENTION ago. A trigger on a busy bucket whose filters skip most objects
  records a row per object: kept forever, they would outgrow everything else. An accepted
  event stays with the generation it made, as its record and as what stops a redelivery from
  making a second one. A rejected event redelivered after its row is gone is looked at again,
  as a new one.

It runs as one task of the queue, `housekeeping`, with a fixed id: whichever worker claims it
does the sweep, so there is never more than one at a time, and it snoozes until the next
sweep. `ensure_scheduled` (called when a worker starts) creates it if missing and revives it if
it ever died. Deletes go in batches of BATCH rows, each its own short transaction, for at most
SWEEP_BUDGET seconds; what is left is taken up again a moment later.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

import sqlalchemy as sa

from service.database import Store
from service.metrics import PURGED_ROWS
from service.models import IdempotencyKey, Task, TriggerEvent, utcnow
from service.runtime.kinds import HOUSEKEEPING
from service.runtime.outcomes import Later
from service.runtime.queue import ClaimedTask, TaskQueue, TaskStatus

log = logging.getLogger("genrelay.housekeeping")

TASK_ID = "task_housekeeping"
INTERVAL = 3600.0  # seconds between sweeps
DONE_TASK_RETENTION = dt.timedelta(days=7)
DEAD_TASK_RETENTION = dt.timedelta(days=30)
UNACCEPTED_EVENT_RETENTION = dt.timedelta(days=30)
BATCH = 1000
SWEEP_BUDGET = 20.0  # seconds of deleting per run; the rest follows after CONTINUE_AFTER
CONTINUE_AFTER = 1.0
RETRY_AFTER = 60.0  # after a failed sweep (e.g. the database was away)


class HousekeepingHandler:
    """The `housekeeping` task: one sweep, then snooze until the next."""

    def __init__(self, store: Store, *, batch: int = BATCH, budget: float = SWEEP_BUDGET) -> None:
        self.store = store
        self.batch = batch
        self.budget = budget

    def run(self, task: ClaimedTask) -> Later:
        try:
            finished = self.sweep()
        except Exception as exc:
            # Never let the one housekeeping task die of retries: try again a bit later.
            log.exception("housekeeping sweep failed; trying again in %.0f s", RETRY_AFTER)
            return Later(RETRY_AFTER, f"sweep failed: {type(exc).__name__}")
        return Later(INTERVAL if finished else CONTINUE_AFTER, "next sweep")

    def on_exhausted(self, task: ClaimedTask, error: str) -> None:
        """Nothing depends on it; `ensure_scheduled` revives it at the next worker start."""

    def sweep(self, now: dt.datetime | None = None) -> bool:
        """Delete what is due; True when nothing is left, False when the budget ran out."""
        now = now or utcnow()
        deadline = time.monotonic() + self.budget
        targets = {
            "idempotency_keys": self._expired_keys(now),
            "done_tasks": self._old_tasks(TaskStatus.DONE, now - DONE_TASK_RETENTION),
            "dead_tasks": self._old_tasks(TaskStatus.DEAD, now - DEAD_TASK_RETENTION),
            "trigger_events": self._unaccepted_events(now - UNACCEPTED_EVENT_RETENTION),
        }
        counts = dict.fromkeys(targets, 0)
        finished = True
        for name, statement in targets.items():
            while True:
                deleted = self._delete_batch(statement)
                counts[name] += deleted
                PURGED_ROWS.labels(name).inc(deleted)
                if deleted < self.batch:
                    break
                if time.monotonic() > deadline:
                    finished = False
                    break
            if not finished:
                break
        if any(counts.values()):
            log.info(
                "housekeeping deleted %s",
                ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items()),
            )
        return finished

    def _expired_keys(self, now: dt.datetime) -> sa.Delete:
        expired = (
            sa.select(IdempotencyKey.tenant_id, IdempotencyKey.key)
            .where(IdempotencyKey.expires_at <= now)
            .limit(self.batch)
        )
        return sa.delete(IdempotencyKey).where(
            sa.tuple_(IdempotencyKey.tenant_id, IdempotencyKey.key).in_(expired)
        )

    def _old_tasks(self, status: TaskStatus, cutoff: dt.datetime) -> sa.Delete:
        # run_at <= finished_at for a task that ran, so the (status, run_at) index narrows it;
        # a task retired before its run_at is picked up once run_at has passed the cutoff too.
        old = (
            sa.select(Task.id)
            .where(Task.status == status, Task.run_at < cutoff, Task.finished_at < cutoff)
            .limit(self.batch)
        )
        return sa.delete(Task).where(Task.id.in_(old))

    def _unaccepted_events(self, cutoff: dt.datetime) -> sa.Delete:
        # The partial index ix_trigger_events_unaccepted_created holds just these rows.
        old = (
            sa.select(TriggerEvent.id)
            .where(TriggerEvent.status != "accepted", TriggerEvent.created_at < cutoff)
            .limit(self.batch)
        )
        return sa.delete(TriggerEvent).where(TriggerEvent.id.in_(old))

    def _delete_batch(self, statement: sa.Delete) -> int:
        with self.store.transaction() as session:
            result = session.execute(statement.execution_options(synchronize_session=False))
            return int(getattr(result, "rowcount", 0) or 0)


def ensure_scheduled(queue: TaskQueue) -> None:
    """Create the housekeeping task if it does not exist; revive it if it died."""
    queue.ensure_singleton(TASK_ID, HOUSEKEEPING)
