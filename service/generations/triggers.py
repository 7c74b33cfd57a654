"""Triggers: GCS object notifications and Pub/Sub messages that become generations.

A trigger belongs to a tenant and answers at its push URL, `{base}/v1/triggers/{id}/push`,
which is what Eventarc or a Pub/Sub push subscription is given. A push is accepted from a
Google-signed ID token (service/adapters/oidc.py) whose audience is that push URL (or
GENRELAY_OIDC_AUDIENCE) and whose email is on the trigger's `push_accounts`.

What a push may carry:
- an Eventarc CloudEvent in binary content mode (`ce-*` headers), type
  `google.cloud.storage.object.v1.finalized`, the object's JSON as its data;
- a Pub/Sub push envelope `{message: {data, attributes, messageId, publishTime}, subscription}`:
  a GCS Pub/Sub notification (attributes `eventType: OBJECT_FINALIZE`, `bucketId`,
  `objectId`), or any other message whose base64 `data` is a `POST /v1/generations` body.

An object becomes the `gs://bucket/name` input (`input.url`) of a generation whose request is
the trigger's `input` template, `metadata` and `webhook`; a message's request is merged over
the same template. The generation goes through the normal intake (allow-lists, the line).

At least once in, once out: every push is recorded as one `trigger_events` row per (trigger,
event id) — the CloudEvent's `ce-id` or the message's `messageId` — written in the same
transaction as its generation, so a redelivery finds the row and makes nothing new. A push
that can never become a generation (malformed, wrong type, filtered out, an invalid request,
a bucket the tenant may not read, a CloudEvent without `ce-id`, JSON nested too deep to read,
text no database can store — a NUL, a lone surrogate — in its event id, object or request) is
acknowledged (200) and recorded as `rejected` or `skipped` with the reason, so Pub/Sub does
not redeliver it forever; so is one whose webhook's host the DNS says does not exist. Only
failures that may pass (the database or Google's certificates unreachable, no DNS answer
for the webhook's host) answer 5xx and record nothing, so the sender redelivers. An event
already recorded is answered as a duplicate before any of those is tried.

A push is authenticated (token, trigger, `push_accounts`) before its body is read.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from marshmallow import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.deepimage import WEBHOOKS_RESERVED_MESSAGE, ProcessRequestSchema
from schemas.generations import GenerationCreateSchema
from service.adapters.gcs_urls import BUCKET_RE
from service.adapters.oidc import CertificatesUnavailable, InvalidToken, TokenVerifier
from service.config import Config
from service.database import Store
from service.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    ServiceError,
    Unauthorized,
    Unavailable,
    require_identity_coding,
)
from service.generations.inputs import access_problems
from service.generations.service import GenerationService, NewGeneration
from service.ids import new_id
from service.models import Trigger, TriggerEvent, utcnow
from service.notifications.service import UnresolvableTarget, require_safe_target
from service.notifications.ssrf import URLPolicy
from service.pagination import Page, paginate
from service.tenants import settings_by_id
from service.text import UNSTORABLE_MESSAGE, escape_unstorable, has_unstorable, unstorable_values

log = logging.getLogger("genrelay.triggers")

SOURCES = ("gcs", "pubsub")
FINALIZED = "google.cloud.storage.object.v1.finalized"
OBJECT_FINALIZE = "OBJECT_FINALIZE"
MAX_METADATA_VALUE = 500
MAX_EVENT_ID = 200  # trigger_events.event_id; a longer id is recorded as its hash
# Retry-After of a push that may pass when sent again.
RETRY_AFTER = "10"


@dataclasses.dataclass(frozen=True)
class PushOutcome:
    """What a push did: its event row, and whether it had been seen before."""

    event: TriggerEvent
    duplicate: bool


class _Reject(Exception):
    """The push can never become a generation: acknowledge it and record why."""

    def __init__(self, reason: str, *, status: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclasses.dataclass
class _Parsed:
    kind: str
    event_id: str
    subject: str | None = None
    request: dict[str, Any] | None = None  # a generation request (messages)
    bucket: str | None = None
    name: str | None = None
    problem: str | None = None
    # The pushed strings the event id and subject are made of, by the field they came in
    # (`message.messageId`, `ce-id`, `data.name`...), to name one that cannot be stored.
    fields: dict[str, str] = dataclasses.field(default_factory=dict)


def _merge(base: Any, over: Any) -> Any:
    """`over` deep-merged onto `base` (objects merge key by key; anything else replaces)."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    return copy.deepcopy(over)


class TriggerService:
    def __init__(
        self,
        store: Store,
        generations: GenerationService,
        config: Config,
        policy: URLPolicy,
        verifier: TokenVerifier,
    ) -> None:
        self.store = store
        self.generations = generations
        self.config = config
        self.policy = policy
        self.verifier = verifier

    # --- Management ---------------------------------------------------------------------------

    def push_url(self, trigger_id: str, base_url: str) -> str:
        base = (self.config.public_url or base_url).rstrip("/")
        return f"{base}/v1/triggers/{trigger_id}/push"

    def audience(self, trigger_id: str, base_url: str) -> str:
        return self.config.oidc_audience or self.push_url(trigger_id, base_url)

    def create(self, tenant_id: str, fields: dict[str, Any]) -> Trigger:
        now = utcnow()
        trigger = Trigger(
            id=new_id("trg_"),
            tenant_id=tenant_id,
            source=fields["source"],
            bucket=fields.get("bucket"),
            name_prefix=fields.get("name_prefix", ""),
            name_suffix=fields.get("name_suffix", ""),
            template=fields.get("input", {}),
            meta=fields.get("metadata", {}),
            webhook=fields.get("webhook"),
            push_accounts=[a.lower() for a in fields["push_accounts"]],
            enabled=fields.get("enabled", True),
            description=fields.get("description", ""),
            created_at=now,
            updated_at=now,
        )
        self._check(trigger)
        with self.store.transaction() as session:
            session.add(trigger)
        return trigger

    def update(self, tenant_id: str, trigger_id: str, changes: dict[str, Any]) -> Trigger:
        with self.store.transaction() as session:
            trigger = self._owned(session, tenant_id, trigger_id)
            for name, value in changes.items():
                attribute = {"input": "template", "metadata": "meta"}.get(name, name)
                if name == "push_accounts":
                    value = [a.lower() for a in value]
                setattr(trigger, attribute, value)
            if not _only_stops_or_describes(changes):
                self._check(trigger)
            trigger.updated_at = utcnow()
            session.flush()
            session.expunge(trigger)
        return trigger

    def get(self, tenant_id: str, trigger_id: str) -> Trigger:
        with self.store.read() as session:
            return self._owned(session, tenant_id, trigger_id)

    def list(self, tenant_id: str, *, cursor: str | None = None, limit: int = 20) -> Page[Trigger]:
        query = sa.select(Trigger).where(Trigger.tenant_id == tenant_id)
        with self.store.read() as session:
            return paginate(session, query, Trigger, cursor=cursor, limit=limit)

    def delete(self, tenant_id: str, trigger_id: str) -> None:
        with self.store.transaction() as session:
            trigger = self._owned(session, tenant_id, trigger_id)
            session.execute(sa.delete(TriggerEvent).where(TriggerEvent.trigger_id == trigger.id))
            session.delete(trigger)

    def events(
        self,
        tenant_id: str,
        trigger_id: str,
        *,
        status: str | None = None,
        cursor: str | None = None,
        limit: int = 20,
    ) -> Page[TriggerEvent]:
        query = sa.select(TriggerEvent).where(TriggerEvent.trigger_id == trigger_id)
        if status is not None:
            query = query.where(TriggerEvent.status == status)
        with self.store.read() as session:
            self._owned(session, tenant_id, trigger_id)
            return paginate(session, query, TriggerEvent, cursor=cursor, limit=limit)

    def _owned(self, session: Session, tenant_id: str, trigger_id: str) -> Trigger:
        trigger = session.get(Trigger, trigger_id)
        if trigger is None or trigger.tenant_id != tenant_id:
            raise NotFound(f"no trigger {trigger_id!r}")
        return trigger

    def _check(self, trigger: Trigger) -> None:
        """422 for a trigger that could never make a generation."""
        # The template is kept as sent: what no database can store is refused first.
        errors: list[dict[str, str]] = unstorable_values(trigger.template, "input")
        if errors:
            raise InvalidRequest("the trigger's input cannot be stored", errors=errors)
        with self.store.read() as session:
            settings = settings_by_id(session, trigger.tenant_id)
        if trigger.source == "gcs" and not trigger.bucket:
            errors.append({"field": "bucket", "message": "A gcs trigger needs its bucket."})
        if trigger.bucket:
            if not BUCKET_RE.fullmatch(trigger.bucket):
                errors.append({"field": "bucket", "message": "Not a GCS bucket name."})
            elif trigger.bucket not in settings.allowed_input_buckets:
                errors.append(
                    {
                        "field": "bucket",
                        "message": f"bucket {trigger.bucket!r} is not allowed for this tenant's "
                        "inputs (the operator lists the buckets it may read)",
                    }
                )
        if trigger.source == "gcs" and not errors:
            # The template plus an object must make a valid Deep-Image request, naming only
            # storages and buckets the tenant may use.
            sample = _merge(trigger.template, {"url": f"gs://{trigger.bucket}/object"})
            try:
                ProcessRequestSchema().load(sample)
            except ValidationError as exc:
                errors += _flatten(exc.messages, "input")
            errors += access_problems(settings, sample)
        elif trigger.source == "pubsub" and isinstance(trigger.template, dict):
            # A message's request is merged over the template: what it names, each request does
            # (a message may set any other field of it anew, but not take `webhooks` away).
            errors += access_problems(settings, trigger.template)
            if "webhooks" in trigger.template:
                errors.append({"field": "input.webhooks", "message": WEBHOOKS_RESERVED_MESSAGE})
        if trigger.webhook:
            require_safe_target(self.policy, trigger.webhook, "webhook", trigger.tenant_id)
        if errors:
            raise InvalidRequest("the trigger could never make a valid generation", errors=errors)

    # --- Pushes -------------------------------------------------------------------------------

    def push(
        self,
        trigger_id: str,
        *,
        headers: Mapping[str, str],
        read_body: Callable[[], bytes],
        base_url: str,
    ) -> PushOutcome:
        """Authenticate and record one push; make its generation when it can become one.

        `headers` have lowercase names; `read_body` is called (once) only when the push is
        authenticated, so an unauthenticated upload is not read.
        Raises Unauthorized (401), Forbidden (403), NotFound (404), UnsupportedContentCoding
        (415) or Unavailable (503).
        """
        try:
            identity = self.verifier.verify(
                headers.get("authorization"), self.audience(trigger_id, base_url)
            )
        except InvalidToken as exc:
            raise Unauthorized(str(exc)) from None
        except CertificatesUnavailable as exc:
            raise Unavailable(
                f"Google's certificates could not be read ({exc}); try again",
                headers={"Retry-After": RETRY_AFTER},
            ) from None
        with self.store.read() as session:
            trigger = session.get(Trigger, trigger_id)
        if trigger is None:
            raise NotFound(f"no trigger {trigger_id!r}")
        if identity.email not in trigger.push_accounts:
            raise Forbidden(
                f"{identity.email} is not allowed to push to this trigger (push_accounts)"
            )
        # Eventarc and Pub/Sub send no Content-Encoding; a coded body is refused unread
        # rather than recorded as "not JSON".
        require_identity_coding(headers.get("content-encoding"))
        parsed = _storable(_parse(headers, read_body()))
        seen = self._find(trigger.id, parsed.event_id)
        if seen is not None:
            # Answered before anything that may fail for now (the webhook's DNS, say): a
            # redelivery of an event already recorded is acknowledged, whatever else holds.
            return PushOutcome(seen, duplicate=True)
        try:
            if parsed.problem is not None:
                raise _Reject(parsed.problem)
            if not trigger.enabled:
                raise _Reject("the trigger is disabled")
            request = self._request_for(trigger, parsed)
            new = self._validated(request)
        except _Reject as rejected:
            return self._record(trigger, parsed, rejected.status, rejected.reason)
        return self._create(trigger, parsed, new)

    def _request_for(self, trigger: Trigger, parsed: _Parsed) -> dict[str, Any]:
        base: dict[str, Any] = {"input": trigger.template, "metadata": dict(trigger.meta)}
        if trigger.webhook:
            base["webhook"] = trigger.webhook
        if parsed.request is not None:
            if trigger.source == "gcs":
                # A gcs trigger's bucket and name filters say which objects it takes; a
                # message naming any input would go past them.
                raise _Reject("a gcs trigger makes generations from objects, not from messages")
            request = _merge(base, parsed.request)
            if isinstance(request.get("metadata"), dict):  # else the validation names it
                request["metadata"]["trigger"] = trigger.id  # set last: not the message's
            return dict(request)
        base["metadata"]["trigger"] = trigger.id
        assert parsed.bucket is not None and parsed.name is not None
        if trigger.bucket and parsed.bucket != trigger.bucket:
            raise _Reject(
                f"the object is in bucket {parsed.bucket!r}, not the trigger's {trigger.bucket!r}",
                status="skipped",
            )
        if not parsed.name.startswith(trigger.name_prefix) or not parsed.name.endswith(
            trigger.name_suffix
        ):
            raise _Reject(
                "the object's name does not match the trigger's filters", status="skipped"
            )
        uri = f"gs://{parsed.bucket}/{parsed.name}"
        request = _merge(base, {"input": {"url": uri}})
        if len(uri) <= MAX_METADATA_VALUE:
            request["metadata"]["object"] = uri
        return dict(request)

    def _validated(self, request: dict[str, Any]) -> NewGeneration:
        try:
            loaded = GenerationCreateSchema().load(request)
        except ValidationError as exc:
            problems = _flatten(exc.messages, "")
            shown = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
            raise _Reject(f"not a valid generation request: {shown}") from None
        return NewGeneration(**loaded)

    def _create(self, trigger: Trigger, parsed: _Parsed, new: NewGeneration) -> PushOutcome:
        event_row: dict[str, TriggerEvent] = {}

        def record(session: Session, generation_id: str) -> None:
            event = self._event(trigger, parsed, "accepted", None, generation_id)
            session.add(event)
            event_row["event"] = event

        try:
            self.generations.create(trigger.tenant_id, new, also=record)
        except IntegrityError:
            return PushOutcome(self._existing(trigger.id, parsed.event_id), duplicate=True)
        except UnresolvableTarget:
            # A DNS failure may pass: record nothing, so the redelivery makes the generation.
            raise Unavailable(
                "the webhook's host does not resolve now; try again",
                headers={"Retry-After": RETRY_AFTER},
            ) from None
        except InvalidRequest as exc:
            problems = "; ".join(f"{e['field']}: {e['message']}" for e in (exc.errors or []))
            return self._record(trigger, parsed, "rejected", problems or exc.detail)
        except ServiceError:
            raise
        event = event_row["event"]
        log.info(
            "trigger %s: event %s made %s",
            trigger.id,
            event.id,
            event.generation_id,
            extra={"generation_id": event.generation_id},
        )
        return PushOutcome(event, duplicate=False)

    def _record(self, trigger: Trigger, parsed: _Parsed, status: str, reason: str) -> PushOutcome:
        # A reason may quote what was pushed (a field's name, an SDK's message): never a NUL
        # or a lone surrogate, which the database would refuse.
        reason = escape_unstorable(reason)
        event = self._event(trigger, parsed, status, reason[:2000], None)
        try:
            with self.store.transaction() as session:
                session.add(event)
        except IntegrityError:
            return PushOutcome(self._existing(trigger.id, parsed.event_id), duplicate=True)
        log.info("trigger %s: event %s %s: %s", trigger.id, event.id, status, reason[:300])
        return PushOutcome(event, duplicate=False)

    def _event(
        self,
        trigger: Trigger,
        parsed: _Parsed,
        status: str,
        reason: str | None,
        generation_id: str | None,
    ) -> TriggerEvent:
        return TriggerEvent(
            id=new_id("tev_"),
            trigger_id=trigger.id,
            tenant_id=trigger.tenant_id,
            event_id=parsed.event_id,
            kind=parsed.kind,
            status=status,
            reason=reason,
            subject=parsed.subject[:1100] if parsed.subject else None,
            generation_id=generation_id,
            created_at=utcnow(),
        )

    def _find(self, trigger_id: str, event_id: str) -> TriggerEvent | None:
        with self.store.read() as session:
            return session.scalar(
                sa.select(TriggerEvent).where(
                    TriggerEvent.trigger_id == trigger_id, TriggerEvent.event_id == event_id
                )
            )

    def _existing(self, trigger_id: str, event_id: str) -> TriggerEvent:
        """The row whose unique (trigger, event id) a concurrent push of the event took."""
        event = self._find(trigger_id, event_id)
        if event is None:  # the unique row is there: only a concurrent delete removes it
            raise Unavailable("the event is being handled; try again")
        return event


def _only_stops_or_describes(changes: dict[str, Any]) -> bool:
    """Whether a change only disables the trigger or edits its description: allowed however
    the trigger stands, so that one whose bucket the operator has since taken away, or whose
    webhook does not resolve now, can still be stopped without deleting its event log."""
    return set(changes) <= {"enabled", "description"} and changes.get("enabled") is not True


def _flatten(messages: Any, path: str) -> list[dict[str, str]]:
    if isinstance(messages, dict):
        out: list[dict[str, str]] = []
        for key, value in messages.items():
            name = path if key == "_schema" else f"{path}.{key}" if path else str(key)
            out += _flatten(value, name)
        return out
    if isinstance(messages, list | tuple):
        return [item for message in messages for item in _flatten(message, path)]
    return [{"field": path or "(body)", "message": str(messages)}]


def _body_hash(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _stand_in_id(event_id: str) -> str:
    """The event id recorded for one no database can store (or over MAX_EVENT_ID
    characters): its hash, the same for every delivery of the event (its body may differ,
    Pub/Sub's `deliveryAttempt` for one)."""
    return _body_hash(event_id.encode("utf-8", "surrogatepass"))


def _storable(parsed: _Parsed) -> _Parsed:
    """`parsed` with nothing in it the database cannot store (a NUL, a lone surrogate).

    Such an event id is replaced by its hash and such a subject dropped, and the push is
    rejected naming the field; so is a message whose generation request holds one (or a
    number out of range), which the intake would otherwise refuse only as a database error.
    """
    bad = sorted(field for field, value in parsed.fields.items() if has_unstorable(value))
    if has_unstorable(parsed.event_id):
        parsed.event_id = _stand_in_id(parsed.event_id)
        bad = bad or ["the event id"]
    elif len(parsed.event_id) > MAX_EVENT_ID:
        # Cut short, two ids that share their beginning would be taken for one event, and the
        # second never made; their hashes differ.
        parsed.event_id = _stand_in_id(parsed.event_id)
    if parsed.subject is not None and has_unstorable(parsed.subject):
        parsed.subject = None
        bad = bad or ["the object's name"]
    if bad:
        parsed.problem = f"{', '.join(bad)}: {UNSTORABLE_MESSAGE}"
    elif parsed.problem is None and parsed.request is not None:
        problems = unstorable_values(parsed.request)
        if problems:
            shown = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
            parsed.problem = f"not a valid generation request: {shown}"
    return parsed


def _parse(headers: Mapping[str, str], body: bytes) -> _Parsed:
    """What the push says; `problem` is set when it cannot become a generation."""
    if headers.get("ce-specversion"):
        return _parse_cloudevent(headers, body)
    try:
        envelope = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _Parsed("malformed", _body_hash(body), problem="the body is not JSON")
    message = envelope.get("message") if isinstance(envelope, dict) else None
    if not isinstance(message, dict):
        return _Parsed(
            "malformed",
            _body_hash(body),
            problem="neither a CloudEvent (ce-* headers) nor a Pub/Sub push envelope",
        )
    return _parse_message(message, body)


def _parse_cloudevent(headers: Mapping[str, str], body: bytes) -> _Parsed:
    """A CloudEvent in binary content mode, parsed by the cloudevents SDK."""
    from cloudevents.core.bindings.http import HTTPMessage, from_binary_event
    from cloudevents.core.exceptions import BaseCloudEventException

    # Without ce-id the SDK makes up a new id for every delivery, and each would be new here.
    event_id = headers.get("ce-id") or ""
    if not event_id.strip():
        return _Parsed("cloudevent", _body_hash(body), problem="the CloudEvent has no ce-id")
    fields = {"ce-id": event_id}
    try:
        # The SDK reads JSON data itself: too deep a nesting is its RecursionError.
        event = from_binary_event(HTTPMessage(headers=dict(headers), body=body))
    except (BaseCloudEventException, ValueError, TypeError, RecursionError) as exc:
        return _Parsed(
            "cloudevent", event_id, problem=f"not a valid CloudEvent: {exc}", fields=fields
        )
    subject = event.get_subject()
    if isinstance(subject, str):
        fields["ce-subject"] = subject
    if event.get_type() != FINALIZED:
        return _Parsed(
            "cloudevent",
            event_id,
            subject=subject,
            problem=f"event type {event.get_type()!r} is not {FINALIZED}",
            fields=fields,
        )
    data = event.get_data()
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            data = None
    if not isinstance(data, dict) or not _named(data.get("bucket")) or not _named(data.get("name")):
        return _Parsed(
            "cloudevent",
            event_id,
            subject=subject,
            problem="the event's data is not a GCS object (bucket and name)",
            fields=fields,
        )
    bucket, name = data["bucket"], data["name"]
    fields = {"ce-id": event_id, "data.bucket": bucket, "data.name": name}
    return _Parsed(
        "cloudevent", event_id, f"gs://{bucket}/{name}", bucket=bucket, name=name, fields=fields
    )


def _named(value: Any) -> bool:
    """Whether `value` can be a bucket's or an object's name: a string, not empty."""
    return isinstance(value, str) and bool(value)


def _parse_message(message: dict[str, Any], body: bytes) -> _Parsed:
    id_field = "messageId" if message.get("messageId") else "message_id"
    event_id = message.get(id_field)
    if not isinstance(event_id, str) or not event_id:
        return _Parsed("malformed", _body_hash(body), problem="the message has no messageId")
    fields = {f"message.{id_field}": event_id}
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict):
        return _Parsed("message", event_id, problem="attributes is not an object", fields=fields)
    if "eventType" in attributes:
        kind = "gcs_notification"
        bucket, name = attributes.get("bucketId"), attributes.get("objectId")
        subject = f"gs://{bucket}/{name}" if bucket and name else None
        for field, value in (("bucketId", bucket), ("objectId", name)):
            if subject is not None and isinstance(value, str):
                fields[f"message.attributes.{field}"] = value
        if attributes["eventType"] != OBJECT_FINALIZE:
            return _Parsed(
                kind,
                event_id,
                subject,
                problem=f"eventType {attributes['eventType']!r} is not {OBJECT_FINALIZE}",
                fields=fields,
            )
        if not _named(bucket) or not _named(name):
            return _Parsed(
                kind, event_id, problem="bucketId and objectId are required", fields=fields
            )
        return _Parsed(kind, event_id, subject, bucket=bucket, name=name, fields=fields)
    data = message.get("data")
    problem = "data is not base64 of a JSON object"
    try:
        decoded = json.loads(base64.b64decode(data or "", validate=True))
    except (binascii.Error, ValueError, TypeError, RecursionError):
        return _Parsed("message", event_id, problem=problem, fields=fields)
    if not isinstance(decoded, dict):
        return _Parsed("message", event_id, problem=problem, fields=fields)
    return _Parsed("message", event_id, request=decoded, fields=fields)
