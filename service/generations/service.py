"""Generation use cases: intake (with idempotency keys), read, list, cancel."""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.generations import GenerationSchema
from service.adapters.blobstore import BlobStore
from service.config import Config
from service.database import Store
from service.domain import GenerationStatus
from service.errors import Conflict, NotFound
from service.generations.idempotency import (
    IDEMPOTENCY_TTL,
    Answer,
    claim_key,
    earlier_answer,
    key_made,
    record_response,
)
from service.generations.inputs import require_access
from service.generations.lifecycle import change_status, changes_seen
from service.generations.line import Line
from service.generations.result_access import sign_result
from service.generations.submit import Submission
from service.generations.views import GenerationRecord, GenerationView, read_generation
from service.ids import new_id
from service.models import Generation, utcnow
from service.notifications.service import require_safe_target
from service.notifications.ssrf import URLPolicy
from service.pagination import Page, paginate
from service.runtime.queue import TaskQueue
from service.runtime.runner import TaskRunner
from service.runtime.worker import BackgroundLeases
from service.tenants import TenantSettings, settings_by_id

# The table, for Core statements on the hot paths.
_GENERATIONS = cast(sa.Table, Generation.__table__)
_INSERT_GENERATION = sa.insert(_GENERATIONS)

log = logging.getLogger("genrelay.generations")

__all__ = [
    "IDEMPOTENCY_TTL",
    "GenerationService",
    "GenerationView",
    "Intake",
    "NewGeneration",
]


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


# The outcome of intake: the generation made (or shown again), or the stored first response.
Intake = Answer[GenerationView]

# How many result links of a listed page are signed at once, when signing one takes longer
# than REMOTE_SIGNING (seconds: a request to IAM, not a local signature).
SIGNING_THREADS = 8
REMOTE_SIGNING = 0.005


def _result_uri(generation: GenerationRecord) -> str | None:
    """Where the generation's result is stored, if it has one still there."""
    if generation.result and generation.result_expired_at is None:
        uri = generation.result.get("uri")
        return uri if isinstance(uri, str) else None
    return None


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
        leases: BackgroundLeases | None = None,
    ) -> None:
        self.policy = policy
        # The first submit runs in the request: its lease is renewed while it does (a
        # GENRELAY_TASK_LEASE shorter than a slow Deep-Image answer would let a worker take the
        # task and send it a second time).
        self.leases = leases or BackgroundLeases(queue)
        self.store = store
        self.queue = queue
        self.line = line
        self.runner = runner
        self.blobs = blobs
        self.config = config

    def _view(
        self, generation: GenerationRecord, *, queue_position: int | None = None
    ) -> GenerationView:
        """The generation as shown, with a V4 URL for its stored result where the credentials
        can sign one."""
        uri = _result_uri(generation)
        signed_url = None if uri is None else self._sign(uri)
        return GenerationView(generation, signed_url=signed_url, queue_position=queue_position)

    def _views(self, generations: list[GenerationRecord]) -> list[GenerationView]:
        """A page of generations as shown, their result links signed a few at once where
        signing takes a request.

        On Cloud Run every link is a request to IAM's signBlob (tens of milliseconds): one
        after the other, a page of 100 succeeded generations took 100 of them in a row. A
        link signed locally (a key: about a millisecond) or not at all is not worth a thread:
        the first link tells which it is."""
        uris = {i: uri for i, g in enumerate(generations) if (uri := _result_uri(g)) is not None}
        links: dict[int, str | None] = {}
        pending = list(uris.items())
        if pending:
            i, uri = pending.pop(0)
            started = time.perf_counter()
            links[i] = self._sign(uri)
            if time.perf_counter() - started < REMOTE_SIGNING:  # no request: the rest alike
                links.update((i, self._sign(uri)) for i, uri in pending)
                pending = []
        if pending:
            with ThreadPoolExecutor(min(SIGNING_THREADS, len(pending)), "genrelay-sign") as pool:
                # Each in a copy of this context: its log lines keep the request's id.
                signed = [
                    (i, pool.submit(contextvars.copy_context().run, self._sign, uri))
                    for i, uri in pending
                ]
                links.update((i, future.result()) for i, future in signed)
        return [GenerationView(g, signed_url=links.get(i)) for i, g in enumerate(generations)]

    def _sign(self, uri: str) -> str | None:
        return sign_result(self.blobs, uri, self.config.signed_url_ttl)

    def create(
        self,
        tenant_id: str,
        new: NewGeneration,
        *,
        idempotency_key: str | None = None,
        also: Callable[[Session, str], None] | None = None,
        settings: TenantSettings | None = None,
    ) -> Intake:
        """Store the generation and let the line admit it; if it gets a slot now, submit it.

        One transaction reads the tenant's settings (unless the caller passes `settings`, as
        the API key lookup read them), stores the generation (and its key) and runs the
        admission; a generation admitted there gets its submit task already claimed
        by this request, which then makes the first attempt itself. Without a free slot it
        waits, `queued`. `also(session, generation_id)` runs in that transaction (a trigger
        records its event there, so a duplicate event rolls the generation back).

        With an `idempotency_key` the answer is rendered here, once, and kept for retries
        (service/generations/idempotency.py); a retry gets the first answer back.
        """
        assert settings is None or settings.id == tenant_id
        fingerprint = ""
        if idempotency_key is not None:
            fingerprint = new.fingerprint()
            earlier = self._earlier(tenant_id, idempotency_key, fingerprint)
            if earlier is not None:
                return earlier  # whatever has changed since, such as where the webhook resolves
        if new.webhook is not None:
            # Before a connection is taken for the transactions: a lookup may take seconds.
            require_safe_target(self.policy, new.webhook, "webhook", tenant_id)
        # One pooled connection for the transactions below (ours, the inline submit's, the
        # answer's), one after the other. An authenticated request holds one already
        # (handlers/auth.hold_connection); a trigger's push does not.
        with self.store.reusing_connection():
            return self._create(tenant_id, new, idempotency_key, fingerprint, also, settings)

    def _create(
        self,
        tenant_id: str,
        new: NewGeneration,
        idempotency_key: str | None,
        fingerprint: str,
        also: Callable[[Session, str], None] | None,
        settings: TenantSettings | None,
    ) -> Intake:
        now = utcnow()
        generation_id = new_id("gen_")
        try:
            with self.store.transaction() as session:
                if idempotency_key is not None:
                    claim_key(session, tenant_id, idempotency_key, fingerprint, now=now)
                if settings is None:
                    settings = settings_by_id(session, tenant_id)
                require_access(settings, new.input)
                retention = new.retention if new.retention is not None else settings.retention

                def store(admitted_at: dt.datetime | None) -> None:
                    session.connection().execute(
                        _INSERT_GENERATION,
                        {
                            "id": generation_id,
                            "tenant_id": tenant_id,
                            "status": GenerationStatus.QUEUED.value,
                            "input": new.input,
                            "metadata": new.metadata,
                            "webhook": new.webhook,
                            "webhook_events_filter": new.webhook_events_filter,
                            "priority": new.priority,
                            "deadline_at": new.deadline,
                            "retention_seconds": retention,
                            "admitted_at": admitted_at,
                            "created_at": now,
                            "updated_at": now,
                        },
                    )

                task = self.line.admit_new(
                    session,
                    generation_id,
                    tenant_id,
                    store=store,
                    now=now,
                    deadline=new.deadline,
                ).claimed
                if idempotency_key is not None:
                    key_made(session, tenant_id, idempotency_key, generation_id)
                if also is not None:
                    also(session, generation_id)
        except IntegrityError:
            # Another request with the same key committed first: answer as it did.
            if idempotency_key is None:
                raise
            earlier = self._earlier(tenant_id, idempotency_key, fingerprint)
            if earlier is None:
                raise
            return earlier
        moved = None
        if task is not None:
            # The attempt is handed the generation as stored: it need not read it back. The
            # answer shows the generation as the attempt's status change left it, if it made
            # one: that row need not be read back either.
            known = Submission(GenerationStatus.QUEUED.value, now, new.deadline, new.input)
            try:
                with changes_seen() as seen, self.leases.holding(task):
                    self.runner.execute(dataclasses.replace(task, known=known))
                moved = seen.get(generation_id)
            except Exception:
                # The generation and its task are committed: a worker takes over after the
                # lease.
                log.exception("inline submit of %s failed; left to the worker", generation_id)
        return self._answer(tenant_id, generation_id, idempotency_key, moved)

    def _answer(
        self,
        tenant_id: str,
        generation_id: str,
        key: str | None,
        generation: GenerationRecord | None = None,
    ) -> Intake:
        """The generation as it is now (read, unless the caller has just seen it change);
        with a key, also rendered and kept as the key's first response (one transaction)."""
        if key is None:
            if generation is None:
                generation = self._load(generation_id)
            return Answer(self._view(generation))
        with self.store.transaction() as session:
            if generation is None:
                generation = session.get(Generation, generation_id)
            assert generation is not None
            view = self._view(generation)
            body = GenerationSchema().dump(view)  # the one rendering, kept for retries
            record_response(session, tenant_id, key, 202, body)
        return Answer(view, body=body)

    def retry_answer(
        self, tenant_id: str, new: NewGeneration, idempotency_key: str
    ) -> Intake | None:
        """The answer `create` would give a retry of `new` with `idempotency_key`, without
        making anything: the first response, or the generation as it is now; None when the
        key has no unexpired record (IdempotencyKeyReused when it was used with another
        body)."""
        return self._earlier(tenant_id, idempotency_key, new.fingerprint())

    def _earlier(self, tenant_id: str, key: str, fingerprint: str) -> Intake | None:
        return earlier_answer(
            self.store,
            tenant_id,
            key,
            fingerprint,
            made="generation",
            # Shown, not kept: the answer to keep is the first request's own.
            show=lambda generation_id: self._answer(tenant_id, generation_id, None),
        )

    def get(self, tenant_id: str, generation_id: str) -> GenerationView:
        """One generation of this tenant; NotFound for unknown ids and other tenants' ids.

        A generation waiting for a slot also shows its place in its tenant's line.
        """
        with self.store.read() as session:
            generation = session.get(Generation, generation_id)
            if generation is None or generation.tenant_id != tenant_id:
                raise NotFound(f"no generation {generation_id!r}")
            position = self.line.position(session, generation)
        return self._view(generation, queue_position=position)

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
    ) -> Page[GenerationView]:
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
        return Page(items=self._views(page.items), next_cursor=page.next_cursor)

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

    def cancel(self, tenant_id: str, generation_id: str) -> GenerationView:
        """Cancel a queued or processing generation; canceling twice is harmless."""
        generation = self.get(tenant_id, generation_id)
        if generation.status != GenerationStatus.CANCELED:
            self.store.retrying(lambda: self._cancel(generation_id))
            generation = GenerationView(self._load(generation_id))
        if generation.status != GenerationStatus.CANCELED:
            raise Conflict(f"generation {generation_id} has already {generation.status}")
        return generation

    def _cancel(self, generation_id: str) -> None:
        with self.store.transaction() as session:
            change_status(session, generation_id, GenerationStatus.CANCELED, now=utcnow())

    def _load(self, generation_id: str) -> GenerationRecord:
        with self.store.read_one() as connection:
            generation = read_generation(connection, generation_id)
        assert generation is not None
        return generation
