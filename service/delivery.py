"""The `deliver` task: send one delivery, record the attempt, decide what comes next (DESIGN §4).

Outcomes, classified once here:
- 2xx: succeeded.
- 410: failed for good, and the subscription is disabled.
- 429, 5xx, 3xx (redirects are not followed), timeouts, connection errors: retried on
  GENRELAY_WEBHOOK_RETRY_SCHEDULE with jitter; past the schedule the delivery is `dead`.
- other 4xx, or a target address that is not allowed: failed for good.
A subscription whose deliveries have all failed for 5 days is disabled too.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import random
import time
import uuid

import requests
import sqlalchemy as sa

from service.config import Config
from service.models import Delivery, DeliveryAttempt, Event, Subscription, utcnow
from service.notifications import tenant_webhook_secret
from service.signing import sign
from service.ssrf import UnsafeURL
from service.store import Store
from service.tasks import ClaimedTask
from service.worker import Snooze

log = logging.getLogger("genrelay.delivery")

SEND_TIMEOUT = 15.0
EXCERPT_BYTES = 1024
DISABLE_AFTER_FAILING = dt.timedelta(days=5)
# A later event for the same target waits this long while an earlier one is still pending.
ORDER_WAIT = 1.0


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # final: the target refused it (4xx, not allowed)
    DEAD = "dead"  # final: the retry schedule ran out


class Outcome(enum.Enum):
    SUCCESS = "success"
    RETRY = "retry"
    FINAL = "final"
    GONE = "gone"  # 410: final, and the subscription is disabled


def classify(status_code: int | None) -> Outcome:
    """What an HTTP answer (None: no answer at all) means for the delivery."""
    if status_code is None:
        return Outcome.RETRY
    if 200 <= status_code < 300:
        return Outcome.SUCCESS
    if status_code == 410:
        return Outcome.GONE
    if status_code == 429 or status_code >= 500 or 300 <= status_code < 400:
        return Outcome.RETRY
    return Outcome.FINAL


class DeliverHandler:
    """Sends deliveries through a session that only connects to checked public addresses."""

    def __init__(
        self,
        store: Store,
        config: Config,
        http: requests.Session,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.schedule = config.webhook_retry_schedule
        self.http = http
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not security

    def run(self, task: ClaimedTask) -> None:
        delivery_id = task.payload["delivery_id"]
        replay = bool(task.payload.get("replay"))
        with self.store.transaction() as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery is None or (delivery.status != DeliveryStatus.PENDING and not replay):
                return
            if self._earlier_pending(session, delivery):
                raise Snooze(ORDER_WAIT, "an earlier event for this target is still pending")
            secrets = self._secrets(session, delivery)
            if secrets is None:
                self._finish(delivery_id, DeliveryStatus.FAILED, None, "subscription disabled")
                return
            url, body, webhook_id = delivery.url, delivery.body.encode(), delivery.webhook_id
            content_type = (
                "application/cloudevents+json"
                if delivery.format == "cloudevents"
                else "application/json"
            )
            attempts_before = delivery.attempts
        signed = sign(webhook_id, utcnow(), body, secrets, content_type)
        status_code, excerpt, error, duration_ms = self._send(url, signed.headers, signed.body)
        outcome = (
            Outcome.FINAL if error and error.startswith("not allowed") else classify(status_code)
        )
        self._record_attempt(delivery_id, status_code, excerpt, error, duration_ms)
        attempts = attempts_before + 1
        if outcome is Outcome.SUCCESS:
            self._finish(delivery_id, DeliveryStatus.SUCCEEDED, status_code, None)
            return
        reason = error or f"HTTP {status_code}"
        if outcome is Outcome.RETRY and not replay and attempts < len(self.schedule):
            delay = self.schedule[attempts] * (0.8 + 0.4 * self.rng.random())
            self._schedule_retry(delivery_id, status_code, reason, delay)
            raise Snooze(delay, f"delivery {delivery_id}: {reason}")
        final = DeliveryStatus.DEAD if outcome is Outcome.RETRY else DeliveryStatus.FAILED
        self._finish(delivery_id, final, status_code, reason, gone=outcome is Outcome.GONE)

    def on_exhausted(self, task: ClaimedTask, error: str) -> None:
        self._finish(task.payload["delivery_id"], DeliveryStatus.DEAD, None, error)

    def _earlier_pending(self, session: sa.orm.Session, delivery: Delivery) -> bool:
        """Per generation and target, events go out in lifecycle order."""
        if delivery.event_id is None:
            return False
        event = session.get(Event, delivery.event_id)
        if event is None:
            return False
        earlier = session.scalar(
            sa.select(sa.func.count())
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
        )
        return bool(earlier)

    def _secrets(self, session: sa.orm.Session, delivery: Delivery) -> list[str] | None:
        """Every secret that signs this delivery now; None when its subscription is off."""
        if delivery.subscription_id is None:
            return [tenant_webhook_secret(session, delivery.tenant_id)]
        subscription = session.get(Subscription, delivery.subscription_id)
        if subscription is None or not subscription.enabled:
            return None
        secrets = [subscription.secret]
        expires = subscription.previous_secret_expires_at
        if subscription.previous_secret and expires and expires > utcnow():
            secrets.append(subscription.previous_secret)
        return secrets

    def _send(
        self, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int | None, str | None, str | None, int]:
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
            return None, None, f"not allowed: {exc.reason}", _ms(started)
        except requests.RequestException as exc:
            return None, None, f"{type(exc).__name__}", _ms(started)
        with response:
            try:
                raw = response.raw.read(EXCERPT_BYTES, decode_content=True)
            except Exception:  # a receiver cutting the body short must not lose the status
                raw = b""
            excerpt = raw.decode("utf-8", errors="replace")
            return response.status_code, excerpt, None, _ms(started)

    def _record_attempt(
        self,
        delivery_id: str,
        status_code: int | None,
        excerpt: str | None,
        error: str | None,
        duration_ms: int,
    ) -> None:
        with self.store.transaction() as session:
            session.add(
                DeliveryAttempt(
                    id="att_" + uuid.uuid4().hex,
                    delivery_id=delivery_id,
                    attempted_at=utcnow(),
                    status_code=status_code,
                    duration_ms=duration_ms,
                    response_excerpt=excerpt,
                    error=error,
                )
            )
            session.execute(
                sa.update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(
                    attempts=Delivery.attempts + 1,
                    last_status_code=status_code,
                    last_error=error,
                    updated_at=utcnow(),
                )
            )

    def _schedule_retry(
        self, delivery_id: str, status_code: int | None, reason: str, delay: float
    ) -> None:
        with self.store.transaction() as session:
            delivery = session.get(Delivery, delivery_id)
            assert delivery is not None
            delivery.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
            self._note_failure(session, delivery, reason)

    def _finish(
        self,
        delivery_id: str,
        status: DeliveryStatus,
        status_code: int | None,
        reason: str | None,
        *,
        gone: bool = False,
    ) -> None:
        with self.store.transaction() as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery is None:
                return
            delivery.status = status
            delivery.next_attempt_at = None
            delivery.updated_at = utcnow()
            if status is DeliveryStatus.SUCCEEDED:
                delivery.last_error = None
                self._note_success(session, delivery)
            else:
                delivery.last_error = reason
                self._note_failure(session, delivery, reason or status.value, gone=gone)

    def _note_success(self, session: sa.orm.Session, delivery: Delivery) -> None:
        if delivery.subscription_id is not None:
            subscription = session.get(Subscription, delivery.subscription_id)
            if subscription is not None:
                subscription.failing_since = None

    def _note_failure(
        self, session: sa.orm.Session, delivery: Delivery, reason: str, *, gone: bool = False
    ) -> None:
        if delivery.subscription_id is None:
            return
        subscription = session.get(Subscription, delivery.subscription_id)
        if subscription is None or not subscription.enabled:
            return
        now = utcnow()
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
