"""Events and their fan-out to webhook targets.

`record_event` runs inside the transaction that changed a generation's status: the event row,
one delivery row per target and one `deliver` task per delivery commit together with the
change, or not at all. The delivery body is built once, here, and sent as these exact bytes
on every attempt.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from schemas.generations import GenerationSummarySchema
from service.domain import EVENT_FOR_STATUS, DeliveryStatus, GenerationStatus
from service.generations.views import GenerationView
from service.ids import new_id
from service.models import Delivery, Event, Generation, Subscription, Tenant
from service.notifications.signing import (
    cloudevents_body,
    new_secret,
    new_webhook_id,
    standard_body,
)
from service.runtime import wakeup
from service.runtime.kinds import DELIVER
from service.runtime.queue import new_task_row

CLOUDEVENTS_SOURCE = "/genrelay"


# Built once: every status change runs it.
_ENABLED_SUBSCRIPTIONS = sa.select(Subscription).where(
    Subscription.tenant_id == sa.bindparam("tenant_id"), Subscription.enabled.is_(True)
)
_SUMMARY = GenerationSummarySchema()  # stateless: one instance serves every event


def generation_resource(generation: Generation, *, signed_url: str | None = None) -> dict[str, Any]:
    """The generation as events and deliveries carry it (inline image data by size and hash);
    `signed_url` (never stored on the row) goes into `result.url`."""
    return _SUMMARY.dump(GenerationView(generation, signed_url=signed_url))


def record_event(
    session: Session,
    generation: Generation,
    status: GenerationStatus,
    *,
    now: dt.datetime,
    signed_url: str | None = None,
) -> Event | None:
    """Write the event of a status change and queue its deliveries (same transaction).

    `generation` is the row as the change left it (change_status's UPDATE ... RETURNING);
    `signed_url`, a download link for its result, is shown in the event's `result.url`.
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
    )
    return event


def fan_out(
    session: Session,
    event: Event,
    *,
    webhook: str | None,
    webhook_events_filter: list[str] | None,
) -> None:
    """Store `event` and queue a delivery to each target that wants it: the subject's own
    `webhook` (unless its filter leaves the type out) and the tenant's enabled subscriptions
    that list the type."""
    session.add(event)
    if webhook and (webhook_events_filter is None or event.type in webhook_events_filter):
        tenant_webhook_secret(session, event.tenant_id)  # the deliverer only reads it
        queue_delivery(session, event, url=webhook, fmt="standard", subscription=None)
    subscriptions = session.scalars(_ENABLED_SUBSCRIPTIONS, {"tenant_id": event.tenant_id})
    for subscription in subscriptions:
        if event.type in subscription.events:
            queue_delivery(
                session,
                event,
                url=subscription.url,
                fmt=subscription.format,
                subscription=subscription,
            )


def queue_delivery(
    session: Session,
    event: Event,
    *,
    url: str,
    fmt: str,
    subscription: Subscription | None,
) -> Delivery:
    """One delivery row for (event, target) and the task that sends it."""
    webhook_id = new_webhook_id()
    body = render_body(
        fmt,
        event.type,
        webhook_id,
        event.created_at,
        event.data,
        subject=event.generation_id or None,
    )
    delivery = Delivery(
        id=new_id("dlv_"),
        tenant_id=event.tenant_id,
        event_id=event.id,
        subscription_id=subscription.id if subscription else None,
        event_type=event.type,
        url=url,
        format=fmt,
        webhook_id=webhook_id,
        body=body.decode("utf-8"),
        status=DeliveryStatus.PENDING,
        next_attempt_at=event.created_at,
        created_at=event.created_at,
        updated_at=event.created_at,
    )
    session.add(delivery)
    session.add(
        new_task_row(
            DELIVER,
            {"delivery_id": delivery.id},
            event.generation_id,
            event.created_at,
        )
    )
    wakeup.request_wake(session)  # due now
    return delivery


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
