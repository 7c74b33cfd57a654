"""Request and response schemas of /v1/generations."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import re
from collections.abc import Iterator
from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    pre_load,
    validate,
    validates,
)

from schemas.deepimage import ProcessRequestSchema, base64_payload
from service.domain import GENERATION_EVENT_TYPES, GenerationStatus
from service.tenants import MAX_RETENTION

MAX_METADATA_KEYS = 50
METADATA_KEY_MAX, METADATA_VALUE_MAX = 40, 500
_METADATA_PARAM = re.compile(r"metadata\[(.*)\]", re.DOTALL)
PRIORITY_MIN, PRIORITY_MAX = 0, 9
DEADLINE_PASSED = "Must be in the future."


class UTCDateTime(fields.AwareDateTime):
    """An RFC 3339 time with a zone (its "T" and "Z" in either case) that is also a time in
    UTC: the database stores UTC, and `0001-01-01T00:00:00+01:00` or
    `9999-12-31T23:59:59-01:00` are outside its calendar."""

    default_error_messages = {
        "out_of_range": "Out of range: must be between 0001-01-01 and 9999-12-31 in UTC."
    }

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dt.datetime:
        if isinstance(value, str):
            # RFC 3339 §5.6 allows "t" and "z" in lower case; the ISO parser takes upper only.
            value = value.upper()
        parsed = super()._deserialize(value, attr, data, **kwargs)
        try:
            parsed.astimezone(dt.UTC)
        except OverflowError:
            raise self.make_error("out_of_range") from None
        return parsed


def deadline_passed(deadline: dt.datetime | None) -> bool:
    """A `deadline` that is not in the future (the intakes refuse it, unless the request is a
    retry its Idempotency-Key answers)."""
    return deadline is not None and deadline <= dt.datetime.now(dt.UTC)


def events_filter_field(event_types: tuple[str, ...], description: str) -> fields.List:
    """`webhook_events_filter`: some of the events `webhook` can be sent, each once."""
    return fields.List(
        fields.String(validate=validate.OneOf(event_types)),
        validate=validate.Length(min=1, max=len(event_types)),
        metadata={"description": description, "uniqueItems": True},
    )


class GenerationCreateSchema(Schema):
    """Body of `POST /v1/generations`.

    `future_deadline=False` leaves the "deadline in the future" check to the caller: the
    intake handlers make it after the Idempotency-Key lookup, so that a retry sent after the
    deadline passed gets the first answer again (`deadline_passed`).
    """

    class Meta:
        unknown = RAISE

    def __init__(self, *args: Any, future_deadline: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.future_deadline = future_deadline

    input = fields.Nested(
        ProcessRequestSchema,
        required=True,
        metadata={
            "description": "A Deep-Image processing request, forwarded unchanged but for "
            "gs://bucket/object images, which Deep-Image receives as short-lived signed URLs."
        },
    )
    webhook = fields.Url(
        schemes={"http", "https"},
        require_tld=False,
        validate=validate.Length(max=2048),
        metadata={"description": "Where to send this generation's notifications."},
    )
    # Only the generation's own: it never sends `batch.completed` (a batch's webhook does).
    webhook_events_filter = events_filter_field(
        GENERATION_EVENT_TYPES, "Which of the generation's events go to `webhook` (default: all)."
    )
    metadata = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=40)),
        values=fields.String(validate=validate.Length(max=500)),
        metadata={"description": "Up to 50 string pairs of your own, returned as given."},
    )

    priority = fields.Integer(
        load_default=0,
        strict=True,
        validate=validate.Range(min=PRIORITY_MIN, max=PRIORITY_MAX),
        metadata={
            "description": "Within your own line, higher goes first (0-9, default 0); order "
            "among equal priorities is first come, first served."
        },
    )
    deadline = UTCDateTime(
        metadata={
            "description": "RFC 3339 time with a zone. Still waiting for a Deep-Image slot "
            "then, the generation is canceled with `error.code` `deadline_exceeded`, never "
            "submitted and never charged. A deadline already passed is 422, unless the "
            "request retries one its Idempotency-Key answered: then that answer again."
        },
    )

    retention = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=MAX_RETENTION),
        metadata={
            "description": "Seconds to keep the stored result; then it is deleted and the "
            "generation shows `result.expired_at`. Default: the tenant's setting (forever "
            "unless the operator set one)."
        },
    )

    @validates("deadline")
    def _in_the_future(self, value: dt.datetime, **_: Any) -> None:
        if self.future_deadline and deadline_passed(value):
            raise ValidationError(DEADLINE_PASSED)

    @validates("metadata")
    def _few_keys(self, value: dict[str, Any], **_: Any) -> None:
        if len(value) > MAX_METADATA_KEYS:
            raise ValidationError(f"At most {MAX_METADATA_KEYS} keys.")

    @validates("webhook_events_filter")
    def _unique(self, value: list[str], **_: Any) -> None:
        if len(set(value)) != len(value):
            raise ValidationError("Event types must not repeat.")


class GenerationListArgsSchema(Schema):
    """Query of `GET /v1/generations`."""

    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf([s.value for s in GenerationStatus]))
    created_after = UTCDateTime(
        metadata={"description": "ISO 8601 with a time zone; only generations created later."}
    )
    batch = fields.String(
        validate=validate.Length(min=1, max=40),
        metadata={"description": "Only the items of this batch."},
    )
    metadata = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=METADATA_KEY_MAX)),
        values=fields.String(validate=validate.Length(max=METADATA_VALUE_MAX)),
        metadata={
            "description": "`metadata[key]=value`: only generations whose metadata has that "
            "value for that key; several are ANDed.",
            "style": "deepObject",
        },
    )
    cursor = fields.String(validate=validate.Length(max=500))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100), strict=False)

    @pre_load
    def _metadata_filters(self, data: Any, **_: Any) -> Any:
        """Gather the `metadata[key]=value` parameters into one `metadata` mapping."""
        out: dict[str, Any] = {}
        filters: dict[str, str] = {}
        errors: dict[str, list[str]] = {}
        for name in list(data):
            match = _METADATA_PARAM.fullmatch(name)
            if match is None:
                out[name] = data[name]
                continue
            key = match.group(1)
            values = data.data.getlist(name) if hasattr(data, "data") else [data[name]]
            if not 1 <= len(key) <= METADATA_KEY_MAX:
                errors[name] = [f"Metadata keys are 1 to {METADATA_KEY_MAX} characters."]
            elif len(values) != 1:
                errors[name] = ["Give each metadata key once."]
            elif len(values[0]) > METADATA_VALUE_MAX:
                errors[name] = [f"Metadata values are at most {METADATA_VALUE_MAX} characters."]
            else:
                filters[key] = values[0]
        if errors:
            raise ValidationError(errors)
        if filters:
            out["metadata"] = filters
        return out


class UpstreamSchema(Schema):
    job = fields.String(allow_none=True)


class ResultSchema(Schema):
    uri = fields.String(metadata={"description": "gs://bucket/name of the stored image."})
    url = fields.String(
        metadata={
            "description": "A V4 signed download URL, made when shown (absent where the "
            "credentials cannot sign, and once the result has expired)."
        }
    )
    content_type = fields.String()
    size = fields.Integer()
    crc32c = fields.String()
    width = fields.Integer()
    height = fields.Integer()
    expired_at = fields.AwareDateTime(
        metadata={
            "description": "When the stored image was deleted (its retention ran out, or "
            "DELETE /v1/generations/{id}/result); absent while it is kept."
        }
    )


class ErrorSchema(Schema):
    code = fields.String()
    message = fields.String()


class GenerationSchema(Schema):
    """The generation resource."""

    id = fields.String()
    status = fields.String(validate=validate.OneOf([s.value for s in GenerationStatus]))
    input = fields.Dict(metadata={"description": "The Deep-Image request as submitted."})
    metadata = fields.Dict(attribute="meta")
    webhook = fields.String(allow_none=True)
    webhook_events_filter = fields.List(fields.String(), allow_none=True)
    created_at = fields.AwareDateTime()
    updated_at = fields.AwareDateTime()
    completed_at = fields.AwareDateTime(allow_none=True)
    priority = fields.Integer()
    deadline = fields.AwareDateTime(attribute="deadline_at", allow_none=True)
    queue_position = fields.Integer(
        allow_none=True,
        metadata={
            "description": "While `queued` and waiting for a Deep-Image slot: 1 for the next of "
            "your generations to go. Shown when one generation is read; null otherwise."
        },
    )
    batch_id = fields.String(allow_none=True)
    custom_id = fields.String(allow_none=True)
    retention = fields.Integer(
        attribute="retention_seconds",
        allow_none=True,
        metadata={"description": "Seconds the result is kept; null: forever."},
    )
    upstream = fields.Method("_upstream", metadata={"type": "object"})
    result = fields.Nested(ResultSchema, allow_none=True)
    error = fields.Method("_error", allow_none=True)
    links = fields.Method("_links")

    def _upstream(self, generation: Any) -> dict[str, Any]:
        return {"job": generation.upstream_job}

    @post_dump(pass_original=True)
    def _signed_url(self, data: dict[str, Any], generation: Any, **_: Any) -> dict[str, Any]:
        # `generation`: a row, or a service.generations.views.GenerationView (the row plus
        # what is made when shown). Only a view has a place in the line; a row shows null.
        data.setdefault("queue_position", None)
        # Signed when shown (it expires), so it lives beside the stored result, not in it.
        if data.get("result") is not None and getattr(generation, "signed_url", None):
            data["result"]["url"] = generation.signed_url
        expired_at = getattr(generation, "result_expired_at", None)
        if data.get("result") is not None and expired_at is not None:
            data["result"].pop("url", None)
            data["result"]["expired_at"] = expired_at.isoformat()
        return data

    def _error(self, generation: Any) -> dict[str, Any] | None:
        if generation.error_code is None:
            return None
        return {"code": generation.error_code, "message": generation.error_message}

    def _links(self, generation: Any) -> dict[str, str]:
        base = f"/v1/generations/{generation.id}"
        return {"self": base, "cancel": base + "/cancel", "result": base + "/result"}


# Where Deep-Image takes inline (base64) image data; see schemas/deepimage.py.
INLINE_IMAGE_FIELDS = (("url",), ("background", "replace"))


def inline_images(request: dict[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    """The inline (base64) image data of a Deep-Image request, by the path of its field."""
    for path in INLINE_IMAGE_FIELDS:
        *parents, leaf = path
        holder: Any = request
        for key in parents:
            holder = holder.get(key) if isinstance(holder, dict) else None
        value = holder.get(leaf) if isinstance(holder, dict) else None
        if isinstance(value, str) and base64_payload(value) is not None:
            yield path, value


def compact_input(request: dict[str, Any]) -> dict[str, Any]:
    """The request with inline image data replaced by its size and SHA-256.

    Events, delivery bodies and list items carry this form: a 2 MiB base64 image would
    otherwise be stored again in every event and every delivery, and sent in every list page.
    `GET /v1/generations/{id}` shows the request as it was sent.
    """
    compacted: dict[str, Any] | None = None
    for path, value in inline_images(request):
        *parents, leaf = path
        if compacted is None:
            compacted = copy.deepcopy(request)
        target = compacted
        for key in parents:
            target = target[key]
        target[leaf] = {
            "omitted": "inline image data",
            "bytes": len(value.encode()),
            "sha256": hashlib.sha256(value.encode()).hexdigest(),
        }
    return request if compacted is None else compacted


class GenerationSummarySchema(GenerationSchema):
    """The generation resource as events, deliveries and lists show it (inline images
    replaced by their size and hash)."""

    input = fields.Function(  # type: ignore[assignment]
        lambda generation: compact_input(generation.input),
        metadata={
            "type": "object",
            "description": "The Deep-Image request; inline base64 image data (in `url` or "
            "`background.replace`) is shown as `{omitted, bytes, sha256}`.",
        },
    )


class GenerationPageSchema(Schema):
    data = fields.List(fields.Nested(GenerationSummarySchema))
    next_cursor = fields.String(allow_none=True)
