"""Generation use cases: intake (with idempotency keys), read, list, cancel."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.adapters.blobstore import BlobStore
from service.config import Config
from service.database import Store
from service.domain import GenerationStatus
from service.errors import Conflict, IdempotencyKeyReused, NotFound
from service.generations.inputs import require_access
from service.generations.lifecycle import change_status
from service.generations.line import Line
from service.generations.result_access import sign_result
from service.ids import new_id
from service.models import Generation, IdempotencyKey, utcnow
from service.notifications.service import require_safe_target
from service.notifications.ssrf import URLPolicy
from service.pagination import Page, paginate
from service.runtime.queue import TaskQueue
from service.runtime.runner import TaskRunner
from service.tenants import settings_by_id

log = logging.getLogger("genrelay.generations")

IDEMPOTENCY_TTL = dt.timedelta(hours=24)


@dataclasses.dataclass(frozen=True)
class NewGeneration:
    """A validated `POST /v1/generations` body."""

    input: dict[str, Any]
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # Within the tenant's line: higher goes first. A generation still waiting for a slot at
    # `deadline` is canceled without ever being submitted.
    priority: int = 0
    deadline: dt.datetime | None = None
    # Seconds to keep the stored result (None: the tenant's setting, by default forever).
    retention: int | None = None

    def fingerprint(self) -> str:
        """A hash of the request body, to tell a retry from a different request."""
        fields = dataclasses.asdict(self)
        if fields["retention"] is None:
            del fields["retention"]  # as before it existed: earlier keys still match
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Intake:
    """The outcome of intake: a generation, or the stored first response to replay verbatim."""

    generation: Generation | None
    replay: tuple[int, dict[str, Any]] | None = None


class GenerationService:
    """Owns the transactions of every generation use case."""

    def __init__(
        self,
        store: Store,
        queue: TaskQueue,
        line: Line,
        runner: TaskRunner,
        blobs: BlobStore,
        config: Config,
        policy: URLPolicy,
    ) -> None:
        self.policy = policy
        self.store = store
        self.queue = queue
        self.line = line
        self.runner = runner
        self.blobs = blobs
        self.config = config

    def _with_signed_url(self, generation: Generation) -> Generation:
        """Attach a V4 URL for the stored result, where the credentials can sign one."""
        if generation.result and generation.result_expired_at is None:
            generation.signed_url = sign_result(
                self.blobs, generation.result.get("uri"), self.config.signed_url_ttl
            )
        return generation

    def create(
        self,
        tenant_id: str,
        new: NewGeneration,
        *,
        idempotency_key: str | None = None,
        also: Callable[[Session, str], None] | None = None,
    ) -> Intake:
        """Store the generation and let the line admit it; if it gets a slot now, submit it.

        One transaction stores the generation (and its key) and runs an admission pass; a
        generation admitted there gets its submit task already claimed by this request, which
        then makes the first attempt itself. Without a free slot it waits, `queued`.
        `also(session, generation_id)` runs in that transaction (a trigger records its event
        there, so a duplicate event rolls the generation back).
        """
        fingerprint = new.fingerprint()
        if new.webhook is not None:
            require_safe_target(self.policy, new.webhook, "webhook")
        if idempotency_key is not None:
            earlier = self._replay(tenant_id, idempotency_key, fingerprint)
            if earlier is not None:
                return earlier
        with self.store.read() as session:
            settings = settings_by_id(session, tenant_id)
        require_access(settings, new.input)
        retention = new.retention if new.retention is not None else settings.retention
        now = utcnow()
        generation_id = new_id("gen_")
        try:
            with self.store.transaction() as session:
                session.add(
                    Generation(
                        id=generation_id,
                        tenant_id=tenant_id,
                        status=GenerationStatus.QUEUED,
                        input=new.input,
                        meta=new.metadata,
                        webhook=new.webhook,
                        webhook_events_filter=new.webhook_events_filter,
                        priority=new.priority,
                        deadline_at=new.deadline,
                        retention_seconds=retention,
                        created_at=now,
                        updated_at=now,
                    )
                )
                if idempotency_key is not None:
                    # An expired key may be used again: drop the old record first.
                    session.execute(
                        sa.delete(IdempotencyKey).where(
                            IdempotencyKey.tenant_id == tenant_id,
                            IdempotencyKey.key == idempotency_key,
                            IdempotencyKey.expires_at <= now,
                        )
                    )
                    session.flush()
                    session.add(
                        IdempotencyKey(
                            tenant_id=tenant_id,
                            key=idempotency_key,
                            request_hash=fingerprint,
                            generation_id=generation_id,
                            created_at=now,
                            expires_at=now + IDEMPOTENCY_TTL,
                        )
                    )
                session.flush()
                if also is not None:
                    also(session, generation_id)
                    session.flush()
                task = self.line.admit(session, now=now, claim_for=generation_id).claimed
        except IntegrityError:
            # Another request with the same key committed first: answer as it did.
            if idempotency_key is None:
                raise
            earlier = self._replay(tenant_id, idempotency_key, fingerprint)
            if earlier is None:
                raise
            return earlier
        if task is not None:
            try:
                self.runner.execute(task)
            except Exception:
                # The generation and its task are committed: a worker takes over after the
                # lease.
                log.exception("inline submit of %s failed; left to the worker", generation_id)
        return Intake(generation=self._load(generation_id))

    def record_response(
        self, tenant_id: str, idempotency_key: str, status: int, body: dict[str, Any]
    ) -> None:
        """Keep the first response sent for a key, so retries get exactly that answer."""
        record_first_response(self.store, tenant_id, idempotency_key, status, body)

    def _replay(self, tenant_id: str, key: str, fingerprint: str) -> Intake | None:
        with self.store.read() as session:
            record = earlier_use(session, tenant_id, key, fingerprint, made="generation")
            if record is None:
                return None
            if record.response_body is not None and record.response_status is not None:
                return Intake(
                    generation=None, replay=(record.response_status, record.response_body)
                )
            # The first request has not answered yet (or died before it could): show the
            # generation as it is now.
            return Intake(generation=session.get(Generation, record.generation_id))

    def get(self, tenant_id: str, generation_id: str) -> Generation:
        """One generation of this tenant; NotFound for unknown ids and other tenants' ids.

        A generation waiting for a slot also shows its place in its tenant's line.
        """
        with self.store.read() as session:
            generation = session.get(Generation, generation_id)
            if generation is None or generation.tenant_id != tenant_id:
                raise NotFound(f"no generation {generation_id!r}")
            generation.queue_position = self.line.position(session, generation)
        return self._with_signed_url(generation)

    def list(
        self,
        tenant_id: str,
        *,
        status: str | None = None,
        created_after: dt.datetime | None = None,
        batch: str | None = None,
        metadata: dict[str, str] | None = None,
        cursor: str | None = None,
        limit: int = 20,
    ) -> Page[Generation]:
        """Newest first; `next_cursor` continues after the last item.

        `batch`: only that batch's items; `metadata`: only generations whose metadata has
        every one of these key/value pairs.
        """
        query = sa.select(Generation).where(Generation.tenant_id == tenant_id)
        if status is not None:
            query = query.where(Generation.status == status)
        if batch is not None:
            query = query.where(Generation.batch_id == batch)
        for key, value in (metadata or {}).items():
            query = query.where(self._metadata_is(key, value))
        if created_after is not None:
            query = query.where(Generation.created_at > created_after)
        with self.store.read() as session:
            page = paginate(session, query, Generation, cursor=cursor, limit=limit)
        return Page(
            items=[self._with_signed_url(g) for g in page.items], next_cursor=page.next_cursor
        )

    def _metadata_is(self, key: str, value: str) -> sa.ColumnElement[bool]:
        """The generation's metadata has `value` under `key`.

        PostgreSQL: `metadata ->> key` on JSONB. SQLite: a JSON path cannot spell every key
        (a quote, a backslash or a non-ASCII letter in it never matches), so the pairs are
        read with json_each instead.
        """
        if self.store.dialect != "sqlite":
            return Generation.meta[key].as_string() == value
        pairs = sa.func.json_each(Generation.meta).table_valued("key", "value")
        return sa.exists().select_from(pairs).where(pairs.c.key == key, pairs.c.value == value)

    def cancel(self, tenant_id: str, generation_id: str) -> Generation:
        """Cancel a queued or processing generation; canceling twice is harmless."""
        generation = self.get(tenant_id, generation_id)
        if generation.status != GenerationStatus.CANCELED:
            with self.store.transaction() as session:
                change_status(session, generation_id, GenerationStatus.CANCELED, now=utcnow())
            generation = self._load(generation_id)
        if generation.status != GenerationStatus.CANCELED:
            raise Conflict(f"generation {generation_id} has already {generation.status}")
        return generation

    def _load(self, generation_id: str) -> Generation:
        with self.store.read() as session:
            generation = session.get(Generation, generation_id)
        assert generation is not None
        return generation


def earlier_use(
    session: Session, tenant_id: str, key: str, fingerprint: str, *, made: str
) -> IdempotencyKey | None:
    """The unexpired record of `key`, or None; IdempotencyKeyReused when it was first used
    with another body, or for another kind of resource (`made`: "generation" or "batch")."""
    record = session.scalar(
        sa.select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
            IdempotencyKey.expires_at > utcnow(),
        )
    )
    if record is None:
        return None
    made_that = record.batch_id is not None if made == "batch" else record.generation_id is not None
    if record.request_hash != fingerprint or not made_that:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was first used with a different request body; "
            "use a new key for a new request",
            errors=[{"field": "Idempotency-Key", "message": "reused with another body"}],
        )
    return record


def record_first_response(
    store: Store, tenant_id: str, idempotency_key: str, status: int, body: dict[str, Any]
) -> None:
    """Keep the first response sent for a key (a generation's or a batch's)."""
    with store.transaction() as session:
        session.execute(
            sa.update(IdempotencyKey)
            .where(
                IdempotencyKey.tenant_id == tenant_id,
                IdempotencyKey.key == idempotency_key,
                IdempotencyKey.response_body.is_(None),
            )
            .values(response_status=status, response_body=body)
            .execution_options(synchronize_session=False)
        )
