"""Bearer API-key authentication for the /v1 resources."""

from __future__ import annotations

import math

import flask

from service.auth import hash_api_key
from service.bootstrap import Services
from service.errors import RateLimited, Unauthorized


def services() -> Services:
    """The service graph of the running app."""
    return flask.current_app.extensions["genrelay"]


def require_tenant() -> None:
    """before_request hook: resolve `Authorization: Bearer <key>` to `g.tenant_id`."""
    if flask.request.method == "OPTIONS":
        return
    header = flask.request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
    key = key.strip()
    tenant_id = services().api_keys.tenant_for(key)
    if tenant_id is None:
        raise Unauthorized("the API key is not valid")
    wait = services().rate_limiter.retry_after(hash_api_key(key))
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        raise RateLimited(
            f"over {services().rate_limiter.rate:g} requests per second for this key; "
            f"retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )
    flask.g.tenant_id = tenant_id


def tenant_id() -> str:
    return flask.g.tenant_id
