"""Webhook-delivery benchmark: one `genrelay worker` next to a bare `requests` thread pool.

What is measured
    Deliveries/s to a local receiver of two senders, in the same run, alternating:

    - ``genrelay``: ONE ``genrelay worker --threads T --poll-interval 0.05`` process draining a
      backlog of N pending deliveries (N ``deliveries`` rows and their ``deliver`` tasks, built
      through ``service.notifications.queue_delivery`` before the worker starts). Per delivery
      the worker claims the task, reads the delivery and its subscription, signs the stored
      body (``service.notifications.signing.sign``), POSTs it through the SSRF-pinned session,
      records the
      attempt, marks the delivery succeeded and completes the task: everything genrelay does
      for a real notification.
    - ``bare``: a ``concurrent.futures.ThreadPoolExecutor(T)``, one ``requests.Session`` per
      thread, that reads the same N stored bodies and URLs from the database beforehand and,
      inside the timed loop, signs each with ``service.notifications.signing.sign`` (same secret)
      and POSTs
      it (timeout 15 s, no redirects). No database, no retries, no bookkeeping: the floor for a
      Python sender on this machine.

    Both post to the same receiver: a minimal asyncio HTTP/1.1 server in its own process (its
    own GIL), answering 204 to every POST and counting them (webhook-ids, connections, first
    and last arrival). It is not gunicorn or werkzeug on purpose: on a 2-core machine every CPU
    cycle the receiver burns is taken from the sender being measured, and one event loop
    parsing a few headers costs far less per request than a WSGI stack. Its CPU is reported.

How it is timed
    - genrelay: from the first POST the receiver sees to the last of (the receiver's last POST,
      the last ``deliveries.updated_at``, the last ``tasks.finished_at``) of the batch, so the
      worker's start-up (importing, building the GCS client, connecting) is excluded; it is
      reported apart as ``boot s`` (process start to first POST). All of these are wall-clock
      times taken on this machine.
    - bare: ``time.perf_counter()`` around submitting the N jobs and waiting for all of them.
    deliveries/s = N / that time. A fresh backlog (and a fresh subscription, so a fresh
    secret) is built for every genrelay round; the bare round that follows sends the bodies
    of that batch again.

How to read the report
    - ``deliveries/s``; the ``all`` rows pool the rounds (all deliveries / summed time).
      ``genrelay / bare`` is the ratio of the pooled rates: the price of durable, retried,
      logged delivery over fire-and-forget posting.
    - ``errors``: genrelay attempts that were not 2xx (or raised), bare posts likewise. Any
      genrelay retry shows up as ``attempts`` > N in the checks line.
    - ``send p50/p99 ms``: one POST as the sender saw it. genrelay's comes from
      ``delivery_attempts.duration_ms``, which genrelay truncates to whole milliseconds.
    - ``queue p50/p99 s``: ``delivery_attempts.attempted_at - deliveries.created_at``. The
      backlog is built before the worker starts, so this is the backlog drain (worker boot +
      position in the queue / rate), not the latency of a lone event.
    - ``CPU %``: CPU seconds per wall second during the timed window (100 = one full core;
      this machine has ``nproc`` cores). ``sender`` is the worker process or the benchmark's own
      process (bare), ``database`` the PostgreSQL backends of the worker (SQLite runs inside
      the worker), ``receiver`` the receiver process, ``machine`` every core's busy time
      whoever used it (/proc/stat; at most nproc x 100 %): far above the sum of the others
      means something else ran during the round. A sender near 100 % is bound by its own
      Python (one GIL), not by waiting.
    - ``anatomy``: before the rounds, ``--probe`` deliveries run one at a time through the
      same genrelay classes (``Worker.run_once`` -> ``TaskRunner`` -> ``DeliverHandler``) in
      this process, with SQLAlchemy's events counting transactions, statements and pool
      checkouts (each one a pre-ping round trip on PostgreSQL), and timing the transactions
      and the HTTP send. It explains where a delivery's time goes without contention.
    - checks line per round: the receiver got exactly the batch's webhook-ids, sampled
      signatures verify; for genrelay also attempts, delivery and task statuses, and the most
      tasks of the batch held at once (sampled). Above T means one claim took many tasks
      (bench/deliveries.md, "One claim, many tasks").
    Everything (senders, receiver, PostgreSQL) shares the machine: compare the two targets
    with each other, not with other machines.

Run from the repository root:

    .venv/bin/python bench/deliveries.py [--deliveries N] [--threads T] [--rounds R]
        [--database sqlite|postgresql] [--probe K] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import requests
from _stack import (
    DATABASE_LOCKED,
    GENRELAY,
    LOOPBACK,
    SEED_BODY,
    TRACEBACK,
    WARNING_OR_ERROR,
    BenchError,
    Processes,
    add_common_options,
    base_env,
    clean_up,
    failed,
    finish,
    free_port,
    fresh_database,
    handle_signals,
    interrupted,
    is_2xx,
    machine_busy,
    machine_facts,
    percentile,
    postgres_url_from_env,
    prepare_database,
    print_log_scan,
    process_cpu,
    require_positive,
    scan_log,
    wait_until,
    work_dirs,
)

WORKER_APPLICATION_NAME = "genrelay-bench-worker"  # finds the worker's PostgreSQL backends
POLL_INTERVAL = "0.05"  # genrelay worker --poll-interval
EVENT_TYPE = "generation.succeeded"

SEND_TIMEOUT = 15.0  # bare pool, as service.notifications.deliver.SEND_TIMEOUT
CONTROL_TIMEOUT = (2.0, 10.0)  # (connect, read) of the benchmark's calls to the receiver
BACKLOG_BATCH = 500  # deliveries per transaction while building a backlog
WATCH_INTERVAL = 0.02  # how often a genrelay round looks at the receiver's counter
DB_CHECK_INTERVAL = 1.0  # how often it looks at the database before the receiver has N


# -- receiver (its own process: `python bench/deliveries.py --receiver-port PORT`) -------

_NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
_SAMPLES = 3  # requests kept (per reset) for the benchmark to verify their signatures


class _ReceiverState:
    """What the receiver counts; reset between rounds over ``GET /_reset``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.posts = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.ids: set[str] = set()
        self.duplicates = 0
        self.unsigned = 0
        self.body_bytes = 0
        self.connections = 0
        self.malformed = 0
        self.samples: list[dict[str, Any]] = []

    def record(self, headers: dict[str, str], body: bytes) -> None:
        now = time.time()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.posts += 1
        self.body_bytes += len(body)
        webhook_id = headers.get("webhook-id", "")
        if webhook_id in self.ids:
            self.duplicates += 1
        self.ids.add(webhook_id)
        if "webhook-signature" not in headers:
            self.unsigned += 1
        if len(self.samples) < _SAMPLES:
            self.samples.append({"headers": headers, "body": body.decode("utf-8", "replace")})

    def stats(self) -> dict[str, Any]:
        return {
            "posts": self.posts,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "distinct_ids": len(self.ids),
            "ids_digest": ids_digest(self.ids),
            "duplicates": self.duplicates,
            "unsigned": self.unsigned,
            "body_bytes": self.body_bytes,
            "connections": self.connections,
            "malformed": self.malformed,
            "samples": self.samples,
        }


def ids_digest(ids: Iterable[str]) -> str:
    """One hash naming a set of webhook-ids (the receiver's and the batch's must match)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


class _ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies: all that requests/urllib3 send."""

    def __init__(self, state: _ReceiverState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.state.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing():
            request = self._next_request()
            if request is None:
                return
            self._answer(*request)

    def _next_request(self) -> tuple[str, str, dict[str, str], bytes] | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_HEAD:
                self._refuse()
            return None
        try:
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                if not colon:
                    raise ValueError("bad header line")
                headers[name.strip().lower()] = value.strip()
            if "transfer-encoding" in headers:
                raise ValueError("only Content-Length bodies")
            length = int(headers.get("content-length", "0"))
            if not 0 <= length <= _MAX_BODY:
                raise ValueError("bad Content-Length")
        except ValueError:
            self._refuse()
            return None
        total = end + 4 + length
        if len(self.buffer) < total:
            return None
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        return method, target, headers, body

    def _answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        assert self.transport is not None
        if method == "POST":
            self.state.record(headers, body)
            response = _NO_CONTENT
        elif method == "GET" and target in ("/_stats", "/_reset"):
            if target == "/_reset":
                self.state.reset()
            payload = json.dumps(self.state.stats()).encode()
            response = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(payload)
            ) + payload
        else:
            response = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        self.transport.write(response)
        if headers.get("connection", "").lower() == "close":
            self.transport.close()

    def _refuse(self) -> None:
        self.state.malformed += 1
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
        self.transport.close()


def serve_receiver(port: int) -> int:
    """Run the receiver on 127.0.0.1:port until SIGTERM or SIGINT."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        state = _ReceiverState()
        server = await loop.create_server(
            lambda: _ReceiverProtocol(state), LOOPBACK, port, backlog=1024
        )
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"receiver listening on {LOOPBACK}:{port}", flush=True)
        await stop.wait()
        server.close()

    asyncio.run(serve())
    return 0


class ReceiverClient:
    """The benchmark's side of the receiver: reset and read its counters."""

    def __init__(self, port: int, pid: int) -> None:
        self.base = f"http://{LOOPBACK}:{port}"
        self.url = f"{self.base}/hook"
        self.pid = pid
        self.http = requests.Session()

    def stats(self) -> dict[str, Any]:
        response = self.http.get(f"{self.base}/_stats", timeout=CONTROL_TIMEOUT)
        response.raise_for_status()
        return cast(dict[str, Any], response.json())

    def reset(self) -> None:
        self.http.get(f"{self.base}/_reset", timeout=CONTROL_TIMEOUT).raise_for_status()

    def close(self) -> None:
        self.http.close()


def verify_samples(samples: list[dict[str, Any]], secret: str) -> bool:
    """True if every kept request verifies with the official Standard Webhooks library."""
    import standardwebhooks

    if not samples:
        return False
    try:
        for sample in samples:
            standardwebhooks.Webhook(secret).verify(sample["body"], sample["headers"])
    except standardwebhooks.WebhookVerificationError:
        return False
    return True


# -- backlog -----------------------------------------------------------------------------


@dataclasses.dataclass
class Batch:
    """N pending deliveries to one fresh subscription (which names the batch)."""

    subscription_id: str
    secret: str
    size: int
    body_bytes: int
    build_seconds: float
    digest: str  # of its webhook-ids


class Bench:
    """The benchmark's own handle on the database, through genrelay's service layer."""

    def __init__(self, db_url: str, receiver: ReceiverClient) -> None:
        from service.config import Config
        from service.database import Store
        from service.notifications.service import NotificationService
        from service.notifications.ssrf import URLPolicy

        self.db_url = db_url
        self.receiver = receiver
        self.config = Config(
            database_url=db_url,
            deepimage_url=f"http://{LOOPBACK}:1",
            deepimage_api_key="x",
            gcs_bucket="x",
            allow_private_webhooks=True,
        )
        self.policy = URLPolicy(allow_private=True)
        self.store = Store(db_url)
        self.notifications = NotificationService(self.store, self.config, self.policy)
        self.tenant_id = ""

    def close(self) -> None:
        self.store.dispose()

    def find_tenant(self, name: str) -> None:
        import sqlalchemy as sa

        from service.models import Tenant

        with self.store.read() as session:
            tenant_id = session.scalar(sa.select(Tenant.id).where(Tenant.name == name))
        if tenant_id is None:
            raise BenchError(f"no tenant {name!r} after genrelay keys create")
        self.tenant_id = tenant_id

    def new_batch(self, size: int, label: str) -> Batch:
        """A fresh subscription to the receiver and `size` pending deliveries to it.

        Each delivery belongs to its own synthetic generation (one `generation.succeeded`
        event each), as a stream of finished generations would: deliveries of one generation
        to one target go out in lifecycle order, which would serialise a single-generation
        backlog behind `ORDER_WAIT` snoozes.
        """
        from service.models import Event, utcnow
        from service.notifications.events import generation_resource, queue_delivery

        began = time.perf_counter()
        created = self.notifications.create_subscription(
            self.tenant_id, url=self.receiver.url, events=[EVENT_TYPE], description=label
        )
        subscription = created.subscription
        body_bytes = 0
        webhook_ids: list[str] = []
        done = 0
        while done < size:
            with self.store.transaction() as session:
                for _ in range(min(BACKLOG_BATCH, size - done)):
                    now = utcnow()
                    generation = synthetic_generation(self.tenant_id, now)
                    event = Event(
                        id="evt_" + uuid.uuid4().hex,
                        tenant_id=self.tenant_id,
                        generation_id=generation.id,
                        type=EVENT_TYPE,
                        data=generation_resource(generation),
                        created_at=now,
                    )
                    session.add(event)
                    delivery = queue_delivery(
                        session,
                        event,
                        url=subscription.url,
                        fmt="standard",
                        subscription=subscription,
                    )
                    body_bytes += len(delivery.body.encode())
                    webhook_ids.append(delivery.webhook_id)
                    done += 1
        return Batch(
            subscription_id=subscription.id,
            secret=created.secret,
            size=size,
            body_bytes=body_bytes,
            build_seconds=time.perf_counter() - began,
            digest=ids_digest(webhook_ids),
        )

    def open_count(self, batch: Batch) -> int:
        """Deliveries of the batch still pending plus their tasks not yet done or dead."""
        import sqlalchemy as sa

        from service.models import Delivery, Event, Task
        from service.runtime.kinds import DELIVER

        with self.store.read() as session:
            pending = session.scalar(
                sa.select(sa.func.count())
                .select_from(Delivery)
                .where(Delivery.subscription_id == batch.subscription_id)
                .where(Delivery.status == "pending")
            )
            tasks = session.scalar(
                sa.select(sa.func.count())
                .select_from(Task)
                .join(Event, Event.generation_id == Task.generation_id)
                .join(Delivery, Delivery.event_id == Event.id)
                .where(Delivery.subscription_id == batch.subscription_id)
                .where(Task.kind == DELIVER, Task.status.in_(("pending", "running")))
            )
        return int(pending or 0) + int(tasks or 0)

    def held_count(self, batch: Batch) -> int:
        """Tasks of the batch claimed right now (a worker with T threads should hold <= T)."""
        import sqlalchemy as sa

        from service.models import Delivery, Event, Task
        from service.runtime.kinds import DELIVER

        with self.store.read() as session:
            held = session.scalar(
                sa.select(sa.func.count())
                .select_from(Task)
                .join(Event, Event.generation_id == Task.generation_id)
                .join(Delivery, Delivery.event_id == Event.id)
                .where(Delivery.subscription_id == batch.subscription_id)
                .where(Task.kind == DELIVER, Task.status == "running")
            )
        return int(held or 0)

    def outcome(self, batch: Batch) -> dict[str, Any]:
        """What the database says about a batch once the worker is done with it."""
        import sqlalchemy as sa

        from service.models import Delivery, DeliveryAttempt, Event, Task
        from service.runtime.kinds import DELIVER

        with self.store.read() as session:
            deliveries = session.execute(
                sa.select(Delivery.status, Delivery.attempts, Delivery.updated_at).where(
                    Delivery.subscription_id == batch.subscription_id
                )
            ).all()
            attempts = session.execute(
                sa.select(
                    DeliveryAttempt.attempted_at,
                    DeliveryAttempt.status_code,
                    DeliveryAttempt.error,
                    DeliveryAttempt.duration_ms,
                    Delivery.created_at,
                )
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .where(Delivery.subscription_id == batch.subscription_id)
            ).all()
            tasks = session.execute(
                sa.select(Task.status, Task.attempts, Task.finished_at)
                .join(Event, Event.generation_id == Task.generation_id)
                .join(Delivery, Delivery.event_id == Event.id)
                .where(Delivery.subscription_id == batch.subscription_id, Task.kind == DELIVER)
            ).all()
        outcomes: collections.Counter[str] = collections.Counter(
            str(a.status_code) if a.status_code is not None else (a.error or "no answer")
            for a in attempts
        )
        finished = [t.finished_at for t in tasks if t.finished_at is not None]
        finished += [d.updated_at for d in deliveries if d.status != "pending"]
        return {
            "delivery_status": dict(collections.Counter(d.status for d in deliveries)),
            "task_status": dict(collections.Counter(t.status for t in tasks)),
            "task_attempts_over_1": sum(1 for t in tasks if t.attempts > 1),
            "attempts": len(attempts),
            "outcomes": dict(sorted(outcomes.items())),
            "queue_latencies": sorted(
                (a.attempted_at - a.created_at).total_seconds() for a in attempts
            ),
            "send_ms": sorted(float(a.duration_ms) for a in attempts),
            "last_finished_at": max(finished).timestamp() if finished else None,
        }

    def batch_rows(self, batch: Batch) -> list[tuple[str, bytes, str, str]]:
        """(url, body, webhook_id, content type) of every delivery of a batch, oldest first."""
        import sqlalchemy as sa

        from service.models import Delivery

        with self.store.read() as session:
            rows = session.execute(
                sa.select(Delivery.url, Delivery.body, Delivery.webhook_id, Delivery.format)
                .where(Delivery.subscription_id == batch.subscription_id)
                .order_by(Delivery.created_at)
            ).all()
        return [
            (
                r.url,
                r.body.encode(),
                r.webhook_id,
                "application/cloudevents+json" if r.format == "cloudevents" else "application/json",
            )
            for r in rows
        ]

    def worker_backend_pids(self) -> list[int]:
        """PostgreSQL backends serving the worker (empty on SQLite)."""
        import sqlalchemy as sa

        if self.store.dialect != "postgresql":
            return []
        with self.store.read() as session:
            rows = session.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = :name"
                ),
                {"name": WORKER_APPLICATION_NAME},
            ).all()
        return [int(r.pid) for r in rows]


def synthetic_generation(tenant_id: str, now: datetime.datetime) -> Any:
    """A finished generation as genrelay would have stored it (never written: it feeds events)."""
    from service.models import Generation

    generation_id = "gen_" + uuid.uuid4().hex
    day = now.strftime("%Y/%m/%d")
    return Generation(
        id=generation_id,
        tenant_id=tenant_id,
        status="succeeded",
        input=SEED_BODY["input"],
        meta={"order": str(uuid.uuid4().int % 10**8)},
        webhook=None,
        webhook_events_filter=None,
        upstream_job=uuid.uuid4().hex,
        result={
            "uri": f"gs://bench-bucket/{tenant_id}/{day}/{generation_id}.png",
            "content_type": "image/png",
            "size": 5_242_880,
            "crc32c": "AAAAAA==",
            "width": 2048,
            "height": 1024,
        },
        error_code=None,
        error_message=None,
        created_at=now,
        updated_at=now,
        submitted_at=now,
        completed_at=now,
    )


# -- anatomy: one delivery at a time, instrumented, in this process ----------------------


def probe(bench: Bench, size: int) -> dict[str, Any]:
    """Run `size` deliveries one at a time through genrelay's own classes; count and time."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from service.database import Store
    from service.notifications.deliver import DeliverHandler
    from service.notifications.signing import sign
    from service.notifications.ssrf import pinned_session
    from service.runtime.kinds import DELIVER
    from service.runtime.queue import ClaimedTask, TaskQueue
    from service.runtime.runner import TaskRunner
    from service.runtime.worker import Worker

    class CountingStore(Store):
        def __init__(self, url: str) -> None:
            super().__init__(url)
            self.transactions = 0
            self.reads = 0
            self.transaction_seconds = 0.0
            self.statements: collections.Counter[str] = collections.Counter()
            self.execute_seconds = 0.0
            self.checkouts = 0
            self._started: list[float] = []
            sa.event.listen(self.engine, "before_cursor_execute", self._before)
            sa.event.listen(self.engine, "after_cursor_execute", self._after)
            sa.event.listen(self.engine, "checkout", self._checkout)

        def _before(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            self.statements[statement.lstrip().split(None, 1)[0].upper()] += 1
            self._started.append(time.perf_counter())

        def _after(self, *_: Any) -> None:
            self.execute_seconds += time.perf_counter() - self._started.pop()

        def _checkout(self, *_: Any) -> None:
            self.checkouts += 1

        @contextlib.contextmanager
        def transaction(self) -> Iterator[Session]:
            began = time.perf_counter()
            try:
                with super().transaction() as session:
                    yield session
            finally:
                self.transactions += 1
                self.transaction_seconds += time.perf_counter() - began

        @contextlib.contextmanager
        def read(self) -> Iterator[Session]:
            began = time.perf_counter()
            try:
                with super().read() as session:
                    yield session
            finally:
                self.reads += 1
                self.transaction_seconds += time.perf_counter() - began

    class TimedHandler(DeliverHandler):
        send_seconds = 0.0

        def _send(self, url: str, headers: dict[str, str], body: bytes) -> Any:
            began = time.perf_counter()
            try:
                return super()._send(url, headers, body)
            finally:
                self.send_seconds += time.perf_counter() - began

    class CountingQueue(TaskQueue):
        claims = 0  # claim transactions, empty ones included
        largest = 0  # most tasks one claim returned (the worker asks for 1)

        def claim_due_tasks(self, limit: int = 1, kinds: Any = None) -> list[ClaimedTask]:
            tasks = super().claim_due_tasks(limit, kinds)
            self.claims += 1
            self.largest = max(self.largest, len(tasks))
            return tasks

    store = CountingStore(bench.db_url)
    http = pinned_session(bench.policy)
    try:
        queue = CountingQueue(store)
        handler = TimedHandler(store, http)
        worker = Worker(TaskRunner(queue, {DELIVER: handler}), threads=1)
        # One delivery first, not counted: it opens the connections.
        warm = bench.new_batch(1, "anatomy probe warm-up")
        for _ in range(5):
            if not worker.run_once() and not bench.open_count(warm):
                break
        batch = bench.new_batch(size, "anatomy probe")
        store.transactions = store.reads = store.checkouts = queue.claims = queue.largest = 0
        store.statements.clear()
        store.execute_seconds = store.transaction_seconds = handler.send_seconds = 0.0
        counted = 0
        began = time.perf_counter()
        # Worker.run_once claims one task (limit=1) and runs what it got; bounded either way.
        for _ in range(size):
            counted += worker.run_once()
            if counted >= size:
                break
        total = time.perf_counter() - began
    finally:
        http.close()
        store.dispose()
    if counted != size or bench.open_count(batch):
        raise BenchError(f"anatomy probe ran {counted} of {size} deliveries, or left some open")
    rows = bench.batch_rows(batch)
    began = time.perf_counter()
    for _url, body, webhook_id, content_type in rows:
        sign(webhook_id, datetime.datetime.now(datetime.UTC), body, [batch.secret], content_type)
    sign_seconds = (time.perf_counter() - began) / len(rows)
    per = 1000.0 / counted
    total_ms = total * per
    transaction_ms = store.transaction_seconds * per
    send_ms = handler.send_seconds * per
    return {
        "deliveries": counted,
        "claims": round(queue.claims / counted, 3),
        "largest_claim": queue.largest,
        "transactions": round(store.transactions / counted, 2),
        "read_only_transactions": round(store.reads / counted, 2),
        "statements": {k: round(v / counted, 2) for k, v in store.statements.most_common()},
        "statements_total": round(sum(store.statements.values()) / counted, 2),
        "pool_checkouts": round(store.checkouts / counted, 2),
        "pre_ping": store.dialect == "postgresql",  # each checkout pings (pool_pre_ping)
        "total_ms": round(total_ms, 3),
        "transaction_ms": round(transaction_ms, 3),
        "execute_ms": round(store.execute_seconds * per, 3),
        "send_ms": round(send_ms, 3),
        "sign_ms": round(sign_seconds * 1000, 3),
        "other_ms": round(total_ms - transaction_ms - send_ms, 3),
        "single_thread_deliveries_per_s": round(1000.0 / total_ms, 1),
    }


# -- rounds ------------------------------------------------------------------------------


@dataclasses.dataclass
class Round:
    """One target sending one batch."""

    target: str
    number: int
    deliveries: int
    wall: float
    outcomes: collections.Counter[str]
    send_ms: list[float]
    queue_s: list[float]
    cpu: dict[str, float | None]  # CPU seconds per wall second, by process role
    checks: dict[str, Any]
    boot: float | None = None

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.outcomes.items() if not is_2xx(k))


def cpu_share(before: float | None, after: float | None, wall: float) -> float | None:
    if before is None or after is None or wall <= 0:
        return None
    return (after - before) / wall


def backends_cpu(pids: list[int]) -> dict[int, float]:
    found = {pid: process_cpu(pid) for pid in pids}
    return {pid: cpu for pid, cpu in found.items() if cpu is not None}


def cpu_now(sender: float | None, receiver: ReceiverClient) -> dict[str, float | None]:
    """CPU seconds so far of the sender, the receiver and the whole machine."""
    return {"sender": sender, "receiver": process_cpu(receiver.pid), "machine": machine_busy()}


def receiver_checks(stats: dict[str, Any], batch: Batch) -> dict[str, Any]:
    return {
        "receiver_posts": stats["posts"],
        "distinct_webhook_ids": stats["distinct_ids"],
        "webhook_ids_match_batch": stats["ids_digest"] == batch.digest,
        "duplicates": stats["duplicates"],
        "unsigned": stats["unsigned"],
        "connections_opened": stats["connections"],
        "malformed": stats["malformed"],
        "signatures_verified": verify_samples(stats["samples"], batch.secret),
    }


def genrelay_round(
    bench: Bench,
    processes: Processes,
    batch: Batch,
    number: int,
    threads: int,
    worker_env: dict[str, str],
    timeout: float,
) -> Round:
    """Start one worker on a ready backlog; time it from the first POST to the last finish."""
    receiver = bench.receiver
    receiver.reset()
    name = f"worker-{number}"
    started_at = time.time()
    pid = processes.start(
        name,
        [GENRELAY, "worker", "--threads", str(threads), "--poll-interval", POLL_INTERVAL],
        worker_env,
    ).pid
    deadline = time.monotonic() + timeout
    window_start: float | None = None
    cpu_start: dict[str, float | None] = {}
    backends_start: dict[int, float] = {}
    last_db_check = time.monotonic()
    most_held = 0  # sampled at the first POST and then about once a second
    while True:
        processes.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(
                f"genrelay round {number} did not finish within {timeout:.0f} s "
                f"(receiver: {receiver.stats()['posts']} of {batch.size}, "
                f"open deliveries + tasks: {bench.open_count(batch)})"
            )
        posts = receiver.stats()["posts"]
        if posts and window_start is None:
            window_start = time.monotonic()
            cpu_start = cpu_now(process_cpu(pid), receiver)
            backends_start = backends_cpu(bench.worker_backend_pids())
            most_held = max(most_held, bench.held_count(batch))
        now = time.monotonic()
        if posts >= batch.size or now - last_db_check >= DB_CHECK_INTERVAL:
            last_db_check = now
            if posts < batch.size:
                most_held = max(most_held, bench.held_count(batch))
            if bench.open_count(batch) == 0:
                break
        time.sleep(WATCH_INTERVAL)
    window_end = time.monotonic()
    cpu_end = cpu_now(process_cpu(pid), receiver)
    backends_end = backends_cpu(bench.worker_backend_pids())
    stats = receiver.stats()
    exit_code = processes.stop(name)
    result = bench.outcome(batch)

    first_at = stats["first_at"] or started_at
    ends = [t for t in (stats["last_at"], result["last_finished_at"]) if t is not None]
    wall = (max(ends) if ends else time.time()) - first_at
    window = window_end - (window_start or window_end)
    cpu: dict[str, float | None] = {
        role: cpu_share(cpu_start.get(role), cpu_end[role], window) for role in cpu_end
    }
    if bench.store.dialect == "postgresql":
        used = sum(cpu - backends_start.get(pid, 0.0) for pid, cpu in backends_end.items())
        cpu["database"] = used / window if window > 0 and backends_end else None
    checks = receiver_checks(stats, batch)
    checks.update(
        {
            "attempts": result["attempts"],
            "delivery_status": result["delivery_status"],
            "task_status": result["task_status"],
            "tasks_claimed_more_than_once": result["task_attempts_over_1"],
            "most_tasks_held_at_once": most_held,
            "worker_exit_code": exit_code,
        }
    )
    return Round(
        target="genrelay",
        number=number,
        deliveries=batch.size,
        wall=wall,
        outcomes=collections.Counter(result["outcomes"]),
        send_ms=result["send_ms"],
        queue_s=result["queue_latencies"],
        cpu=cpu,
        checks=checks,
        boot=first_at - started_at,
    )


def bare_round(bench: Bench, batch: Batch, number: int, threads: int, timeout: float) -> Round:
    """Sign and POST the batch's stored bodies from a plain thread pool."""
    from service.notifications.signing import sign

    rows = bench.batch_rows(batch)
    secrets_ = [batch.secret]
    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()

    def open_session() -> None:
        session = requests.Session()
        local.session = session
        with lock:
            sessions.append(session)

    def send(row: tuple[str, bytes, str, str]) -> tuple[str, float]:
        url, body, webhook_id, content_type = row
        signed = sign(webhook_id, datetime.datetime.now(datetime.UTC), body, secrets_, content_type)
        began = time.perf_counter()
        try:
            response = local.session.post(
                url,
                data=signed.body,
                headers=signed.headers,
                timeout=SEND_TIMEOUT,
                allow_redirects=False,
            )
            outcome = str(response.status_code)
            response.close()
        except requests.RequestException as exc:
            outcome = type(exc).__name__
        return outcome, (time.perf_counter() - began) * 1000

    receiver = bench.receiver
    receiver.reset()
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=threads, thread_name_prefix="bare", initializer=open_session
    )
    try:
        cpu_before = cpu_now(time.process_time(), receiver)
        window_start = time.monotonic()
        began = time.perf_counter()
        pending = {pool.submit(send, row) for row in rows}
        deadline = time.monotonic() + timeout
        done: set[concurrent.futures.Future[tuple[str, float]]] = set()
        while pending:
            if time.monotonic() > deadline:
                raise BenchError(f"bare round {number} did not finish within {timeout:.0f} s")
            finished, pending = concurrent.futures.wait(pending, timeout=0.5)
            done |= finished
        wall = time.perf_counter() - began
        window = time.monotonic() - window_start
        cpu_after = cpu_now(time.process_time(), receiver)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for session in sessions:
            session.close()
    results = [f.result() for f in done]
    stats = receiver.stats()
    return Round(
        target="bare",
        number=number,
        deliveries=len(rows),
        wall=wall,
        outcomes=collections.Counter(outcome for outcome, _ in results),
        send_ms=sorted(ms for _, ms in results),
        queue_s=[],
        cpu={role: cpu_share(cpu_before[role], cpu_after[role], window) for role in cpu_before},
        checks=receiver_checks(stats, batch),
    )


# -- statistics --------------------------------------------------------------------------


def _round3(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 3)


def summarize(rounds: list[Round]) -> dict[str, Any]:
    """Pooled figures of some rounds of one target."""
    deliveries = sum(r.deliveries for r in rounds)
    wall = sum(r.wall for r in rounds)
    send_ms = sorted(x for r in rounds for x in r.send_ms)
    queue_s = sorted(x for r in rounds for x in r.queue_s)
    outcomes: collections.Counter[str] = collections.Counter()
    for r in rounds:
        outcomes.update(r.outcomes)
    boots = [r.boot for r in rounds if r.boot is not None]
    cpu: dict[str, float | None] = {}
    for role in ("sender", "database", "receiver", "machine"):
        # Weighted by each round's time, like the pooled rate.
        pairs = [(share, r.wall) for r in rounds if (share := r.cpu.get(role)) is not None]
        weight = sum(w for _, w in pairs)
        cpu[role] = _round3(sum(s * w for s, w in pairs) / weight) if weight > 0 else None
    return {
        "deliveries": deliveries,
        "errors": sum(r.errors for r in rounds),
        "wall_s": round(wall, 3),
        "deliveries_per_s": round(deliveries / wall, 1) if wall > 0 else None,
        "boot_s": _round3(sum(boots) / len(boots)) if boots else None,
        "send_p50_ms": _round3(percentile(send_ms, 50)),
        "send_p99_ms": _round3(percentile(send_ms, 99)),
        "queue_p50_s": _round3(percentile(queue_s, 50)),
        "queue_p99_s": _round3(percentile(queue_s, 99)),
        "cpu_share": cpu,
        "outcomes": dict(sorted(outcomes.items())),
    }


# -- logs --------------------------------------------------------------------------------

_LOG_PATTERNS = {
    "warning_or_error": WARNING_OR_ERROR,
    "traceback": TRACEBACK,
    "database_locked": DATABASE_LOCKED,
    "task_crashed": re.compile(r"crashed|is dead after"),
}


# -- report ------------------------------------------------------------------------------


def run_facts(args: argparse.Namespace, database: str, body_bytes: float) -> dict[str, Any]:
    return {
        **machine_facts(),
        "database": database,
        "deliveries_per_round": args.deliveries,
        "threads": args.threads,
        "rounds_per_target": args.rounds,
        "genrelay": f"1 x genrelay worker --threads {args.threads} --poll-interval {POLL_INTERVAL}",
        "bare": f"ThreadPoolExecutor({args.threads}), one requests.Session per thread",
        "receiver": "asyncio HTTP/1.1 server, own process, 204 to every POST",
        "body": f"Standard Webhooks JSON, generation.succeeded, mean {body_bytes:.0f} bytes",
    }


def _fmt(value: float | None, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def print_report(report: dict[str, Any]) -> None:
    print()
    print("== genrelay webhook-delivery benchmark ==")
    for key, value in report["machine"].items():
        print(f"{key:>22}: {value}")

    anatomy = report.get("anatomy")
    if anatomy:
        print()
        print(
            f"anatomy of one genrelay delivery ({anatomy['deliveries']} deliveries one at a time, "
            "in this process, no contention):"
        )
        statements = ", ".join(f"{k} {v:g}" for k, v in anatomy["statements"].items())
        ping = " (each +1 pre-ping round trip)" if anatomy["pre_ping"] else ""
        others = round(anatomy["transactions"] - anatomy["claims"], 3)
        print(
            f"  transactions: {anatomy['claims']:g} claim + {anatomy['read_only_transactions']:g} "
            f"read-only + {others:g} other read-write; {anatomy['statements_total']:g} statements "
            f"({statements}); {anatomy['pool_checkouts']:g} pool checkouts{ping}"
        )
        print(
            f"  {anatomy['total_ms']:.2f} ms per delivery = {anatomy['transaction_ms']:.2f} ms in "
            f"transactions (of which {anatomy['execute_ms']:.2f} ms in cursor.execute) + "
            f"{anatomy['send_ms']:.2f} ms HTTP + {anatomy['other_ms']:.2f} ms other "
            f"(signing alone: {anatomy['sign_ms']:.3f} ms)"
        )
        print(f"  -> {anatomy['single_thread_deliveries_per_s']:.0f} deliveries/s on one thread")
        if anatomy["largest_claim"] > 1:
            print(
                f"  !! one claim (Worker.run_once asks for 1 task) returned "
                f"{anatomy['largest_claim']} tasks: see deliveries.md, 'One claim, many tasks'"
            )

    print()
    columns = [  # (title, unit, width)
        ("target", "", 9),
        ("round", "", 5),
        ("deliveries", "", 10),
        ("errors", "", 6),
        ("time", "s", 7),
        ("deliv/s", "", 8),
        ("boot", "s", 5),
        ("send p50", "ms", 8),
        ("send p99", "ms", 8),
        ("queue p50", "s", 9),
        ("queue p99", "s", 9),
        ("sender", "CPU", 6),
        ("db", "CPU", 5),
        ("recv", "CPU", 5),
        ("machine", "CPU", 7),
    ]
    print(" ".join(f"{t:<{w}}" if i == 0 else f"{t:>{w}}" for i, (t, _, w) in enumerate(columns)))
    print(" ".join(f"{u:>{w}}" for _, u, w in columns))
    print("-" * (sum(w for _, _, w in columns) + len(columns) - 1))
    rows = [(r["target"], str(r["round"]), r) for r in report["rounds"]]
    rows += [(name, "all", s) for name, s in report["targets"].items()]
    for target, number, s in rows:
        cpu = s["cpu_share"]
        cells = [
            target,
            number,
            str(s["deliveries"]),
            str(s["errors"]),
            _fmt(s["wall_s"], ".2f"),
            _fmt(s["deliveries_per_s"], ".1f"),
            _fmt(s["boot_s"], ".2f"),
            _fmt(s["send_p50_ms"], ".1f"),
            _fmt(s["send_p99_ms"], ".1f"),
            _fmt(s["queue_p50_s"], ".2f"),
            _fmt(s["queue_p99_s"], ".2f"),
            _pct(cpu["sender"]),
            _pct(cpu.get("database")),
            _pct(cpu["receiver"]),
            _pct(cpu["machine"]),
        ]
        print(
            " ".join(
                f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                for i, (c, (_, _, w)) in enumerate(zip(cells, columns, strict=True))
            )
        )
    ratio = report["ratio_deliveries_per_s"]
    print()
    print(f"genrelay / bare: deliveries/s x{_fmt(ratio, '.3f')}")
    print()
    for r in report["rounds"]:
        c = r["checks"]
        line = (
            f"{r['target']} round {r['round']}: receiver got {c['receiver_posts']} POSTs, "
            f"{c['distinct_webhook_ids']} distinct webhook-ids "
            f"({'the batch' if c['webhook_ids_match_batch'] else 'NOT the batch'}), "
            f"{c['duplicates']} duplicates, {c['unsigned']} unsigned, "
            f"{c['connections_opened']} connections, signatures "
            f"{'verified' if c['signatures_verified'] else 'NOT verified'}"
        )
        if r["target"] == "genrelay":
            line += (
                f"; attempts {c['attempts']}, deliveries {c['delivery_status']}, "
                f"tasks {c['task_status']}, claimed twice {c['tasks_claimed_more_than_once']}, "
                f"most tasks held at once {c['most_tasks_held_at_once']} (sampled; threads: "
                f"{report['machine']['threads']}), "
                f"worker exit {c['worker_exit_code']}"
            )
        print(line)
        threads = report["machine"]["threads"]
        if r["target"] == "genrelay" and c["most_tasks_held_at_once"] > threads:
            print(
                f"    !! {c['most_tasks_held_at_once']} tasks held at once by {threads} threads: "
                "one claim took many (deliveries.md, 'One claim, many tasks')"
            )
        odd = {k: v for k, v in r["outcomes"].items() if not is_2xx(k)}
        if odd:
            print(f"    non-2xx outcomes: {odd}")
    for name, scan in report["logs"].items():
        print_log_scan(name, scan, lines=3)


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=2000, help="per round (2000)")
    parser.add_argument(
        "--threads", type=int, default=8, help="worker threads = bare pool size (8)"
    )
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per target (2)")
    parser.add_argument(
        "--probe", type=int, default=200, help="deliveries of the anatomy probe (200; 0: skip)"
    )
    parser.add_argument(
        "--round-timeout", type=float, default=180.0, help="seconds a round may take (180)"
    )
    add_common_options(
        parser, postgres_url=postgres_url_from_env(), logs="the worker and receiver logs"
    )
    parser.add_argument("--receiver-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    require_positive(parser, args, ("deliveries", "threads", "rounds"))
    if args.probe < 0:
        parser.error("--probe must not be negative")
    if args.round_timeout <= 0:
        parser.error("--round-timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.receiver_port is not None:
        return serve_receiver(args.receiver_port)
    handle_signals()
    with work_dirs(args.log_dir) as (tmp_dir, log_dir):
        processes = Processes(log_dir)
        try:
            with fresh_database(
                args.database,
                tmp_dir,
                args.postgres_url,
                settings=("fsync", "synchronous_commit"),
            ) as (db_url, db_desc):
                try:
                    report = run(args, processes, db_url, db_desc)
                finally:
                    clean_up(processes)
                report["logs"] = {
                    name: scan_log(processes.log_path(name), _LOG_PATTERNS)
                    for name in processes.children
                    if name.startswith("worker")
                }
        except BenchError as exc:
            return failed(exc, processes)
        except KeyboardInterrupt:
            return interrupted()
    return finish(report, print_report, args.json_out)


def run(
    args: argparse.Namespace, processes: Processes, db_url: str, db_desc: str
) -> dict[str, Any]:
    setup_env = {**base_env(), "GENRELAY_DATABASE_URL": db_url}
    worker_url = db_url
    if db_url.startswith("postgresql"):
        worker_url += f"?application_name={WORKER_APPLICATION_NAME}"
    worker_env = {
        **base_env(),
        "GENRELAY_DATABASE_URL": worker_url,
        "GENRELAY_DEEPIMAGE_API_KEY": "x",
        # Never called (no submit/poll/store tasks here); loopback anyway.
        "GENRELAY_DEEPIMAGE_URL": f"http://{LOOPBACK}:1",
        "GENRELAY_GCS_BUCKET": "x",
        # The worker builds a GCS client at start but never calls it for deliveries.
        "STORAGE_EMULATOR_HOST": f"http://{LOOPBACK}:1",
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
    }

    print(f"database: {db_desc}; migrating and creating a key", flush=True)
    prepare_database(setup_env)

    port = free_port()
    receiver_pid = processes.start(
        "receiver",
        [sys.executable, str(Path(__file__).resolve()), "--receiver-port", str(port)],
        base_env(),
    ).pid
    receiver = ReceiverClient(port, receiver_pid)
    bench = Bench(db_url, receiver)
    try:
        wait_until(lambda: receiver.stats() is not None, processes, "the receiver")
        bench.find_tenant("bench")
        anatomy: dict[str, Any] | None = None
        if args.probe:
            print(f"anatomy probe: {args.probe} deliveries one at a time", flush=True)
            anatomy = probe(bench, args.probe)
        rounds: list[Round] = []
        body_bytes: list[float] = []
        for number in range(1, args.rounds + 1):
            batch = bench.new_batch(args.deliveries, f"bench round {number}")
            body_bytes.append(batch.body_bytes / batch.size)
            print(
                f"round {number}: backlog of {batch.size} deliveries built in "
                f"{batch.build_seconds:.1f} s (not timed)",
                flush=True,
            )
            g = genrelay_round(
                bench, processes, batch, number, args.threads, worker_env, args.round_timeout
            )
            rounds.append(g)
            print(
                f"round {number} genrelay: {g.deliveries / g.wall:.1f} deliveries/s "
                f"({g.wall:.2f} s, boot {g.boot:.2f} s), {g.errors} errors",
                flush=True,
            )
            processes.check_alive()
            b = bare_round(bench, batch, number, args.threads, args.round_timeout)
            rounds.append(b)
            print(
                f"round {number} bare: {b.deliveries / b.wall:.1f} deliveries/s "
                f"({b.wall:.2f} s), {b.errors} errors",
                flush=True,
            )
    finally:
        bench.close()
        receiver.close()

    per_target = {
        name: summarize([r for r in rounds if r.target == name]) for name in ("genrelay", "bare")
    }
    g_rate = per_target["genrelay"]["deliveries_per_s"]
    b_rate = per_target["bare"]["deliveries_per_s"]
    return {
        "machine": run_facts(args, db_desc, sum(body_bytes) / len(body_bytes)),
        "anatomy": anatomy,
        "rounds": [
            {
                "target": r.target,
                "round": r.number,
                **summarize([r]),
                "checks": r.checks,
            }
            for r in rounds
        ],
        "targets": per_target,
        "ratio_deliveries_per_s": round(g_rate / b_rate, 3) if g_rate and b_rate else None,
    }


if __name__ == "__main__":
    sys.exit(main())
