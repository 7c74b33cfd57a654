"""How a generation learns its upstream job is done: Deep-Image's callback, or polling.

Both paths end in `record_source`, which stores the result URL once, enqueues the `store`
task and retires the pending `poll` task in the same transaction; whichever path comes second
finds the URL set and does nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.config import Config
from service.database import Store
from service.domain import GenerationStatus
from service.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from service.generations.callback_urls import token_is_valid
from service.generations.lifecycle import change_status
from service.generations.line import slot_freed
from service.generations.store import result_url_policy
from service.models import Generation, utcnow
from service.notifications.ssrf import UnsafeURL
from service.runtime.inline import InlineTasks
from service.runtime.kinds import POLL, STORE
from service.runtime.queue import ClaimedTask, TaskQueue
from service.runtime.wakeup import request_wake

log = logging.getLogger("genrelay.completion")


@dataclasses.dataclass(frozen=True)
class SourceRecorded:
    """The result's URL was recorded and its `store` task queued; `claimed`: that task, when
    the caller asked to run its first attempt itself."""

    claimed: ClaimedTask | None = None


def record_source(
    session: Session,
    queue: TaskQueue,
    generation_id: str,
    url: str,
    *,
    now: dt.datetime,
    claim: bool = False,
) -> SourceRecorded | None:
    """Remember where the result is and schedule its storage; None if already known.

    With `claim`, the `store` task is added already claimed by the caller, who runs its first
    attempt once this transaction has committed.
    """
    result = session.execute(
        sa.update(Generation)
        .where(
            Generation.id == generation_id,
            Generation.status == GenerationStatus.PROCESSING,
            Generation.source_found_at.is_(None),
        )
        .values(source_url=url, source_found_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return None
    slot_freed(session)  # Deep-Image is done with the job: its slot goes to the next in line
    claimed = None
    if claim:
        claimed = queue.enqueue_claimed(session, STORE, generation_id=generation_id)
    else:
        queue.enqueue(session, STORE, generation_id=generation_id)
    # The fallback poll has nothing left to do: retire it rather than have a worker claim it.
    queue.retire_pending(session, POLL, generation_id, "the result was found before it ran")
    return SourceRecorded(claimed)


def job_ended(session: Session, queue: TaskQueue, generation_id: str, *, now: dt.datetime) -> bool:
    """A canceled generation's upstream job is over: hand on the slot it kept; False if not
    (already known, or it held none)."""
    result = session.execute(
        sa.update(Generation)
        .where(
            Generation.id == generation_id,
            Generation.status == GenerationStatus.CANCELED,
            Generation.admitted_at.is_not(None),
            Generation.source_found_at.is_(None),
        )
        .values(source_found_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    slot_freed(session)
    queue.retire_pending(session, POLL, generation_id, "the canceled job's end is known")
    return True


class CallbackOutcome(enum.StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # the result was already known
    IGNORED = "ignored"  # the generation is finished or canceled


@dataclasses.dataclass(frozen=True)
class Callback:
    job: str
    # None: the job ended without a result. Deep-Image documents only the callback of a
    # complete job; one without a result is taken as a hint that the job is over, and the
    # job's poll, which asks Deep-Image itself how it ended, runs now.
    result_url: str | None


class CompletionService:
    """Deep-Image's completion callback: authenticated by the URL's token, recorded once.

    With `inline` (web processes), the `store` task of an accepted callback is run by this
    process as soon as the callback's transaction has committed, when one of its inline
    threads is idle; otherwise (and in any case if this process dies) a worker runs it.
    """

    def __init__(
        self, store: Store, queue: TaskQueue, config: Config, inline: InlineTasks | None = None
    ) -> None:
        self.store = store
        self.queue = queue
        self.config = config
        self.inline = inline
        self.result_urls = result_url_policy(config)

    def authenticate(self, generation_id: str, token: str) -> None:
        """Check the URL's token before anything else is read; Unauthorized if wrong."""
        secret = self.config.callback_secret
        if not secret or not token_is_valid(secret, generation_id, token):
            raise Unauthorized("the callback token is not valid for this generation")

    def accept(self, generation_id: str, callback: Callback) -> CallbackOutcome:
        """Record the callback's result URL and schedule storage; idempotent."""
        if callback.result_url is None:
            return self.store.retrying(lambda: self._poll_now(generation_id, callback.job))
        try:
            # Checked again when the worker downloads it; refused here so nothing is stored.
            self.result_urls.check_syntax(callback.result_url)
        except UnsafeURL as exc:
            raise InvalidRequest(
                f"result_url: {exc.reason}", errors=[{"field": "result_url", "message": exc.reason}]
            ) from None
        # An idle inline thread, taken before the transaction: it decides how the task is added.
        inline = self.inline if self.inline is not None and self.inline.reserve() else None
        try:
            outcome, claimed = self.store.retrying(
                lambda: self._accept(generation_id, callback, claim=inline is not None)
            )
        except BaseException:
            if inline is not None:
                inline.cancel()
            raise
        if inline is not None:
            if claimed is not None:
                inline.start(claimed)  # committed: the first attempt runs while we answer
            else:
                inline.cancel()
        return outcome

    def _poll_now(self, generation_id: str, job: str) -> CallbackOutcome:
        """A callback without a result: the job's pending poll is made due now (it reads how
        the job ended from Deep-Image, which a callback's body cannot prove)."""
        with self.store.transaction() as session:
            generation = session.get(Generation, generation_id)
            if generation is None:
                raise NotFound(f"no generation {generation_id!r}")
            if GenerationStatus(generation.status).is_terminal:
                # Canceled while its job ran: the poll learns that job's end, and then hands
                # on the slot it keeps meanwhile (as a result's callback would).
                if (
                    generation.upstream_job == job
                    and self._job_end_unknown(generation)
                    and self.queue.hurry_pending(session, POLL, generation_id)
                ):
                    request_wake(session)
                return CallbackOutcome.IGNORED
            if generation.upstream_job is None:  # the submit's commit is still to come
                raise Conflict(
                    "the generation's upstream job is not recorded yet; retry later",
                    headers={"Retry-After": "5"},
                )
            if generation.upstream_job != job:
                raise Conflict(f"job {job!r} is not this generation's recorded upstream job")
            if generation.source_found_at is not None:
                return CallbackOutcome.DUPLICATE  # its result is known: being stored
            if self.queue.hurry_pending(session, POLL, generation_id):
                request_wake(session)
        return CallbackOutcome.ACCEPTED

    @staticmethod
    def _job_end_unknown(generation: Generation) -> bool:
        """A canceled generation whose upstream job still holds a slot (job_ended's case)."""
        return (
            generation.status == GenerationStatus.CANCELED
            and generation.admitted_at is not None
            and generation.source_found_at is None
        )

    def _accept(
        self, generation_id: str, callback: Callback, *, claim: bool
    ) -> tuple[CallbackOutcome, ClaimedTask | None]:
        now = utcnow()
        with self.store.transaction() as session:
            generation = session.get(Generation, generation_id)
            if generation is None:
                raise NotFound(f"no generation {generation_id!r}")
            if GenerationStatus(generation.status).is_terminal:
                if generation.upstream_job == callback.job:
                    job_ended(session, self.queue, generation_id, now=now)  # if canceled
                return CallbackOutcome.IGNORED, None
            if (
                generation.upstream_job is None
                and generation.status == GenerationStatus.QUEUED
                and self.config.confirm_results
            ):
                # Nothing says the callback's job is this generation's: confirming it with
                # Deep-Image would only prove it is one of *our* jobs (perhaps another
                # tenant's). So it is not bound; the submit records its own job, and this
                # callback, retried, or the fallback poll then finds the result.
                raise Conflict(
                    "the generation's upstream job is not recorded yet; retry later",
                    headers={"Retry-After": "5"},
                )
            if generation.upstream_job is None and generation.status == GenerationStatus.QUEUED:
                # Without confirmation the callback is trusted as it is (its result URL is
                # downloaded as given): it overtook the commit of our own submit (a fast job),
                # and the URL's token says which generation it is for.
                change_status(
                    session,
                    generation_id,
                    GenerationStatus.PROCESSING,
                    now=now,
                    upstream_job=callback.job,
                    submitted_at=now,
                )
            elif generation.upstream_job != callback.job:
                raise Conflict(f"job {callback.job!r} is not this generation's upstream job")
            assert callback.result_url is not None
            recorded = record_source(
                session, self.queue, generation_id, callback.result_url, now=now, claim=claim
            )
            if recorded is None:
                # Known already, or canceled since we read it: then its job is over now.
                if job_ended(session, self.queue, generation_id, now=now):
                    return CallbackOutcome.IGNORED, None
                return CallbackOutcome.DUPLICATE, None
        return CallbackOutcome.ACCEPTED, recorded.claimed
