"""The `genrelay worker` process: threads that claim due tasks and run them, lease renewal,
and the wake-ups that end a thread's wait when a task is queued."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

from service.runtime.queue import ClaimedTask, TaskQueue
from service.runtime.runner import TaskRunner

log = logging.getLogger("genrelay.worker")

# Deliveries a thread runs together. Their POSTs go one after the other, so a slow target
# delays the rest of its batch (by at most the send timeout each): small batches keep that
# short while taking most of the per-transaction cost off each delivery.
BATCH = 8
# A worker thread whose loop keeps failing waits up to this long between tries (seconds),
# and logs that it still fails at most this often.
MAX_BACKOFF = 10.0
FAILING_REPORT_EVERY = 60.0


class LeaseKeeper:
    """Renews the leases of the tasks this process is running, each every third of its lease.

    A claim holds a task for GENRELAY_TASK_LEASE (a few kinds for a short lease of their own,
    the line's pass 3 s); without renewal a task running longer (a large result on a slow
    link) would be claimed and run again by another worker while the first still works on it.
    A holder that dies stops renewing, so its tasks still come back one lease later. A lease
    found lost (another worker claimed the task after this process stalled longer than a
    lease) is logged; that task's outcome will not be recorded by us.
    """

    def __init__(self, queue: TaskQueue) -> None:
        self.queue = queue
        shortest = min([queue.lease, *queue.short_leases.values()])
        # How often `run` looks for leases due a renewal: a third of the shortest lease.
        self.interval = shortest.total_seconds() / 3
        self._held: dict[str, ClaimedTask] = {}
        self._renewed: dict[str, float] = {}  # task id -> when its lease was last taken or renewed
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, *tasks: ClaimedTask) -> Iterator[None]:
        now = time.monotonic()
        with self._lock:
            for task in tasks:
                self._held[task.id] = task
                self._renewed[task.id] = now
        try:
            yield
        finally:
            with self._lock:
                for task in tasks:
                    self._held.pop(task.id, None)
                    self._renewed.pop(task.id, None)

    def renew_once(self, *, only_due: bool = False) -> int:
        """Renew the held leases now (`only_due`: those a third of whose lease has passed);
        return how many of those are still ours."""
        now = time.monotonic()
        with self._lock:
            tasks = [
                task
                for task in self._held.values()
                if not only_due
                or now - self._renewed.get(task.id, now)
                >= self.queue.lease_for(task.kind).total_seconds() / 3
            ]
        if not tasks:
            return 0
        kept, renewed = self.queue.renew_leases(tasks)
        for task in tasks:
            if task.id in kept:
                # One skipped for its row being locked stays due: tried again at the next look,
                # not a third of a lease later (for the line's 3 s lease, that is its end).
                if task.id in renewed:
                    with self._lock:
                        if task.id in self._renewed:
                            self._renewed[task.id] = now
                continue
            with self._lock:
                still_running = self._held.pop(task.id, None) is not None
                self._renewed.pop(task.id, None)
            if still_running:
                log.warning(
                    "task %s (%s): lease lost to another claim while running",
                    task.id,
                    task.kind,
                )
        return len(kept)

    def run(self, stopping: threading.Event) -> None:
        """Renew the leases that are due, looking every `interval`, until `stopping` is set
        (after the task threads are done)."""
        while not stopping.wait(self.interval):
            try:
                self.renew_once(only_due=True)
            except Exception:
                log.exception("renewing task leases failed (database unreachable?); next try soon")


class BackgroundLeases(LeaseKeeper):
    """A LeaseKeeper with a renewing thread of its own, started in the process that first holds
    a task (gunicorn forks after the app is built): for attempts made outside a worker's loop,
    such as the first submit that intake makes inside its request."""

    def __init__(self, queue: TaskQueue) -> None:
        super().__init__(queue)
        self._running_in: int | None = None  # the process whose thread renews
        self._start = threading.Lock()

    @contextlib.contextmanager
    def holding(self, *tasks: ClaimedTask) -> Iterator[None]:
        if self._running_in != os.getpid():
            self._start_thread()
        with super().holding(*tasks):
            yield

    def _start_thread(self) -> None:
        with self._start:
            if self._running_in == os.getpid():
                return
            thread = threading.Thread(
                target=self.run, args=(threading.Event(),), name="genrelay-leases", daemon=True
            )
            thread.start()
            self._running_in = os.getpid()


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
        batch: int = BATCH,
    ) -> None:
        """`wake_url`: a PostgreSQL (libpq) URL to LISTEN on for queued tasks, or None to poll.
        `batch`: how many tasks of a batchable kind a thread claims and runs together."""
        self.runner = runner
        self.batch = max(1, batch)
        self.threads = threads
        self.poll_interval = poll_interval
        self.wake_url = wake_url
        self.stopping = threading.Event()
        self.wake = Wakeups(threads)  # a task may be due: an idle thread looks at once
        self.leases = LeaseKeeper(runner.queue)

    def run_once(self, limit: int = 1) -> int:
        """Claim and run up to `limit` due tasks on this thread; return how many ran.

        When the first task claimed is of a kind run in batches (deliveries), up to `batch`
        due tasks of that kind are claimed with it and run together: one read and one
        transaction for all of them, rather than three transactions each.
        """
        queue = self.runner.queue
        tasks = queue.claim_due_tasks(limit=limit)
        if tasks and len(tasks) < self.batch and self.runner.batchable(tasks[0].kind):
            kind = tasks[0].kind
            tasks += queue.claim_due_tasks(limit=self.batch - len(tasks), kinds=[kind])
        if tasks:
            self.wake.signal()  # there may be more: another idle thread looks while we work
        index = 0
        while index < len(tasks):
            if self.stopping.is_set():
                for unrun in tasks[index:]:
                    queue.release(unrun)
                break
            group = [tasks[index]]
            if self.runner.batchable(group[0].kind):
                while index + len(group) < len(tasks) and (
                    tasks[index + len(group)].kind == group[0].kind
                ):
                    group.append(tasks[index + len(group)])
            with self.leases.holding(*group):
                if len(group) == 1:
                    self.runner.execute(group[0])
                else:
                    self.runner.execute_batch(group, stopping=self.stopping)
            index += len(group)
        return len(tasks)

    def _loop(self) -> None:
        failures = 0  # in a row
        reported = 0.0
        while not self.stopping.is_set():
            try:
                ran = self.run_once()
            except Exception:
                # The database away, most likely: the wait doubles up to MAX_BACKOFF, and the
                # first failure's traceback is logged, then a line a minute, not one per try.
                failures += 1
                now = time.monotonic()
                if failures == 1:
                    log.exception("worker loop error (database unreachable?); backing off")
                    reported = now
                elif now - reported >= FAILING_REPORT_EVERY:
                    log.warning("worker loop still failing: %d times in a row", failures)
                    reported = now
                backoff = self.poll_interval * 2 ** min(failures - 1, 16)
                self.stopping.wait(min(MAX_BACKOFF, backoff))
                continue
            if failures:
                log.info("worker loop working again after %d failures", failures)
                failures = 0
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
            from service.runtime.wakeup import Listener

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
