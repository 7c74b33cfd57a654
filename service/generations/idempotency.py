"""Idempotency keys: one protocol for every intake (a generation, a batch).

The service owns it end to end; a handler only passes the `Idempotency-Key` header's value in
and renders the `Answer` that comes back:

1. `earlier_answer` (`earlier_use`) before anything is stored: an unexpired record of the
   key either replays the first response verbatim (`Answer.replayed`), or, when the first
   request has not answered yet (or died before it could), shows the resource as it is now
   and keeps nothing: the response to keep is the first request's own (step 3). A record made
   with another body (or for another kind of resource) is IdempotencyKeyReused.
2. `claim_key` first in the intake's transaction: an expired record of the key is dropped
   and the new one inserted. Two requests racing with one key meet on the primary key: the
   later one waits there until the first commits, then fails with IntegrityError and replays
   the winner (step 1 again). Waiting there, first, it holds no other lock: in particular not
   the upstream account's, which the line takes later in the same transaction (a batch and a
   generation sent with one key at once would otherwise each wait for the other). A
   generation's record points at it once its row is written (`key_made`).
3. `record_response` once the answer is known: the body the client gets, dumped once,
   kept for retries.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.database import Store
from service.errors import IdempotencyKeyReused
from service.models import IdempotencyKey, utcnow

# The table, for Core statements on the hot paths.
_KEYS = cast(sa.Table, IdempotencyKey.__table__)

IDEMPOTENCY_TTL = dt.timedelta(hours=24)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Answer(Generic[T]):
    """What an intake answers: the resource made (or shown again), or a stored first response.

    `body`: the response already rendered for the key (the handler sends exactly these
    fields); None without a key, when the handler renders `resource` itself. `replayed`: the
    body is the first response of an earlier request, sent again verbatim with `status`.
    """

    resource: T | None
    status: int = 202
    body: dict[str, Any] | None = None
    replayed: bool = False

    @classmethod
    def replay(cls, status: int, body: dict[str, Any]) -> Answer[T]:
        return cls(resource=None, status=status, body=body, replayed=True)


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


def claim_key(
    session: Session,
    tenant_id: str,
    key: str,
    fingerprint: str,
    *,
    now: dt.datetime,
    batch_id: str | None = None,
) -> None:
    """Record `key` as used for the resource `session`'s transaction makes: its first write,
    so that a concurrent use of the key waits here holding no other lock.

    An expired record of the key is dropped first (an expired key may be used again). A
    generation's record is claimed without its id, before the row exists (the record refers
    to it), and given it by `key_made`. A concurrent use of the key that committed first
    makes this fail with IntegrityError.
    """
    connection = session.connection()
    connection.execute(
        sa.delete(_KEYS).where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
            IdempotencyKey.expires_at <= now,
        )
    )
    connection.execute(
        sa.insert(_KEYS).values(
            tenant_id=tenant_id,
            key=key,
            request_hash=fingerprint,
            batch_id=batch_id,
            created_at=now,
            expires_at=now + IDEMPOTENCY_TTL,
        )
    )


def key_made(session: Session, tenant_id: str, key: str, generation_id: str) -> None:
    """Point `key`'s record, claimed in `session`'s transaction, at the generation it made."""
    session.connection().execute(
        sa.update(_KEYS)
        .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
        .values(generation_id=generation_id)
    )


def record_response(
    session: Session, tenant_id: str, key: str, status: int, body: dict[str, Any]
) -> None:
    """Keep the first response sent for `key`, inside the caller's transaction."""
    session.connection().execute(
        sa.update(_KEYS)
        .where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
            IdempotencyKey.response_body.is_(None),
        )
        .values(response_status=status, response_body=body)
    )


def earlier_answer(
    store: Store,
    tenant_id: str,
    key: str,
    fingerprint: str,
    *,
    made: str,
    show: Callable[[str], Answer[T]],
) -> Answer[T] | None:
    """The answer to a retry of `key`, or None when the key is unused: the first response
    verbatim, or (when the first request has not answered yet, or died before it could)
    `show(resource_id)`, the resource as it is now, which must not be kept for the key."""
    with store.read() as session:
        record = earlier_use(session, tenant_id, key, fingerprint, made=made)
        if record is None:
            return None
        if record.response_body is not None and record.response_status is not None:
            return Answer.replay(record.response_status, record.response_body)
        resource_id = record.batch_id if made == "batch" else record.generation_id
    assert resource_id is not None
    return show(resource_id)
