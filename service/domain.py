"""The generation state machine and the error codes a generation can end with."""

from __future__ import annotations

import enum

# A tenant's cap on its jobs at Deep-Image (`genrelay tenants set --max-in-flight`), and the
# most GENRELAY_UPSTREAM_CONCURRENCY takes: past it, the same as none, and a larger number
# would not fit the database's integer.
MAX_IN_FLIGHT = 100_000


class GenerationStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {GenerationStatus.SUCCEEDED, GenerationStatus.FAILED, GenerationStatus.CANCELED}
)

# Which status may follow which; `lifecycle.change_status` refuses anything else.
_TRANSITIONS: dict[GenerationStatus, frozenset[GenerationStatus]] = {
    GenerationStatus.QUEUED: frozenset(
        {GenerationStatus.PROCESSING, GenerationStatus.FAILED, GenerationStatus.CANCELED}
    ),
    GenerationStatus.PROCESSING: frozenset(
        {GenerationStatus.SUCCEEDED, GenerationStatus.FAILED, GenerationStatus.CANCELED}
    ),
}


def allowed_predecessors(new: GenerationStatus) -> frozenset[GenerationStatus]:
    """The statuses from which `new` may be reached (used in conditional UPDATEs)."""
    return frozenset(s for s, targets in _TRANSITIONS.items() if new in targets)


class ErrorCode(enum.StrEnum):
    """Machine-readable `error.code` values of a failed generation."""

    UPSTREAM_REJECTED = "upstream_rejected"  # Deep-Image answered 400 (bad input, credits...)
    UPSTREAM_AUTH = "upstream_auth"  # Deep-Image refused our API key (403/404 on auth)
    UPSTREAM_JOB_FAILED = "upstream_job_failed"  # the job ran and failed (HTTP 500 + failed)
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # transient errors outlasted every retry
    UPSTREAM_TIMEOUT = "upstream_timeout"  # no result before GENRELAY_GENERATION_TIMEOUT
    UPSTREAM_NOT_FOUND = "upstream_not_found"  # Deep-Image does not know the job (any more)
    UPSTREAM_PROTOCOL = "upstream_protocol"  # an answer outside the documented API
    RESULT_NOT_IMAGE = "result_not_image"  # the result is not a PNG, JPEG or WEBP
    RESULT_TOO_LARGE = "result_too_large"  # over GENRELAY_MAX_RESULT_BYTES
    RESULT_UNAVAILABLE = "result_unavailable"  # the result URL could not be downloaded
    STORAGE_FAILED = "storage_failed"  # GCS refused the write, or stayed unreachable
    STORAGE_CONFLICT = "storage_conflict"  # another object already has this result's name
    INPUT_UNAVAILABLE = "input_unavailable"  # a gs:// input could not be signed for Deep-Image
    DEADLINE_EXCEEDED = "deadline_exceeded"  # canceled: still waiting for a slot at its deadline
    INTERNAL = "internal"


# Outgoing notification types: one per status a generation can move into...
EVENT_FOR_STATUS: dict[GenerationStatus, str] = {
    status: f"generation.{status.value}"
    for status in GenerationStatus
    if status != GenerationStatus.QUEUED
}
GENERATION_EVENT_TYPES = tuple(EVENT_FOR_STATUS.values())
# ...and one when every item of a batch has finished (service/generations/batch_progress.py).
BATCH_COMPLETED = "batch.completed"
EVENT_TYPES = (*GENERATION_EVENT_TYPES, BATCH_COMPLETED)


class DeliveryStatus(enum.StrEnum):
    """Where a delivery (one event for one target) stands."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # final: the target refused it (4xx, not allowed)
    DEAD = "dead"  # final: the retry schedule ran out


class BatchStatus(enum.StrEnum):
    """A batch is `processing` while any of its generations is queued or processing, then
    `completed` (also when it was canceled: `canceled_at` tells)."""

    PROCESSING = "processing"
    COMPLETED = "completed"
