"""Prometheus metrics.

Two kinds:
- Instruments counted by the process that does the work: HTTP latency by route (web),
  Deep-Image calls, GCS uploads, delivery outcomes and task outcomes (worker). Under gunicorn
  the web processes share them through prometheus-client's multiprocess mode
  (`PROMETHEUS_MULTIPROC_DIR`, set up in service/server/gunicorn_conf.py); the worker serves its own
  with `genrelay worker --http-port N` (`serve_worker_metrics`: loopback only, unless
  GENRELAY_METRICS_TOKEN is set and required).
- Gauges read from the database at scrape time: generations by status, pending tasks and the
  age of the oldest, deliveries by status. They are the same whichever process answers.
"""

from __future__ import annotations

import hmac
import logging
import os
import socketserver
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import sqlalchemy as sa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from service.database import Store
from service.generations.line import read_state
from service.models import Delivery, Generation, Task, Tenant, utcnow

log = logging.getLogger("genrelay.metrics")

HTTP_LATENCY = Histogram(
    "genrelay_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route", "status"],
)
UPSTREAM_LATENCY = Histogram(
    "genrelay_upstream_request_duration_seconds",
    "Deep-Image API calls, by operation and outcome (ok, transient, permanent).",
    ["operation", "outcome"],
)
GCS_UPLOAD_LATENCY = Histogram(
    "genrelay_gcs_upload_duration_seconds",
    "Streaming a result into GCS (download included), by outcome.",
    ["outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
DELIVERY_OUTCOMES = Counter(
    "genrelay_delivery_attempts_total",
    "Webhook delivery attempts, by outcome (succeeded, retry, failed, dead).",
    ["outcome"],
)
TASK_OUTCOMES = Counter(
    "genrelay_tasks_total",
    "Task executions, by kind and outcome (done, pending, dead, lost).",
    ["kind", "outcome"],
)
UPSTREAM_REFUSALS = Counter(
    "genrelay_upstream_refusals_total",
    "429 answers from Deep-Image to a submission (the generation waits in the line again).",
)
PURGED_ROWS = Counter(
    "genrelay_purged_rows_total",
    "Rows deleted by housekeeping, by what they were (idempotency_keys, done_tasks, dead_tasks, "
    "trigger_events).",
    ["what"],
)


# Tenants named in genrelay_generations_waiting; the rest are summed as `other`.
WAITING_TENANT_LABELS = 10


class DatabaseCollector:
    """Gauges computed from the database, at most every CACHE_SECONDS per process.

    Counting a million-row table takes tens of milliseconds; scrapes come every 15-60 s from
    each scraper, and gauges a few seconds old are as good.
    """

    CACHE_SECONDS = 15.0
    # Per engine (weakly held: a disposed engine's entry goes with it), per process.
    _cache: weakref.WeakKeyDictionary[Any, tuple[float, list[Metric]]] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        """The gauges, and `genrelay_database_up`: 0 (and no gauges) while the database cannot
        be read, so a scrape still has every other metric then."""
        key = self.store.engine
        with self._lock:
            cached = self._cache.get(key)
            if cached is None or time.monotonic() - cached[0] > self.CACHE_SECONDS:
                cached = (time.monotonic(), self._read())
                self._cache[key] = cached
        yield from cached[1]

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "genrelay_database_up", "1 if the last read of the database's gauges succeeded."
        )
        try:
            gauges = list(self._query())
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics: the database could not be read: %s", type(exc).__name__)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [*gauges, up]

    def _query(self) -> Iterator[Metric]:
        generations = GaugeMetricFamily(
            "genrelay_generations", "Generations by status.", labels=["status"]
        )
        pending = GaugeMetricFamily(
            "genrelay_tasks_pending",
            "Tasks waiting to run (pending or held), by kind.",
            labels=["kind"],
        )
        oldest = GaugeMetricFamily(
            "genrelay_tasks_oldest_due_seconds",
            "How long the longest-waiting due task has been due, by kind.",
            labels=["kind"],
        )
        deliveries = GaugeMetricFamily(
            "genrelay_deliveries", "Deliveries by status.", labels=["status"]
        )
        in_flight = GaugeMetricFamily(
            "genrelay_upstream_in_flight",
            "Jobs holding one of the Deep-Image account's slots (submitted, result not known).",
        )
        limit = GaugeMetricFamily(
            "genrelay_upstream_concurrency_limit",
            "The account's concurrency limit admissions respect, by where it came from "
            "(configured, stated by a 429, probing).",
            labels=["source"],
        )
        waiting = GaugeMetricFamily(
            "genrelay_generations_waiting",
            f"Generations waiting for a slot, for the {WAITING_TENANT_LABELS} tenants with the "
            "most waiting (by name; by id for one named `other`) and the rest as `other`.",
            labels=["tenant"],
        )
        now = utcnow()
        with self.store.read() as session:
            for status, count in session.execute(
                sa.select(Generation.status, sa.func.count()).group_by(Generation.status)
            ):
                generations.add_metric([status], count)
            for kind, count in session.execute(
                sa.select(Task.kind, sa.func.count())
                .where(Task.status.in_(["pending", "running"]))
                .group_by(Task.kind)
            ):
                pending.add_metric([kind], count)
            for kind, due in session.execute(
                sa.select(Task.kind, sa.func.min(Task.run_at))
                .where(Task.status == "pending", Task.run_at <= now)
                .group_by(Task.kind)
            ):
                oldest.add_metric([kind], max(0.0, (now - due).total_seconds()))
            for status, count in session.execute(
                sa.select(Delivery.status, sa.func.count()).group_by(Delivery.status)
            ):
                deliveries.add_metric([status], count)
            line = read_state(session)
            in_flight.add_metric([], line.in_flight)
            limit.add_metric([line.limit_source], line.limit)
            ranked = sorted(line.waiting_by_tenant.items(), key=lambda item: -item[1])
            shown = dict(ranked[:WAITING_TENANT_LABELS])
            names: dict[str, str] = {
                tenant_id: name
                for tenant_id, name in session.execute(
                    sa.select(Tenant.id, Tenant.name).where(Tenant.id.in_(shown))
                )
            }
            for tenant_id, count in shown.items():
                label = names.get(tenant_id, tenant_id)
                # A tenant named `other` is shown by its id: two series labelled alike would
                # make Prometheus refuse the whole scrape.
                waiting.add_metric([tenant_id if label == "other" else label], count)
            waiting.add_metric(["other"], sum(n for _, n in ranked[WAITING_TENANT_LABELS:]))
        yield from (generations, pending, oldest, deliveries, in_flight, limit, waiting)

    def describe(self) -> list[Any]:
        return []  # collected on demand only: registering must not query the database


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No per-scrape line on stderr."""


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_worker_metrics(port: int, token: str | None) -> WSGIServer:
    """The worker's metrics on `port`, from a daemon thread (`genrelay worker --http-port`).

    Without a token only loopback can reach it (a sidecar or `kubectl port-forward`); with
    GENRELAY_METRICS_TOKEN set it listens on every interface and wants the token, as the web
    service's /metrics does.
    """
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if token is not None:
            given = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                start_response(
                    "401 Unauthorized",
                    [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
                )
                return [b"send the metrics token as 'Authorization: Bearer <token>'\n"]
        return metrics_app(environ, start_response)

    host = "0.0.0.0" if token is not None else "127.0.0.1"  # noqa: S104 - guarded by the token
    server = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def exposition(store: Store | None) -> tuple[bytes, str]:
    """The text to serve at /metrics: this process's (or all gunicorn workers') metrics,
    and the database gauges when a store is given."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        text = generate_latest(registry)
    else:
        text = generate_latest(REGISTRY)
    if store is not None:
        database = CollectorRegistry(auto_describe=False)
        database.register(DatabaseCollector(store))
        text += generate_latest(database)
    return text, CONTENT_TYPE_LATEST
