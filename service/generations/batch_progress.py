"""How far a batch is: its counts, its resource, and the moment it completes.

`note_item_finished` runs inside `change_status` (service/generations/lifecycle.py) whenever a
generation
of a batch reaches a terminal status. It locks the batch row (after the generation's row,
which the status UPDATE holds: always in that order), checks with one query whether any item
is still queued or processing, and if none is, completes the batch with a conditional UPDATE
(`completed_at IS NULL`), so exactly one transaction completes it and writes its
`batch.completed` event. The event's `generation_id` holds the batch id (the event's subject)
and its data is the batch resource; it goes to the batch's `webhook` (subject to its
`webhook_events_filter`) and to the subscriptions that list `batch.completed`.

A transaction that finishes many items of one batch (a chunk of a batch cancel) defers the
check (`defer_completion`) and runs it once at its end (`complete_if_done`), after locking
every item it changes: the lock order stays generation rows, then the batch row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from schemas.batches import BatchSchema
from service.domain import BATCH_COMPLETED, BatchStatus, GenerationStatus
from service.ids import new_id
from service.models import Batch, Event, Generation
from service.notifications.events import fan_out

UNFINISHED = (GenerationStatus.QUEUED.value, GenerationStatus.PROCESSING.value)
_DEFERRED = "genrelay_batch_completion_deferred"


@dataclasses.dataclass(frozen=True)
class BatchView:
    """A batch with its items counted by status; reads like the batch otherwise."""

    batch: Batch
    counts: dict[str, int]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batch, name)


def empty_counts() -> dict[str, int]:
    return {**{s.value: 0 for s in GenerationStatus}, "total": 0}


def batch_counts(session: Session, batch_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """Items by status for each batch, with one GROUP BY (index ix_generations_batch)."""
    ids = list(batch_ids)
    counts = {batch_id: empty_counts() for batch_id in ids}
    if not ids:
        return counts
    rows = session.execute(
        sa.select(Generation.batch_id, Generation.status, sa.func.count())
        .where(Generation.batch_id.in_(ids))
        .group_by(Generation.batch_id, Generation.status)
    )
    for batch_id, status, count in rows:
        counts[str(batch_id)][status] = int(count)
        counts[str(batch_id)]["total"] += int(count)
    return counts


def view(session: Session, batch: Batch) -> BatchView:
    return BatchView(batch, batch_counts(session, [batch.id])[batch.id])


def batch_resource(batch: BatchView) -> dict[str, Any]:
    """The public representation of a batch (the same the API shows)."""
    return BatchSchema().dump(batch)


def defer_completion(session: Session, batch_id: str) -> None:
    """In this transaction, items of `batch_id` that finish do not check for completion one by
    one: the caller (a chunk of a batch cancel) calls `complete_if_done` once, at the end."""
    session.info.setdefault(_DEFERRED, set()).add(batch_id)


def note_item_finished(session: Session, batch_id: str, now: dt.datetime) -> bool:
    """An item of `batch_id` just became terminal: complete the batch if it was the last one.

    True when this call completed the batch (and recorded `batch.completed`).
    """
    if batch_id in session.info.get(_DEFERRED, ()):
        return False
    return complete_if_done(session, batch_id, now)


def complete_if_done(session: Session, batch_id: str, now: dt.datetime) -> bool:
    """Complete the batch if none of its items is queued or processing (see the module
    docstring); True when this call completed it."""
    locked = session.execute(
        sa.select(Batch.completed_at).where(Batch.id == batch_id).with_for_update()
    ).one_or_none()
    if locked is None or locked.completed_at is not None:
        return False
    unfinished = session.scalar(
        sa.select(Generation.id)
        .where(Generation.batch_id == batch_id, Generation.status.in_(UNFINISHED))
        .limit(1)
    )
    if unfinished is not None:
        return False
    completed = session.execute(
        sa.update(Batch)
        .where(Batch.id == batch_id, Batch.completed_at.is_(None))
        .values(status=BatchStatus.COMPLETED.value, completed_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if completed.rowcount != 1:  # type: ignore[attr-defined]
        return False
    batch = session.scalars(
        sa.select(Batch).where(Batch.id == batch_id).execution_options(populate_existing=True)
    ).one()
    event = Event(
        id=new_id("evt_"),
        tenant_id=batch.tenant_id,
        generation_id=batch.id,
        type=BATCH_COMPLETED,
        data=batch_resource(view(session, batch)),
        created_at=now,
    )
    fan_out(
        session, event, webhook=batch.webhook, webhook_events_filter=batch.webhook_events_filter
    )
    return True
