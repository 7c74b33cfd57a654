"""The `submit` task: forward an admitted generation to Deep-Image.

It runs once the line (service/generations/line.py) has given the generation an upstream slot. A
429 is
not a failed attempt: the generation hands its slot back and waits in the line again. Other
transient errors (5xx, timeouts) are raised to the runner, which retries the task on the
`submit` policy while the slot is kept.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.adapters.blobstore import BlobError, BlobStore, TransientBlobError
from service.adapters.deepimage import DeepImageClient, PermanentUpstreamError, UpstreamBusy
from service.config import Config
from service.database import Store
from service.domain import ErrorCode, GenerationStatus
from service.generations.callback_urls import callback_url
from service.generations.inputs import InputNotSignable, with_signed_inputs
from service.generations.lifecycle import change_status, failing
from service.generations.line import Line
from service.generations.poll import first_poll_delay
from service.metrics import UPSTREAM_REFUSALS
from service.models import Batch, Generation, utcnow
from service.runtime.kinds import POLL
from service.runtime.outcomes import DONE, Apply, Done, Failed, Next, Outcome
from service.runtime.queue import ClaimedTask, TaskQueue

log = logging.getLogger("genrelay.submit")


class Submission(NamedTuple):
    """What a submission needs of its generation. Intake, which has just stored it, hands it
    to its inline attempt (`ClaimedTask.known`); a worker's attempt reads it (`_READ`)."""

    status: str
    admitted_at: dt.datetime | None
    deadline_at: dt.datetime | None
    input: dict[str, Any]
    # An item of a batch being canceled: its cancel may not have reached it yet.
    batch_canceled: bool = False


_READ = sa.select(
    Generation.status,
    Generation.admitted_at,
    Generation.deadline_at,
    Generation.input,
    sa.exists()
    .where(Batch.id == Generation.batch_id, Batch.canceled_at.is_not(None))
    .label("batch_canceled"),
).where(Generation.id == sa.bindparam("generation_id"))


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

    def run(self, task: ClaimedTask) -> Outcome:
        generation_id = task.generation_id
        assert generation_id is not None
        now = utcnow()
        generation = task.known
        if generation is None:
            with self.store.read_one() as connection:
                generation = connection.execute(_READ, {"generation_id": generation_id}).first()
        if generation is None or generation.status != GenerationStatus.QUEUED:
            return DONE  # canceled, or already submitted by an earlier attempt
        if generation.admitted_at is None:
            return DONE  # not (or no longer) admitted: the line admits it again
        if generation.batch_canceled:
            # The batch's cancel goes through its items a chunk at a time; one admitted
            # before its turn is canceled here rather than sent (and paid for).
            return Done(lambda session: _cancel_with_batch(session, generation_id))
        deadline = generation.deadline_at
        payload = dict(generation.input)
        if deadline is not None and deadline <= now:
            return Done(lambda session: _cancel_overdue(session, generation_id))
        try:
            payload = self._signed_inputs(payload)
        except InputNotSignable as exc:
            return Done(failing(generation_id, ErrorCode.INPUT_UNAVAILABLE, str(exc)))
        except TransientBlobError as exc:
            return Failed(f"signing a gs:// input: {exc.message}")  # the task's, not shown
        except BlobError as exc:
            log.error("signing a gs:// input of %s failed: %s", generation_id, exc.message)
            message = "a gs:// input could not be signed; the operator's logs say why"
            return Done(failing(generation_id, ErrorCode.INPUT_UNAVAILABLE, message))
        if self.config.public_url:
            payload["webhooks"] = {
                "complete": callback_url(
                    self.config.public_url, self.config.callback_secret, generation_id
                )
            }
        try:
            job = self.deepimage.process(payload)
        except UpstreamBusy as busy:
            UPSTREAM_REFUSALS.inc()
            log.info("Deep-Image is at its limit (429); %s waits again", generation_id)
            stated = busy.limit
            return Done(
                lambda session: self.line.note_refused(
                    session, generation_id, stated=stated, now=utcnow()
                )
            )
        except PermanentUpstreamError as exc:
            return Done(failing(generation_id, exc.error_code, exc.message))
        return Done(lambda session: self._record_job(session, generation_id, job.job))

    def _record_job(self, session: Session, generation_id: str, job: str) -> Next | None:
        now = utcnow()
        moved = change_status(
            session,
            generation_id,
            GenerationStatus.PROCESSING,
            now=now,
            upstream_job=job,
            submitted_at=now,
        )
        if moved:
            self.line.note_accepted(session)
        elif _keep_canceled_job(session, generation_id, job, now):
            # Canceled while the request was in flight. Deep-Image documents no way to cancel
            # a job: it runs on, and its result is ignored when it arrives. Recorded, it holds
            # the account's slot again until it ends, as any canceled job does.
            log.info("generation %s was canceled while job %s was created", generation_id, job)
        else:
            # The job's callback came first and recorded the job itself
            # (service/generations/completion.py).
            log.info("generation %s left queued before job %s was recorded", generation_id, job)
            return None
        # The task goes on as the job's poll: the fallback for a lost callback, the only path
        # in polling-only mode, and for a canceled job, how its end is learned.
        delay = first_poll_delay(self.config)
        return Next(POLL, {"delay": delay}, delay)

    def _signed_inputs(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload with its gs:// inputs as signed URLs (only in what goes upstream)."""
        if self.blobs is None:
            return payload
        return with_signed_inputs(
            payload, self.blobs, dt.timedelta(seconds=self.config.input_url_ttl)
        )

    def on_exhausted(self, task: ClaimedTask, error: str) -> Apply:
        assert task.generation_id is not None
        # `error` may be an internal error's text: it stays in the task's last_error.
        return failing(
            task.generation_id,
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"Deep-Image could not be reached after {task.attempts} attempts",
        )


def _keep_canceled_job(session: Session, generation_id: str, job: str, now: dt.datetime) -> bool:
    """Record the job of a generation canceled while it was being created; False if the
    generation is not such a one."""
    kept = session.execute(
        sa.update(Generation)
        .where(
            Generation.id == generation_id,
            Generation.status == GenerationStatus.CANCELED,
            Generation.upstream_job.is_(None),
            Generation.admitted_at.is_not(None),
            Generation.source_found_at.is_(None),
        )
        .values(upstream_job=job, submitted_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return getattr(kept, "rowcount", 0) == 1


def _cancel_with_batch(session: Session, generation_id: str) -> None:
    change_status(session, generation_id, GenerationStatus.CANCELED, now=utcnow())


def _cancel_overdue(session: Session, generation_id: str) -> None:
    change_status(
        session,
        generation_id,
        GenerationStatus.CANCELED,
        now=utcnow(),
        error_code=ErrorCode.DEADLINE_EXCEEDED.value,
        error_message="the deadline passed before the generation could be submitted; "
        "it was never sent to Deep-Image",
    )
