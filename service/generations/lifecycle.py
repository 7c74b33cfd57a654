"""The one place a generation's status changes: a conditional UPDATE guarded by the state
machine, so concurrent actors (intake, worker, callbacks, cancel) can never regress a status."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.domain import ErrorCode, GenerationStatus, allowed_predecessors
from service.generations.batch_progress import note_item_finished
from service.generations.line import slot_freed
from service.generations.views import COLUMNS, GENERATIONS
from service.models import Generation, utcnow
from service.notifications.events import any_subscription, record_event
from service.runtime.outcomes import after_commit

# Where `change_status` leaves the rows of its changes, once committed, while `changes_seen` is
# open on this thread.
_SEEN: ContextVar[dict[str, sa.Row[Any]] | None] = ContextVar("genrelay_changes_seen", default=None)


@contextmanager
def changes_seen() -> Iterator[dict[str, sa.Row[Any]]]:
    """The rows of the status changes committed on this thread inside the block, by generation
    id, each as its change left it (the latest change wins): what a caller can show without
    reading the generation again (intake's answer after its inline submit). Only changes made
    in the task runner's transactions are seen (it runs `committed` after each commit): a
    generation missing from the dict must be read."""
    seen: dict[str, sa.Row[Any]] = {}
    token = _SEEN.set(seen)
    try:
        yield seen
    finally:
        _SEEN.reset(token)


def change_status(
    session: Session,
    generation_id: str,
    new: GenerationStatus,
    *,
    now: dt.datetime,
    signed_url: str | None = None,
    **fields: Any,
) -> bool:
    """Move the generation to `new` if its current status allows it; True when it moved.

    A move also writes its event and queues the event's deliveries, in the same transaction;
    a move that ends a generation holding an upstream slot has the line hand that slot on
    (for a cancel, once its upstream job has ended). `signed_url` (not stored) goes into the
    event's `result.url`. `fields`: other columns to set, by attribute name.
    """
    values: dict[str, Any] = {"status": new.value, "updated_at": now, **fields}
    if new.is_terminal:
        values["completed_at"] = now
    statement = _status_update(new, tuple(sorted(values)))
    params = {f"new_{name}": value for name, value in values.items()}
    session.flush()  # what the session holds pending goes first, as an ORM statement's would
    # The row as it now is (COLUMNS), for the event, without a second SELECT.
    generation = (
        session.connection().execute(statement, {"generation_id": generation_id, **params}).first()
    )
    if generation is None:
        return False
    if new.is_terminal and generation.submitted_at is not None and generation.submitted_at >= now:
        # Its move to processing committed after this change read the clock (this UPDATE
        # waited for that one's lock). The end is stamped after it, so that the generation's
        # events, and the deliveries that go out in their order, follow the commits.
        now = generation.submitted_at + dt.timedelta(microseconds=1)
        generation = (
            session.connection()
            .execute(_RESTAMP_END, {"generation_id": generation_id, "at": now})
            .one()
        )
    # A copy the session holds already is stale now: it reloads on next use.
    held = session.identity_map.get(session.identity_key(Generation, generation_id))
    if held is not None:
        session.expire(held)
    held_a_slot = generation.admitted_at is not None and generation.source_found_at is None
    # A canceled job still runs at Deep-Image (which has no cancel): its slot is freed when
    # the job ends there (service/generations/completion.py `job_ended`), not now.
    job_runs_on = new == GenerationStatus.CANCELED and generation.upstream_job is not None
    if new.is_terminal and held_a_slot and not job_runs_on:
        slot_freed(session)  # it held an upstream slot until now: someone waiting may have it
    record_event(
        session, generation, new, now=now, signed_url=signed_url, subscribed=generation.subscribed
    )
    if new.is_terminal and generation.batch_id is not None:
        note_item_finished(session, generation.batch_id, now)  # the last item completes it
    seen = _SEEN.get()
    if seen is not None:
        after_commit(session, functools.partial(seen.__setitem__, generation_id, generation))
    return True


@functools.cache
def _status_update(new: GenerationStatus, names: tuple[str, ...]) -> sa.Update:
    """The guarded UPDATE ... RETURNING of a move to `new` setting these attributes: a Core
    statement built once per shape (each new statement object costs a cache key).

    The allowed predecessors are bound one by one: `in_()` of a list of plain values is an
    "expanding" parameter, which SQLAlchemy renders into the SQL again on every execution
    (with the same in `TaskQueue.finish_all_in`, 2 % of an intake's instructions).

    It returns the row's COLUMNS and `subscribed`, whether its tenant has an enabled
    subscription, for the event's fan-out."""
    return (
        sa.update(GENERATIONS)
        .where(
            GENERATIONS.c.id == sa.bindparam("generation_id"),
            GENERATIONS.c.status.in_([sa.literal(s.value) for s in allowed_predecessors(new)]),
        )
        .values({COLUMNS[name]: sa.bindparam(f"new_{name}") for name in names})
        .returning(*_RETURNED)
    )


# What a status change returns: the row's COLUMNS, and whether its tenant has an enabled
# subscription.
_RETURNED = (
    *(column.label(name) for name, column in COLUMNS.items()),
    any_subscription(GENERATIONS.c.tenant_id).label("subscribed"),
)


# A generation's end stamped again (`at`), returning what a status change returns.
_RESTAMP_END = (
    sa.update(GENERATIONS)
    .where(GENERATIONS.c.id == sa.bindparam("generation_id"))
    .values(
        {
            GENERATIONS.c.updated_at: sa.bindparam("at"),
            GENERATIONS.c.completed_at: sa.bindparam("at"),
        }
    )
    .returning(*_RETURNED)
)


def fail_generation(
    session: Session,
    generation_id: str,
    code: ErrorCode,
    message: str,
    *,
    now: dt.datetime | None = None,
) -> bool:
    """Mark a generation failed with `error {code, message}`, unless it already finished."""
    return change_status(
        session,
        generation_id,
        GenerationStatus.FAILED,
        now=now or utcnow(),
        error_code=code.value,
        error_message=message,
    )


def failing(generation_id: str, code: ErrorCode, message: str) -> Callable[[Session], None]:
    """The change that fails a generation, for a task's outcome to carry."""

    def apply(session: Session) -> None:
        fail_generation(session, generation_id, code, message)

    return apply
