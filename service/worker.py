"""Runs claimed tasks: the `genrelay worker` loop and the inline first attempt at intake."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from service.logs import log_context
from service.metrics import TASK_OUTCOMES
from service.tasks import ClaimedTask, TaskQueue, TaskStatus

log = logging.getLogger("genrelay.worker")


# Wait before trying again to record a dead task's outcome, after that failed.
RECORD_OUTCOME_RETRY = 30.0


class RetryableError(Exception):
    """The attempt failed for a reason that may pass (network, 5xx, 429): try again later."""


class Snooze(Exception):
    """Nothing to do yet (e.g. the upstream job is still running): run again after `delay`."""

    def __init__(
        self, delay: float, reason: str = "", *, payload: dict[str, Any] | None = None
    ) -> None:
        super().__init__(reason or f"snoozed for {delay:.1f} s")
        self.delay = delay
        self.payload = payload  # replaces the task's payload when given


# What `TaskHandler.run` returns when it has marked its task done itself, with
# `TaskQueue.complete_in`, in the transaction that recorded the task's outcome.
COMPLETED = "completed"


class TaskHandler(Protocol):
    def run(self, task: ClaimedTask) -> str | None:
        """Do the work. Return when done (COMPLETED if the task was marked done in the
        handler's own transaction); raise RetryableError to try again later."""

    def on_exhausted(self, task: ClaimedTask, error: str) -> None:
        """The task is dead (out of attempts or age): record the outcome on what it served."""


class TaskRunner:
    """Executes one claimed task through its handler and records the outcome in the queue."""

    def __init__(self, queue: TaskQueue, handlers: Mapping[str, TaskHandler]) -> None:
        self.queue = queue
        self.handlers = dict(handlers)

    def execute(self, task: ClaimedTask) -> TaskStatus | None:
        """Run `task` once; return its new status (None when our lease was lost meanwhile)."""
        with log_context(generation_id=task.generation_id, task_id=task.id, task_kind=task.kind):
            # DEBUG: the scale-out test reads these to prove no task ran twice at once.
            log.debug("task started (attempt %d)", task.attempts)
            outcome = self._execute(task)
            log.debug("task finished: %s", outcome.value if outcome else "lease lost")
        TASK_OUTCOMES.labels(task.kind, outcome.value if outcome else "lost").inc()
        return outcome

    def _execute(self, task: ClaimedTask) -> TaskStatus | None:
        handler = self.handlers.get(task.kind)
        if handler is None:
            return self.queue.give_up(task, f"no handler for task kind {task.kind!r}")
        if task.attempts > task.max_attempts:
            # Claimed again after its holders kept dying: never loop forever on it.
            return self._give_up(handler, task, "attempts exhausted (leases expired)")
        try:
            outcome = handler.run(task)
        except Snooze as snooze:
            return self.queue.snooze(task, snooze.delay, payload=snooze.payload)
        except RetryableError as exc:
            log.warning(
                "task %s (%s) attempt %d failed: %s", task.id, task.kind, task.attempts, exc
            )
            return self._retry(handler, task, str(exc))
        except Exception as exc:
            # A bug or an unexpected outage (e.g. the database): retried like a transient
            # error so nothing is lost, with the traceback logged for whoever investigates.
            log.exception("task %s (%s) crashed", task.id, task.kind)
            return self._retry(handler, task, f"{type(exc).__name__}: {exc}")
        if outcome == COMPLETED:
            return TaskStatus.DONE
        return TaskStatus.DONE if self.queue.complete(task) else None

    def _retry(self, handler: TaskHandler, task: ClaimedTask, error: str) -> TaskStatus | None:
        # One decision (one jitter draw), then exactly that: a task given up always records
        # its outcome through `on_exhausted` first.
        delay = self.queue.retry_delay(task)
        if delay is None:
            return self._give_up(handler, task, error)
        return self.queue.reschedule(task, delay, error)

    def _give_up(self, handler: TaskHandler, task: ClaimedTask, error: str) -> TaskStatus | None:
        """Record the outcome on what the task served, then mark it dead.

        In that order: if recording fails (e.g. the database is briefly away), the task stays
        pending and comes back, over its attempts, to this point — a dead task whose outcome
        was never recorded would leave its generation waiting forever.
        """
        log.error(
            "task %s (%s) is dead after %d attempts: %s", task.id, task.kind, task.attempts, error
        )
        try:
            handler.on_exhausted(task, error)
        except Exception:
            log.exception(
                "task %s (%s): recording the dead outcome failed; trying again later",
                task.id,
                task.kind,
            )
            return self.queue.defer(task, RECORD_OUTCOME_RETRY, error)
        return self.queue.give_up(task, error)


class LeaseKeeper:
    """Renews the leases of the tasks this process is running, every third of a lease.

    A claim holds a task for GENRELAY_TASK_LEASE; without renewal a task running longer (a
    large result on a slow link) would be claimed and run again by another worker while the
    first still works on it. A holder that dies stops renewing, so its tasks still come back
    one lease later. A lease found lost (another worker claimed the task after this process
    stalled longer than a lease) is logged; that task's outcome will not be recorded by us.
    """

    def __init__(self, queue: TaskQueue) -> None:
        self.queue = queue
        self.interval = queue.lease.total_seconds() / 3
        self._held: dict[str, ClaimedTask] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, task: ClaimedTask) -> Iterator[None]:
        with self._lock:
            self._held[task.id] = task
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(task.id, None)

    def renew_once(self) -> int:
        """Renew every held lease now; return how many are still ours."""
        with self._lock:
            tasks = list(self._held.values())
        if not tasks:
            return 0
        kept = self.queue.renew(tasks)
        for task in tasks:
            if task.id not in kept:
                with self._lock:
                    still_running = self._held.pop(task.id, None) is not None
                if still_running:
                    log.warning(
                        "task %s (%s): lease lost to another claim while running",
                        task.id,
                        task.kind,
                    )
        return len(kept)

    def run(self, stopping: threading.Event) -> None:
        """Renew every `interval` until `stopping` is set (after the task threads are done)."""
        while not stopping.wait(self.interval):
            try:
                self.renew_once()
            except Exception:
                log.exception("renewing task leases failed (database unreachable?); next try soon")


class Wakeups:
    """Wakes idle worker threads, one per signal.

    A signal says "a task may be due". Waking one thread rather than all of them keeps a
    notification from turning into N empty claims; the woken thread, once it has claimed a
    task, signals the next (`Worker.run_once`), so a batch of tasks queued together still
    spreads over the idle threads, and the chain stops at the first claim that finds nothing.
    A signal given while no thread waits is kept (up to `limit`) for the next one that does.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._pending = 0
        self._cond = threading.Condition()

    def signal(self) -> None:
        with self._cond:
            self._pending = min(self.limit, self._pending + 1)
            self._cond.notify()

    def signal_all(self) -> None:
        with self._cond:
            self._pending = self.limit
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Until signalled (True) or `timeout` seconds (False)."""
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
            if self._pending:
                self._pending -= 1
                return True
            return False


class Worker:
    """Claims due tasks and runs them on N threads until told to stop."""

    def __init__(
        self,
        runner: TaskRunner,
        *,
        threads: int = 4,
        poll_interval: float = 0.5,
        wake_url: str | None = None,
    ) -> None:
        """`wake_url`: a PostgreSQL (libpq) URL to LISTEN on for queued tasks, or None to poll."""
        self.runner = runner
        self.threads = threads
        self.poll_interval = poll_interval
        self.wake_url = wake_url
        self.stopping = threading.Event()
        self.wake = Wakeups(threads)  # a task may be due: an idle thread looks at once
        self.leases = LeaseKeeper(runner.queue)

    def run_once(self, limit: int = 1) -> int:
        """Claim and run up to `limit` due tasks on this thread; return how many ran."""
        tasks = self.runner.queue.claim_due_tasks(limit=limit)
        if tasks:
            self.wake.signal()  # there may be more: another idle thread looks while we work
        for index, task in enumerate(tasks):
            if self.stopping.is_set():
                for unrun in tasks[index:]:
                    self.runner.queue.release(unrun)
                break
            with self.leases.holding(task):
                self.runner.execute(task)
        return len(tasks)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                ran = self.run_once()
            except Exception:
                log.exception("worker loop error (database unreachable?); backing off")
                ran = 0
            if ran == 0:
                self.wake.wait(self.poll_interval)

    def run(self) -> None:
        """Block until `stop()`: each thread finishes the task it holds before returning."""
        log.info("worker started with %d threads", self.threads)
        pool = [
            threading.Thread(target=self._loop, name=f"genrelay-worker-{n}", daemon=True)
            for n in range(self.threads)
        ]
        for thread in pool:
            thread.start()
        # Runs until the task threads are done, so the tasks finished during shutdown keep
        # their leases too.
        done = threading.Event()
        keeper = threading.Thread(
            target=self.leases.run, args=(done,), name="genrelay-leases", daemon=True
        )
        keeper.start()
        listener = None
        if self.wake_url:
            from service.wakeup import Listener

            listener = threading.Thread(
                target=Listener(self.wake_url, self.wake.signal).run,
                args=(self.stopping,),
                name="genrelay-wakeup",
                daemon=True,
            )
            listener.start()
        self.stopping.wait()
        for thread in pool:
            thread.join()
        done.set()
        keeper.join()
        if listener is not None:
            listener.join()
        log.info("worker stopped")

    def stop(self) -> None:
        self.stopping.set()
        self.wake.signal_all()  # idle threads see `stopping` at once
