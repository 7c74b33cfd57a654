"""Runs claimed tasks: a handler's I/O, then its outcome and the task's own update in one
transaction (the contract is in service/runtime/outcomes.py).

Used by the worker's threads and by the inline first attempts of web processes. Tasks of a
kind whose handler has `run_batch` (deliveries) can be run together: one read for all of them,
one transaction for all their outcomes.

How outcomes are recorded, for one task or a batch alike:
1. `_decide`, once per outcome and outside any transaction: a `Failed` gets its next run (one
   jitter draw) or is given up, and then joined by the handler's `on_exhausted` change. The
   result is a `_Plan`: the changes to apply and the task's own update.
2. `_write`, in one transaction: every plan's changes (a batch handler's `apply_together`
   writes them in as few statements as it can), then the tasks' updates: all those Done in
   one UPDATE, the others each in its own. A task whose lease was lost still has its changes
   written (what they record happened) but its row is left to its new holder: status None.
3. When a batch's transaction fails, each plan is written again in a transaction of its own,
   as decided. What changes leave for after the commit (metrics) runs only for what committed.
4. A plan's own transaction that the database aborted to break a conflict with another one
   (a deadlock, a serialization failure) is written again, as decided (`Store.retrying`): it
   rolled back whole, and its changes are database writes guarded by their own conditions,
   plus `after_commit` actions kept on the aborted session, which is dropped. Left unwritten,
   the task would stay held until its lease ends and then run again: for a submit, a second
   job at Deep-Image. A plan whose transaction still fails leaves its task held that long.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from service.errors import TransientError
from service.logs import log_context
from service.metrics import TASK_OUTCOMES
from service.runtime.outcomes import (
    Apply,
    BatchHandler,
    Done,
    Failed,
    Later,
    Next,
    Outcome,
    TaskHandler,
    Told,
    committed,
)
from service.runtime.queue import ClaimedTask, TaskQueue, TaskStatus

log = logging.getLogger("genrelay.worker")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What an outcome comes to, decided once: `changes`, then the task's update to `status`
    (`update`: its own guarded UPDATE; None for DONE, finished with the others)."""

    task: ClaimedTask
    status: TaskStatus
    changes: tuple[Apply, ...] = ()
    update: Callable[[Session], bool] | None = None


class TaskRunner:
    """Executes claimed tasks through their handlers and applies the outcomes."""

    def __init__(self, queue: TaskQueue, handlers: Mapping[str, TaskHandler]) -> None:
        self.queue = queue
        self.handlers = dict(handlers)
        # Known once: a Protocol's isinstance check is slow, and every write asks.
        self._batch_handlers = {
            kind: handler
            for kind, handler in self.handlers.items()
            if isinstance(handler, BatchHandler)
        }

    def batchable(self, kind: str) -> bool:
        """Whether tasks of `kind` may be run together (`execute_batch`)."""
        return kind in self._batch_handlers

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

    def execute_batch(
        self, tasks: Sequence[ClaimedTask], *, stopping: threading.Event | None = None
    ) -> list[TaskStatus | None]:
        """Run tasks of one batchable kind together: the handler's `run_batch`, then every
        outcome in one transaction (one by one if that transaction fails). `stopping`: set
        when the process is told to stop; the handler then begins no more of them."""
        handler = self._batch_handlers.get(tasks[0].kind) if tasks else None
        if len(tasks) < 2 or handler is None:
            return [self.execute(task) for task in tasks]
        assert all(task.kind == tasks[0].kind for task in tasks)
        limit = self.queue.policy(tasks[0].kind).max_attempts
        for task in tasks:
            with _task_context(task):
                log.debug("task started (attempt %d, in a batch)", task.attempts)
        # Claimed again after their holders kept dying: given up, never run.
        runnable = [task for task in tasks if task.attempts <= limit]
        with log_context(task_kind=tasks[0].kind):
            ran = zip(runnable, self._run_batch(handler, runnable, stopping), strict=True)
            outcomes = {task.id: outcome for task, outcome in ran}
            statuses: dict[str, TaskStatus | None] = {}
            plans = []
            for task in tasks:
                plan = self._decided(handler, task, outcomes.get(task.id, _GIVE_UP))
                if plan is None:
                    statuses[task.id] = None
                else:
                    plans.append(plan)
            statuses.update(self._write_together(plans))
        for task in tasks:
            status = statuses[task.id]
            with _task_context(task):
                log.debug("task finished: %s", status.value if status else "lease lost")
            TASK_OUTCOMES.labels(task.kind, status.value if status else "lost").inc()
        return [statuses[task.id] for task in tasks]

    def _execute(self, task: ClaimedTask) -> TaskStatus | None:
        handler = self.handlers.get(task.kind)
        if handler is None:
            outcome: Outcome = Failed(f"no handler for task kind {task.kind!r}")
        elif task.attempts > self.queue.policy(task.kind).max_attempts:
            # Claimed again after its holders kept dying: never loop forever on it.
            outcome = _GIVE_UP
        else:
            outcome = self._run(handler, task)
        plan = self._decided(handler, task, outcome)
        return None if plan is None else self._write_alone(plan)

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

    def _run_batch(
        self, handler: BatchHandler, tasks: list[ClaimedTask], stopping: threading.Event | None
    ) -> list[Outcome]:
        if not tasks:
            return []
        try:
            outcomes = handler.run_batch(tasks, stopping=stopping)
        except Exception as exc:
            log.exception("a batch of %d %s tasks crashed", len(tasks), tasks[0].kind)
            return [Failed(f"{type(exc).__name__}: {exc}") for _ in tasks]
        assert len(outcomes) == len(tasks)
        return outcomes

    # -- recording outcomes: decide once, then write (the module's docstring says how) -----

    def _decided(
        self, handler: TaskHandler | None, task: ClaimedTask, outcome: Outcome
    ) -> _Plan | None:
        """`_decide`, or None (logged) if the handler's `on_exhausted` failed: nothing is
        recorded, and the task comes back when its lease ends."""
        try:
            return self._decide(handler, task, outcome)
        except Exception:
            log.exception("task %s (%s): recording its outcome failed", task.id, task.kind)
            return None

    def _decide(self, handler: TaskHandler | None, task: ClaimedTask, outcome: Outcome) -> _Plan:
        """What `outcome` comes to: the one decision about a failure (retry when, or give up)."""
        queue = self.queue
        if isinstance(outcome, Failed):
            run_at = None if handler is None or outcome is _GIVE_UP else queue.retry_at(task)
            told: tuple[Apply, ...] = (
                () if outcome.apply is None else (Told(outcome.apply, run_at),)
            )
            if run_at is not None:
                retry = functools.partial(
                    queue.retry_in, task=task, run_at=run_at, error=outcome.error
                )
                return _Plan(task, TaskStatus.PENDING, told, retry)
            # Given up: the last attempt's record, the dead outcome on what the task served,
            # and the task marked dead.
            log.error(
                "task %s (%s) is dead after %d attempts: %s",
                task.id,
                task.kind,
                task.attempts,
                outcome.error,
            )
            record = handler.on_exhausted(task, outcome.error) if handler else None
            changes = told if record is None else (*told, record)
            bury = functools.partial(queue.bury_in, task=task, error=outcome.error)
            return _Plan(task, TaskStatus.DEAD, changes, bury)
        changes = () if outcome.apply is None else (outcome.apply,)
        if isinstance(outcome, Later):
            later = functools.partial(
                queue.later_in,
                task=task,
                delay=outcome.delay,
                reason=outcome.reason,
                payload=outcome.payload,
            )
            return _Plan(task, TaskStatus.PENDING, changes, later)
        assert isinstance(outcome, Done)
        return _Plan(task, TaskStatus.DONE, changes)

    def _write(self, session: Session, plans: Sequence[_Plan]) -> dict[str, TaskStatus | None]:
        """Every plan's changes, then the tasks' updates, in the caller's transaction; the new
        status of each task (None: its lease was lost)."""
        together = self._batch_handlers.get(plans[0].task.kind)
        following: dict[str, Next] = {}  # Done tasks that go on as another kind
        if together is not None:
            changes = [change for plan in plans for change in plan.changes]
            if changes:
                together.apply_together(session, changes)
        else:
            for plan in plans:
                for change in plan.changes:
                    made = change(session)
                    if isinstance(made, Next) and plan.status is TaskStatus.DONE:
                        following[plan.task.id] = made
        ends = [p.task for p in plans if p.update is None and p.task.id not in following]
        finished = self.queue.finish_all_in(session, ends)
        statuses: dict[str, TaskStatus | None] = {}
        for plan in plans:
            task = plan.task
            if task.id in following:
                then = following[task.id]
                held = self.queue.continue_in(session, task, then.kind, then.payload, then.delay)
            else:
                held = task.id in finished if plan.update is None else plan.update(session)
            statuses[task.id] = plan.status if held else None
        return statuses

    def _write_together(self, plans: list[_Plan]) -> dict[str, TaskStatus | None]:
        """All plans in one transaction; each in its own if that fails (for any reason: a
        conflict too, as one by one holds fewer rows at once)."""
        try:
            with self.queue.store.transaction() as session:
                statuses = self._write(session, plans)
        except Exception:
            log.exception("recording %d outcomes together failed; one by one", len(plans))
            return {plan.task.id: self._write_alone(plan) for plan in plans}
        committed(session)
        return statuses

    def _write_alone(self, plan: _Plan) -> TaskStatus | None:
        """One plan in a transaction of its own, written again if the database aborted it to
        break a conflict; None if it failed all the same (the database away, or the outcome's
        change failed): nothing was recorded, and the task stays claimed until its lease ends,
        then runs again."""
        task = plan.task
        try:
            status, session = self.queue.store.retrying(functools.partial(self._commit, plan))
        except Exception:
            log.exception("task %s (%s): recording its outcome failed", task.id, task.kind)
            return None
        committed(session)
        return status

    def _commit(self, plan: _Plan) -> tuple[TaskStatus | None, Session]:
        """`plan` written and committed in a new transaction (and session: what an aborted
        one left for after its commit goes with it); its task's status and the session."""
        with self.queue.store.transaction() as session:
            status = self._write(session, [plan])[plan.task.id]
        return status, session


def _task_context(task: ClaimedTask) -> Any:
    """Log lines name the task and its generation."""
    return log_context(generation_id=task.generation_id, task_id=task.id, task_kind=task.kind)


# A task claimed once too often (its holders died): given up without running it.
_GIVE_UP = Failed("attempts exhausted (leases expired)")
