"""/v1/subscriptions and /v1/webhooks/default/secret."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from handlers.auth import require_tenant, services, tenant_id
from handlers.problems import StrictJSONParser, require_json_body
from schemas.notifications import (
    DeliverySchema,
    PageArgsSchema,
    SecretSchema,
    SubscriptionCreateSchema,
    SubscriptionPageSchema,
    SubscriptionSchema,
    SubscriptionUpdateSchema,
    SubscriptionWithSecretSchema,
)
from schemas.problems import ProblemSchema

blp = Blueprint(
    "subscriptions",
    __name__,
    url_prefix="/v1/subscriptions",
    description="Where notifications of state changes are sent, and how they are signed.",
)
blp.ARGUMENTS_PARSER = StrictJSONParser()
blp.before_request(require_tenant)
blp.before_request(require_json_body)

webhooks_blp = Blueprint(
    "webhooks",
    __name__,
    url_prefix="/v1/webhooks",
    description="The secret that signs notifications to per-request `webhook` URLs.",
)
webhooks_blp.before_request(require_tenant)


@blp.route("", methods=["POST"])
@blp.arguments(SubscriptionCreateSchema)
@blp.response(201, SubscriptionWithSecretSchema)
@blp.alt_response(422, schema=ProblemSchema)
def create_subscription(body: dict[str, Any]) -> Any:
    """Subscribe a URL; its `whsec_` secret is in this response only."""
    return services().notifications.create_subscription(tenant_id(), **body)


@blp.route("", methods=["GET"])
@blp.arguments(PageArgsSchema, location="query", as_kwargs=True)
@blp.response(200, SubscriptionPageSchema)
def list_subscriptions(**args: Any) -> Any:
    page = services().notifications.list_subscriptions(tenant_id(), **args)
    return {"data": page.items, "next_cursor": page.next_cursor}


@blp.route("/<string:subscription_id>", methods=["GET"])
@blp.response(200, SubscriptionSchema)
@blp.alt_response(404, schema=ProblemSchema)
def get_subscription(subscription_id: str) -> Any:
    return services().notifications.get_subscription(tenant_id(), subscription_id)


@blp.route("/<string:subscription_id>", methods=["PATCH"])
@blp.arguments(SubscriptionUpdateSchema)
@blp.response(200, SubscriptionSchema)
@blp.alt_response(404, schema=ProblemSchema)
def update_subscription(changes: dict[str, Any], subscription_id: str) -> Any:
    """Change it; `enabled: true` turns a disabled subscription back on."""
    return services().notifications.update_subscription(tenant_id(), subscription_id, changes)


@blp.route("/<string:subscription_id>", methods=["DELETE"])
@blp.response(204)
@blp.alt_response(404, schema=ProblemSchema)
def delete_subscription(subscription_id: str) -> Any:
    services().notifications.delete_subscription(tenant_id(), subscription_id)
    return None


@blp.route("/<string:subscription_id>/rotate-secret", methods=["POST"])
@blp.response(200, SubscriptionWithSecretSchema)
@blp.alt_response(404, schema=ProblemSchema)
def rotate_secret(subscription_id: str) -> Any:
    """A new secret; the old one keeps signing beside it for 24 hours, as does every secret
    replaced in the 24 hours before."""
    return services().notifications.rotate_secret(tenant_id(), subscription_id)


@blp.route("/<string:subscription_id>/test", methods=["POST"])
@blp.response(202, DeliverySchema)
@blp.alt_response(404, schema=ProblemSchema)
def send_test(subscription_id: str) -> Any:
    """Send a `ping` to the subscription; follow it in the delivery log."""
    return services().notifications.send_test(tenant_id(), subscription_id)


@webhooks_blp.route("/default/secret", methods=["GET"])
@webhooks_blp.response(200, SecretSchema)
def default_secret() -> Any:
    """The secret signing deliveries to generations' own `webhook` URLs."""
    return {"secret": services().notifications.default_webhook_secret(tenant_id())}
