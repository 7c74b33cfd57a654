"""Errors the simulated API answers with, in Deep-Image's own JSON shape.

Deep-Image error bodies are ``{"message": ...}``, sometimes with ``"code"`` and, for failed jobs,
``"status"`` and ``"job"`` (reference section 4). One exception type carries all of them so every
handler answers through the same path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FAILURE_MESSAGE = (
    "We have encountered some technical issues while processing the image. "
    "No credits were lost. Please try again."
)
RATE_LIMIT_MESSAGE = (
    "Image cannot be processed right now. Your rate limit is {limit} and you are currently "
    "processing {active} images."
)

# Deep-Image documents the first sentence; the second is in its docs with DATE left open, so
# its format here (ISO 8601, UTC) is the simulator's own choice.
NO_MORE_REQUESTS_MESSAGE = "No more requests are available. Next requests available {date}"


class SimulatorError(Exception):
    """An HTTP error answer of the simulated API."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """The JSON body Deep-Image would send."""
        body: dict[str, Any] = {"message": self.message}
        if self.code is not None:
            body["code"] = self.code
        body.update(self.extra)
        return body


def bad_request(message: str) -> SimulatorError:
    """A 400 BAD_REQUEST error, the code Deep-Image uses for invalid input."""
    return SimulatorError(400, message, "BAD_REQUEST")


def too_many_requests(limit: int, active: int) -> SimulatorError:
    """The documented 429 for the concurrency limit (no Retry-After is ever sent)."""
    return SimulatorError(
        429, RATE_LIMIT_MESSAGE.format(limit=limit, active=active), "TOO_MANY_REQUESTS"
    )


def no_more_requests(available_at: str) -> SimulatorError:
    """The documented 403 of an account whose requests have run out until `available_at`."""
    return SimulatorError(403, NO_MORE_REQUESTS_MESSAGE.format(date=available_at))


def job_failed(job_id: str) -> SimulatorError:
    """The documented 500 body of a failed job."""
    return SimulatorError(500, FAILURE_MESSAGE, extra={"status": "failed", "job": job_id})


def job_not_found() -> SimulatorError:
    """404 for an unknown job (or a job of another API key)."""
    return SimulatorError(404, "Job not found")


def image_deleted() -> SimulatorError:
    """404 for a job whose result was deleted."""
    return SimulatorError(404, "Image deleted", extra={"status": "complete"})
