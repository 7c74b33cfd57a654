"""SQLAlchemy table definitions. The migrations in `migrations/versions` create exactly these."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC (what every timestamp column holds)."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        # SQLite compares timestamps as text: store them naive in one fixed format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


JSONDocument = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# A generation holds an upstream slot from its admission until Deep-Image is done with its job
# (`source_found_at`: the result, or the end of a canceled generation's job, is known) or it
# ends without one. A generation canceled while its job runs at Deep-Image keeps the slot until
# that job ends: Deep-Image has no cancel. The condition of the partial index that counts them.
IN_FLIGHT_SQL = (
    "admitted_at IS NOT NULL AND source_found_at IS NULL AND (status IN ('queued', "
    "'processing') OR (status = 'canceled' AND upstream_job IS NOT NULL))"
)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSONDocument}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    # Signs notifications to per-request `webhook` URLs; made on first use.
    webhook_secret: Mapped[str | None] = mapped_column(sa.String(100), default=None)
    # Share of the upstream slots when several tenants wait (`genrelay tenants set`).
    weight: Mapped[int] = mapped_column(default=1, server_default="1")
    # At most this many of the tenant's jobs at Deep-Image at once (None: no cap of its own).
    max_in_flight: Mapped[int | None] = mapped_column(default=None)
    # The GCP loop (service/generations/inputs.py): buckets its `gs://` inputs may name, Deep-Image
    # storages (`storage://NAME/...`) it may read and write, where its results go
    # (`gs://bucket/prefix`; None: GENRELAY_GCS_BUCKET/PREFIX) and how many seconds they are
    # kept (None: forever). None and [] both mean "none allowed".
    allowed_input_buckets: Mapped[list[str] | None] = mapped_column(JSONDocument, default=None)
    allowed_storages: Mapped[list[str] | None] = mapped_column(JSONDocument, default=None)
    output_uri: Mapped[str | None] = mapped_column(sa.String(1100), default=None)
    retention_seconds: Mapped[int | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Where its next slot starts on the line's fair clock (service/generations/line.py).
    fair_tag: Mapped[float] = mapped_column(default=0.0, server_default="0")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id"), index=True)
    # SHA-256 of the key: keys are 256-bit random, so a plain hash cannot be brute-forced.
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (
        sa.Index("ix_generations_tenant_created", "tenant_id", "created_at", "id"),
        # Lists filtered by status (migration 0004).
        sa.Index("ix_generations_tenant_status_created", "tenant_id", "status", "created_at", "id"),
        # The line (service/generations/line.py): waiting generations per tenant, in the order they
        # go.
        sa.Index(
            "ix_generations_waiting",
            "tenant_id",
            sa.desc(sa.column("priority")),
            "created_at",
            "id",
            postgresql_where=sa.text("status = 'queued' AND admitted_at IS NULL"),
            sqlite_where=sa.text("status = 'queued' AND admitted_at IS NULL"),
        ),
        # ...and the ones holding an upstream slot (counted before every admission).
        sa.Index(
            "ix_generations_in_flight",
            "tenant_id",
            postgresql_where=sa.text(IN_FLIGHT_SQL),
            sqlite_where=sa.text(IN_FLIGHT_SQL),
        ),
        sa.Index("ix_generations_batch", "batch_id", "status"),
        # On PostgreSQL the table also keeps a tenth of each page free for its rows' updates
        # (fillfactor 90, migration 0009): set by the migration alone, since SQLAlchemy 2.0
        # cannot declare a table's storage parameters.
    )
    # What is made when a generation is shown (a signed download URL, its place in the line)
    # is not stored here: see service/generations/views.py.

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id"))
    status: Mapped[str] = mapped_column(sa.String(20), index=True)
    input: Mapped[dict[str, Any]]
    # "metadata" is reserved on declarative classes; the column keeps the public name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata")
    webhook: Mapped[str | None] = mapped_column(sa.String(2048))
    webhook_events_filter: Mapped[list[str] | None] = mapped_column(JSONDocument)
    # Not indexed: nothing looks a generation up by its job (migration 0008).
    upstream_job: Mapped[str | None] = mapped_column(sa.String(100))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    error_code: Mapped[str | None] = mapped_column(sa.String(50))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    submitted_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # Where Deep-Image put the finished image (from its callback or from polling), and when
    # that became known: set once, so a duplicate callback finds it set and changes nothing.
    source_url: Mapped[str | None] = mapped_column(sa.Text, default=None)
    source_found_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # The line: higher priority goes first within a tenant; a generation still waiting at its
    # deadline is canceled; `admitted_at` is set when it is given an upstream slot (and
    # cleared when a 429 hands the slot back).
    priority: Mapped[int] = mapped_column(default=0, server_default="0")
    deadline_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    admitted_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    batch_id: Mapped[str | None] = mapped_column(sa.String(40), default=None)
    custom_id: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    # Seconds the stored result is kept (the request's `retention`, else the tenant's); None:
    # forever. When the result has been deleted (expired, or DELETE .../result): when.
    retention_seconds: Mapped[int | None] = mapped_column(default=None)
    result_expired_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Batch(Base):
    """Many generations sent in one request (`POST /v1/batches`)."""

    __tablename__ = "batches"
    __table_args__ = (sa.Index("ix_batches_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id"))
    status: Mapped[str] = mapped_column(sa.String(20))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata")
    template: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, default=None)
    webhook: Mapped[str | None] = mapped_column(sa.String(2048), default=None)
    webhook_events_filter: Mapped[list[str] | None] = mapped_column(JSONDocument, default=None)
    total: Mapped[int]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    canceled_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class UpstreamAccount(Base):
    """Deep-Image's concurrency limit as genrelay knows it; one row per account.

    Its row is also the lock that admissions take, so every process agrees on who gets a slot.
    """

    __tablename__ = "upstream_accounts"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    # The limit admissions respect now, and where it came from: "configured"
    # (GENRELAY_UPSTREAM_CONCURRENCY), "stated" (a 429 said it), "probing" (learned).
    limit: Mapped[int] = mapped_column("concurrency_limit")
    limit_source: Mapped[str] = mapped_column(sa.String(20))
    # Probing: submissions accepted at the limit since it last changed.
    accepted_at_limit: Mapped[int] = mapped_column(default=0)
    # After a 429: no admissions before this time (it doubles while 429s keep coming).
    paused_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    refusals_in_a_row: Mapped[int] = mapped_column(default=0)
    # False until the first 429: till then the learned limit grows fast (slow start).
    refused_before: Mapped[bool] = mapped_column(default=False)
    # The virtual time of the line's fair share between tenants (service/generations/line.py).
    fair_clock: Mapped[float] = mapped_column(default=0.0, server_default="0")
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(sa.String(64))
    # What the key made: a generation, or a batch.
    generation_id: Mapped[str | None] = mapped_column(sa.ForeignKey("generations.id"))
    batch_id: Mapped[str | None] = mapped_column(sa.String(40), default=None)
    response_status: Mapped[int | None] = mapped_column(default=None)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (sa.Index("ix_tasks_due", "status", "run_at"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(40))
    generation_id: Mapped[str | None] = mapped_column(sa.String(40), index=True)
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(20))
    attempts: Mapped[int] = mapped_column(default=0)
    run_at: Mapped[dt.datetime]
    # Who holds the task now: a fresh token per claim, so a worker whose lease ran out
    # cannot finish or reschedule a task that somebody else has claimed since.
    claim_token: Mapped[str | None] = mapped_column(sa.String(40), default=None)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(sa.Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Event(Base):
    """A state change of a generation, written in the transaction that made it."""

    __tablename__ = "events"
    __table_args__ = (
        sa.Index("ix_events_tenant_created", "tenant_id", "created_at", "id"),
        sa.Index("ix_events_generation", "generation_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id"))
    generation_id: Mapped[str] = mapped_column(sa.String(40))
    type: Mapped[str] = mapped_column(sa.String(60))
    # The generation resource as it was at that moment.
    data: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (sa.Index("ix_subscriptions_tenant", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id"))
    url: Mapped[str] = mapped_column(sa.String(2048))
    events: Mapped[list[str]] = mapped_column(JSONDocument)
    format: Mapped[str] = mapped_column(sa.String(20))
    description: Mapped[str] = mapped_column(sa.String(500), default="")
    enabled: Mapped[bool] = mapped_column(default=True)
    disabled_reason: Mapped[str | None] = mapped_column(sa.Text, default=None)
    # Kept to sign with (a hash would not do). The previous secret signs too until it expires.
    secret: Mapped[str] = mapped_column(sa.String(100))
    previous_secret: Mapped[str | None] = mapped_column(sa.String(100), default=None)
    previous_secret_expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # Secrets replaced before the previous one whose overlap still runs (rotations less than
    # 24 h apart), newest first: [{"secret": ..., "until": ISO 8601}]. They sign too.
    earlier_secrets: Mapped[list[dict[str, str]] | None] = mapped_column(JSONDocument, default=None)
    # Since when every delivery has failed (None while the last one succeeded).
    failing_since: Mapped[dt.datetime | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Delivery(Base):
    """One event for one target: the outbox row the worker sends and retries."""

    __tablename__ = "deliveries"
    __table_args__ = (
        sa.Index("ix_deliveries_tenant_created", "tenant_id", "created_at", "id"),
        sa.Index("ix_deliveries_subscription", "subscription_id", "created_at"),
        sa.Index("ix_deliveries_event", "event_id"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id"))
    event_id: Mapped[str | None] = mapped_column(sa.String(40))  # None for test pings
    # None: the generation's own `webhook`, signed with the tenant's default secret.
    subscription_id: Mapped[str | None] = mapped_column(sa.String(40))
    event_type: Mapped[str] = mapped_column(sa.String(60))
    url: Mapped[str] = mapped_column(sa.String(2048))
    format: Mapped[str] = mapped_column(sa.String(20))
    # Stable across retries and replays (Standard Webhooks' idempotency key for receivers).
    webhook_id: Mapped[str] = mapped_column(sa.String(60), unique=True)
    # The exact bytes sent every time (signatures are computed over them).
    body: Mapped[str] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(20))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_status_code: Mapped[int | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(sa.Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(sa.ForeignKey("deliveries.id"), index=True)
    attempted_at: Mapped[dt.datetime]
    status_code: Mapped[int | None]
    duration_ms: Mapped[int]
    response_excerpt: Mapped[str | None] = mapped_column(sa.Text)
    error: Mapped[str | None] = mapped_column(sa.Text)


class Trigger(Base):
    """A push endpoint that turns GCS object notifications or Pub/Sub messages into generations.

    Eventarc or a Pub/Sub push subscription posts to `/v1/triggers/{id}/push` with a
    Google-signed OIDC token; `push_accounts` are the service accounts allowed to (service/
    triggers.py).
    """

    __tablename__ = "triggers"
    __table_args__ = (sa.Index("ix_triggers_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id"))
    source: Mapped[str] = mapped_column(sa.String(20))  # "gcs" or "pubsub"
    bucket: Mapped[str | None] = mapped_column(sa.String(222), default=None)
    name_prefix: Mapped[str] = mapped_column(sa.String(1024), default="")
    name_suffix: Mapped[str] = mapped_column(sa.String(1024), default="")
    # Merged under every generation request the trigger makes (the object goes in `url`).
    template: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata")
    webhook: Mapped[str | None] = mapped_column(sa.String(2048), default=None)
    push_accounts: Mapped[list[str]] = mapped_column(JSONDocument)
    enabled: Mapped[bool] = mapped_column(default=True)
    description: Mapped[str] = mapped_column(sa.String(500), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class TriggerEvent(Base):
    """One pushed event, once: the same (trigger, event id) makes at most one generation."""

    __tablename__ = "trigger_events"
    __table_args__ = (
        sa.UniqueConstraint("trigger_id", "event_id", name="uq_trigger_events_event"),
        sa.Index("ix_trigger_events_trigger_created", "trigger_id", "created_at", "id"),
        # What housekeeping deletes once old: the events that made no generation.
        sa.Index(
            "ix_trigger_events_unaccepted_created",
            "created_at",
            postgresql_where=sa.text("status <> 'accepted'"),
            sqlite_where=sa.text("status <> 'accepted'"),
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    trigger_id: Mapped[str] = mapped_column(sa.ForeignKey("triggers.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id"))
    # The CloudEvent's `ce-id` or the Pub/Sub `messageId`.
    event_id: Mapped[str] = mapped_column(sa.String(200))
    kind: Mapped[str] = mapped_column(sa.String(40))  # cloudevent, gcs_notification, message
    # "accepted" (generation_id is set) or "rejected" (reason says why; never retried).
    status: Mapped[str] = mapped_column(sa.String(20))
    reason: Mapped[str | None] = mapped_column(sa.Text, default=None)
    subject: Mapped[str | None] = mapped_column(sa.String(1100), default=None)
    generation_id: Mapped[str | None] = mapped_column(sa.String(40), default=None)
    # When it first arrived.
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
