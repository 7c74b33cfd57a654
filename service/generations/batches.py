"""Batch use cases: intake of up to 10,000 generations at once, read, list, cancel.

Intake stores the batch, its idempotency key and every item's generation in ONE transaction:
the generations go in as Core bulk INSERTs of plain dicts, in chunks (no ORM objects, so
10,000 items cost little memory), all `queued` and waiting in the line, and an admission pass
(`Line.admit`) in the same transaction hands out the free upstream slots at once. The items'
ids are sorted before they are given out, so the line (priority, then age, then id) takes a
batch's items in the order they were sent.

Cancel works in chunks of CANCEL_CHUNK items per transaction, waiting items first (so no
upstream slot is freed, and handed to a sibling that is about to be canceled, before the end),
each item through `change_status` with its own `generation.canceled` event. The request does
what it can in CANCEL_BUDGET seconds; a `cancel_batch` task, queued with the cancel, finishes
what is left.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.batches import BatchSchema
from service.database import Store
from service.domain import BatchStatus, GenerationStatus
from service.errors import Conflict, InvalidRequest, NotFound
from service.generations.batch_progress import (
    UNFINISHED,
    BatchView,
    batch_counts,
    complete_if_done,
    defer_completion,
    view,
)
from service.generations.idempotency import (
    Answer,
    claim_key,
    earlier_answer,
    record_response,
)
from service.generations.inputs import access_problems
from service.generations.lifecycle import change_status
from service.generations.line import Line
from service.ids import new_id
from service.models import Batch, Generation, utcnow
from service.notifications.service import require_safe_target
from service.notifications.ssrf import URLPolicy
from service.pagination import Page, paginate
from service.runtime.kinds import CANCEL_BATCH
from service.runtime.outcomes import DONE, Done
from service.runtime.queue import ClaimedTask, TaskQueue
from service.tenants import TenantSettings, settings_by_id

log = logging.getLogger("genrelay.batches")

INSERT_CHUNK = 1000  # generation rows per bulk INSERT
MAX_REPORTED_ERRORS = 100  # field errors listed in one 422 (the detail counts them all)
CANCEL_CHUNK = 250  # items canceled per transaction
CANCEL_BUDGET = 3.0  # seconds a cancel request spends canceling; a task does the rest


@dataclasses.dataclass(frozen=True)
class NewBatchItem:
    """One validated item: its input already merged over the template, its metadata over the
    batch's."""

    input: dict[str, Any]
    metadata: dict[str, str]
    custom_id: str | None = None


@dataclasses.dataclass(frozen=True)
class NewBatch:
    """A validated `POST /v1/batches` body (JSON or NDJSON)."""

    items: Sequence[NewBatchItem]
    template: dict[str, Any] | None = None
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    priority: int = 0
    deadline: dt.datetime | None = None
    # Seconds to keep each item's stored result (None: the tenant's setting).
    retention: int | None = None

    def fingerprint(self) -> str:
        """A hash of the request, to tell a retry from a different request."""
        digest = hashlib.sha256()

        def feed(value: Any) -> None:
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
            digest.update(text.encode())
            digest.update(b"\n")

        fields: dict[str, Any] = {
            "template": self.template,
            "webhook": self.webhook,
            "webhook_events_filter": self.webhook_events_filter,
            "metadata": self.metadata,
            "priority": self.priority,
            "deadline": self.deadline,
        }
        if self.retention is not None:  # absent as before it existed: earlier keys still match
            fields["retention"] = self.retention
        feed(fields)
        for item in self.items:
            feed([item.input, item.metadata, item.custom_id])
        return digest.hexdigest()


# The outcome of intake: the batch made (or shown again), or the stored first response.
BatchIntake = Answer[BatchView]


def _require_item_access(settings: TenantSettings, items: Sequence[NewBatchItem]) -> None:
    """The tenant's allow-lists (gs:// buckets, storage:// names) hold for every item, as for a
    single generation; InvalidRequest naming each field as `items[i].input...`."""
    problems = [
        {"field": f"items[{index}].{problem['field']}", "message": problem["message"]}
        for index, item in enumerate(items)
        for problem in access_problems(settings, item.input)
    ]
    if problems:
        raise InvalidRequest(
            f"{len({p['field'].split('.')[0] for p in problems})} of {len(items)} items name "
            "storage the tenant may not use",
            errors=problems[:MAX_REPORTED_ERRORS],
        )


class BatchService:
    """Owns the transactions of every batch use case."""

    def __init__(self, store: Store, queue: TaskQueue, line: Line, policy: URLPolicy) -> None:
        self.store = store
        self.queue = queue
        self.line = line
        self.policy = policy

    def create(
        self,
        tenant_id: str,
        new: NewBatch,
        *,
        idempotency_key: str | None = None,
        settings: TenantSettings | None = None,
        webhook_field: str = "webhook",
    ) -> BatchIntake:
        """Store the batch and its generations in one transaction; admit what fits now.

        `settings`: the tenant's, when the caller has read them (the API key lookup does).
        `webhook_field`: the webhook's name in the request, for a refusal to name it
        (`batch.webhook` on an NDJSON header line).
        """
        fingerprint = new.fingerprint() if idempotency_key is not None else ""
        if idempotency_key is not None:
            # A retry gets the first answer, whatever has changed since (the tenant's allowed
            # buckets, where its webhook's host resolves): it is checked only to be stored.
            earlier = self._earlier(tenant_id, idempotency_key, fingerprint)
            if earlier is not None:
                return earlier
        if new.webhook is not None:
            require_safe_target(self.policy, new.webhook, webhook_field, tenant_id)
        if settings is None:
            with self.store.read() as session:
                settings = settings_by_id(session, tenant_id)
        assert settings.id == tenant_id
        _require_item_access(settings, new.items)
        now = utcnow()
        batch_id = new_id("bat_")
        try:
            with self.store.transaction() as session:
                if idempotency_key is not None:
                    # First, so a concurrent retry with the key waits here and then replays.
                    claim_key(
                        session,
                        tenant_id,
                        idempotency_key,
                        fingerprint,
                        now=now,
                        batch_id=batch_id,
                    )
                session.add(
                    Batch(
                        id=batch_id,
                        tenant_id=tenant_id,
                        status=BatchStatus.PROCESSING.value,
                        meta=new.metadata,
                        template=new.template,
                        webhook=new.webhook,
                        webhook_events_filter=new.webhook_events_filter,
                        total=len(new.items),
                        created_at=now,
                        updated_at=now,
                    )
                )
                session.flush()
                retention = new.retention if new.retention is not None else settings.retention
                rows = self._rows(tenant_id, batch_id, new, now, retention)
                for chunk in _chunks(rows, INSERT_CHUNK):
                    session.execute(sa.insert(Generation), chunk)
                admitted = self.line.admit(session, now=now).admitted
        except IntegrityError:
            # Another request with the same key committed first: answer as it did.
            if idempotency_key is None:
                raise
            earlier = self._earlier(tenant_id, idempotency_key, fingerprint)
            if earlier is None:
                raise
            return earlier
        log.info(
            "batch %s accepted: %d item(s), %d admitted at once",
            batch_id,
            len(new.items),
            len(admitted),
        )
        return self._answer(tenant_id, batch_id, idempotency_key)

    @staticmethod
    def _rows(
        tenant_id: str, batch_id: str, new: NewBatch, now: dt.datetime, retention: int | None
    ) -> Iterator[dict[str, Any]]:
        # Sorted: items created in the same millisecond keep their order in the line.
        ids = sorted(new_id("gen_") for _ in new.items)
        for generation_id, item in zip(ids, new.items, strict=True):
            yield {
                "id": generation_id,
                "tenant_id": tenant_id,
                "status": GenerationStatus.QUEUED.value,
                "input": item.input,
                "meta": item.metadata,
                "webhook": new.webhook,
                "webhook_events_filter": new.webhook_events_filter,
                "priority": new.priority,
                "deadline_at": new.deadline,
                "batch_id": batch_id,
                "custom_id": item.custom_id,
                "retention_seconds": retention,
                "created_at": now,
                "updated_at": now,
            }

    def _answer(self, tenant_id: str, batch_id: str, key: str | None) -> BatchIntake:
        """The batch as it is now; with a key, also rendered and kept as the key's first
        response (one transaction)."""
        if key is None:
            return Answer(self.get(tenant_id, batch_id))
        with self.store.transaction() as session:
            batch = view(session, self._owned(session, tenant_id, batch_id))
            body = BatchSchema().dump(batch)  # the one rendering, kept for retries
            record_response(session, tenant_id, key, 202, body)
        return Answer(batch, body=body)

    def retry_answer(
        self, tenant_id: str, new: NewBatch, idempotency_key: str
    ) -> BatchIntake | None:
        """The answer `create` would give a retry of `new` with `idempotency_key`, without
        making anything: the first response, or the batch as it is now; None when the key has
        no unexpired record (IdempotencyKeyReused when it was used with another body)."""
        return self._earlier(tenant_id, idempotency_key, new.fingerprint())

    def _earlier(self, tenant_id: str, key: str, fingerprint: str) -> BatchIntake | None:
        return earlier_answer(
            self.store,
            tenant_id,
            key,
            fingerprint,
            made="batch",
            # Shown, not kept: the answer to keep is the first request's own.
            show=lambda batch_id: self._answer(tenant_id, batch_id, None),
        )

    def get(self, tenant_id: str, batch_id: str) -> BatchView:
        """One batch of this tenant with its counts; NotFound for unknown and others' ids."""
        with self.store.read() as session:
            return view(session, self._owned(session, tenant_id, batch_id))

    def list(
        self, tenant_id: str, *, cursor: str | None = None, limit: int = 20
    ) -> Page[BatchView]:
        """Newest first; `next_cursor` continues after the last one. Counted in one query."""
        query = sa.select(Batch).where(Batch.tenant_id == tenant_id)
        with self.store.read() as session:
            page = paginate(session, query, Batch, cursor=cursor, limit=limit)
            counts = batch_counts(session, [b.id for b in page.items])
        return Page(
            items=[BatchView(b, counts[b.id]) for b in page.items], next_cursor=page.next_cursor
        )

    def cancel(self, tenant_id: str, batch_id: str) -> BatchView:
        """Cancel every item still queued or processing; canceling twice is harmless.

        The request cancels items for up to CANCEL_BUDGET seconds; what is left of a large
        batch is canceled by a `cancel_batch` task (the answer shows `canceled_at` at once, and
        the counts as far as they got). The task is queued with `canceled_at`, due when the
        request's time is up, so the cancel is finished even if the request is not (the
        task then finds nothing left, or what a failed request left). A batch that completed
        uncanceled is a Conflict.
        """
        now = utcnow()
        with self.store.transaction() as session:
            # Locked, so an item completing the batch meanwhile is seen (after it commits).
            batch = self._owned(session, tenant_id, batch_id, lock=True)
            if batch.canceled_at is None:
                if batch.completed_at is not None:
                    raise Conflict(f"batch {batch_id} has already completed")
                batch.canceled_at = now
                batch.updated_at = now
                self.queue.enqueue(
                    session, CANCEL_BATCH, {"batch_id": batch_id}, delay=CANCEL_BUDGET
                )
        try:
            self.cancel_items(batch_id, budget=CANCEL_BUDGET)
        except Exception:
            # The cancel is recorded, and its task is queued: the task does the rest.
            log.exception("canceling the items of batch %s failed; left to its task", batch_id)
        return self.get(tenant_id, batch_id)

    def cancel_items(self, batch_id: str, *, budget: float | None) -> bool:
        """Cancel the batch's unfinished items, CANCEL_CHUNK per transaction, waiting ones
        first; True when none is left, False when `budget` seconds ran out first."""
        started = time.monotonic()
        while True:
            canceled = self.store.retrying(lambda: self._cancel_chunk(batch_id))
            if canceled < CANCEL_CHUNK:
                return True
            if budget is not None and time.monotonic() - started >= budget:
                return False

    def _cancel_chunk(self, batch_id: str) -> int:
        """Cancel up to CANCEL_CHUNK unfinished items in one transaction; how many."""
        with self.store.transaction() as session:
            # Lock the chunk's rows first, then change them: every transaction that finishes
            # an item locks its generation before the batch row.
            chunk = list(
                session.scalars(
                    sa.select(Generation.id)
                    .where(Generation.batch_id == batch_id, Generation.status.in_(UNFINISHED))
                    .order_by(Generation.admitted_at.is_not(None), Generation.id)
                    .limit(CANCEL_CHUNK)
                    .with_for_update()
                )
            )
            # One completion check for the chunk, after its last item, not one per item.
            defer_completion(session, batch_id)
            for generation_id in chunk:
                change_status(session, generation_id, GenerationStatus.CANCELED, now=utcnow())
            complete_if_done(session, batch_id, utcnow())
        return len(chunk)

    def require(self, tenant_id: str, batch_id: str) -> None:
        """NotFound unless the batch exists and is this tenant's."""
        with self.store.read() as session:
            self._owned(session, tenant_id, batch_id)

    @staticmethod
    def _owned(session: Session, tenant_id: str, batch_id: str, *, lock: bool = False) -> Batch:
        batch = session.get(Batch, batch_id, with_for_update=lock, populate_existing=lock)
        if batch is None or batch.tenant_id != tenant_id:
            raise NotFound(f"no batch {batch_id!r}")
        return batch


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class CancelBatchHandler:
    """The `cancel_batch` task: cancel what a cancel request left of its batch."""

    def __init__(self, batches: BatchService) -> None:
        self.batches = batches

    def run(self, task: ClaimedTask) -> Done:
        self.batches.cancel_items(task.payload["batch_id"], budget=None)
        return DONE

    def on_exhausted(self, task: ClaimedTask, error: str) -> None:
        log.error("could not finish canceling batch %s: %s", task.payload["batch_id"], error)
