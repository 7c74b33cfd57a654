"""Schemas of /v1/triggers: triggers, their pushes' events, and the push answer."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from schemas.deepimage import StrictBoolean
from service.generations.triggers import SOURCES

EVENT_STATUSES = ("accepted", "rejected", "skipped")
MAX_PUSH_ACCOUNTS = 20
# A generation takes 50 metadata keys; a trigger adds `trigger` and `object`.
MAX_TRIGGER_METADATA_KEYS = 48


def _few_keys(value: dict[str, Any]) -> None:
    if len(value) > MAX_TRIGGER_METADATA_KEYS:
        raise ValidationError(f"At most {MAX_TRIGGER_METADATA_KEYS} keys of your own.")


class _TriggerFields(Schema):
    class Meta:
        unknown = RAISE

    bucket = fields.String(
        validate=validate.Length(min=3, max=222),
        allow_none=True,
        metadata={
            "description": "The GCS bucket whose new objects start generations (required for "
            "source gcs; for pubsub, GCS notifications from other buckets are skipped). It "
            "must be on the tenant's input buckets."
        },
    )
    name_prefix = fields.String(
        validate=validate.Length(max=1024),
        metadata={"description": "Only objects whose name starts with this."},
    )
    name_suffix = fields.String(
        validate=validate.Length(max=1024),
        metadata={"description": "Only objects whose name ends with this (e.g. .png)."},
    )
    input = fields.Dict(
        metadata={
            "description": "The Deep-Image request template; the object goes in `url` "
            "(a message's own `input` is merged over it)."
        }
    )
    metadata = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=40)),
        values=fields.String(validate=validate.Length(max=500)),
        # Not validate.Length: it is documented as maxLength, which means nothing for an object.
        validate=_few_keys,
        metadata={
            "description": "Copied to every generation, with `trigger` and `object` added "
            f"(so at most {MAX_TRIGGER_METADATA_KEYS} keys of your own).",
            "maxProperties": MAX_TRIGGER_METADATA_KEYS,
        },
    )
    webhook = fields.Url(
        schemes={"http", "https"},
        require_tld=False,
        allow_none=True,
        validate=validate.Length(max=2048),
        metadata={"description": "Where the generations' notifications go."},
    )
    push_accounts = fields.List(
        fields.Email(validate=validate.Length(max=320)),
        validate=validate.Length(min=1, max=MAX_PUSH_ACCOUNTS),
        metadata={
            "description": "Service accounts (emails) whose Google-signed ID tokens may push: "
            "the Eventarc trigger's or the push subscription's service account."
        },
    )
    enabled = StrictBoolean()
    description = fields.String(validate=validate.Length(max=500))


class TriggerCreateSchema(_TriggerFields):
    """Body of `POST /v1/triggers`."""

    source = fields.String(
        required=True,
        validate=validate.OneOf(SOURCES),
        metadata={
            "description": "gcs: Eventarc CloudEvents of finalized objects; pubsub: a Pub/Sub "
            "push subscription (GCS notifications or generation requests)."
        },
    )
    push_accounts = fields.List(
        fields.Email(validate=validate.Length(max=320)),
        required=True,
        validate=validate.Length(min=1, max=MAX_PUSH_ACCOUNTS),
        metadata={"description": "Service accounts (emails) allowed to push."},
    )


class TriggerUpdateSchema(_TriggerFields):
    """Body of `PATCH /v1/triggers/{id}`: any of the fields but `source`."""

    class Meta(_TriggerFields.Meta):
        openapi = {"minProperties": 1}

    @validates_schema
    def _something(self, data: dict[str, Any], **_: Any) -> None:
        if not data:
            raise ValidationError("Give at least one field to change.")


class TriggerSchema(Schema):
    """The trigger resource."""

    id = fields.String()
    source = fields.String()
    bucket = fields.String(allow_none=True)
    name_prefix = fields.String()
    name_suffix = fields.String()
    input = fields.Dict(attribute="template")
    metadata = fields.Dict(attribute="meta")
    webhook = fields.String(allow_none=True)
    push_accounts = fields.List(fields.String())
    enabled = fields.Boolean()
    description = fields.String()
    push_url = fields.String(
        metadata={"description": "Give this to Eventarc or the push subscription."}
    )
    audience = fields.String(
        metadata={"description": "The audience the push's ID token must name."}
    )
    created_at = fields.AwareDateTime()
    updated_at = fields.AwareDateTime()
    links = fields.Method("_links")

    def _links(self, trigger: Any) -> dict[str, str]:
        base = f"/v1/triggers/{trigger.id}"
        return {"self": base, "events": base + "/events", "push": base + "/push"}


class TriggerPageSchema(Schema):
    data = fields.List(fields.Nested(TriggerSchema))
    next_cursor = fields.String(allow_none=True)


class TriggerListArgsSchema(Schema):
    class Meta:
        unknown = RAISE

    cursor = fields.String(validate=validate.Length(max=500))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100), strict=False)


class TriggerEventListArgsSchema(TriggerListArgsSchema):
    status = fields.String(validate=validate.OneOf(EVENT_STATUSES))


class TriggerEventSchema(Schema):
    """One push, recorded once per event id."""

    id = fields.String()
    trigger_id = fields.String()
    event_id = fields.String(
        metadata={"description": "The CloudEvent's ce-id or the Pub/Sub messageId."}
    )
    kind = fields.String(
        metadata={"description": "cloudevent, gcs_notification, message or malformed."}
    )
    status = fields.String(
        metadata={
            "description": "accepted (made generation_id), rejected (can never make one: "
            "reason), skipped (filtered out)."
        }
    )
    reason = fields.String(allow_none=True)
    subject = fields.String(allow_none=True, metadata={"description": "gs://bucket/object"})
    generation_id = fields.String(allow_none=True)
    received_at = fields.AwareDateTime(attribute="created_at")


class TriggerEventPageSchema(Schema):
    data = fields.List(fields.Nested(TriggerEventSchema))
    next_cursor = fields.String(allow_none=True)


class PushAnswerSchema(Schema):
    """The answer to a push: 200 whenever it was recorded (the sender must not redeliver)."""

    duplicate = fields.Boolean(
        metadata={"description": "The event had been pushed before; nothing new was made."}
    )
    event = fields.Nested(TriggerEventSchema)
