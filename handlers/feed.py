"""/v1/events and /v1/deliveries: catch up on notifications, inspect and replay deliveries."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from handlers.auth import require_tenant, services, tenant_id
from handlers.problems import StrictJSONParser, require_json_body
from schemas.notifications import (
    DeliveryDetailSchema,
    DeliveryListArgsSchema,
    DeliveryPageSchema,
    DeliverySchema,
    EventListArgsSchema,
    EventPageSchema,
    EventSchema,
)
from schemas.problems import ProblemSchema

events_blp = Blueprint(
    "events",
    __name__,
    url_prefix="/v1/events",
    description="Every state change, newest first, for catching up on missed notifications.",
)
events_blp.ARGUMENTS_PARSER = StrictJSONParser()
events_blp.before_request(require_tenant)

deliveries_blp = Blueprint(
    "deliveries",
    __name__,
    url_prefix="/v1/deliveries",
    description="Each notification sent to each target, with every attempt.",
)
deliveries_blp.ARGUMENTS_PARSER = StrictJSONParser()
deliveries_blp.before_request(require_tenant)
deliveries_blp.before_request(require_json_body)


@events_blp.route("", methods=["GET"])
@events_blp.arguments(EventListArgsSchema, location="query", as_kwargs=True)
@events_blp.response(200, EventPageSchema)
def list_events(**args: Any) -> Any:
    page = services().notifications.list_events(tenant_id(), **args)
    return {"data": page.items, "next_cursor": page.next_cursor}


@events_blp.route("/<string:event_id>", methods=["GET"])
@events_blp.response(200, EventSchema)
@events_blp.alt_response(404, schema=ProblemSchema)
def get_event(event_id: str) -> Any:
    return services().notifications.get_event(tenant_id(), event_id)


@deliveries_blp.route("", methods=["GET"])
@deliveries_blp.arguments(DeliveryListArgsSchema, location="query", as_kwargs=True)
@deliveries_blp.response(200, DeliveryPageSchema)
def list_deliveries(**args: Any) -> Any:
    page = services().notifications.list_deliveries(tenant_id(), **args)
    return {"data": page.items, "next_cursor": page.next_cursor}


@deliveries_blp.route("/<string:delivery_id>", methods=["GET"])
@deliveries_blp.response(200, DeliveryDetailSchema)
@deliveries_blp.alt_response(404, schema=ProblemSchema)
def get_delivery(delivery_id: str) -> Any:
    return services().notifications.get_delivery(tenant_id(), delivery_id)


@deliveries_blp.route("/<string:delivery_id>/retry", methods=["POST"])
@deliveries_blp.response(202, DeliverySchema)
@deliveries_blp.alt_response(404, schema=ProblemSchema)
@deliveries_blp.alt_response(
    409, schema=ProblemSchema, description="Its subscription is disabled or deleted"
)
def retry_delivery(delivery_id: str) -> Any:
    """Send it again now, as one more attempt with the same webhook-id.

    If it fails, a delivery still on its retry schedule stays `pending` for the attempts it
    has left; any other is `dead` (or `failed` after a final answer such as a 4xx).
    """
    return services().notifications.retry_delivery(tenant_id(), delivery_id)
