"""/v1/triggers: GCS and Pub/Sub triggers (API key), and their push endpoint (Google ID token)."""

from __future__ import annotations

from typing import Any

import flask
from flask_smorest import Blueprint

from handlers.auth import require_tenant, services, tenant_id
from handlers.problems import StrictJSONParser, require_json_body
from schemas.problems import ProblemSchema
from schemas.triggers import (
    PushAnswerSchema,
    TriggerCreateSchema,
    TriggerEventListArgsSchema,
    TriggerEventPageSchema,
    TriggerListArgsSchema,
    TriggerPageSchema,
    TriggerSchema,
    TriggerUpdateSchema,
)
from service.models import Trigger

blp = Blueprint(
    "triggers",
    __name__,
    url_prefix="/v1/triggers",
    description="GCS object notifications (Eventarc) and Pub/Sub messages that start generations.",
)
blp.ARGUMENTS_PARSER = StrictJSONParser()
blp.before_request(require_tenant)
blp.before_request(require_json_body)

push_blp = Blueprint(
    "trigger_pushes",
    __name__,
    url_prefix="/v1/triggers",
    description="Where Eventarc and Pub/Sub push (authenticated by a Google-signed ID token).",
)


def _shown(trigger: Trigger) -> Trigger:
    """The trigger with its push URL and audience (not stored: they follow the config)."""
    triggers = services().triggers
    base = flask.request.host_url
    trigger.push_url = triggers.push_url(trigger.id, base)  # type: ignore[attr-defined]
    trigger.audience = triggers.audience(trigger.id, base)  # type: ignore[attr-defined]
    return trigger


@blp.route("", methods=["POST"])
@blp.arguments(TriggerCreateSchema)
@blp.response(201, TriggerSchema)
@blp.alt_response(422, schema=ProblemSchema, description="Invalid fields, or a bucket not allowed")
def create_trigger(body: dict[str, Any]) -> Any:
    """Create a trigger; the answer has the push URL to give Eventarc or Pub/Sub."""
    trigger = services().triggers.create(tenant_id(), body)
    return _shown(trigger), 201, {"Location": f"/v1/triggers/{trigger.id}"}


@blp.route("", methods=["GET"])
@blp.arguments(TriggerListArgsSchema, location="query", as_kwargs=True)
@blp.response(200, TriggerPageSchema)
def list_triggers(**args: Any) -> Any:
    """This tenant's triggers, newest first."""
    page = services().triggers.list(tenant_id(), **args)
    return {"data": [_shown(t) for t in page.items], "next_cursor": page.next_cursor}


@blp.route("/<string:trigger_id>", methods=["GET"])
@blp.response(200, TriggerSchema)
@blp.alt_response(404, schema=ProblemSchema)
def get_trigger(trigger_id: str) -> Any:
    """One trigger."""
    return _shown(services().triggers.get(tenant_id(), trigger_id))


@blp.route("/<string:trigger_id>", methods=["PATCH"])
@blp.arguments(TriggerUpdateSchema)
@blp.response(200, TriggerSchema)
@blp.alt_response(404, schema=ProblemSchema)
def update_trigger(changes: dict[str, Any], trigger_id: str) -> Any:
    """Change a trigger (`enabled: false` acknowledges pushes and records them as rejected)."""
    return _shown(services().triggers.update(tenant_id(), trigger_id, changes))


@blp.route("/<string:trigger_id>", methods=["DELETE"])
@blp.response(204)
@blp.alt_response(404, schema=ProblemSchema)
def delete_trigger(trigger_id: str) -> Any:
    """Delete a trigger and its events (delete the Eventarc trigger or subscription too)."""
    services().triggers.delete(tenant_id(), trigger_id)
    return ""


@blp.route("/<string:trigger_id>/events", methods=["GET"])
@blp.arguments(TriggerEventListArgsSchema, location="query", as_kwargs=True)
@blp.response(200, TriggerEventPageSchema)
@blp.alt_response(404, schema=ProblemSchema)
def list_trigger_events(trigger_id: str, **args: Any) -> Any:
    """Every push the trigger received (once per event id), newest first."""
    page = services().triggers.events(tenant_id(), trigger_id, **args)
    return {"data": page.items, "next_cursor": page.next_cursor}


@push_blp.route("/<string:trigger_id>/push", methods=["POST"])
@push_blp.doc(
    security=[{"googleIdToken": []}],
    requestBody={
        "description": "An Eventarc CloudEvent in binary content mode (ce-* headers, the "
        "object's JSON as the body) or a Pub/Sub push envelope {message, subscription}.",
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
)
@push_blp.response(200, PushAnswerSchema)
@push_blp.alt_response(401, schema=ProblemSchema, description="Bad, expired or foreign token")
@push_blp.alt_response(403, schema=ProblemSchema, description="Account not on push_accounts")
@push_blp.alt_response(404, schema=ProblemSchema, description="No such trigger")
@push_blp.alt_response(
    415, schema=ProblemSchema, description="A Content-Encoding (the body is not read)"
)
@push_blp.alt_response(503, schema=ProblemSchema, description="Try again (redelivered)")
def push(trigger_id: str) -> Any:
    """Receive one event; 200 once it is recorded, whatever became of it."""
    outcome = services().triggers.push(
        trigger_id,
        headers={name.lower(): value for name, value in flask.request.headers.items()},
        # Read only once the push is authenticated.
        read_body=lambda: flask.request.get_data(cache=False),
        base_url=flask.request.host_url,
    )
    return {"duplicate": outcome.duplicate, "event": outcome.event}
