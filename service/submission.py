"""The `submit` task: forward an admitted generation to Deep-Image.

It runs once the line (service/line.py) has given the generation an upstream slot. A 429 is
not a failed attempt: the generation hands its slot back and waits in the line again. Other
transient errors (5xx, timeouts) are retried with backoff while the slot is kept.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from service.blobstore import BlobError, BlobStore, TransientBlobError
from service.callbacks import callback_url
from service.completion import POLL, first_poll_delay
from service.config import Config
from service.deepimage import (
    DeepImageClient,
    PermanentUpstreamError,
    TransientUpstreamError,
    UpstreamBusy,
)
from service.domain import ErrorCode, GenerationStatus
from service.gcp_access import InputNotSignable, with_signed_inputs
from service.lifecycle import change_status, fail_generation
from service.line import SUBMIT, Line
from service.metrics import UPSTREAM_REFUSALS
from service.models import Generation, utcnow
from service.store import Store
from service.tasks import ClaimedTask, TaskQueue
from service.worker import COMPLETED, RetryableError

log = logging.getLogger("genrelay.submit")

__all__ = ["SUBMIT", "SubmitHandler"]


class SubmitHandler:
    """Sends the caller's `input` plus our callback URL to `POST /rest_api/process`."""

    def __init__(
        self,
        store: Store,
        queue: TaskQueue,
        deepimage: DeepImageClient,
        config: Config,
        line: Line,
        *,
        blobs: BlobStore | None = None,
    ) -> None:
        self.blobs = blobs
        self.store = store
        self.queue = queue
        self.deepimage = deepimage
        self.config = config
        self.line = line

    def run(self, task: ClaimedTask) -> str | None:
        assert task.generation_id is not None
        now = utcnow()
        with self.store.read() as session:
            generation = session.get(Generation, task.generation_id)
            if generation is None or generation.status != GenerationStatus.QUEUED:
                return None  # canceled, or already submitted by an earlier attempt
            if generation.admitted_at is None:
                return None  # not (or no longer) admitted: the line admits it again
            deadline = generation.deadline_at
            payload = dict(generation.input)
        if deadline is not None and deadline <= now:
            self._cancel_overdue(task)
            return None
        try:
            payload = self._signed_inputs(payload)
        except InputNotSignable as exc:
            fail_generation(self.store, task.generation_id, ErrorCode.INPUT_UNAVAILABLE, str(exc))
            return None
        except TransientBlobError as exc:
            raise RetryableError(f"signing a gs:// input: {exc.message}") from None
        except BlobError as exc:
            fail_generation(
                self.store,
                task.generation_id,
                ErrorCode.INPUT_UNAVAILABLE,
                f"a gs:// input could not be signed: {exc.message}",
            )
            return None
        if self.config.public_url:
            payload["webhooks"] = {
                "complete": callback_url(
                    self.config.public_url, self.config.callback_secret, task.generation_id
                )
            }
        try:
            job = self.deepimage.process(payload)
        except UpstreamBusy as exc:
            UPSTREAM_REFUSALS.inc()
            with self.store.transaction() as session:
                self.line.note_refused(session, task.generation_id, stated=exc.limit, now=utcnow())
                completed = self.queue.complete_in(session, task)
            log.info("Deep-Image is at its limit (429); %s waits again", task.generation_id)
            return COMPLETED if completed else None
        except TransientUpstreamError as exc:
            raise RetryableError(exc.message) from None
        except PermanentUpstreamError as exc:
            fail_generation(self.store, task.generation_id, exc.error_code, exc.message)
            return None
        now = utcnow()
        with self.store.transaction() as session:
            moved = change_status(
                session,
                task.generation_id,
                GenerationStatus.PROCESSING,
                now=now,
                upstream_job=job.job,
                submitted_at=now,
            )
            if moved:
                # The fallback for a lost callback, and the only path in polling-only mode.
                delay = first_poll_delay(self.config)
                self.queue.enqueue(
                    session, POLL, {"delay": delay}, generation_id=task.generation_id, delay=delay
                )
                self.line.note_accepted(session)
            completed = self.queue.complete_in(session, task)
        if not moved:
            # Canceled while the request was in flight (Deep-Image documents no way to cancel
            # a job: its result is ignored when it arrives), or the job's callback came first
            # and recorded the job itself (service/completion.py).
            log.info(
                "generation %s left queued before job %s was recorded", task.generation_id, job.job
            )
        return COMPLETED if completed else None

    def _signed_inputs(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload with its gs:// inputs as signed URLs (only in what goes upstream)."""
        if self.blobs is None:
            return payload
        return with_signed_inputs(
            payload, self.blobs, dt.timedelta(seconds=self.config.input_url_ttl)
        )

    def _cancel_overdue(self, task: ClaimedTask) -> None:
        assert task.generation_id is not None
        with self.store.transaction() as session:
            change_status(
                session,
                task.generation_id,
                GenerationStatus.CANCELED,
                now=utcnow(),
                error_code=ErrorCode.DEADLINE_EXCEEDED.value,
                error_message="the deadline passed before the generation could be submitted; "
                "it was never sent to Deep-Image",
            )

    def on_exhausted(self, task: ClaimedTask, error: str) -> None:
        assert task.generation_id is not None
        fail_generation(
            self.store,
            task.generation_id,
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"Deep-Image could not be reached after {task.attempts} attempts: {error}",
        )
