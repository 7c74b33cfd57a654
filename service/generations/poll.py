"""The `poll` task: asks Deep-Image about a job whose callback has not come.

With callbacks on, it is the fallback for a lost callback (first run after
GENRELAY_RECONCILE_AFTER); in polling-only mode (no GENRELAY_PUBLIC_URL) the only way a result
is found. Each run that finds the job still going comes back after twice its last wait. A
canceled generation's job is polled too, until it ends, so its upstream slot is handed on.
"""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.adapters.deepimage import (
    DeepImageClient,
    PermanentUpstreamError,
    TransientUpstreamError,
)
from service.config import Config
from service.database import Store
from service.domain import ErrorCode, GenerationStatus
from service.generations.completion import job_ended, record_source
from service.generations.lifecycle import failing
from service.models import Generation, utcnow
from service.runtime.outcomes import DONE, Apply, Done, Later, Outcome
from service.runtime.queue import ClaimedTask, TaskQueue

log = logging.getLogger("genrelay.poll")

# Polling backs off from FIRST_POLL_DELAY (polling-only mode) up to MAX_POLL_DELAY; never
# less than MIN_POLL_DELAY between polls (GENRELAY_RECONCILE_AFTER=0 polls at once, first).
FIRST_POLL_DELAY = 2.0
MIN_POLL_DELAY = 1.0
MAX_POLL_DELAY = 60.0


def first_poll_delay(config: Config) -> float:
    """With callbacks, poll only as a fallback after RECONCILE_AFTER; without, soon."""
    if config.public_url:
        return config.reconcile_after
    return min(config.reconcile_after, FIRST_POLL_DELAY)


class PollHandler:
    """The `poll` task: asks Deep-Image about a job whose callback has not come."""

    def __init__(
        self, store: Store, queue: TaskQueue, deepimage: DeepImageClient, config: Config
    ) -> None:
        self.store = store
        self.queue = queue
        self.deepimage = deepimage
        self.config = config

    def run(self, task: ClaimedTask) -> Outcome:
        assert task.generation_id is not None
        with self.store.read() as session:
            generation = session.get(Generation, task.generation_id)
        if generation is None or generation.source_found_at is not None:
            return DONE  # the callback came: nothing to reconcile
        if generation.status == GenerationStatus.CANCELED and generation.admitted_at is not None:
            return self._await_canceled_job(task, generation)
        if generation.status != GenerationStatus.PROCESSING:
            return DONE  # finished: nothing to reconcile
        assert generation.upstream_job is not None and generation.submitted_at is not None
        generation_id = generation.id
        now = utcnow()
        timed_out = (now - generation.submitted_at).total_seconds() > self.config.generation_timeout
        delay = _next_delay(task)
        try:
            job = self.deepimage.result(generation.upstream_job)
        except TransientUpstreamError as exc:
            if timed_out:
                return Done(self._time_out(generation_id, now))
            return Later(delay, f"Deep-Image unavailable: {exc.message}")
        except PermanentUpstreamError as exc:
            fail = _unless_found(generation_id, failing(generation_id, exc.error_code, exc.message))
            return Done(_then_ended(fail, self.queue, generation_id, now))
        if job.finished and job.result_url:
            url = job.result_url

            def found(session: Session) -> None:
                if record_source(session, self.queue, generation_id, url, now=now) is None:
                    # Canceled while we asked (or the callback came first): a canceled job
                    # is over now, and its slot goes on.
                    job_ended(session, self.queue, generation_id, now=now)

            return Done(found)
        if timed_out:
            # Asked first: a job that finished in the last wait between polls is stored.
            return Done(self._time_out(generation_id, now))
        # Still running. The next poll doubles its wait; `delay` travels in the payload.
        return Later(delay, f"job {job.job} is {job.status}", payload={"delay": delay})

    def _time_out(self, generation_id: str, now: dt.datetime) -> Apply:
        """Fail the generation, whose job is not done after the timeout, unless its result
        was found meanwhile (a callback while we asked); a canceled one's slot goes on."""
        message = f"no result within {self.config.generation_timeout:.0f} s"
        fail = failing(generation_id, ErrorCode.UPSTREAM_TIMEOUT, message)
        return _then_ended(_unless_found(generation_id, fail), self.queue, generation_id, now)

    def _await_canceled_job(self, task: ClaimedTask, generation: Generation) -> Outcome:
        """A canceled generation whose job may still run upstream: free its slot once the job
        is over (or past the generation timeout: Deep-Image may have lost it)."""
        assert generation.upstream_job is not None and generation.submitted_at is not None
        generation_id = generation.id
        now = utcnow()
        delay = _next_delay(task)
        timed_out = (now - generation.submitted_at).total_seconds() > self.config.generation_timeout
        if not timed_out:
            try:
                job = self.deepimage.result(generation.upstream_job)
            except TransientUpstreamError as exc:
                return Later(delay, f"Deep-Image unavailable: {exc.message}")
            except PermanentUpstreamError:
                pass  # failed, or unknown to Deep-Image: over either way
            else:
                if not job.finished:
                    reason = f"canceled job {job.job} is {job.status}"
                    return Later(delay, reason, payload={"delay": delay})
        return Done(lambda session: job_ended(session, self.queue, generation_id, now=now))

    def on_exhausted(self, task: ClaimedTask, error: str) -> Apply:
        generation_id = task.generation_id
        assert generation_id is not None
        # `error` may be an internal error's text: it stays in the task's last_error.
        fail = failing(
            generation_id,
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"Deep-Image could not be polled after {task.attempts} attempts",
        )
        # A canceled generation's slot is not kept forever by a poll that cannot succeed.
        return _then_ended(_unless_found(generation_id, fail), self.queue, generation_id, utcnow())


def _unless_found(generation_id: str, fail: Apply) -> Apply:
    """`fail`, unless the generation's result was found meanwhile: its callback, accepted
    while the poll asked Deep-Image, has queued the store, and the generation is not failed
    for what the poll saw (a 404, say, or no answer in time)."""

    def apply(session: Session) -> None:
        found = session.execute(
            sa.select(Generation.source_found_at)
            .where(Generation.id == generation_id)
            .with_for_update()
        ).scalar()
        if found is None:
            fail(session)

    return apply


def _then_ended(apply: Apply, queue: TaskQueue, generation_id: str, now: dt.datetime) -> Apply:
    """`apply`, then, if the generation was canceled meanwhile, the end of its job: the poll
    that ends here was the last one, and the canceled job's slot must not be kept forever."""

    def both(session: Session) -> None:
        apply(session)
        job_ended(session, queue, generation_id, now=now)

    return both


def _next_delay(task: ClaimedTask) -> float:
    """The wait before the next poll: twice the last one, from MIN_POLL_DELAY up to
    MAX_POLL_DELAY (a first wait of 0 doubled to 0 for ever: a hundred polls of a job of a
    few seconds)."""
    last = float(task.payload.get("delay", FIRST_POLL_DELAY))
    return min(MAX_POLL_DELAY, max(MIN_POLL_DELAY, 2 * last))
