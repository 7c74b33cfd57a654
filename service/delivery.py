"""The `deliver` task: send one delivery, record the attempt, decide what comes next.

Outcomes, classified once here:
- 2xx: succeeded.
- 410: failed for good, and the subscription is disabled.
- 429, 5xx, 3xx (redirects are not followed), timeouts, connection errors: retried on
  GENRELAY_WEBHOOK_RETRY_SCHEDULE with jitter (the `deliver` kind's retry policy, the one
  schedule of a delivery: the task runs at the delivery's `next_attempt_at`); past the
  schedule the delivery is `dead`. An attempt that fails inside genrelay (a bug, the database
  away) takes its turn on the same schedule.
- other 4xx, or a target address that is not allowed: failed for good.
A subscription whose deliveries have all failed for 5 days is disabled too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import time

import requests
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.domain import DeliveryStatus
from service.ids import new_id
from service.metrics import DELIVERY_OUTCOMES
from service.models import Delivery, DeliveryAttempt, Event, Subscription, Tenant, utcnow
from service.runtime.outcomes import DONE, Apply, Done, Failed, Later, Outcome
from service.runtime.queue import ClaimedTask
from service.signing import sign
from service.ssrf import UnsafeURL
from service.store import Store

log = logging.getLogger("genrelay.delivery")

SEND_TIMEOUT = 15.0
EXCERPT_BYTES = 1024
DISABLE_AFTER_FAILING = dt.timedelta(days=5)
# A later event for the same target waits this long while an earlier one is still pending.
ORDER_WAIT = 1.0


class Verdict(enum.Enum):
    SUCCESS = "success"
    RETRY = "retry"
    FINAL = "final"
    GONE = "gone"  # 410: final, and the subscription is disabled


def classify(status_code: int | None) -> Verdict:
    """What an HTTP answer (None: no answer at all) means for the delivery."""
    if status_code is None:
        return Verdict.RETRY
    if 200 <= status_code < 300:
        return Verdict.SUCCESS
    if status_code == 410:
        return Verdict.GONE
    if status_code == 429 or status_code >= 500 or 300 <= status_code < 400:
        return Verdict.RETRY
    return Verdict.FINAL


class DeliverHandler:
    """Sends deliveries through a session that only connects to checked public addresses."""

    def __init__(
        self,
        store: Store,
        http: requests.Session,
    ) -> None:
        self.store = store
        self.http = http

    def run(self, task: ClaimedTask) -> Outcome:
        delivery_id = task.payload["delivery_id"]
        try:
            return self._attempt(delivery_id, replay=bool(task.payload.get("replay")))
        except Exception as exc:
            # A bug, or the database away: the attempt takes its turn on the schedule like a
            # failed POST, and the delivery shows when the next one comes.
            log.exception("delivery %s: the attempt failed inside genrelay", delivery_id)
            return _retrying(delivery_id, None, f"error inside genrelay ({type(exc).__name__})")

    def _attempt(self, delivery_id: str, *, replay: bool) -> Outcome:
        with self.store.read() as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery is None or (delivery.status != DeliveryStatus.PENDING and not replay):
                return DONE
            blocked_until = self._earlier_pending(session, delivery)
            secrets = self._secrets(session, delivery)
        if blocked_until is not None:
            wait = max(ORDER_WAIT, (blocked_until - utcnow()).total_seconds())
            return Later(wait, "an earlier event for this target is still pending")
        if secrets is None:
            return Done(
                _recording(delivery_id, None, DeliveryStatus.FAILED, "subscription disabled")
            )
        content_type = (
            "application/cloudevents+json"
            if delivery.format == "cloudevents"
            else "application/json"
        )
        signed = sign(delivery.webhook_id, utcnow(), delivery.body.encode(), secrets, content_type)
        attempt = self._send(delivery.url, signed.headers, signed.body)
        verdict = Verdict.FINAL if attempt.refused else classify(attempt.status_code)
        if verdict is Verdict.SUCCESS:
            return Done(_recording(delivery_id, attempt, DeliveryStatus.SUCCEEDED, None))
        reason = attempt.error or f"HTTP {attempt.status_code}"
        if verdict is Verdict.RETRY and not replay:
            return _retrying(delivery_id, attempt, reason)
        final = DeliveryStatus.DEAD if verdict is Verdict.RETRY else DeliveryStatus.FAILED
        gone = verdict is Verdict.GONE
        return Done(_recording(delivery_id, attempt, final, reason, gone=gone))

    def on_exhausted(self, task: ClaimedTask, error: str) -> Apply:
        """Its schedule is spent: a delivery still pending is dead (one whose last attempt was
        recorded by the same outcome already is)."""
        return _recording(
            task.payload["delivery_id"], None, DeliveryStatus.DEAD, error, only_pending=True
        )

    def _earlier_pending(self, session: Session, delivery: Delivery) -> dt.datetime | None:
        """Per generation and target, events go out in lifecycle order: when may this one go?

        None when nothing earlier is pending; else the earliest next attempt among those.
        """
        if delivery.event_id is None:
            return None
        event = session.get(Event, delivery.event_id)
        if event is None:
            return None
        earlier = session.execute(
            sa.select(sa.func.count(), sa.func.min(Delivery.next_attempt_at))
            .select_from(Delivery)
            .join(Event, Event.id == Delivery.event_id)
            .where(
                Event.generation_id == event.generation_id,
                Delivery.url == delivery.url,
                Delivery.subscription_id.is_(None)
                if delivery.subscription_id is None
                else Delivery.subscription_id == delivery.subscription_id,
                Delivery.status == DeliveryStatus.PENDING,
                Delivery.created_at < delivery.created_at,
            )
        ).one()
        count, next_attempt = earlier
        if not count:
            return None
        return next_attempt if next_attempt is not None else utcnow()

    def _secrets(self, session: Session, delivery: Delivery) -> list[str] | None:
        """Every secret that signs this delivery now; None when its subscription is off."""
        if delivery.subscription_id is None:
            tenant = session.get(Tenant, delivery.tenant_id)
            # Made at fan-out time (record_event), so a plain read finds it.
            return [tenant.webhook_secret] if tenant and tenant.webhook_secret else None
        subscription = session.get(Subscription, delivery.subscription_id)
        if subscription is None or not subscription.enabled:
            return None
        secrets = [subscription.secret]
        expires = subscription.previous_secret_expires_at
        if subscription.previous_secret and expires and expires > utcnow():
            secrets.append(subscription.previous_secret)
        return secrets

    def _send(self, url: str, headers: dict[str, str], body: bytes) -> Attempt:
        started = time.monotonic()
        try:
            response = self.http.post(
                url,
                data=body,
                headers=headers,
                timeout=SEND_TIMEOUT,
                allow_redirects=False,
                stream=True,
            )
        except UnsafeURL as exc:
            return Attempt(None, None, f"not allowed: {exc.reason}", _ms(started), refused=True)
        except requests.RequestException as exc:
            return Attempt(None, None, type(exc).__name__, _ms(started))
        with response:
            try:
                raw = response.raw.read(EXCERPT_BYTES, decode_content=True)
            except Exception:  # a receiver cutting the body short must not lose the status
                raw = b""
            excerpt = raw.decode("utf-8", errors="replace")
            return Attempt(response.status_code, excerpt, None, _ms(started))


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What one POST to the target gave."""

    status_code: int | None
    excerpt: str | None
    error: str | None
    duration_ms: int
    refused: bool = False  # the target address is not allowed: final


def _retrying(delivery_id: str, attempt: Attempt | None, reason: str) -> Failed:
    """A failed attempt: the next is the delivery schedule's (the `deliver` kind's retry
    policy), which the runner applies and tells the record (None: the schedule is spent)."""

    def record(session: Session, next_at: dt.datetime | None) -> None:
        status = DeliveryStatus.PENDING if next_at else DeliveryStatus.DEAD
        apply = _recording(
            delivery_id, attempt, status, reason, next_attempt_at=next_at, only_pending=True
        )
        apply(session)

    return Failed(f"delivery {delivery_id}: {reason}", record)


def _recording(
    delivery_id: str,
    attempt: Attempt | None,
    status: DeliveryStatus,
    reason: str | None,
    *,
    next_attempt_at: dt.datetime | None = None,
    gone: bool = False,
    only_pending: bool = False,
) -> Apply:
    """The change recording an attempt (if any) and what it made of the delivery."""

    def apply(session: Session) -> None:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or (only_pending and delivery.status != DeliveryStatus.PENDING):
            return
        DELIVERY_OUTCOMES.labels("retry" if next_attempt_at is not None else status.value).inc()
        now = utcnow()
        if attempt is not None:
            session.add(
                DeliveryAttempt(
                    id=new_id("att_"),
                    delivery_id=delivery_id,
                    attempted_at=now,
                    status_code=attempt.status_code,
                    duration_ms=attempt.duration_ms,
                    response_excerpt=attempt.excerpt,
                    error=attempt.error,
                )
            )
            delivery.attempts += 1
            delivery.last_status_code = attempt.status_code
        delivery.status = status
        delivery.last_error = reason
        delivery.next_attempt_at = next_attempt_at
        delivery.updated_at = now
        subscription = (
            session.get(Subscription, delivery.subscription_id)
            if delivery.subscription_id
            else None
        )
        if subscription is not None and subscription.enabled:
            _track_failures(subscription, status, reason, now, gone=gone)

    return apply


def _track_failures(
    subscription: Subscription,
    status: DeliveryStatus,
    reason: str | None,
    now: dt.datetime,
    *,
    gone: bool,
) -> None:
    """A success clears the failing streak; a 410 or 5 days of failures disable."""
    if status is DeliveryStatus.SUCCEEDED:
        subscription.failing_since = None
        return
    if subscription.failing_since is None:
        subscription.failing_since = now
    if gone:
        _disable(subscription, "the endpoint answered 410 Gone", now)
    elif now - subscription.failing_since >= DISABLE_AFTER_FAILING:
        _disable(subscription, f"every delivery failed for 5 days (last: {reason})", now)


def _disable(subscription: Subscription, reason: str, now: dt.datetime) -> None:
    log.warning("disabling subscription %s: %s", subscription.id, reason)
    subscription.enabled = False
    subscription.disabled_reason = reason
    subscription.updated_at = now


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
