"""Events and their fan-out to webhook targets.

`record_event` runs inside the transaction that changed a generation's status: the event row,
one delivery row per target and one `deliver` task per delivery commit together with the
change, or not at all. The delivery body is built once, here, and sent as these exact bytes
on every attempt.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from schemas.generations import GenerationSummarySchema
from service.domain import EVENT_FOR_STATUS, DeliveryStatus, GenerationStatus
from service.generations.views import GenerationRecord, GenerationView
from service.ids import new_id
from service.models import Delivery, Event, Subscription, Tenant
from service.notifications.signing import (
    cloudevents_body,
    new_secret,
    new_webhook_id,
    standard_body,
)
from service.runtime.kinds import DELIVER
from service.runtime.queue import insert_task

CLOUDEVENTS_SOURCE = "/genrelay"


# Core statements, built once: every status change runs them.
_ENABLED_SUBSCRIPTIONS = sa.select(
    Subscription.id, Subscription.url, Subscription.format, Subscription.events
).where(Subscription.tenant_id == sa.bindparam("tenant_id"), Subscription.enabled.is_(True))
_INSERT_EVENT = sa.insert(cast(sa.Table, Event.__table__))
_INSERT_DELIVERY = sa.insert(cast(sa.Table, Delivery.__table__))
_SUMMARY = GenerationSummarySchema()  # stateless: one instance serves every event


def any_subscription(tenant_id: sa.ColumnElement[str]) -> sa.Exists:
    """Whether the tenant has an enabled subscription, as SQL. A status change returns it with
    the row it changed, so that its fan-out reads the subscriptions only when there are some:
    one statement less per status change for a tenant with none."""
    return sa.exists().where(Subscription.tenant_id == tenant_id, Subscription.enabled.is_(True))


def generation_resource(
    generation: GenerationRecord, *, signed_url: str | None = None
) -> dict[str, Any]:
    """The generation as events and deliveries carry it (inline image data by size and hash);
    `signed_url` (never stored on the row) goes into `result.url`."""
    return _SUMMARY.dump(GenerationView(generation, signed_url=signed_url))


def record_event(
    session: Session,
    generation: GenerationRecord,
    status: GenerationStatus,
    *,
    now: dt.datetime,
    signed_url: str | None = None,
    subscribed: bool = True,
) -> Event | None:
    """Write the event of a status change and queue its deliveries (same transaction).

    `generation` is the row as the change left it (change_status's UPDATE ... RETURNING);
    `signed_url`, a download link for its result, is shown in the event's `result.url`.
    `subscribed=False`: the tenant has no enabled subscription (`any_subscription`, read in
    the change's own statement).
    """
    event_type = EVENT_FOR_STATUS.get(status)
    if event_type is None:
        return None
    event = Event(
        id=new_id("evt_"),
        tenant_id=generation.tenant_id,
        generation_id=generation.id,
        type=event_type,
        data=generation_resource(generation, signed_url=signed_url),
        created_at=now,
    )
    fan_out(
        session,
        event,
        webhook=generation.webhook,
        webhook_events_filter=generation.webhook_events_filter,
        subscribed=subscribed,
    )
    return event


def fan_out(
    session: Session,
    event: Event,
    *,
    webhook: str | None,
    webhook_events_filter: list[str] | None,
    subscribed: bool = True,
) -> None:
    """Store `event` and queue a delivery to each target that wants it: the subject's own
    `webhook` (unless its filter leaves the type out) and the tenant's enabled subscriptions
    that list the type (not read when `subscribed` is False: the caller knows of none).

    `event` is not added to the session: it, its deliveries and their tasks are inserted with
    Core statements (this runs with every status change).
    """
    connection = session.connection()
    connection.execute(
        _INSERT_EVENT,
        {
            "id": event.id,
            "tenant_id": event.tenant_id,
            "generation_id": event.generation_id,
            "type": event.type,
            "data": event.data,
            "created_at": event.created_at,
        },
    )
    if webhook and (webhook_events_filter is None or event.type in webhook_events_filter):
        tenant_webhook_secret(session, event.tenant_id)  # the deliverer only reads it
        queue_delivery(session, event, url=webhook, fmt="standard", subscription_id=None)
    if not subscribed:
        return
    subscriptions = connection.execute(_ENABLED_SUBSCRIPTIONS, {"tenant_id": event.tenant_id})
    for subscription in subscriptions.all():
        if event.type in subscription.events:
            queue_delivery(
                session,
                event,
                url=subscription.url,
                fmt=subscription.format,
                subscription_id=subscription.id,
            )


def queue_delivery(
    session: Session,
    event: Event,
    *,
    url: str,
    fmt: str,
    subscription_id: str | None,
    stored_event: bool = True,
) -> Delivery:
    """One delivery row for (event, target) and the task that sends it; the row is returned
    as inserted (not in the session). `stored_event=False`: the event is not in the feed
    (a test ping), so the delivery names none."""
    webhook_id = new_webhook_id()
    body = render_body(
        fmt,
        event.type,
        webhook_id,
        event.created_at,
        event.data,
        subject=event.generation_id or None,
    )
    values: dict[str, Any] = {
        "id": new_id("dlv_"),
        "tenant_id": event.tenant_id,
        "event_id": event.id if stored_event else None,
        "subscription_id": subscription_id,
        "event_type": event.type,
        "url": url,
        "format": fmt,
        "webhook_id": webhook_id,
        "body": body.decode("utf-8"),
        "status": DeliveryStatus.PENDING.value,
        "attempts": 0,
        "next_attempt_at": event.created_at,
        "created_at": event.created_at,
        "updated_at": event.created_at,
    }
    session.connection().execute(_INSERT_DELIVERY, values)
    insert_task(
        session, DELIVER, {"delivery_id": values["id"]}, event.generation_id, event.created_at
    )
    return Delivery(**values)


def render_body(
    fmt: str,
    event_type: str,
    webhook_id: str,
    timestamp: dt.datetime,
    data: dict[str, Any],
    *,
    subject: str | None,
) -> bytes:
    """The bytes a delivery sends: Standard Webhooks JSON or CloudEvents structured JSON."""
    if fmt == "cloudevents":
        return cloudevents_body(
            event_type, webhook_id, timestamp, data, CLOUDEVENTS_SOURCE, subject
        )
    return standard_body(event_type, timestamp, data)


def tenant_webhook_secret(session: Session, tenant_id: str) -> str:
    """The secret that signs per-request `webhook` deliveries; created on first use.

    Called with every event that has a webhook target, so it takes no lock on the tenant's
    row: locking it there made concurrent status changes of one tenant deadlock (the soak
    test found it). Tenants get their secret at creation; older ones on first use, by a
    conditional UPDATE that only one transaction can win.
    """
    current = sa.select(Tenant.webhook_secret).where(Tenant.id == tenant_id)
    secret = session.scalar(current)
    if secret is None:
        session.execute(
            sa.update(Tenant)
            .where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
            .values(webhook_secret=new_secret())
            .execution_options(synchronize_session=False)
        )
        secret = session.scalar(current)
    assert secret is not None
    return secret
