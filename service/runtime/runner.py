"""Runs one claimed task: its handler's I/O, then its outcome and the task's own update in one
transaction (the contract is in service/runtime/outcomes.py).

Used by the worker's threads and by intake's inline first attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from service.errors import TransientError
from service.logs import log_context
from service.metrics import TASK_OUTCOMES
from service.runtime.outcomes import Done, Failed, Later, Outcome, TaskHandler
from service.runtime.queue import ClaimedTask, TaskQueue, TaskStatus

log = logging.getLogger("genrelay.worker")


class TaskRunner:
    """Executes one claimed task through its handler and applies the outcome."""

    def __init__(self, queue: TaskQueue, handlers: Mapping[str, TaskHandler]) -> None:
        self.queue = queue
        self.handlers = dict(handlers)

    def execute(self, task: ClaimedTask) -> TaskStatus | None:
        """Run `task` once; return its new status (None when our lease was lost meanwhile,
        or the outcome could not be recorded: the task then comes back when its lease ends)."""
        with log_context(generation_id=task.generation_id, task_id=task.id, task_kind=task.kind):
            # DEBUG: the scale-out test reads these to prove no task ran twice at once.
            log.debug("task started (attempt %d)", task.attempts)
            status = self._execute(task)
            log.debug("task finished: %s", status.value if status else "lease lost")
        TASK_OUTCOMES.labels(task.kind, status.value if status else "lost").inc()
        return status

    def _execute(self, task: ClaimedTask) -> TaskStatus | None:
        handler = self.handlers.get(task.kind)
        try:
            if handler is None:
                return self._bury(None, task, f"no handler for task kind {task.kind!r}")
            if task.attempts > self.queue.policy(task.kind).max_attempts:
                # Claimed again after its holders kept dying: never loop forever on it.
                return self._bury(handler, task, "attempts exhausted (leases expired)")
            return self._apply(handler, task, self._run(handler, task))
        except Exception:
            # The database is away, or the outcome's change failed: nothing was recorded. The
            # task stays claimed until its lease ends, then runs again.
            log.exception("task %s (%s): recording its outcome failed", task.id, task.kind)
            return None

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

    def _apply(
        self, handler: TaskHandler, task: ClaimedTask, outcome: Outcome
    ) -> TaskStatus | None:
        queue = self.queue
        if isinstance(outcome, Failed):
            # One decision (one jitter draw), then exactly that.
            run_at = queue.retry_at(task)
            if run_at is None:
                return self._bury(handler, task, outcome.error, outcome)
            with queue.store.transaction() as session:
                if outcome.apply is not None:
                    outcome.apply(session, run_at)
                held = queue.retry_in(session, task, run_at, outcome.error)
            return TaskStatus.PENDING if held else None
        with queue.store.transaction() as session:
            if outcome.apply is not None:
                outcome.apply(session)
            if isinstance(outcome, Later):
                held = queue.later_in(
                    session, task, outcome.delay, outcome.reason, payload=outcome.payload
                )
                return TaskStatus.PENDING if held else None
            assert isinstance(outcome, Done)
            return TaskStatus.DONE if queue.finish_in(session, task) else None

    def _bury(
        self,
        handler: TaskHandler | None,
        task: ClaimedTask,
        error: str,
        failed: Failed | None = None,
    ) -> TaskStatus | None:
        """Give the task up: the last attempt's record, the dead outcome on what the task
        served, and the task marked dead, all in one transaction."""
        log.error(
            "task %s (%s) is dead after %d attempts: %s", task.id, task.kind, task.attempts, error
        )
        with self.queue.store.transaction() as session:
            if failed is not None and failed.apply is not None:
                failed.apply(session, None)
            record = handler.on_exhausted(task, error) if handler is not None else None
            if record is not None:
                record(session)
            held = self.queue.bury_in(session, task, error)
        return TaskStatus.DEAD if held else None
