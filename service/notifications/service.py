"""Subscriptions, the event feed and the delivery log: what a tenant sees of its notifications."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.config import Config
from service.database import Store
from service.domain import GENERATION_EVENT_TYPES, DeliveryStatus
from service.errors import Conflict, InvalidRequest, NotFound
from service.ids import new_id
from service.models import (
    Delivery,
    DeliveryAttempt,
    Event,
    Generation,
    Subscription,
    Tenant,
    utcnow,
)
from service.notifications.events import queue_delivery, tenant_webhook_secret
from service.notifications.signing import new_secret, still_signing
from service.notifications.ssrf import NoSuchHost, Unresolvable, UnsafeURL, URLPolicy, lookups_for
from service.pagination import Page, paginate
from service.runtime import wakeup
from service.runtime.kinds import DELIVER
from service.runtime.queue import new_task_row

ROTATION_OVERLAP = dt.timedelta(hours=24)
# Secrets kept signing beside the current and the previous one, at most (the newest kept).
MAX_EARLIER_SECRETS = 8
# Each event is stored once per subscription (its delivery body): a cap bounds the fan-out.
MAX_SUBSCRIPTIONS = 25
PING = "ping"


@dataclasses.dataclass(frozen=True)
class WithSecret:
    """A subscription with the secret that is shown this once; reads like the subscription."""

    subscription: Subscription
    secret: str

    def __getattr__(self, name: str) -> Any:
        return getattr(self.subscription, name)


@dataclasses.dataclass(frozen=True)
class DeliveryDetail:
    """A delivery and its attempts, oldest first; reads like the delivery otherwise."""

    delivery: Delivery
    attempt_log: list[DeliveryAttempt]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.delivery, name)


class NotificationService:
    """Owns the transactions of subscriptions, events and deliveries, per tenant."""

    def __init__(self, store: Store, config: Config, policy: URLPolicy) -> None:
        self.store = store
        self.config = config
        self.policy = policy

    # Subscriptions

    def create_subscription(
        self,
        tenant_id: str,
        *,
        url: str,
        events: list[str] | None = None,
        format: str = "standard",
        description: str = "",
        enabled: bool = True,
    ) -> WithSecret:
        """A new subscription and its secret (shown to the caller this once)."""
        require_safe_target(self.policy, url, "url", tenant_id)
        now = utcnow()
        secret = new_secret()
        subscription = Subscription(
            id=new_id("sub_"),
            tenant_id=tenant_id,
            url=url,
            events=list(events or GENERATION_EVENT_TYPES),
            format=format,
            description=description,
            enabled=enabled,
            secret=secret,
            created_at=now,
            updated_at=now,
        )
        with self.store.transaction() as session:
            # The tenant's row, locked: two creations at once cannot both take the last place.
            session.execute(sa.select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
            count = session.scalar(
                sa.select(sa.func.count())
                .select_from(Subscription)
                .where(Subscription.tenant_id == tenant_id)
            )
            if (count or 0) >= MAX_SUBSCRIPTIONS:
                raise InvalidRequest(
                    f"a tenant may have at most {MAX_SUBSCRIPTIONS} subscriptions (each event is "
                    "stored once more for each); delete one or filter its events instead",
                    errors=[{"field": "url", "message": "Too many subscriptions."}],
                )
            session.add(subscription)
        return WithSecret(subscription, secret)

    def list_subscriptions(
        self, tenant_id: str, *, cursor: str | None = None, limit: int = 20
    ) -> Page[Subscription]:
        query = sa.select(Subscription).where(Subscription.tenant_id == tenant_id)
        with self.store.read() as session:
            return paginate(session, query, Subscription, cursor=cursor, limit=limit)

    def get_subscription(self, tenant_id: str, subscription_id: str) -> Subscription:
        with self.store.read() as session:
            return _owned(session, Subscription, tenant_id, subscription_id, "subscription")

    def update_subscription(
        self, tenant_id: str, subscription_id: str, changes: dict[str, Any]
    ) -> Subscription:
        """Change url, events, format, description or enabled; re-enabling clears the reason."""
        if "url" in changes:
            require_safe_target(self.policy, changes["url"], "url", tenant_id)
        with self.store.transaction() as session:
            subscription = _owned(session, Subscription, tenant_id, subscription_id, "subscription")
            for name, value in changes.items():
                setattr(subscription, name, value)
            if changes.get("enabled") is True:
                subscription.disabled_reason = None
                subscription.failing_since = None
            subscription.updated_at = utcnow()
        return subscription

    def delete_subscription(self, tenant_id: str, subscription_id: str) -> None:
        """Remove it; its pending deliveries fail as 'subscription disabled' when due."""
        with self.store.transaction() as session:
            session.delete(
                _owned(session, Subscription, tenant_id, subscription_id, "subscription")
            )

    def rotate_secret(self, tenant_id: str, subscription_id: str) -> WithSecret:
        """A new secret; the old one keeps signing beside it for 24 hours.

        So does every secret replaced in the 24 hours before (up to MAX_EARLIER_SECRETS): a
        client that sends the rotation again, having lost the first answer, would otherwise
        see the secret its receivers hold stop signing at once."""
        secret = new_secret()
        now = utcnow()
        with self.store.transaction() as session:
            # Locked: two rotations at once (a retry beside its lost first) take turns, or
            # each would set `previous_secret` from the same row and one secret be lost.
            subscription = _owned(
                session, Subscription, tenant_id, subscription_id, "subscription", lock=True
            )
            earlier = still_signing(subscription.earlier_secrets, now)
            expires = subscription.previous_secret_expires_at
            if subscription.previous_secret and expires and expires > now:
                earlier.insert(
                    0, {"secret": subscription.previous_secret, "until": expires.isoformat()}
                )
            subscription.earlier_secrets = earlier[:MAX_EARLIER_SECRETS] or None
            subscription.previous_secret = subscription.secret
            subscription.previous_secret_expires_at = now + ROTATION_OVERLAP
            subscription.secret = secret
            subscription.updated_at = now
        return WithSecret(subscription, secret)

    def send_test(self, tenant_id: str, subscription_id: str) -> Delivery:
        """Queue a `ping` delivery to the subscription (no event in the feed)."""
        now = utcnow()
        with self.store.transaction() as session:
            subscription = _owned(session, Subscription, tenant_id, subscription_id, "subscription")
            ping = Event(
                id=new_id("evt_ping_"),
                tenant_id=tenant_id,
                generation_id="",
                type=PING,
                data={"subscription_id": subscription.id, "message": "genrelay test delivery"},
                created_at=now,
            )
            # Built like any delivery, but the ping event itself is not stored in the feed.
            return queue_delivery(
                session,
                ping,
                url=subscription.url,
                fmt=subscription.format,
                subscription_id=subscription.id,
                stored_event=False,
            )

    def default_webhook_secret(self, tenant_id: str) -> str:
        """The secret that signs deliveries to per-request `webhook` URLs."""
        with self.store.transaction() as session:
            return tenant_webhook_secret(session, tenant_id)

    # Events

    def list_events(
        self,
        tenant_id: str,
        *,
        type: str | None = None,
        generation_id: str | None = None,
        cursor: str | None = None,
        limit: int = 20,
    ) -> Page[Event]:
        query = sa.select(Event).where(Event.tenant_id == tenant_id)
        if type is not None:
            query = query.where(Event.type == type)
        if generation_id is not None:
            query = query.where(Event.generation_id == generation_id)
        with self.store.read() as session:
            page = paginate(session, query, Event, cursor=cursor, limit=limit)
            return Page(
                items=_without_gone_links(session, page.items), next_cursor=page.next_cursor
            )

    def get_event(self, tenant_id: str, event_id: str) -> Event:
        with self.store.read() as session:
            [event] = _without_gone_links(
                session, [_owned(session, Event, tenant_id, event_id, "event")]
            )
            return event

    # Deliveries

    def list_deliveries(
        self,
        tenant_id: str,
        *,
        subscription: str | None = None,
        status: str | None = None,
        event: str | None = None,
        cursor: str | None = None,
        limit: int = 20,
    ) -> Page[Delivery]:
        query = sa.select(Delivery).where(Delivery.tenant_id == tenant_id)
        if subscription is not None:
            query = query.where(Delivery.subscription_id == subscription)
        if status is not None:
            query = query.where(Delivery.status == status)
        if event is not None:
            query = query.where(Delivery.event_id == event)
        with self.store.read() as session:
            return paginate(session, query, Delivery, cursor=cursor, limit=limit)

    def get_delivery(self, tenant_id: str, delivery_id: str) -> DeliveryDetail:
        with self.store.read() as session:
            delivery = _owned(session, Delivery, tenant_id, delivery_id, "delivery")
            attempts = list(
                session.scalars(
                    sa.select(DeliveryAttempt)
                    .where(DeliveryAttempt.delivery_id == delivery_id)
                    .order_by(DeliveryAttempt.attempted_at)
                )
            )
        return DeliveryDetail(delivery=delivery, attempt_log=attempts)

    def retry_delivery(self, tenant_id: str, delivery_id: str) -> Delivery:
        """Send it again (whatever its status) as one new attempt with the same webhook-id.

        The attempt is one more, outside the schedule: if it fails, a delivery whose schedule
        still has attempts to come stays pending for them (service/notifications/deliver.py).
        """
        now = utcnow()
        with self.store.transaction() as session:
            delivery = _owned(session, Delivery, tenant_id, delivery_id, "delivery")
            if delivery.subscription_id is not None:
                # Nothing would be sent, and the delivery would be recorded `failed`, even
                # one that had succeeded.
                subscription = session.get(Subscription, delivery.subscription_id)
                if subscription is None or not subscription.enabled:
                    state = "deleted" if subscription is None else "disabled; enable it first"
                    raise Conflict(
                        f"delivery {delivery_id}'s subscription is {state}: nothing to send to"
                    )
            delivery.status = DeliveryStatus.PENDING
            delivery.next_attempt_at = now
            delivery.updated_at = now
            session.add(
                new_task_row(
                    DELIVER,
                    {"delivery_id": delivery.id, "replay": True},
                    None,
                    now,
                )
            )
            wakeup.request_wake(session)  # due now
        return delivery


class UnresolvableTarget(InvalidRequest):
    """A target refused because its host does not resolve now: it may, later."""


def require_safe_target(policy: URLPolicy, url: str, field: str, tenant_id: str) -> None:
    """Refuse a target of the tenant's that could reach private addresses (checked now, and
    again at send)."""
    try:
        with lookups_for(tenant_id):  # its hung lookups count as the tenant's
            policy.check(url)
    except UnsafeURL as exc:
        # A name the DNS says does not exist is refused like any unsafe URL; only a lookup
        # that failed for now (no answer in time, a resolver down) may pass.
        passing = isinstance(exc, Unresolvable) and not isinstance(exc, NoSuchHost)
        refusal = UnresolvableTarget if passing else InvalidRequest
        raise refusal(
            f"{field}: {exc.reason}", errors=[{"field": field, "message": exc.reason}]
        ) from None


def _without_gone_links(session: Session, events: list[Event]) -> list[Event]:
    """The events as shown: an event keeps the generation as it was, `result.url` included,
    but a result deleted since (DELETE, retention) has no link left, so that no answer links
    to an object already gone. Such events are shown as copies without it (not stored)."""
    linked = {e.generation_id for e in events if _links(e)}
    if not linked:
        return events
    gone = set(
        session.scalars(
            sa.select(Generation.id).where(
                Generation.id.in_(linked), Generation.result_expired_at.is_not(None)
            )
        )
    )
    # Only the events that link: the generation's others (queued, processing: no result)
    # are shown as they are.
    return [_unlinked(e) if e.generation_id in gone and _links(e) else e for e in events]


def _links(event: Event) -> bool:
    """Whether the event's generation, as it was, carries a link to its result."""
    result = (event.data or {}).get("result")
    return isinstance(result, dict) and "url" in result


def _unlinked(event: Event) -> Event:
    result = {k: v for k, v in event.data["result"].items() if k != "url"}
    return Event(
        id=event.id,
        tenant_id=event.tenant_id,
        generation_id=event.generation_id,
        type=event.type,
        data={**event.data, "result": result},
        created_at=event.created_at,
    )


def _owned(
    session: Session, model: Any, tenant_id: str, item_id: str, what: str, *, lock: bool = False
) -> Any:
    """The row if it belongs to the tenant; NotFound for unknown ids and other tenants' ids.
    `lock`: locked until the transaction ends (FOR UPDATE; SQLite's writes take turns)."""
    row = session.get(model, item_id, with_for_update=lock)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no {what} {item_id!r}")
    return row
