"""Per-request log context (request id, Cloud trace) and HTTP latency metrics."""

from __future__ import annotations

import re
import time
import uuid

import flask

from service.logs import pop_context, push_context, trace_from_header
from service.metrics import HTTP_LATENCY

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")

# Every label of the HTTP histogram comes from a fixed set: anyone can send any method to any
# path, and each new label combination would be a new series (unbounded memory in every
# process and in the scraper).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
KNOWN_STATUSES = frozenset(
    {
        200,
        201,
        202,
        204,
        301,
        302,
        304,
        400,
        401,
        403,
        404,
        405,
        408,
        409,
        410,
        413,
        415,
        422,
        429,
        500,
        501,
        502,
        503,
        504,
    }
)


def metric_labels(method: str, rule: str | None, status: int) -> tuple[str, str, str]:
    """(method, route, status) for the HTTP histogram, each from a bounded set."""
    return (
        method if method in KNOWN_METHODS else "other",
        rule if rule is not None else "unmatched",  # the app's routes are a fixed set
        str(status) if status in KNOWN_STATUSES else f"{status // 100}xx",
    )


def register_observability(app: flask.Flask, gcp_project: str | None) -> None:
    """Hooks that open and close each request's context."""

    @app.before_request
    def _open() -> None:
        given = flask.request.headers.get("X-Request-Id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        view_args = flask.request.view_args or {}
        flask.g.request_id = request_id
        flask.g.started = time.perf_counter()
        flask.g.log_token = push_context(
            request_id=request_id,
            trace=trace_from_header(
                flask.request.headers.get("X-Cloud-Trace-Context"), gcp_project
            ),
            generation_id=view_args.get("generation_id"),
        )

    @app.after_request
    def _close(response: flask.Response) -> flask.Response:
        response.headers["X-Request-Id"] = flask.g.get("request_id", "")
        started = flask.g.get("started")
        if started is not None:
            rule = flask.request.url_rule
            HTTP_LATENCY.labels(
                *metric_labels(
                    flask.request.method, rule.rule if rule else None, response.status_code
                )
            ).observe(time.perf_counter() - started)
        return response

    @app.teardown_request
    def _teardown(_error: BaseException | None) -> None:
        token = flask.g.pop("log_token", None)
        if token is not None:
            pop_context(token)
