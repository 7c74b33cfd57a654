"""Bearer API-key authentication for the /v1 resources."""

from __future__ import annotations

import contextlib
import ipaddress
import math

import flask

from service.auth import hash_api_key
from service.bootstrap import Services
from service.errors import RateLimited, Unauthorized
from service.tenants import TenantSettings


def services() -> Services:
    """The service graph of the running app."""
    return flask.current_app.extensions["genrelay"]


def client_address(request: flask.Request, trusted_proxies: int) -> str:
    """Who is calling: the X-Forwarded-For entry `trusted_proxies` from its end (each proxy
    in front appends the address it was reached from, Cloud Run's front end one, so a client
    can forge only the entries before), else the connection's peer. A client reaching
    gunicorn directly writes the whole header: `trusted_proxies` 0 ignores it. An entry that
    is not an IP address is not taken either (it would be any text a client likes, kept as a
    key of the limiter's table)."""
    if trusted_proxies > 0:
        entries = request.headers.get("X-Forwarded-For", "").split(",")
        if len(entries) >= trusted_proxies:
            with contextlib.suppress(ValueError):
                return str(ipaddress.ip_address(entries[-trusted_proxies].strip()))
    return request.remote_addr or "unknown"


def require_tenant() -> None:
    """before_request hook: resolve `Authorization: Bearer <key>` to its tenant (`tenant()`)."""
    if flask.request.method == "OPTIONS":
        return
    header = flask.request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
    key = key.strip()
    key_hash = hash_api_key(key)
    bad_keys = services().bad_keys
    address = client_address(flask.request, services().config.trusted_proxies)
    wait = bad_keys.refuse(address, key_hash)
    if wait is not None:  # before the database: invalid keys cost a lookup each
        seconds = max(1, math.ceil(wait))
        raise RateLimited(
            f"too many invalid API keys from this address; retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )
    hold_connection()
    tenant = services().api_keys.tenant_for(key)
    if tenant is None:
        bad_keys.failed(address, key_hash)
        raise Unauthorized("the API key is not valid")
    bad_keys.succeeded(key_hash)
    wait = services().rate_limiter.retry_after(key_hash)
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        raise RateLimited(
            f"over {services().rate_limiter.rate:g} requests per second for this key; "
            f"retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )
    flask.g.tenant = tenant


def hold_connection() -> None:
    """The request's statements, from the key lookup on, share one pooled connection (one
    checkout, so one pre-ping on PostgreSQL); `release_connection` gives it back."""
    held = contextlib.ExitStack()
    held.enter_context(services().store.reusing_connection())
    flask.g.held_connection = held


def release_connection(_error: BaseException | None) -> None:
    """teardown_request hook: the end of `hold_connection`."""
    held = flask.g.pop("held_connection", None)
    if held is not None:
        held.close()


def tenant() -> TenantSettings:
    """The calling tenant, with its settings as the key lookup read them."""
    return flask.g.tenant


def tenant_id() -> str:
    return tenant().id
