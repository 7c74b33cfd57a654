"""Cursor pagination, newest first, over any table with `created_at` and a string `id`."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import re
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.errors import InvalidRequest

T = TypeVar("T")

_STORABLE = re.compile(r"[^\x00\ud800-\udfff]*")


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def paginate(
    session: Session, query: sa.Select[Any], model: Any, *, cursor: str | None, limit: int
) -> Page[Any]:
    """Run `query` newest first from `cursor`; `next_cursor` continues after the last item."""
    if cursor is not None:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(
            sa.or_(
                model.created_at < created_at,
                sa.and_(model.created_at == created_at, model.id < last_id),
            )
        )
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    items = rows[:limit]
    next_cursor = encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
    return Page(items=items, next_cursor=next_cursor)


def encode_cursor(created_at: dt.datetime, item_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), item_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    """The position a cursor stands for; InvalidRequest naming `cursor` if it is not ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, last_id = json.loads(raw)
        moment = dt.datetime.fromisoformat(created_at)
        if moment.tzinfo is None or not isinstance(last_id, str):
            raise ValueError("bad cursor")
        # As the database gets it: in UTC (a moment past year 1 or 9999 there overflows).
        moment = moment.astimezone(dt.UTC)
        # A NUL (PostgreSQL text refuses it) or a lone surrogate (not encodable) in the id
        # would fail in the driver, not here.
        if not _STORABLE.fullmatch(last_id):
            raise ValueError("bad cursor")
    except (ValueError, TypeError, OverflowError, binascii.Error):
        raise InvalidRequest(
            "the cursor is not one this API returned",
            errors=[{"field": "cursor", "message": "Invalid cursor."}],
        ) from None
    return moment, last_id
