"""Bearer API-key authentication for the /v1 resources."""

from __future__ import annotations

import flask

from service.bootstrap import Services
from service.errors import Unauthorized


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
    tenant_id = services().api_keys.tenant_for(key.strip())
    if tenant_id is None:
        raise Unauthorized("the API key is not valid")
    flask.g.tenant_id = tenant_id


def tenant_id() -> str:
    return flask.g.tenant_id
