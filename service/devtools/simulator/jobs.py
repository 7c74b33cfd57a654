"""In-memory job engine of the simulator: jobs, accounts, scheduling, webhooks and statistics.

A job's status is a function of the clock (received, in_progress, then complete or failed at its
due time), so polling always sees a consistent state even if the background thread lags: a due
job is finalised by whichever comes first, the scheduler thread or a request looking at it.
Every random draw happens at submission, under the lock, so a seeded run is reproducible no
matter how threads interleave; the one exception is the opt-in timeout fault (`timeout_rate`),
which also draws for each result call as it arrives.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import random
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import requests

from service.devtools.simulator.errors import (
    FAILURE_MESSAGE,
    SimulatorError,
    image_deleted,
    job_failed,
    job_not_found,
    no_more_requests,
    too_many_requests,
)
from service.devtools.simulator.images import CONTENT_TYPES, EXTENSIONS, render_image
from service.devtools.simulator.settings import SimulatorSettings, apply_overrides
from service.devtools.simulator.validation import ProcessRequest

logger = logging.getLogger("genrelay.simulator")

Clock = Callable[[], float]
JobState = Literal["pending", "complete", "failed", "cancelled"]
CallbackPlan = Literal["normal", "lost", "duplicate"]

USER_AGENT = "genrelay-deep-image-simulator/1"
# Share of processing_time during which a job reports "received" before "in_progress".
RECEIVED_SHARE = 0.25
# Rendered result images kept in memory (LRU); jobs are short-lived, so this stays small.
IMAGE_CACHE_BYTES = 128 * 1024 * 1024
# Longest single wait of a process_result handler before it re-checks the job; it keeps a fake
# clock (unit tests) and a lagging scheduler from stalling the answer.
_WAIT_SLICE = 0.25
_SCHEDULER_SLICE = 1.0


def _new_rng(seed: int | None) -> random.Random:
    # Drives simulated faults, not security: a seedable PRNG is exactly what is wanted.
    return random.Random(seed)  # noqa: S311


def _utc_now() -> datetime:
    return datetime.now(UTC)


def account_id(api_key: str) -> str:
    """A stable, non-reversible account id for an API key (the key itself is never stored)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


def _safe_target(url: str) -> str:
    # Webhook URLs often carry a secret token in the path or query; log only scheme and host.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Scheduler:
    """One background thread running callables at clock times; it exits when idle."""

    def __init__(self, clock: Clock, name: str = "sim-scheduler") -> None:
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the scheduler thread once the clock reaches ``when``."""
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            if self._thread is None:
                # Started lazily and only while there is work, so an app used through the
                # Flask test client leaves no thread behind once its jobs are done.
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(self._thread)
                self._thread.start()
            self._cond.notify()

    def _next_due(self) -> Callable[[], None] | None:
        with self._cond:
            while True:
                if self._stopped or not self._heap:
                    self._thread = None
                    return None
                when = self._heap[0][0]
                delay = when - self._clock()
                if delay <= 0:
                    return heapq.heappop(self._heap)[2]
                self._cond.wait(min(delay, _SCHEDULER_SLICE))

    def _run(self) -> None:
        while (fn := self._next_due()) is not None:
            try:
                fn()
            except Exception:
                logger.exception("simulator scheduled task failed")

    def stop(self, timeout: float = 5.0) -> None:
        """Drop pending tasks and wait for the thread to end."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)


class _ImageCache:
    """A byte-bounded LRU of rendered result images."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        self.discard(key)
        self._items[key] = data
        self._size += len(data)
        while self._size > self._max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._size -= len(old)

    def discard(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old)

    def clear(self) -> None:
        self._items.clear()
        self._size = 0


@dataclass(eq=False)
class Job:
    """One simulated job; mutable fields are guarded by the engine lock."""

    id: str
    account: str
    endpoint: str
    request: ProcessRequest
    created_at: float
    created_wall: str
    due_at: float
    will_fail: bool
    callback_plan: CallbackPlan
    result_base: str
    image_date: str
    image_name: str
    render_seed: int
    state: JobState = "pending"
    deleted: bool = False
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    # Inputs downloaded at submission (fetch_inputs knob): field, host, path, size, sha256.
    fetched_inputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def result_url(self) -> str:
        """Where the simulator serves this job's result image."""
        return f"{self.result_base}/images/{self.image_date}/{self.image_name}"


class SimulatorEngine:
    """All mutable state of one simulator instance, safe to use from many threads."""

    def __init__(self, settings: SimulatorSettings, clock: Clock | None = None) -> None:
        self._lock = threading.RLock()
        self._settings = settings
        self._clock: Clock = clock or time.monotonic
        self._rng = _new_rng(settings.seed)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._images: dict[str, str] = {}
        self._pending: dict[str, set[str]] = {}
        self._consumed: Counter[str] = Counter()
        self._stats: Counter[str] = Counter()
        self._responses: Counter[int] = Counter()
        # Most jobs ever active at once, per account (the concurrency limit's high-water mark).
        self._peak_active: Counter[str] = Counter()
        self._cache = _ImageCache(IMAGE_CACHE_BYTES)
        self._scheduler = Scheduler(self._clock)
        self._deliveries: set[threading.Thread] = set()
        self._stopping = threading.Event()

    # -- settings -------------------------------------------------------------------------

    @property
    def settings(self) -> SimulatorSettings:
        """The current knobs (an immutable snapshot)."""
        return self._settings

    @property
    def stopping(self) -> threading.Event:
        """Set once shutdown began; waits in handlers use it to return early."""
        return self._stopping

    def update_settings(self, overrides: Mapping[str, Any]) -> SimulatorSettings:
        """Apply knob overrides at run time (ValueError if invalid); reseed if seed is given."""
        with self._lock:
            self._settings = apply_overrides(self._settings, overrides)
            if "seed" in overrides:
                self._rng = _new_rng(self._settings.seed)
            return self._settings

    def account_for(self, api_key: str) -> str | None:
        """The account id of a known API key, else None."""
        if api_key in self._settings.api_keys:
            return account_id(api_key)
        return None

    # -- submission -----------------------------------------------------------------------

    def injected_upstream_error(self) -> SimulatorError | None:
        """Draw the upstream_error_rate fault for one process call."""
        with self._lock:
            if self._rng.random() >= self._settings.upstream_error_rate:
                return None
            status = self._rng.choice((500, 502, 503))
            self._stats["injected_upstream_errors"] += 1
        code, message = {
            500: ("INTERNAL_SERVER_ERROR", "Unexpected error, please try again later."),
            502: ("BAD_GATEWAY", "Upstream worker did not answer."),
            503: ("SERVICE_UNAVAILABLE", "Service temporarily unavailable."),
        }[status]
        return SimulatorError(status, message, code)

    def requests_left(self) -> None:
        """Raise the documented 403 "No more requests are available" while the
        `no_more_requests` knob is on (no random draw: seeded runs are unchanged)."""
        if not self._settings.no_more_requests:
            return
        with self._lock:
            self._stats["injected_no_more_requests"] += 1
        now = _utc_now()
        first_of_next_month = datetime(
            now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC
        )
        raise no_more_requests(first_of_next_month.isoformat().replace("+00:00", "Z"))

    def injected_timeout(self) -> float | None:
        """Draw the timeout_rate fault for one call: seconds to hold its answer, or None.

        Nothing is drawn while the rate is 0, so seeded runs without this fault repeat the
        same draws as before it existed.
        """
        with self._lock:
            settings = self._settings
            if settings.timeout_rate <= 0 or self._rng.random() >= settings.timeout_rate:
                return None
            self._stats["injected_timeouts"] += 1
            return settings.timeout_seconds

    def submit(
        self,
        account: str,
        request: ProcessRequest,
        endpoint: str,
        base_url: str,
        *,
        fetched: list[dict[str, Any]] | None = None,
    ) -> Job:
        """Create a job or raise the 400 (credits) / 429 (limit) the upstream would answer."""
        with self._lock:
            settings = self._settings
            pending = self._pending.setdefault(account, set())
            # Every account's due jobs, so that `peak_active` counts only jobs still running.
            self._finalize_all_due_locked()
            active = len(pending)
            if settings.credits - self._consumed[account] - active < 1:
                raise SimulatorError(
                    400,
                    "You dont have enough credits to perform those actions",
                    "NOT_ENOUGH_CREDITS",
                )
            if active >= settings.concurrency_limit:
                self._stats["concurrency_rejections"] += 1
                raise too_many_requests(settings.concurrency_limit, active)
            if self._rng.random() < settings.rate_limit_rate:
                self._stats["injected_rate_limits"] += 1
                raise too_many_requests(settings.concurrency_limit, active)
            will_fail = self._rng.random() < settings.failure_rate
            lost = self._rng.random() < settings.lost_callback_rate
            duplicate = self._rng.random() < settings.duplicate_callback_rate
            plan: CallbackPlan = "lost" if lost else "duplicate" if duplicate else "normal"
            now = self._clock()
            wall = _utc_now()
            job = Job(
                id=str(uuid.uuid1()),
                account=account,
                endpoint=endpoint,
                request=request,
                created_at=now,
                created_wall=wall.isoformat(),
                due_at=now + settings.processing_time,
                will_fail=will_fail,
                callback_plan=plan,
                result_base=(settings.public_url or base_url).rstrip("/"),
                image_date=wall.strftime("%Y-%m-%d"),
                image_name=f"{uuid.uuid4()}.{EXTENSIONS[request.output_format]}",
                render_seed=self._rng.getrandbits(32),
                fetched_inputs=list(fetched or []),
            )
            self._jobs[job.id] = job
            self._images[job.image_name] = job.id
            pending.add(job.id)
            self._peak_active[account] = max(self._peak_active[account], len(pending))
            everyone = sum(len(p) for p in self._pending.values())
            self._stats["peak_active"] = max(self._stats["peak_active"], everyone)
            self._stats["jobs_created"] += 1
            self._evict_locked(settings.max_jobs)
            logger.debug("simulator job %s created (%s, fail=%s)", job.id, endpoint, will_fail)
        if settings.processing_time <= 0:
            self.refresh(job)
        else:
            self._scheduler.call_at(job.due_at, lambda: self.refresh(job))
        return job

    def _evict_locked(self, max_jobs: int) -> None:
        excess = len(self._jobs) - max_jobs
        if excess <= 0:
            return
        # Oldest finished jobs go first; pending ones are never forgotten.
        finished = (j for j in self._jobs.values() if j.state != "pending")
        victims = list(itertools.islice(finished, excess))
        for job in victims:
            del self._jobs[job.id]
            self._images.pop(job.image_name, None)
            self._cache.discard(job.image_name)

    # -- progress -------------------------------------------------------------------------

    def refresh(self, job: Job) -> None:
        """Finalise ``job`` if its due time has passed."""
        with self._lock:
            self._refresh_locked(job)

    def _refresh_locked(self, job: Job) -> None:
        if job.state == "pending" and self._clock() >= job.due_at:
            self._finalize_locked(job)

    def _finalize_due_locked(self, pending: set[str]) -> None:
        for job_id in list(pending):
            job = self._jobs.get(job_id)
            if job is not None:
                self._refresh_locked(job)

    def _finalize_locked(self, job: Job) -> None:
        job.state = "failed" if job.will_fail else "complete"
        job.finished_at = job.due_at
        self._pending.get(job.account, set()).discard(job.id)
        if job.state == "complete":
            # Failed jobs cost no credits, as the failure message promises.
            self._consumed[job.account] += 1
            self._stats["jobs_completed"] += 1
        else:
            self._stats["jobs_failed"] += 1
        job.done.set()
        self._plan_callback_locked(job)

    def _plan_callback_locked(self, job: Job) -> None:
        settings = self._settings
        url = job.request.webhook_url or settings.account_webhook_url
        if url is None or (job.state == "failed" and not settings.send_failure_callbacks):
            return
        if job.callback_plan == "lost":
            self._stats["callbacks_lost"] += 1
            job.callbacks.append(
                {"attempt": 1, "url": url, "lost": True, "status_code": None, "error": None}
            )
            logger.info("simulator dropped the callback of job %s on purpose", job.id)
            return
        payload: dict[str, Any] = {
            "job": job.id,
            "data": job.request.body,
            "result_url": job.result_url if job.state == "complete" else None,
            "results": None,
        }
        if job.state == "failed":
            # Invented shape: the docs describe no failure event, so mark it explicitly.
            payload.update(status="failed", message=FAILURE_MESSAGE)
        copies = 2 if job.callback_plan == "duplicate" else 1
        if copies == 2:
            self._stats["callbacks_duplicated"] += 1
        timeout = settings.callback_timeout

        def start() -> None:
            self._start_delivery(job, url, payload, copies, timeout)

        self._scheduler.call_at(self._clock() + settings.callback_delay, start)

    # -- webhook delivery -----------------------------------------------------------------

    def _start_delivery(
        self, job: Job, url: str, payload: dict[str, Any], copies: int, timeout: float
    ) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            # One short-lived thread per delivery: a slow receiver must not hold up the
            # scheduler (completions of other jobs), and nothing idles once deliveries end.
            thread = threading.Thread(
                target=self._deliver,
                args=(job, url, payload, copies, timeout),
                name=f"sim-callback-{job.id[:8]}",
                daemon=True,
            )
            self._deliveries.add(thread)
        thread.start()

    def _deliver(
        self, job: Job, url: str, payload: dict[str, Any], copies: int, timeout: float
    ) -> None:
        try:
            for attempt in range(1, copies + 1):
                if self._stopping.is_set():
                    break
                record = self._post(url, payload, timeout)
                record["attempt"] = attempt
                with self._lock:
                    if self._stopping.is_set():
                        # Stopped meanwhile: shutdown may have given up waiting for this
                        # thread, and whoever read the simulator's logs may be gone. Nothing
                        # is recorded or logged. (shutdown sets the flag under this lock, so
                        # a delivery logs either before it or never.)
                        break
                    job.callbacks.append(record)
                    self._stats["callbacks_sent"] += 1
                    ok = record["status_code"] is not None and 200 <= record["status_code"] < 300
                    self._stats["callbacks_delivered" if ok else "callbacks_failed"] += 1
                    if ok:
                        logger.info(
                            "simulator callback of job %s to %s answered %s",
                            job.id,
                            _safe_target(url),
                            record["status_code"],
                        )
                    else:
                        # Decision: no retries (none documented); the failure is only recorded.
                        logger.warning(
                            "simulator callback of job %s to %s failed: %s",
                            job.id,
                            _safe_target(url),
                            record["error"] or record["status_code"],
                        )
        finally:
            with self._lock:
                self._deliveries.discard(threading.current_thread())

    @staticmethod
    def _post(url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        sent_at = _utc_now().isoformat()
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            # A session per delivery, closed at once: a pooled session shared across threads
            # would keep sockets open after the receiver is gone (ResourceWarnings in tests).
            with (
                requests.Session() as session,
                session.post(
                    url,
                    json=payload,
                    timeout=timeout,
                    allow_redirects=False,
                    headers={"User-Agent": USER_AGENT},
                ) as response,
            ):
                status = response.status_code
        except requests.RequestException as exc:
            error = type(exc).__name__
        return {
            "url": url,
            "lost": False,
            "status_code": status,
            "error": error,
            "sent_at": sent_at,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }

    # -- reading jobs ---------------------------------------------------------------------

    def lookup(self, account: str, job_id: str) -> Job:
        """The job of this account, or 404 Job not found."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.account != account:
                raise job_not_found()
            return job

    def _pending_status(self, job: Job) -> str:
        received_until = job.created_at + (job.due_at - job.created_at) * RECEIVED_SHARE
        return "received" if self._clock() < received_until else "in_progress"

    def result_body(self, job: Job) -> dict[str, Any]:
        """The ProcessResult body for ``job``; raises the 404/500 answers."""
        with self._lock:
            self._refresh_locked(job)
            if job.deleted:
                raise image_deleted()
            if job.state == "failed":
                raise job_failed(job.id)
            if job.state == "complete":
                return {"status": "complete", "job": job.id, "result_url": job.result_url}
            return {"status": self._pending_status(job), "job": job.id}

    def wait_result(self, job: Job, seconds: float) -> dict[str, Any]:
        """Wait up to ``seconds`` (real time) for ``job`` to finish; return its result body."""
        deadline = time.monotonic() + seconds
        while True:
            body = self.result_body(job)
            remaining = deadline - time.monotonic()
            if body["status"] == "complete" or remaining <= 0 or self._stopping.is_set():
                return body
            job.done.wait(min(remaining, _WAIT_SLICE))

    def delete(self, account: str, job_id: str) -> dict[str, Any]:
        """Delete a job's result (idempotent); a pending job is cancelled."""
        with self._lock:
            job = self.lookup(account, job_id)
            self._refresh_locked(job)
            if not job.deleted:
                job.deleted = True
                self._stats["jobs_deleted"] += 1
                if job.state == "pending":
                    job.state = "cancelled"
                    self._pending.get(account, set()).discard(job.id)
                    job.done.set()
                self._cache.discard(job.image_name)
            return {"message": "Image deleted", "job": job.id}

    def image(self, date: str, name: str) -> tuple[bytes, str]:
        """Bytes and content type of a result image; 404 if unknown, deleted or expired."""
        with self._lock:
            job_id = self._images.get(name)
            job = self._jobs.get(job_id) if job_id else None
            if job is None or job.image_date != date:
                raise SimulatorError(404, "Image not found")
            self._refresh_locked(job)
            if job.deleted:
                raise SimulatorError(404, "Image deleted")
            if job.state != "complete":
                raise SimulatorError(404, "Image not found")
            ttl = self._settings.result_ttl
            if (
                ttl is not None
                and job.finished_at is not None
                and (self._clock() > job.finished_at + ttl)
            ):
                raise SimulatorError(404, "Image expired")
            data = self._cache.get(name)
            padding = self._settings.result_padding_bytes
        req = job.request
        if data is None:
            # Rendered outside the lock: large images take a moment and other requests go on.
            data = render_image(
                req.width,
                req.height,
                req.output_format,
                seed=job.render_seed,
                quality=req.quality,
                transparent=req.transparent,
                padding_bytes=padding,
            )
            with self._lock:
                if not job.deleted:
                    self._cache.put(name, data)
        return data, CONTENT_TYPES[req.output_format]

    def me(self, account: str) -> dict[str, Any]:
        """The invented /me body: username, email, credits, rate limit and webhook setting."""
        with self._lock:
            settings = self._settings
            pending = self._pending.setdefault(account, set())
            self._finalize_due_locked(pending)
            user = f"sim-user-{account[:8]}"
            return {
                "username": user,
                "email": f"{user}@simulator.invalid",
                "credits": settings.credits - self._consumed[account],
                "rate_limit": settings.concurrency_limit,
                "processing": len(pending),
                "webhooks": {"complete": settings.account_webhook_url},
            }

    # -- introspection --------------------------------------------------------------------

    def record_response(self, status: int) -> None:
        """Count one /rest_api answer by status code."""
        with self._lock:
            self._responses[status] += 1

    def _finalize_all_due_locked(self) -> None:
        for pending in self._pending.values():
            self._finalize_due_locked(pending)

    def stats(self) -> dict[str, Any]:
        """Counters of what the simulator saw and did."""
        with self._lock:
            self._finalize_all_due_locked()
            names = (
                "jobs_created",
                "jobs_completed",
                "jobs_failed",
                "jobs_deleted",
                "callbacks_sent",
                "callbacks_delivered",
                "callbacks_failed",
                "callbacks_lost",
                "callbacks_duplicated",
                "concurrency_rejections",
                "injected_rate_limits",
                "injected_upstream_errors",
                "injected_timeouts",
                "injected_no_more_requests",
            )
            stats: dict[str, Any] = {name: self._stats[name] for name in names}
            stats["jobs_active"] = sum(len(p) for p in self._pending.values())
            stats["peak_active"] = self._stats["peak_active"]
            stats["peak_active_by_account"] = dict(self._peak_active)
            stats["responses_429"] = self._responses[429]
            stats["responses_5xx"] = sum(n for s, n in self._responses.items() if s >= 500)
            stats["responses_by_status"] = {str(s): n for s, n in sorted(self._responses.items())}
            return stats

    def _job_state(self, job: Job) -> str:
        if job.deleted:
            return "deleted"
        if job.state == "pending":
            return self._pending_status(job)
        return job.state

    def job_debug(self, job_id: str) -> dict[str, Any]:
        """Everything known about one job, whatever its account (404 if unknown)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise job_not_found()
            self._refresh_locked(job)
            req = job.request
            upload = req.upload
            return {
                "job": job.id,
                "state": self._job_state(job),
                "endpoint": job.endpoint,
                "account": job.account,
                "created_at": job.created_wall,
                "due_in": round(max(job.due_at - self._clock(), 0.0), 3),
                "will_fail": job.will_fail,
                "request": req.body,
                "upload": None
                if upload is None
                else {"part": upload.part, "filename": upload.filename, "size": upload.size},
                "source": {"kind": req.source_kind, "size": req.source_size},
                "fetched_inputs": [dict(f) for f in job.fetched_inputs],
                "output": {
                    "width": req.width,
                    "height": req.height,
                    "format": req.output_format,
                },
                "result_url": job.result_url if job.state == "complete" else None,
                "callback_url": req.webhook_url or self._settings.account_webhook_url,
                "callback_plan": job.callback_plan,
                "callbacks": [dict(c) for c in job.callbacks],
            }

    def job_list(self) -> list[dict[str, str]]:
        """Id and state of every job held, oldest first."""
        with self._lock:
            self._finalize_all_due_locked()
            return [{"job": j.id, "state": self._job_state(j)} for j in self._jobs.values()]

    def reset(self) -> None:
        """Forget all jobs, accounts and counters; keep the knobs; reseed."""
        with self._lock:
            for job in self._jobs.values():
                if job.state == "pending":
                    job.state = "cancelled"
                job.done.set()
            self._jobs.clear()
            self._images.clear()
            self._pending.clear()
            self._consumed.clear()
            self._peak_active.clear()
            self._stats.clear()
            self._responses.clear()
            self._cache.clear()
            self._rng = _new_rng(self._settings.seed)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the scheduler and wait for webhook deliveries in flight to end; idempotent.

        A delivery that ends from now on records and logs nothing (see `_deliver`)."""
        with self._lock:
            self._stopping.set()
            for job in self._jobs.values():
                job.done.set()
        self._scheduler.stop(timeout)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [t for t in self._deliveries if t.is_alive()]
            if not threads or time.monotonic() >= deadline:
                break
            threads[0].join(max(deadline - time.monotonic(), 0.0))
