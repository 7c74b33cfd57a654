"""Liveness and readiness probes."""

from __future__ import annotations

import hmac
import threading
import time
from typing import Any

import flask
from flask_smorest import Blueprint

from handlers.auth import services
from handlers.problems import problem_response
from schemas.problems import ProblemSchema
from service.adapters.blobstore import BlobError
from service.errors import Unauthorized
from service.metrics import exposition
from service.migrate import migrated

blp = Blueprint("health", __name__, description="Probes for the platform.")

# The bucket check is a billed GCS list operation, and /readyz is public: its answer (either
# way) is reused for this long, per app.
BUCKET_CHECK_SECONDS = 5.0
_clock = time.monotonic
_check_lock = threading.Lock()

_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}


@blp.route("/healthz", methods=["GET"])
@blp.doc(security=[])
@blp.alt_response(200, schema=_STATUS, success=True, description="Alive")
def healthz() -> Any:
    """The process is alive."""
    return {"status": "ok"}


@blp.route("/metrics", methods=["GET"])
# The metrics token, not an API key, and only when GENRELAY_METRICS_TOKEN is set: optional.
@blp.doc(security=[{"metricsToken": []}, {}])
@blp.alt_response(200, schema={"type": "string"}, content_type="text/plain", success=True)
@blp.alt_response(401, schema=ProblemSchema, description="The metrics token is set, not sent")
def metrics() -> Any:
    """Prometheus metrics (text exposition format); needs the metrics token when one is set."""
    token = services().config.metrics_token
    if token is not None:
        given = flask.request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("send the metrics token as 'Authorization: Bearer <token>'")
    text, content_type = exposition(services().store)
    return flask.Response(
        text, mimetype=content_type.split(";")[0], headers={"Content-Type": content_type}
    )


@blp.route("/readyz", methods=["GET"])
@blp.doc(security=[])
@blp.alt_response(200, schema=_STATUS, success=True, description="Ready")
@blp.alt_response(503, schema=ProblemSchema, description="The database or the bucket is down")
def readyz() -> Any:
    """The database answers and is migrated, and the bucket answers; 503 otherwise."""
    try:
        with services().store.read_one() as connection:
            up_to_date = migrated(connection)
    except Exception:
        return problem_response(503, "Service Unavailable", "the database is not reachable")
    if not up_to_date:
        # Every API call would fail: not ready, and saying why (not a database outage).
        detail = "the database is not migrated to this release: run `genrelay migrate`"
        return problem_response(503, "Service Unavailable", detail)
    if not _bucket_reachable():
        return problem_response(503, "Service Unavailable", "the result bucket is not reachable")
    return {"status": "ready"}


def _bucket_reachable() -> bool:
    """The bucket check's outcome, at most BUCKET_CHECK_SECONDS old."""
    cache = flask.current_app.extensions.setdefault("genrelay_bucket_check", {})
    with _check_lock:  # concurrent probes wait for one check rather than each making one
        checked_at = cache.get("at")
        if checked_at is None or _clock() - checked_at >= BUCKET_CHECK_SECONDS:
            try:
                services().blobs.check()
                cache["ok"] = True
            except BlobError:
                cache["ok"] = False
            cache["at"] = _clock()
        return bool(cache["ok"])
