"""The `deliver` task: send one delivery, record the attempt, decide what comes next.

Outcomes, classified once here:
- 2xx: succeeded.
- 410: failed for good, and the subscription is disabled.
- 429, 5xx, 3xx (redirects are not followed), timeouts (SEND_TIMEOUT bounds the whole
  attempt), connection errors, a host name that does not resolve (that may pass): retried on
  GENRELAY_WEBHOOK_RETRY_SCHEDULE with jitter (the `deliver` kind's retry policy, the one
  schedule of a delivery: the task runs at the delivery's `next_attempt_at`); past the
  schedule the delivery is `dead`. An attempt that fails inside genrelay (a bug, the database
  away) takes its turn on the same schedule.
- other 4xx, or a target address that is not allowed: failed for good.
A subscription whose deliveries have all failed for 5 days is disabled too.

A replay (POST /v1/deliveries/{id}/retry) is one attempt more, outside the schedule: when it
fails the way a scheduled attempt would be retried, the delivery is dead unless attempts of
its schedule are still to come; then it stays pending and they come as they would have. A
batch attempts each delivery once: a replay due with its delivery's scheduled attempt is sent
alone, and the scheduled attempt comes ORDER_WAIT later (when the delivery still needs it).

A subscription's deliveries go to its url as it is at each attempt (a PATCH of it redirects
the retries and replays still to come); the delivery's `url` is where it was last sent.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import requests
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.database import Store
from service.domain import DeliveryStatus
from service.ids import new_id
from service.metrics import DELIVERY_OUTCOMES
from service.models import Delivery, DeliveryAttempt, Event, Subscription, Task, Tenant, utcnow
from service.notifications.signing import sign, still_signing
from service.notifications.ssrf import Deadline, Unresolvable, UnsafeURL, lookups_for
from service.runtime.kinds import DELIVER
from service.runtime.outcomes import DONE, Apply, Done, Failed, Later, Outcome, Told, after_commit
from service.runtime.queue import ClaimedTask, TaskStatus

log = logging.getLogger("genrelay.delivery")

# Seconds one attempt may take in all: connecting, TLS, the answer's status line and headers,
# the excerpt of its body (a Deadline cuts the connection then); also each read's timeout.
SEND_TIMEOUT = 15.0
EXCERPT_BYTES = 1024
# What a database cannot store in text: NUL (PostgreSQL refuses it) and lone surrogates.
_NOT_STORABLE = re.compile("[\x00\ud800-\udfff]")
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


# Per generation and target, events go out in lifecycle order: the earliest next attempt of
# an earlier delivery still pending to the same target (its creation time when it is due now),
# or NULL when there is none. A target is a subscription (sent to its url of the moment,
# whatever url its deliveries were last sent to), or a per-request webhook's url. The same
# subscription (or both none) is compared through
# coalesce (ids are never empty) so that no index on subscription_id can drive the lookup:
# without statistics (a fresh or freshly filled database) PostgreSQL and SQLite otherwise
# scan every earlier delivery of the subscription, thousands in a backlog, for each delivery,
# where the generation's events lead to a handful.
_EARLIER = sa.orm.aliased(Delivery, name="earlier")
_MINE = sa.orm.aliased(Event, name="mine")
_THEIRS = sa.orm.aliased(Event, name="theirs")
_BLOCKED_UNTIL = (
    sa.select(sa.func.min(sa.func.coalesce(_EARLIER.next_attempt_at, _EARLIER.created_at)))
    .select_from(_EARLIER)
    .join(_THEIRS, _THEIRS.id == _EARLIER.event_id)
    .join(_MINE, _MINE.generation_id == _THEIRS.generation_id)
    .where(
        _MINE.id == Delivery.event_id,
        sa.func.coalesce(_EARLIER.subscription_id, "")
        == sa.func.coalesce(Delivery.subscription_id, ""),
        sa.or_(Delivery.subscription_id.is_not(None), _EARLIER.url == Delivery.url),
        _EARLIER.status == DeliveryStatus.PENDING.value,
        _EARLIER.created_at < Delivery.created_at,
    )
    .correlate(Delivery)
    .scalar_subquery()
)
# Everything an attempt needs, in one statement for a batch of deliveries: the delivery, where
# it goes, what signs it, what is ahead of it.
_READ = (
    sa.select(
        Delivery.id,
        Delivery.status,
        Delivery.url,
        Delivery.format,
        Delivery.webhook_id,
        Delivery.body,
        Delivery.subscription_id,
        Delivery.tenant_id,
        Subscription.url.label("subscription_url"),
        Subscription.enabled,
        Subscription.secret,
        Subscription.previous_secret,
        Subscription.previous_secret_expires_at,
        Subscription.earlier_secrets,
        Tenant.webhook_secret,
        _BLOCKED_UNTIL.label("blocked_until"),
    )
    .select_from(Delivery)
    .outerjoin(Subscription, Subscription.id == Delivery.subscription_id)
    .outerjoin(Tenant, sa.and_(Tenant.id == Delivery.tenant_id, Delivery.subscription_id.is_(None)))
    .where(Delivery.id.in_(sa.bindparam("delivery_ids", expanding=True)))
)


class DeliverHandler:
    """Sends deliveries through a session that only connects to checked public addresses."""

    def __init__(self, store: Store, http: requests.Session) -> None:
        self.store = store
        self.http = http

    def run(self, task: ClaimedTask) -> Outcome:
        return self.run_batch([task])[0]

    def run_batch(
        self, tasks: list[ClaimedTask], *, stopping: threading.Event | None = None
    ) -> list[Outcome]:
        """Read every delivery of the batch at once, then attempt each in turn, once.

        Once `stopping` is set, the deliveries not yet begun are handed back, due at once and
        not counted: a batch of slow targets takes minutes, the platform kills a stopping
        worker after seconds, and what was sent before the kill was never recorded (all of it
        went again, to every target, after the lease).

        Two tasks of one delivery may be due together: a replay and the delivery's scheduled
        attempt, or two replays. The delivery is then attempted once, by a replay if one is
        there (sent now, as asked); its scheduled task comes back ORDER_WAIT later, not
        counted as an attempt, and finds the delivery done or still pending; another replay
        ends unsent (the one sent serves it).
        """
        ids = [task.payload["delivery_id"] for task in tasks]
        try:
            with self.store.read_one() as connection:
                rows = {row.id: row for row in connection.execute(_READ, {"delivery_ids": ids})}
        except Exception as exc:
            log.exception("reading %d deliveries failed", len(ids))
            return [_failed_inside(delivery_id, exc) for delivery_id in ids]
        attempting: dict[str, ClaimedTask] = {}  # delivery id -> the task that attempts it
        for task, delivery_id in zip(tasks, ids, strict=True):
            held = attempting.get(delivery_id)
            if held is None or (_is_replay(task) and not _is_replay(held)):
                attempting[delivery_id] = task
        outcomes: list[Outcome] = []
        for task, delivery_id in zip(tasks, ids, strict=True):
            chosen = attempting[delivery_id]
            if task is not chosen:
                if _is_replay(task):
                    outcomes.append(DONE)  # another replay of it is sent in this batch
                else:
                    outcomes.append(Later(ORDER_WAIT, "a replay of this delivery is being sent"))
                continue
            if stopping is not None and stopping.is_set():  # no POST begun from here on
                outcomes.append(Later(0.0, "not sent: the worker was stopping"))
                continue
            replay = None
            if _is_replay(task):
                others = [t for t, i in zip(tasks, ids, strict=True) if i == delivery_id]
                replay = _Replay(
                    task.id,
                    ending=tuple(t.id for t in others if t is not task and _is_replay(t)),
                    deferred=any(not _is_replay(t) for t in others),
                )
            try:
                outcomes.append(self._attempt(delivery_id, rows.get(delivery_id), replay=replay))
            except Exception as exc:
                log.exception("delivery %s: the attempt failed inside genrelay", delivery_id)
                outcomes.append(_failed_inside(delivery_id, exc))
        return outcomes

    def _attempt(self, delivery_id: str, row: Any, *, replay: _Replay | None) -> Outcome:
        """One attempt; `replay`: the replay task making it, if one is."""
        if row is None or (row.status != DeliveryStatus.PENDING and not replay):
            return DONE
        if row.blocked_until is not None:
            wait = max(ORDER_WAIT, (row.blocked_until - utcnow()).total_seconds())
            return Later(wait, "an earlier event for this target is still pending")
        secrets = _secrets(row)
        if secrets is None:
            return Done(
                _Recording(delivery_id, None, DeliveryStatus.FAILED, "subscription disabled")
            )
        content_type = (
            "application/cloudevents+json" if row.format == "cloudevents" else "application/json"
        )
        # A subscription's url as it is now (checked at send time like any target); a
        # per-request webhook's own.
        url = row.url if row.subscription_id is None else row.subscription_url
        signed = sign(row.webhook_id, utcnow(), row.body.encode(), secrets, content_type)
        with lookups_for(row.tenant_id):  # its hung lookups count as its tenant's
            attempt = self._send(url, signed.headers, signed.body)
        if url != row.url:  # the subscription's url changed since: recorded on the delivery
            attempt = dataclasses.replace(attempt, url=url)
        verdict = Verdict.FINAL if attempt.refused else classify(attempt.status_code)
        if verdict is Verdict.SUCCESS:
            return Done(_Recording(delivery_id, attempt, DeliveryStatus.SUCCEEDED, None))
        reason = attempt.error or f"HTTP {attempt.status_code}"
        if verdict is Verdict.RETRY:
            if not replay:
                return _retrying(delivery_id, attempt, reason)
            # Dead, unless its schedule still has attempts to come (decided when recorded).
            return Done(
                _Recording(delivery_id, attempt, DeliveryStatus.DEAD, reason, replay=replay)
            )
        gone = verdict is Verdict.GONE
        return Done(_Recording(delivery_id, attempt, DeliveryStatus.FAILED, reason, gone=gone))

    def on_exhausted(self, task: ClaimedTask, error: str) -> Apply:
        """Its schedule is spent: a delivery still pending is dead (one whose last attempt was
        recorded by the same outcome already is)."""
        return _Recording(
            task.payload["delivery_id"], None, DeliveryStatus.DEAD, error, only_pending=True
        )

    def apply_together(self, session: Session, changes: list[Apply]) -> None:
        """The records of a batch's attempts (or of one task's), written by `_record`."""
        recordings = [r for r in map(_as_recording, changes) if r is not None]
        if len(recordings) < len(changes):  # not all of them ours: each in turn, as given
            for change in changes:
                change(session)
            return
        _record(session, recordings)

    def _send(self, url: str, headers: dict[str, str], body: bytes) -> Attempt:
        """POST `body`; the attempt takes SEND_TIMEOUT seconds at most in all (but for
        resolving the host), however slowly the target answers."""
        started = time.monotonic()
        with Deadline(SEND_TIMEOUT) as deadline:
            try:
                response = self.http.post(
                    url,
                    data=body,
                    headers=headers,
                    timeout=SEND_TIMEOUT,
                    allow_redirects=False,
                    stream=True,
                )
            except Unresolvable as exc:  # may pass (a resolver restarting): an attempt failed
                return Attempt(None, None, exc.reason, _ms(started))
            except UnsafeURL as exc:
                return Attempt(None, None, f"not allowed: {exc.reason}", _ms(started), refused=True)
            except requests.RequestException as exc:
                if deadline.expired:
                    return _timed_out(started)
                return Attempt(None, None, type(exc).__name__, _ms(started))
            except Exception:
                if deadline.expired:  # a cut TLS socket may fail otherwise
                    return _timed_out(started)
                raise
            with response:
                if deadline.expired:  # cut before the headers ended: what came is no answer
                    return _timed_out(started)
                try:
                    raw = response.raw.read(EXCERPT_BYTES, decode_content=True)
                except Exception:  # a receiver cutting the body short must not lose the status
                    raw = b""
                excerpt = storable_text(raw.decode("utf-8", errors="replace"))
                return Attempt(response.status_code, excerpt, None, _ms(started))


def storable_text(text: str) -> str:
    """`text` as every database stores it: NUL and lone surrogates replaced by U+FFFD."""
    return _NOT_STORABLE.sub("\ufffd", text)


def _timed_out(started: float) -> Attempt:
    return Attempt(None, None, f"Timeout (no answer within {SEND_TIMEOUT:g} s)", _ms(started))


def _is_replay(task: ClaimedTask) -> bool:
    return bool(task.payload.get("replay"))


def _secrets(row: Any) -> list[str] | None:
    """Every secret that signs the delivery now; None when its subscription is off."""
    if row.subscription_id is None:
        # The tenant's, made at fan-out time (record_event), so a plain read finds it.
        return [row.webhook_secret] if row.webhook_secret else None
    if not row.enabled:  # disabled, or deleted (no row)
        return None
    now = utcnow()
    secrets = [row.secret]
    expires = row.previous_secret_expires_at
    if row.previous_secret and expires and expires > now:
        secrets.append(row.previous_secret)
    return secrets + [e["secret"] for e in still_signing(row.earlier_secrets, now)]


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What one POST to the target gave."""

    status_code: int | None
    excerpt: str | None
    error: str | None
    duration_ms: int
    refused: bool = False  # the target address is not allowed: final
    # Where it was sent when that is not the url the delivery's row shows (its subscription's
    # url changed since): written on the row with the attempt.
    url: str | None = None


@dataclasses.dataclass(frozen=True)
class _Replay:
    """A replay task attempting its delivery: `ending`, the other replays of the delivery that
    end unsent in the same batch; `deferred`, whether its scheduled task was put off for it
    (it comes ORDER_WAIT later)."""

    task_id: str
    ending: tuple[str, ...] = ()
    deferred: bool = False


def _failed_inside(delivery_id: str, exc: Exception) -> Failed:
    """A bug, or the database away: the attempt takes its turn on the schedule like a failed
    POST, and the delivery shows when the next one comes."""
    return _retrying(delivery_id, None, f"error inside genrelay ({type(exc).__name__})")


def _retrying(delivery_id: str, attempt: Attempt | None, reason: str) -> Failed:
    """A failed attempt: the next is the delivery schedule's (the `deliver` kind's retry
    policy), which the runner applies and tells the record (None: the schedule is spent)."""
    return Failed(f"delivery {delivery_id}: {reason}", _Retrying(delivery_id, attempt, reason))


@dataclasses.dataclass(frozen=True)
class _Recording:
    """The change recording an attempt (if any) and what it made of the delivery; applied
    alone or with others of a batch, by `_record` either way.

    `only_pending`: only while the delivery is still pending.
    `replay`: a failed replay's, made by that task; `status` (dead) and `next_attempt_at` are
    then decided when written, after every other record of the delivery in the transaction:
    pending until the next attempt of the delivery's schedule, if one is still to come
    (`_after_replay`).
    """

    delivery_id: str
    attempt: Attempt | None
    status: DeliveryStatus
    reason: str | None
    next_attempt_at: dt.datetime | None = None
    gone: bool = False
    only_pending: bool = False
    replay: _Replay | None = None

    def __call__(self, session: Session) -> None:
        _record(session, [self])

    @property
    def outcome(self) -> str:
        """Its label in DELIVERY_OUTCOMES."""
        return "retry" if self.next_attempt_at is not None else self.status.value

    @property
    def values(self) -> tuple[Any, ...]:
        """What its UPDATE sets and checks: deliveries given the same share one statement."""
        code = self.attempt.status_code if self.attempt else None
        shape = (self.attempt is not None, self.only_pending)
        return (*shape, self.status, self.reason, self.next_attempt_at, code)


@dataclasses.dataclass(frozen=True)
class _Retrying:
    """A failed attempt's record, to be told when the delivery is tried next (None: never)."""

    delivery_id: str
    attempt: Attempt | None
    reason: str

    def told(self, next_at: dt.datetime | None) -> _Recording:
        status = DeliveryStatus.PENDING if next_at else DeliveryStatus.DEAD
        return _Recording(
            self.delivery_id,
            self.attempt,
            status,
            self.reason,
            next_attempt_at=next_at,
            only_pending=True,
        )

    def __call__(self, session: Session, next_at: dt.datetime | None) -> None:
        _record(session, [self.told(next_at)])


def _as_recording(change: Apply) -> _Recording | None:
    """`change` as a delivery's record (a failed attempt's once told its next run); None for
    a change of another kind."""
    if isinstance(change, _Recording):
        return change
    if isinstance(change, Told) and isinstance(change.record, _Retrying):
        return change.record.told(change.next_at)
    return None


def _record_statement(*, with_attempt: bool, only_pending: bool) -> sa.Update:
    """The UPDATE recording the same values on some deliveries (built once per shape; values
    bound); it returns the deliveries it changed."""
    table: sa.Table = Delivery.__table__  # type: ignore[assignment]
    c = table.c
    values: dict[str, Any] = {
        name: sa.bindparam(f"new_{name}", type_=c[name].type)
        for name in ("status", "last_error", "next_attempt_at", "updated_at")
    }
    if with_attempt:
        values["attempts"] = c.attempts + 1
        values["last_status_code"] = sa.bindparam("new_last_status_code", type_=c.attempts.type)
    condition: list[sa.ColumnElement[bool]] = [
        c.id.in_(sa.bindparam("delivery_ids", expanding=True))
    ]
    if only_pending:
        condition.append(c.status == DeliveryStatus.PENDING.value)
    return sa.update(table).where(*condition).values(values).returning(c.id, c.subscription_id)


_RECORD = {
    (with_attempt, only_pending): _record_statement(
        with_attempt=with_attempt, only_pending=only_pending
    )
    for with_attempt in (True, False)
    for only_pending in (True, False)
}
_INSERT_ATTEMPT = sa.insert(DeliveryAttempt)
_DELIVERIES: sa.Table = Delivery.__table__  # type: ignore[assignment]
# A delivery sent elsewhere than its row said: the url it went to.
_MOVE = (
    sa.update(_DELIVERIES)
    .where(_DELIVERIES.c.id == sa.bindparam("delivery_id"))
    .values(url=sa.bindparam("new_url", type_=_DELIVERIES.c.url.type))
)
# When the delivery's next attempt comes, by a task other than the given ones (a replay's, and
# those ending beside it): NULL when none is still to run. Through ix_tasks_due: the pending
# and running tasks only.
_NEXT_ATTEMPT = sa.select(sa.func.min(Task.run_at)).where(
    Task.status.in_([TaskStatus.PENDING.value, TaskStatus.RUNNING.value]),
    Task.kind == DELIVER,
    Task.id.not_in(sa.bindparam("task_ids", expanding=True)),
    Task.payload["delivery_id"].as_string() == sa.bindparam("delivery_id"),
)


_LOCK_DELIVERY = (
    sa.select(Delivery.status, Delivery.next_attempt_at)
    .where(Delivery.id == sa.bindparam("delivery_id"))
    .with_for_update()
)


def _after_replay(session: Session, recording: _Recording, *, recorded: bool) -> _Recording:
    """A failed replay's record as written now: pending while the delivery's schedule (or
    another replay) still has an attempt to come, dead otherwise.

    `recorded`: another attempt's record changed the delivery earlier in this transaction
    (its scheduled task's, given up or run in the same batch): what it made of the delivery
    stands, and the replay only adds its attempt.
    """
    replay = recording.replay
    if replay is None:
        return recording
    connection = session.connection()
    # Locked first: a scheduled attempt recording its outcome meanwhile has committed (and
    # is seen below) or waits for this transaction.
    current = connection.execute(_LOCK_DELIVERY, {"delivery_id": recording.delivery_id}).first()
    if current is None:  # deleted: the record changes nothing
        return dataclasses.replace(recording, replay=None)
    if recorded or current.status == DeliveryStatus.SUCCEEDED:
        # Decided by that attempt (one that got through meanwhile: it stays delivered).
        status, next_at = DeliveryStatus(current.status), current.next_attempt_at
    else:
        next_at = connection.scalar(
            _NEXT_ATTEMPT,
            {
                "task_ids": [replay.task_id, *replay.ending],
                "delivery_id": recording.delivery_id,
            },
        )
        if next_at is not None and replay.deferred:
            # Its scheduled task was put off for it: it runs ORDER_WAIT from now.
            next_at = max(next_at, utcnow() + dt.timedelta(seconds=ORDER_WAIT))
        status = DeliveryStatus.PENDING if next_at is not None else DeliveryStatus.DEAD
    return dataclasses.replace(recording, status=status, next_attempt_at=next_at, replay=None)


def _record(session: Session, recordings: Sequence[_Recording]) -> None:
    """Write `recordings` in the caller's transaction, in few Core statements (`_record_round`).

    A delivery may have several (a failed last attempt's, then on_exhausted's dead record; a
    replay's beside its scheduled task's): they are written in order, each seeing what the
    one before wrote, one round per record. A replay's comes after the others of its delivery
    and is decided only then (`_after_replay`), so that it never sets back what they recorded.
    The subscriptions' failing streaks follow, in the order the attempts were made.
    """
    rounds: list[list[tuple[int, _Recording]]] = []
    seen: dict[str, int] = {}
    replays_last = sorted(enumerate(recordings), key=lambda item: item[1].replay is not None)
    for position, recording in replays_last:
        index = seen.get(recording.delivery_id, 0)
        seen[recording.delivery_id] = index + 1
        if index == len(rounds):
            rounds.append([])
        rounds[index].append((position, recording))
    written: set[str] = set()
    tracked: list[tuple[int, _Recording, str]] = []
    for distinct in rounds:
        decided = [
            (position, _after_replay(session, r, recorded=r.delivery_id in written))
            for position, r in distinct
        ]
        changed = _record_round(session, [recording for _, recording in decided])
        written.update(changed)
        tracked += [
            (position, recording, subscription_id)
            for position, recording in decided
            if (subscription_id := changed.get(recording.delivery_id)) is not None
        ]
    tracked.sort(key=lambda item: item[0])
    _track_streaks(session, [(r, subscription_id) for _, r, subscription_id in tracked])


def _record_round(session: Session, recordings: list[_Recording]) -> dict[str, str | None]:
    """Records of distinct deliveries: one guarded UPDATE per set of deliveries given the same
    values (a batch of successes: one), one INSERT for the attempt rows of the deliveries it
    changed (and the url of those sent elsewhere than their rows said). Each outcome recorded
    is counted in DELIVERY_OUTCOMES once committed. Returns the deliveries it changed, each
    with its subscription's id.
    """
    connection = session.connection()
    now = utcnow()
    groups: dict[tuple[Any, ...], list[_Recording]] = {}
    for recording in recordings:
        groups.setdefault(recording.values, []).append(recording)
    changed: dict[str, str | None] = {}  # delivery id -> its subscription's
    for group in groups.values():
        first = group[0]
        result = connection.execute(
            _RECORD[(first.attempt is not None, first.only_pending)],
            {
                "delivery_ids": [recording.delivery_id for recording in group],
                "new_status": first.status.value,
                "new_last_error": first.reason,
                "new_next_attempt_at": first.next_attempt_at,
                "new_updated_at": now,
                "new_last_status_code": first.attempt.status_code if first.attempt else None,
            },
        )
        changed.update((row.id, row.subscription_id) for row in result)
    recorded = [recording for recording in recordings if recording.delivery_id in changed]
    attempts = [
        {
            "id": new_id("att_"),
            "delivery_id": recording.delivery_id,
            "attempted_at": now,
            "status_code": recording.attempt.status_code,
            "duration_ms": recording.attempt.duration_ms,
            "response_excerpt": recording.attempt.excerpt,
            "error": recording.attempt.error,
        }
        for recording in recorded
        if recording.attempt is not None
    ]
    if attempts:
        connection.execute(_INSERT_ATTEMPT, attempts)
    moved = [
        {"delivery_id": recording.delivery_id, "new_url": recording.attempt.url}
        for recording in recorded
        if recording.attempt is not None and recording.attempt.url is not None
    ]
    if moved:
        connection.execute(_MOVE, moved)
    if recorded:
        after_commit(session, functools.partial(_count, [r.outcome for r in recorded]))
    return changed


def _count(outcomes: list[str]) -> None:
    for outcome in outcomes:
        DELIVERY_OUTCOMES.labels(outcome).inc()


# A success's: the subscriptions' failing streaks cleared, where they have one (no read, and
# nothing written where there is none).
_SUBSCRIPTIONS: sa.Table = Subscription.__table__  # type: ignore[assignment]
_CLEAR_STREAKS = (
    sa.update(_SUBSCRIPTIONS)
    .where(
        _SUBSCRIPTIONS.c.id.in_(sa.bindparam("subscription_ids", expanding=True)),
        _SUBSCRIPTIONS.c.failing_since.is_not(None),
    )
    .values(failing_since=None)
)


def _track_streaks(session: Session, recorded: list[tuple[_Recording, str]]) -> None:
    """The failing streaks of the subscriptions of `recorded` (records, in the order their
    attempts were made, each with its subscription's id): a success clears the streak; a
    failure starts one (anew after a success here); a 410, or failures since 5 days, disable.

    A subscription whose last record here is a success only has its streak cleared, by a
    guarded UPDATE (no read; nothing written when it has none), whatever was read before the
    batch.
    """
    now = utcnow()
    by_subscription: dict[str, list[_Recording]] = {}
    for recording, subscription_id in recorded:
        by_subscription.setdefault(subscription_id, []).append(recording)
    cleared: list[str] = []
    for subscription_id, records in by_subscription.items():
        succeeded = [i for i, r in enumerate(records) if r.status is DeliveryStatus.SUCCEEDED]
        failing = records[succeeded[-1] + 1 :] if succeeded else records
        gone = any(r.gone for r in records)
        if not failing and not gone:
            cleared.append(subscription_id)
            continue
        subscription = session.get(Subscription, subscription_id)
        if subscription is None or not subscription.enabled:
            continue
        if not failing:
            subscription.failing_since = None
        elif succeeded or subscription.failing_since is None:
            subscription.failing_since = now  # a streak from these failures on
        if gone:
            _disable(subscription, "the endpoint answered 410 Gone", now)
        elif subscription.failing_since and now - subscription.failing_since >= (
            DISABLE_AFTER_FAILING
        ):
            reason = failing[-1].reason
            _disable(subscription, f"every delivery failed for 5 days (last: {reason})", now)
    if cleared:
        session.connection().execute(_CLEAR_STREAKS, {"subscription_ids": cleared})


def _disable(subscription: Subscription, reason: str, now: dt.datetime) -> None:
    log.warning("disabling subscription %s: %s", subscription.id, reason)
    subscription.enabled = False
    subscription.disabled_reason = reason
    subscription.updated_at = now


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
