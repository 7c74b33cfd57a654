"""Request and response schemas of /v1/batches.

A batch body is read item by item (handlers/batches.py), so its items are checked here one at
a time: `BatchItemSchema` for the item's own shape, then the item's `input` merged over the
batch's `template` (`deep_merge`) with the same `ProcessRequestSchema` as a single generation.
`BatchCreateSchema` documents the whole JSON body in OpenAPI.
"""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, fields, validate

from schemas.generations import GenerationCreateSchema, events_filter_field
from service.domain import EVENT_TYPES, BatchStatus, GenerationStatus

MAX_ITEMS = 10_000
CUSTOM_ID_MAX = 200


def deep_merge(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`values` over `template`: dicts merge key by key, recursively; anything else in
    `values` (a scalar, a list, null) replaces the template's value whole."""
    merged = dict(template)
    for key, value in values.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, dict):
            merged[key] = deep_merge(base, value)
        else:
            merged[key] = value
    return merged


def _metadata_field(description: str) -> fields.Dict:
    return fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=40)),
        values=fields.String(validate=validate.Length(max=500)),
        metadata={"description": description},
    )


class BatchItemSchema(Schema):
    """One item: what differs from the other items of the batch."""

    class Meta:
        unknown = RAISE

    input = fields.Dict(
        required=True,
        metadata={
            "description": "Deep-Image input fields, merged over the batch's `template`; the "
            "result is validated and forwarded like a generation's `input`."
        },
    )
    metadata = _metadata_field(
        "String pairs of this item, merged over the batch's `metadata` (the item's win); at "
        "most 50 keys together."
    )
    custom_id = fields.String(
        validate=validate.Length(min=1, max=CUSTOM_ID_MAX),
        metadata={"description": "Your id for the item (unique within the batch)."},
    )


class BatchOptionsSchema(GenerationCreateSchema):
    """Batch-level fields: the JSON body's, or the NDJSON header line's `batch` object.

    `deadline` is checked to be in the future by the handler, after the Idempotency-Key
    lookup (see GenerationCreateSchema); `retention` applies to every item.
    """

    class Meta:
        unknown = RAISE
        exclude = ("input",)

    def __init__(self, *args: Any, future_deadline: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, future_deadline=future_deadline, **kwargs)

    template = fields.Dict(
        metadata={
            "description": "Deep-Image input fields shared by every item; each item's `input` "
            "is merged over it (dicts merge recursively, item values win, lists and scalars "
            "replace)."
        }
    )
    webhook = fields.Url(
        schemes={"http", "https"},
        require_tld=False,
        validate=validate.Length(max=2048),
        metadata={
            "description": "Receives every item's generation.* events and `batch.completed`."
        },
    )
    webhook_events_filter = events_filter_field(
        EVENT_TYPES,
        "Which events go to `webhook` (default: all): the items' `generation.*` and "
        "`batch.completed`.",
    )
    metadata = _metadata_field(
        "Up to 50 string pairs of your own for the batch; every item's generation carries them "
        "too, under its own."
    )


class BatchCreateSchema(BatchOptionsSchema):
    """Body of `POST /v1/batches` (application/json)."""

    class Meta(BatchOptionsSchema.Meta):
        pass

    items = fields.List(
        fields.Nested(BatchItemSchema),
        required=True,
        validate=validate.Length(min=1, max=MAX_ITEMS),
        metadata={"description": f"1 to {MAX_ITEMS} items, one generation each."},
    )


class BatchHeaderSchema(Schema):
    """The optional first line of an NDJSON body: `{"batch": {...batch-level fields}}`."""

    class Meta:
        unknown = RAISE

    batch = fields.Nested(BatchOptionsSchema, required=True)


class BatchCountsSchema(Schema):
    queued = fields.Integer()
    processing = fields.Integer()
    succeeded = fields.Integer()
    failed = fields.Integer()
    canceled = fields.Integer()
    total = fields.Integer()


class BatchSchema(Schema):
    """The batch resource."""

    id = fields.String()
    status = fields.String(
        validate=validate.OneOf([s.value for s in BatchStatus]),
        metadata={
            "description": "`processing` while any item is queued or processing; then "
            "`completed` (a canceled batch too: see `canceled_at`)."
        },
    )
    counts = fields.Nested(BatchCountsSchema, metadata={"description": "Items by status."})
    metadata = fields.Dict(attribute="meta")
    webhook = fields.String(allow_none=True)
    webhook_events_filter = fields.List(fields.String(), allow_none=True)
    created_at = fields.AwareDateTime()
    completed_at = fields.AwareDateTime(allow_none=True)
    canceled_at = fields.AwareDateTime(allow_none=True)
    links = fields.Method("_links")

    def _links(self, batch: Any) -> dict[str, str]:
        base = f"/v1/batches/{batch.id}"
        return {"self": base, "generations": base + "/generations", "cancel": base + "/cancel"}


class BatchPageSchema(Schema):
    data = fields.List(fields.Nested(BatchSchema))
    next_cursor = fields.String(allow_none=True)


class BatchListArgsSchema(Schema):
    """Query of `GET /v1/batches`."""

    class Meta:
        unknown = RAISE

    cursor = fields.String(validate=validate.Length(max=500))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100), strict=False)


class BatchGenerationsArgsSchema(BatchListArgsSchema):
    """Query of `GET /v1/batches/{id}/generations`."""

    status = fields.String(validate=validate.OneOf([s.value for s in GenerationStatus]))
