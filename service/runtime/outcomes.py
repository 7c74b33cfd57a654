"""The task contract: a handler does its I/O and returns an outcome; the runner applies it.

A handler's `run(task)` returns one of:
- `Done`: the task's work is over (it succeeded, or ended for good and says so in `apply`);
- `Later`: nothing to do yet (a job still running, an earlier delivery first): run again after
  `delay` seconds. Not a failure: the attempt is not counted;
- `Failed`: the attempt failed for a reason that may pass. The runner retries after the delay
  of the kind's retry policy (service/runtime/kinds.py), or gives up once the policy is spent.

Raising a `TransientError` (service/errors.py) is the same as returning `Failed`; any other
exception is a bug or an outage, retried the same way with its traceback logged.

An outcome's `apply` is its database change (a status change, a recorded attempt, a follow-up
task). The runner runs it and the task's own update in **one** transaction, so the task never
ends without its outcome, nor its outcome land twice. `apply` runs whether or not the lease was
still held: what it records happened (a job was created, a POST was sent), and its changes are
guarded by their own conditions (the status machine, the delivery's status).

A `Done`'s apply may return `Next(kind, payload, delay)` when the work goes on as a task of
another kind (a submitted job is polled next): the runner then turns the task's own row into
that task, in the one UPDATE that would have finished it, instead of finishing it and inserting
a new one. (A batch handler's changes return nothing the runner reads.)

When the runner gives up, the handler's `on_exhausted(task, error)` returns the change that
records the dead outcome on what the task served (a generation failed, a delivery dead); it is
applied in the transaction that marks the task dead.

What a change may do only once it is committed (count it in a metric) it hands to
`after_commit(session, action)`: the runner runs those actions after the commit, never after a
rollback, so an outcome written again after a failed transaction is counted once.

A `BatchHandler` runs several tasks of its kind together; the runner then records all their
outcomes in one transaction, the same way as one task's (service/runtime/runner.py says how),
and hands all their changes to the handler's `apply_together`, which may write changes of one
shape in one statement.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from sqlalchemy.orm import Session

from service.runtime.queue import ClaimedTask

Apply = Callable[[Session], object]  # what it returns is ignored, unless a `Next` (above)
# A failed attempt's record, told when the task runs again (None: it has been given up).
ApplyFailure = Callable[[Session, dt.datetime | None], object]

_AFTER_COMMIT = "genrelay_after_commit"


def after_commit(session: Session, action: Callable[[], object]) -> None:
    """Run `action` once the transaction of `session` has committed (never if it rolls back)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


def committed(session: Session) -> None:
    """The transaction of `session` has committed: run what its changes left for then (the
    runner calls this)."""
    for action in session.info.pop(_AFTER_COMMIT, ()):
        action()


@dataclasses.dataclass(frozen=True)
class Done:
    """The work is over; `apply` records what it came to."""

    apply: Apply | None = None


@dataclasses.dataclass(frozen=True)
class Later:
    """Run again after `delay` seconds, not counted as an attempt; `payload` replaces the
    task's payload when given (e.g. the next poll's delay)."""

    delay: float
    reason: str = ""
    payload: dict[str, Any] | None = None
    apply: Apply | None = None


@dataclasses.dataclass(frozen=True)
class Failed:
    """The attempt failed for a reason that may pass: retried per the kind's policy."""

    error: str
    apply: ApplyFailure | None = None


Outcome = Done | Later | Failed


@dataclasses.dataclass(frozen=True)
class Next:
    """What a `Done`'s apply may return: the task goes on as a pending task of `kind`, due
    after `delay` seconds, with `payload` and a fresh count of attempts. Its row is reused
    (`TaskQueue.continue_in`); if the lease was lost, the next task is queued as a new row."""

    kind: str
    payload: dict[str, Any]
    delay: float


DONE = Done()


@dataclasses.dataclass(frozen=True)
class Told:
    """A failed attempt's record told when the task runs again (None: it has been given up):
    the change the runner applies for a `Failed`."""

    record: ApplyFailure
    next_at: dt.datetime | None

    def __call__(self, session: Session) -> object:
        return self.record(session, self.next_at)


class TaskHandler(Protocol):
    def run(self, task: ClaimedTask) -> Outcome:
        """Do the task's I/O; return what it came to (the runner applies it)."""

    def on_exhausted(self, task: ClaimedTask, error: str) -> Apply | None:
        """The task is given up: the change recording that on what it served, if any."""


@runtime_checkable
class BatchHandler(TaskHandler, Protocol):
    """A handler that can run several tasks of its kind together (one read for all of them);
    the runner then records all their outcomes in one transaction."""

    def run_batch(
        self, tasks: list[ClaimedTask], *, stopping: threading.Event | None = None
    ) -> list[Outcome]:
        """One outcome per task, in order. Once `stopping` is set (the process is told to
        stop), tasks not yet begun are handed back (`Later(0)`), so those that ran are
        recorded before the platform's kill."""

    def apply_together(self, session: Session, changes: list[Apply]) -> None:
        """Apply `changes` (this handler's: its outcomes', a `Told` failure's, its
        `on_exhausted`'s) in the caller's transaction: what applying each in turn would do,
        in as few statements as it can. The runner applies one task's changes this way too."""
