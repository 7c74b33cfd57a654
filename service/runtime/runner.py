"""Runs claimed tasks: a handler's I/O, then its outcome and the task's own update in one
transaction (the contract is in service/runtime/outcomes.py).

Used by the worker's threads and by the inline first attempts of web processes. Tasks of a
kind whose handler has `run_batch` (deliveries) can be run together: one read for all of them,
one transaction for all their outcomes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from service.errors import TransientError
from service.logs import log_context
from service.metrics import TASK_OUTCOMES
from service.runtime.outcomes import BatchHandler, Done, Failed, Later, Outcome, TaskHandler
from service.runtime.queue import ClaimedTask, TaskQueue, TaskStatus

log = logging.getLogger("genrelay.worker")


class TaskRunner:
    """Executes claimed tasks through their handlers and applies the outcomes."""

    def __init__(self, queue: TaskQueue, handlers: Mapping[str, TaskHandler]) -> None:
        self.queue = queue
        self.handlers = dict(handlers)
        self._batchable = {
            kind for kind, handler in self.handlers.items() if isinstance(handler, BatchHandler)
        }

    def batchable(self, kind: str) -> bool:
        """Whether tasks of `kind` may be run together (`execute_batch`)."""
        return kind in self._batchable

    def execute(self, task: ClaimedTask) -> TaskStatus | None:
        """Run `task` once; return its new status (None when our lease was lost meanwhile,
        or the outcome could not be recorded: the task then comes back when its lease ends)."""
        with _task_context(task):
            # DEBUG: the scale-out test reads these to prove no task ran twice at once.
            log.debug("task started (attempt %d)", task.attempts)
            status = self._execute(task)
            log.debug("task finished: %s", status.value if status else "lease lost")
        TASK_OUTCOMES.labels(task.kind, status.value if status else "lost").inc()
        return status

    def execute_batch(self, tasks: Sequence[ClaimedTask]) -> list[TaskStatus | None]:
        """Run tasks of one batchable kind together: the handler's `run_batch`, then every
        outcome in one transaction (one by one if that transaction fails)."""
        handler = self.handlers.get(tasks[0].kind) if tasks else None
        if len(tasks) < 2 or not isinstance(handler, BatchHandler):
            return [self.execute(task) for task in tasks]
        assert all(task.kind == tasks[0].kind for task in tasks)
        limit = self.queue.policy(tasks[0].kind).max_attempts
        # Claimed again after their holders kept dying: given up one by one, never run.
        worn = {task.id for task in tasks if task.attempts > limit}
        batch = [task for task in tasks if task.id not in worn]
        statuses: dict[str, TaskStatus | None] = {
            task.id: self.execute(task) for task in tasks if task.id in worn
        }
        for task in batch:
            with _task_context(task):
                log.debug("task started (attempt %d, in a batch)", task.attempts)
        with log_context(task_kind=tasks[0].kind):
            outcomes = self._run_batch(handler, batch)
            try:
                with self.queue.store.transaction() as session:
                    for task, outcome in zip(batch, outcomes, strict=True):
                        statuses[task.id] = self._apply_in(session, handler, task, outcome)
            except Exception:
                log.exception("recording %d outcomes together failed; one by one", len(batch))
                for task, outcome in zip(batch, outcomes, strict=True):
                    statuses[task.id] = self._apply_alone(handler, task, outcome)
        for task in batch:
            status = statuses[task.id]
            with _task_context(task):
                log.debug("task finished: %s", status.value if status else "lease lost")
            TASK_OUTCOMES.labels(task.kind, status.value if status else "lost").inc()
        return [statuses[task.id] for task in tasks]

    def _execute(self, task: ClaimedTask) -> TaskStatus | None:
        handler = self.handlers.get(task.kind)
        if handler is None:
            return self._apply_alone(None, task, Failed(f"no handler for task kind {task.kind!r}"))
        if task.attempts > self.queue.policy(task.kind).max_attempts:
            # Claimed again after its holders kept dying: never loop forever on it.
            return self._apply_alone(handler, task, _GIVE_UP)
        return self._apply_alone(handler, task, self._run(handler, task))

    def _run(self, handler: TaskHandler, task: ClaimedTask) -> Outcome:
        try:
            return handler.run(task)
        except TransientError as exc:
            log.warning(
                "task %s (%s) attempt %d failed: %s", task.id, task.kind, task.attempts, exc
            )
            return Failed(str(exc))
        except Exception as exc:
            # A bug or an unexpected outage (e.g. the database): retried like a transient
            # error so nothing is lost, with the traceback logged for whoever investigates.
            log.exception("task %s (%s) crashed", task.id, task.kind)
            return Failed(f"{type(exc).__name__}: {exc}")

    def _run_batch(self, handler: BatchHandler, tasks: list[ClaimedTask]) -> list[Outcome]:
        try:
            outcomes = handler.run_batch(tasks)
        except Exception as exc:
            log.exception("a batch of %d %s tasks crashed", len(tasks), tasks[0].kind)
            return [Failed(f"{type(exc).__name__}: {exc}") for _ in tasks]
        assert len(outcomes) == len(tasks)
        return outcomes

    def _apply_alone(
        self, handler: TaskHandler | None, task: ClaimedTask, outcome: Outcome
    ) -> TaskStatus | None:
        """Apply one outcome in a transaction of its own; None if that failed (the database
        away, or the outcome's change failed): nothing was recorded, and the task stays
        claimed until its lease ends, then runs again."""
        try:
            with self.queue.store.transaction() as session:
                return self._apply_in(session, handler, task, outcome)
        except Exception:
            log.exception("task %s (%s): recording its outcome failed", task.id, task.kind)
            return None

    def _apply_in(
        self,
        session: Session,
        handler: TaskHandler | None,
        task: ClaimedTask,
        outcome: Outcome,
    ) -> TaskStatus | None:
        """The outcome's change and the task's update, in the caller's transaction."""
        queue = self.queue
        if isinstance(outcome, Failed):
            # One decision (one jitter draw), then exactly that.
            run_at = None if handler is None or outcome is _GIVE_UP else queue.retry_at(task)
            if run_at is None:
                # Given up: the last attempt's record, the dead outcome on what the task
                # served, and the task marked dead.
                log.error(
                    "task %s (%s) is dead after %d attempts: %s",
                    task.id,
                    task.kind,
                    task.attempts,
                    outcome.error,
                )
                if outcome.apply is not None:
                    outcome.apply(session, None)
                record = handler.on_exhausted(task, outcome.error) if handler else None
                if record is not None:
                    record(session)
                return TaskStatus.DEAD if queue.bury_in(session, task, outcome.error) else None
            if outcome.apply is not None:
                outcome.apply(session, run_at)
            held = queue.retry_in(session, task, run_at, outcome.error)
            return TaskStatus.PENDING if held else None
        if outcome.apply is not None:
            outcome.apply(session)
        if isinstance(outcome, Later):
            held = queue.later_in(
                session, task, outcome.delay, outcome.reason, payload=outcome.payload
            )
            return TaskStatus.PENDING if held else None
        assert isinstance(outcome, Done)
        return TaskStatus.DONE if queue.finish_in(session, task) else None


def _task_context(task: ClaimedTask) -> Any:
    """Log lines name the task and its generation."""
    return log_context(generation_id=task.generation_id, task_id=task.id, task_kind=task.kind)


# A task claimed once too often (its holders died): given up without running it.
_GIVE_UP = Failed("attempts exhausted (leases expired)")
