"""Schemas of subscriptions, events and deliveries."""

from __future__ import annotations

from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates,
    validates_schema,
)

from schemas.deepimage import StrictBoolean
from service.domain import EVENT_TYPES, DeliveryStatus

FORMATS = ("standard", "cloudevents")
DELIVERY_STATUSES = tuple(status.value for status in DeliveryStatus)


def _event_list(**kwargs: Any) -> fields.List:
    return fields.List(
        fields.String(validate=validate.OneOf(EVENT_TYPES)),
        validate=validate.Length(min=1, max=len(EVENT_TYPES)),
        **{**kwargs, "metadata": {"uniqueItems": True, **kwargs.get("metadata", {})}},
    )


def _target_url(**kwargs: Any) -> fields.Url:
    return fields.Url(
        schemes={"http", "https"}, require_tld=False, validate=validate.Length(max=2048), **kwargs
    )


class _SubscriptionFields(Schema):
    class Meta:
        unknown = RAISE

    url = _target_url(
        metadata={"description": "https (http only where private targets are allowed)."}
    )
    events = _event_list(
        metadata={
            "description": "Event types to send (default: every generation.* type; "
            "batch.completed only when listed)."
        }
    )
    format = fields.String(
        validate=validate.OneOf(FORMATS),
        metadata={
            "description": "standard (Standard Webhooks JSON) or cloudevents "
            "(CloudEvents 1.0, structured JSON)."
        },
    )
    description = fields.String(validate=validate.Length(max=500))
    enabled = StrictBoolean()

    @validates("events")
    def _unique(self, value: list[str], **_: Any) -> None:
        if len(set(value)) != len(value):
            raise ValidationError("Event types must not repeat.")


class SubscriptionCreateSchema(_SubscriptionFields):
    """Body of `POST /v1/subscriptions`."""

    url = _target_url(required=True)
    format = fields.String(validate=validate.OneOf(FORMATS), load_default="standard")
    description = fields.String(validate=validate.Length(max=500), load_default="")
    enabled = StrictBoolean(load_default=True)


class SubscriptionUpdateSchema(_SubscriptionFields):
    """Body of `PATCH /v1/subscriptions/{id}`: any of the fields."""

    class Meta(_SubscriptionFields.Meta):
        openapi = {"minProperties": 1}  # published by handlers.problems.SchemaExtrasPlugin

    @validates_schema
    def _something(self, data: dict[str, Any], **_: Any) -> None:
        if not data:
            raise ValidationError("Give at least one field to change.")


class SubscriptionSchema(Schema):
    id = fields.String()
    url = fields.String()
    events = fields.List(fields.String())
    format = fields.String()
    description = fields.String()
    enabled = fields.Boolean()
    disabled_reason = fields.String(allow_none=True)
    created_at = fields.AwareDateTime()
    updated_at = fields.AwareDateTime()


class SubscriptionWithSecretSchema(SubscriptionSchema):
    secret = fields.String(metadata={"description": "whsec_…; shown only now."})


class SubscriptionPageSchema(Schema):
    data = fields.List(fields.Nested(SubscriptionSchema))
    next_cursor = fields.String(allow_none=True)


class PageArgsSchema(Schema):
    class Meta:
        unknown = RAISE

    cursor = fields.String(validate=validate.Length(max=500))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))


class EventListArgsSchema(PageArgsSchema):
    type = fields.String(validate=validate.OneOf(EVENT_TYPES))
    generation_id = fields.String(validate=validate.Length(max=40))


class EventSchema(Schema):
    id = fields.String()
    type = fields.String()
    generation_id = fields.String(
        metadata={"description": "The event's subject: a generation id, or a batch id."}
    )
    created_at = fields.AwareDateTime()
    data = fields.Dict(
        metadata={"description": "The generation (or, for batch.completed, the batch) then."}
    )


class EventPageSchema(Schema):
    data = fields.List(fields.Nested(EventSchema))
    next_cursor = fields.String(allow_none=True)


class DeliveryListArgsSchema(PageArgsSchema):
    subscription = fields.String(validate=validate.Length(max=40))
    status = fields.String(validate=validate.OneOf(DELIVERY_STATUSES))
    event = fields.String(validate=validate.Length(max=60))


class DeliverySchema(Schema):
    id = fields.String()
    event_id = fields.String(allow_none=True)
    subscription_id = fields.String(
        allow_none=True, metadata={"description": "null: the generation's own `webhook`."}
    )
    event_type = fields.String()
    url = fields.String()
    format = fields.String()
    webhook_id = fields.String(metadata={"description": "Same on every attempt and replay."})
    status = fields.String(validate=validate.OneOf(DELIVERY_STATUSES))
    attempt_count = fields.Integer(attribute="attempts")
    next_attempt_at = fields.AwareDateTime(allow_none=True)
    last_status_code = fields.Integer(allow_none=True)
    last_error = fields.String(allow_none=True)
    created_at = fields.AwareDateTime()
    updated_at = fields.AwareDateTime()


class DeliveryAttemptSchema(Schema):
    attempted_at = fields.AwareDateTime()
    status_code = fields.Integer(allow_none=True)
    duration_ms = fields.Integer()
    response_excerpt = fields.String(
        allow_none=True, metadata={"description": "The first 1 KB of the response body."}
    )
    error = fields.String(allow_none=True)


class DeliveryDetailSchema(DeliverySchema):
    attempts = fields.List(fields.Nested(DeliveryAttemptSchema), attribute="attempt_log")


class DeliveryPageSchema(Schema):
    data = fields.List(fields.Nested(DeliverySchema))
    next_cursor = fields.String(allow_none=True)


class SecretSchema(Schema):
    secret = fields.String()
