"""First attempts run by the process that queued the task, on a few background threads.

A web process that accepts Deep-Image's callback queues a `store` task. A worker would notice
it on its next poll (up to `--poll-interval` on SQLite, which has no LISTEN/NOTIFY) and then
start the copy; the web process can start it at once. So, when one of its few inline threads
is idle, it adds the task already claimed by itself (`TaskQueue.enqueue_claimed`, as intake
does for the first submit) and runs that first attempt on the thread after it has committed,
while the request that queued it is answered. When every inline thread is busy the task is
queued as usual and a worker takes it: the web process never holds more than `threads` such
attempts (each streams, so holds one chunk), and never makes a request wait for one.

The claim is a lease like a worker's: renewed while the attempt runs (a large result on a
slow link outlives a lease), and if the process dies mid-attempt a worker takes the task once
the lease has run out; nothing is lost. A process that exits normally first waits a little
for its attempts to end, then hands back those still running, so a worker takes them at once.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time

from service.runtime.queue import ClaimedTask
from service.runtime.runner import TaskRunner
from service.runtime.worker import BackgroundLeases

log = logging.getLogger("genrelay.inline")

# At exit, how long running attempts are waited for before they are handed back. The exit
# comes after gunicorn's own drain of the requests in flight, and platforms kill a process
# 10 s after SIGTERM (docker stop, Cloud Run): a hand-back later than that never happens,
# and the store then waits for its lease (GENRELAY_TASK_LEASE) to run out. A store cut short
# is safe to make again (its upload is create-only, and the same bytes count as stored).
EXIT_WAIT = 2.0


class InlineTasks:
    """Runs the first attempt of tasks this process queued, on at most `threads` threads."""

    def __init__(
        self, runner: TaskRunner, *, threads: int, leases: BackgroundLeases | None = None
    ) -> None:
        self.runner = runner
        self.threads = threads
        # The process's renewer of leases held outside a worker's loop (intake's shares it).
        self.leases = leases or BackgroundLeases(runner.queue)
        self._slots = threading.BoundedSemaphore(threads)
        self._lock = threading.Lock()
        self._running: dict[str, ClaimedTask] = {}
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._exit_registered = False

    def reserve(self) -> bool:
        """Take an idle thread for a task about to be queued claimed; False when all are busy
        (queue the task for the workers instead). Give it back with `start` or `cancel`."""
        if self._closed:
            return False
        return self._slots.acquire(blocking=False)

    def cancel(self) -> None:
        """The reserved thread is not needed after all (nothing was queued claimed)."""
        self._slots.release()

    def start(self, task: ClaimedTask) -> None:
        """Run `task` (queued claimed by this process, committed) on the reserved thread."""
        with self._lock:
            self._running[task.id] = task
            if not self._exit_registered:
                # In the process that runs the attempts (gunicorn forks after the app may
                # have been built): at its exit, what still runs is handed back.
                atexit.register(self.close)
                self._exit_registered = True
        thread = threading.Thread(
            target=self._run, args=(task,), name=f"genrelay-inline-{task.kind}", daemon=True
        )
        try:
            thread.start()
        except Exception:
            # No thread to be had: the task stays claimed until its lease ends, then a worker
            # takes it.
            log.exception("could not start the inline attempt of task %s", task.id)
            self._finished(task)

    def _run(self, task: ClaimedTask) -> None:
        try:
            with self.leases.holding(task):
                self.runner.execute(task)
        except Exception:
            log.exception("inline attempt of task %s failed; left to the workers", task.id)
        finally:
            self._finished(task)

    def _finished(self, task: ClaimedTask) -> None:
        with self._lock:
            self._running.pop(task.id, None)
            self._idle.notify_all()
        self._slots.release()

    def running(self) -> list[ClaimedTask]:
        with self._lock:
            return list(self._running.values())

    def close(self, wait: float = EXIT_WAIT) -> int:
        """Take no more; wait up to `wait` seconds for running attempts, then hand back the
        rest (due at once, the attempt counted: it ran, and may have done part of its work).
        Returns how many were handed back."""
        self._closed = True
        deadline = time.monotonic() + wait
        with self._lock:
            while self._running and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            unfinished = list(self._running.values())
        released = 0
        for task in unfinished:
            try:
                if self.runner.queue.release(task, ran=True):
                    released += 1
                    log.warning("task %s (%s) handed back to the workers", task.id, task.kind)
            except Exception:
                log.exception(
                    "could not hand back task %s; a worker takes it after its lease", task.id
                )
        return released
