"""One exception hierarchy, rendered as RFC 9457 problem details by the web layer.

The service raises these; `handlers.problems` turns every one of them (and every HTTP error
Flask or webargs raises) into a single `application/problem+json` shape.
"""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://genrelay.dev/problems/"


class ServiceError(Exception):
    """Base of every error the API reports to a client."""

    status = 500
    slug = "internal"
    title = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug


class InvalidRequest(ServiceError):
    status = 422
    slug = "invalid-request"
    title = "The request has invalid fields"


class Unauthorized(ServiceError):
    status = 401
    slug = "unauthorized"
    title = "Authentication required"


class Forbidden(ServiceError):
    status = 403
    slug = "forbidden"
    title = "Not allowed"


class Unavailable(ServiceError):
    status = 503
    slug = "unavailable"
    title = "Temporarily unavailable"


class NotFound(ServiceError):
    status = 404
    slug = "not-found"
    title = "Not found"


class Conflict(ServiceError):
    status = 409
    slug = "conflict"
    title = "Conflict with the current state"


class IdempotencyKeyReused(ServiceError):
    status = 422
    slug = "idempotency-key-reused"
    title = "Idempotency-Key was used with a different request body"


class RateLimited(ServiceError):
    status = 429
    slug = "rate-limited"
    title = "Too many requests for this API key"


class UnsupportedContentCoding(ServiceError):
    status = 415
    slug = "unsupported-content-coding"
    title = "Unsupported Media Type"


def require_identity_coding(content_encoding: str | None) -> None:
    """Refuse a body sent with a content coding (gzip, br...): genrelay decodes none, and
    reading a coded body as it is would call it invalid JSON, or take a `br` label over plain
    JSON silently. RFC 9110 §15.5.16: a 415 with `Accept-Encoding` saying what is taken."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    unsupported = [c for c in codings if c not in ("", "identity")]
    if unsupported:
        raise UnsupportedContentCoding(
            f"Content-Encoding {', '.join(unsupported)} is not supported: only identity "
            "(no Content-Encoding) is taken; send the body uncompressed",
            headers={"Accept-Encoding": "identity"},
        )


class ClientTooSlow(TimeoutError):
    """The client did not send its request in time (service/server/gunicorn_worker.py); 408."""


class TransientError(Exception):
    """A failure that may pass (a network error, a 5xx, a timeout): worth trying again later.

    The one base of the adapters' transient errors (Deep-Image's, the blob store's, a result
    download's); a task that raises it is retried on its kind's policy.
    """

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
