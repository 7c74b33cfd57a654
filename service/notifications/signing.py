"""Build and sign outgoing notification requests (Standard Webhooks).

A notification is serialised once (`standard_body` or `cloudevents_body`), stored, and the very
same bytes are signed and sent on every attempt: `sign` never re-serialises, so what a
subscriber verifies is exactly what was stored. Signatures come from the `standardwebhooks`
library itself, so ours cannot drift from what its verifiers (and svix's) accept.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import math
import secrets as random_source
from collections.abc import Sequence
from typing import Any

import standardwebhooks
from cloudevents.core.bindings.http import to_structured_event
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.v1.event import CloudEvent

SECRET_PREFIX = "whsec_"  # noqa: S105 -- the format marker of every secret, not a secret
WEBHOOK_ID_PREFIX = "msg_"
STANDARD_CONTENT_TYPE = "application/json"
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"

_SECRET_BYTES = 32
# 20 random bytes are 27 URL-safe characters: unguessable and unique without coordination.
_WEBHOOK_ID_BYTES = 20


@dataclasses.dataclass(frozen=True)
class SignedRequest:
    """Headers and body of one notification request, ready to POST."""

    headers: dict[str, str]
    body: bytes


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(random_source.token_bytes(_SECRET_BYTES)).decode()


def still_signing(
    earlier: Sequence[dict[str, str]] | None, now: dt.datetime
) -> list[dict[str, str]]:
    """The entries of a subscription's `earlier_secrets` ({secret, until}) whose overlap
    still runs at `now`."""
    return [e for e in earlier or () if dt.datetime.fromisoformat(e["until"]) > now]


def new_webhook_id() -> str:
    """A fresh ``webhook-id`` (``msg_`` + 27 URL-safe characters); store it, reuse it on retries."""
    return WEBHOOK_ID_PREFIX + random_source.token_urlsafe(_WEBHOOK_ID_BYTES)


def _utc(timestamp: dt.datetime) -> dt.datetime:
    # A naive time would be read as local time by some code and as UTC by other code (the
    # standardwebhooks signer just stamps UTC on it): refuse it rather than guess.
    if timestamp.tzinfo is None or timestamp.utcoffset() is None:
        raise ValueError("timestamp must be timezone-aware")
    return timestamp.astimezone(dt.UTC)


def _iso_utc(timestamp: dt.datetime) -> str:
    return _utc(timestamp).isoformat().replace("+00:00", "Z")


def standard_body(event_type: str, timestamp: dt.datetime, data: dict[str, Any]) -> bytes:
    """The Standard Webhooks payload ``{type, timestamp, data}`` as compact UTF-8 JSON."""
    payload = {"type": event_type, "timestamp": _iso_utc(timestamp), "data": data}
    # allow_nan=False: NaN/Infinity are not JSON and strict receivers would reject the body.
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def cloudevents_body(
    event_type: str,
    webhook_id: str,
    timestamp: dt.datetime,
    data: dict[str, Any],
    source: str,
    subject: str | None,
) -> bytes:
    """A CloudEvents 1.0 structured-mode JSON event, exactly as the cloudevents SDK writes it."""
    attributes: dict[str, Any] = {
        # The webhook id doubles as the event id: both name one notification, and receivers
        # deduplicate on either.
        "id": webhook_id,
        "source": source,
        "type": event_type,
        "time": _utc(timestamp),
        "datacontenttype": STANDARD_CONTENT_TYPE,
    }
    if subject is not None:
        attributes["subject"] = subject
    try:
        event = CloudEvent(attributes, data)
    except BaseCloudEventException as exc:
        raise ValueError(f"invalid CloudEvent: {exc}") from exc
    return to_structured_event(event).body


def sign(
    webhook_id: str,
    timestamp: dt.datetime,
    body: bytes,
    secrets: Sequence[str],
    content_type: str = STANDARD_CONTENT_TYPE,
) -> SignedRequest:
    """Sign `body` with every secret (several during a rotation) into Standard Webhooks headers."""
    if isinstance(secrets, str):
        # A lone string is a Sequence[str] too; signing with each of its characters is a bug.
        raise TypeError("secrets must be a sequence of secrets, not one string")
    if not secrets:
        raise ValueError("at least one signing secret is required")
    if not webhook_id:
        raise ValueError("webhook_id must not be empty")
    moment = _utc(timestamp)
    try:
        # The library signs text and encodes it as UTF-8 again: for UTF-8 bodies (all JSON we
        # send) that is the very same byte sequence.
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("body must be UTF-8") from exc
    signatures = []
    for position, secret in enumerate(secrets):
        try:
            signer = standardwebhooks.Webhook(secret)
        except (ValueError, standardwebhooks.webhooks.EmptyWebhookSecretError) as exc:
            # Name the position only: the secret itself must never reach a log line.
            raise ValueError(f"signing secret #{position + 1} is not valid base64") from exc
        signatures.append(signer.sign(webhook_id, moment, text))
    return SignedRequest(
        headers={
            "content-type": content_type,
            "webhook-id": webhook_id,
            # The same rounding the library applies inside the signed content.
            "webhook-timestamp": str(math.floor(moment.timestamp())),
            "webhook-signature": " ".join(signatures),
        },
        body=body,
    )
