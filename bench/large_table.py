"""Large-table benchmark: intake latency with 1 M generations and 100 k pending tasks vs empty.

What is measured
    Two fresh PostgreSQL databases, both migrated, both with a tenant ``bench`` and its key:

    - ``empty``: nothing else.
    - ``large``: bulk-filled with plain SQL (``INSERT ... SELECT generate_series``, FKs and
      NOT NULLs enforced as usual) before anything is measured: ``--generations`` rows
      (1,000,000) spread evenly over ``--tenants`` tenants (100, ``bench`` among them, so it
      owns ~10 k), ``created_at`` spread over 90 days, 96 % succeeded (with a ``result``
      document and a source URL), 3 % failed, 1 % canceled, the last hour ``processing``; an
      idempotency key (kept 24 h, never cleaned up, as today) for every other generation;
      and ``--tasks`` pending tasks (100,000): one ``poll`` per processing generation, the
      rest ``deliver`` tasks (a subscriber's retries), all with ``run_at`` 30 min to 6.5 h
      ahead, so none is due (pending, not claimable). Then ``VACUUM (ANALYZE)`` and a
      ``CHECKPOINT`` so neither autovacuum nor a checkpoint lands in a round. Each step is
      timed.

    Then ``genrelay serve`` (2 processes x 8 threads, no worker: the intake's first submit
    is inline, to ``genrelay simulator``) runs against each database in turn, in rounds
    alternating empty, large, empty, large. Each round, after a warm-up, takes the same
    closed-loop load from ``--concurrency`` client threads (8):

    - ``--requests`` (1000) ``POST /v1/generations``, each with its own ``Idempotency-Key``;
    - ``--reads`` (300) ``GET /v1/generations`` (first page, 20 items) of ``bench``;
    - ``--reads`` ``GET /v1/generations/{id}`` of random ``bench`` generations;
    - 10 sequential ``GET /metrics`` (its gauges count rows in the database on each scrape).

    Before the rounds (right after the fill, while the task queue is as filled), in this
    process, on both databases: ``EXPLAIN (ANALYZE, BUFFERS)`` of the statements genrelay
    sends for ``claim_due_tasks`` (as filled, and with every pending task made due inside a
    rolled-back transaction), the list page, the idempotency lookup, the read by id, the
    API-key lookup and the ``/metrics`` gauges, captured from genrelay's code at run time
    (SQLAlchemy cursor events), not copied; then a statement profile: ``--probe`` intakes,
    lists and reads through genrelay's own service classes, one at a time, every statement,
    COMMIT and pool pre-ping timed. Then ``VACUUM (ANALYZE) tasks`` (the rolled-back UPDATEs
    left dead rows) and a ``CHECKPOINT``.

How to read the report
    - Latencies are client-side, ``time.perf_counter()`` around each request; nearest-rank
      percentiles pooled over the rounds of a database. ``large / empty`` is the ratio of the
      pooled figures; the issue's target is intake p50 and p99 within 1.2x (PASS/FAIL is
      printed, the exit code stays 0).
    - ``CPU ms / intake``: CPU of ``genrelay serve`` and of the database's PostgreSQL backends
      per POST, over the intake phase (``/proc/<pid>/stat``): a slower query shows up as
      more PostgreSQL CPU per request before it shows in the latency.
    - ``WAL per intake``: bytes (``pg_current_wal_lsn()``), full-page images and records
      (``pg_stat_wal``) per POST in each round's intake phase; server-wide. Inserts at random
      places of large B-tree indexes log whole 8 KiB pages (the first change of a page after
      a checkpoint), which small indexes rarely do.
    - The statement profile has no concurrency, so it isolates the database's share: DB ms
      per operation and the slowest statements, empty vs large.
    - Rounds of one database should agree; the machine is shared (``load average`` in the
      header, ``other`` CPU per round), so trust a ratio less when they do not.

Run from the repository root:

    .venv/bin/python bench/large_table.py [--generations 1000000] [--tasks 100000]
        [--requests 1000] [--concurrency 8] [--rounds 2] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import secrets
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import requests
import sqlalchemy as sa
from _stack import (
    CLIENT_TIMEOUT,
    DEFAULT_POSTGRES_URL,
    GENRELAY,
    LOOPBACK,
    SEED_BODY,
    SIMULATOR_KEY,
    SIMULATOR_LIMIT,
    BenchError,
    Context,
    CpuProbe,
    Database,
    LoadResult,
    Processes,
    add_common_options,
    base_env,
    closed_loop,
    failed,
    finish,
    free_port,
    fresh_database,
    handle_signals,
    interrupted,
    latency_stats,
    machine_facts,
    own_process,
    prepare_database,
    print_log_scan,
    require_positive,
    scan_log,
    shared_stack,
    tree_of,
    wait_until,
    work_dirs,
)

BUCKET = "genrelay-bench"
SIM_PROCESSING_TIME = 5.0  # jobs stay pending; there are no callbacks (no public URL)
TARGET_RATIO = 1.2
TENANT = "bench"
LIST_LIMIT = 20
METRICS_REQUESTS = 10
ROUND_PAUSE = 1.0
TARGETS = ("empty", "large")


# -- the fill ------------------------------------------------------------------------------

# psycopg placeholders are %(name)s: no bare % in these statements (mod() instead).
FILL_TENANTS = """
INSERT INTO tenants (id, name, created_at)
SELECT 'ten_' || md5('filler-' || t), 'bench-filler-' || lpad(t::text, 3, '0'),
       now() - interval '180 days'
FROM generate_series(1, %(fillers)s) AS t
"""

# Generations in created_at order (as a real table grows), ids random like uuid4 hex, and an
# idempotency key for every other one, written by the same statement.
FILL_GENERATIONS = """
WITH params AS (
  SELECT array_agg(id ORDER BY id) AS tenants, count(*)::int AS n_tenants, now() AS now
  FROM tenants
), base AS (
  SELECT i, 'gen_' || md5('g' || i) AS id,
    p.tenants[1 + mod(hashint4(i) & 2147483647, p.n_tenants)] AS tenant_id,
    p.now - %(days)s * interval '1 day' * ((%(n)s - i)::float8 / %(n)s) AS at,
    md5('j' || i)::uuid::text AS job,
    mod(hashint4(i + 7) & 2147483647, 1000) AS dice,
    p.now AS now
  FROM params AS p, generate_series(1, %(n)s) AS i
), typed AS (
  SELECT b.*, CASE
      WHEN b.at > b.now - interval '1 hour' THEN 'processing'
      WHEN b.dice < 960 THEN 'succeeded'
      WHEN b.dice < 990 THEN 'failed'
      ELSE 'canceled' END AS status
  FROM base AS b
), inserted AS (
  INSERT INTO generations (id, tenant_id, status, input, metadata, upstream_job, result,
    error_code, error_message, created_at, updated_at, submitted_at, completed_at,
    source_url, source_found_at)
  SELECT t.id, t.tenant_id, t.status,
    jsonb_build_object('width', 2048, 'height', 1024, 'background', jsonb_build_object(
      'generate', jsonb_build_object(
        'description', 'a lighthouse at dawn, variant ' || mod(t.i, 997)))),
    jsonb_build_object('order', t.i::text),
    t.job,
    CASE WHEN t.status = 'succeeded' THEN jsonb_build_object(
      'uri', 'gs://' || %(bucket)s || '/' || t.tenant_id
             || to_char(t.at AT TIME ZONE 'UTC', '/YYYY/MM/DD/') || t.id || '.png',
      'content_type', 'image/png', 'size', 1000000 + mod(t.i, 500000),
      'crc32c', 'AAAAAA==', 'width', 2048, 'height', 1024) END,
    CASE WHEN t.status = 'failed' THEN 'upstream_job_failed' END,
    CASE WHEN t.status = 'failed' THEN 'Deep-Image reported that the job failed' END,
    t.at,
    CASE WHEN t.status = 'processing' THEN t.at + interval '300 milliseconds'
         ELSE t.at + interval '20 seconds' END,
    t.at + interval '300 milliseconds',
    CASE WHEN t.status <> 'processing' THEN t.at + interval '20 seconds' END,
    CASE WHEN t.status = 'succeeded'
         THEN 'https://deep-image.ai/api/downloadTemporary_result/' || t.job || '.png' END,
    CASE WHEN t.status = 'succeeded' THEN t.at + interval '15 seconds' END
  FROM typed AS t
  RETURNING id, tenant_id, input, metadata, created_at
)
INSERT INTO idempotency_keys (tenant_id, key, request_hash, generation_id, response_status,
  response_body, created_at, expires_at)
SELECT g.tenant_id, 'order-' || (g.metadata ->> 'order'), encode(sha256(g.id::bytea), 'hex'),
  g.id, 202,
  jsonb_build_object('id', g.id, 'status', 'processing', 'input', g.input,
                     'metadata', g.metadata, 'created_at', g.created_at),
  g.created_at, g.created_at + interval '24 hours'
FROM inserted AS g
WHERE mod((g.metadata ->> 'order')::int, 2) = 0
"""

# One poll task per processing generation, as the submit task leaves them.
FILL_POLL_TASKS = """
INSERT INTO tasks (id, kind, generation_id, payload, status, attempts, max_attempts, run_at,
                   created_at, updated_at)
SELECT 'task_' || md5('poll' || id), 'poll', id, jsonb_build_object('delay', 120.0),
  'pending', 0, 10,
  now() + interval '30 minutes' + random() * interval '6 hours', submitted_at, submitted_at
FROM generations WHERE status = 'processing'
LIMIT %(tasks)s
"""

# The rest: deliveries waiting for their next retry (a subscriber that is down).
FILL_DELIVER_TASKS = """
INSERT INTO tasks (id, kind, generation_id, payload, status, attempts, max_attempts, run_at,
                   created_at, updated_at, last_error)
SELECT 'task_' || md5('deliver' || i), 'deliver',
  'gen_' || md5('g' || (%(n)s - mod(i, 50000))),
  jsonb_build_object('delivery_id', 'dlv_' || md5('d' || i)), 'pending', mod(i, 3), 10,
  now() + interval '30 minutes' + random() * interval '6 hours',
  now() - interval '3 hours', now() - interval '1 hour',
  CASE WHEN mod(i, 3) > 0 THEN 'HTTP 503 from the subscriber' END
FROM generate_series(1, %(count)s) AS i
"""


def fill(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    """Bulk-fill the large database; every step timed."""
    steps: list[dict[str, Any]] = []

    def step(name: str, sql: str, params: dict[str, Any] | None = None) -> int:
        print(f"   {name} ...", end="", flush=True)
        began = time.perf_counter()
        rows = db.execute(sql, params)
        seconds = time.perf_counter() - began
        steps.append({"step": name, "seconds": round(seconds, 2), "rows": rows})
        print(f" {seconds:.1f} s", flush=True)
        return rows

    db.execute("SET synchronous_commit = off")  # this session only: a throwaway database
    began = time.perf_counter()
    step("tenants", FILL_TENANTS, {"fillers": args.tenants - 1})
    keys = step(
        "generations and idempotency keys",
        FILL_GENERATIONS,
        {"n": args.generations, "days": 90, "bucket": BUCKET},
    )
    # The statement's row count is the outer INSERT's (the keys): note both.
    steps[-1]["rows"] = int(db.scalar("SELECT count(*) FROM generations"))
    steps[-1]["idempotency_keys"] = keys
    polls = step("poll tasks", FILL_POLL_TASKS, {"tasks": args.tasks})
    step(
        "deliver tasks",
        FILL_DELIVER_TASKS,
        {"count": max(0, args.tasks - polls), "n": args.generations},
    )
    step("VACUUM (ANALYZE)", "VACUUM (ANALYZE)")
    step("CHECKPOINT", "CHECKPOINT")
    total = time.perf_counter() - began
    return {"steps": steps, "seconds": round(total, 2)}


def table_facts(db: Database) -> dict[str, Any]:
    tables = {
        name: {
            "rows": int(db.scalar(f"SELECT count(*) FROM {name}")),  # noqa: S608 - fixed names
            "bytes": int(db.scalar("SELECT pg_total_relation_size(%s::regclass)", (name,))),
        }
        for name in ("generations", "idempotency_keys", "tasks", "tenants")
    }
    tasks = db.rows(
        "SELECT kind, count(*), count(*) FILTER (WHERE run_at <= now()), "
        "min(run_at) - now() FROM tasks WHERE status = 'pending' GROUP BY kind ORDER BY kind"
    )
    statuses = db.rows("SELECT status, count(*) FROM generations GROUP BY status ORDER BY 1")
    bench = db.scalar(
        "SELECT count(*) FROM generations g JOIN tenants t ON t.id = g.tenant_id WHERE t.name = %s",
        (TENANT,),
    )
    return {
        "tables": tables,
        "pending_tasks": {k: {"count": n, "due": d, "soonest_in": str(s)} for k, n, d, s in tasks},
        "generations_by_status": dict(statuses),
        "bench_tenant_generations": bench,
        "database_bytes": db.scalar("SELECT pg_database_size(current_database())"),
    }


# -- one round -----------------------------------------------------------------------------


class Target:
    """One database with its tenant key."""

    def __init__(self, name: str, url: str, desc: str, api_key: str, db: Database) -> None:
        self.name = name
        self.url = url
        self.desc = desc
        self.api_key = api_key
        self.db = db
        self.tenant_id = str(db.scalar("SELECT id FROM tenants WHERE name = %s", (TENANT,)))


def measure_round(ctx: Context, target: Target, number: int) -> dict[str, Any]:
    """`genrelay serve` on one database: warm-up, then intake, list, read, /metrics."""
    args = ctx.args
    case_dir = ctx.log_dir / f"{target.name}-{number}"
    case_dir.mkdir(parents=True, exist_ok=True)
    processes = Processes(case_dir)
    port = free_port()
    api = f"http://{LOOPBACK}:{port}"
    env = {
        **base_env(),
        "GENRELAY_DATABASE_URL": target.url,
        "GENRELAY_DEEPIMAGE_URL": ctx.sim_url,
        "GENRELAY_DEEPIMAGE_API_KEY": SIMULATOR_KEY,
        "GENRELAY_GCS_BUCKET": BUCKET,
        "STORAGE_EMULATOR_HOST": ctx.gcs.url,
        "GENRELAY_RATE_LIMIT": "0",
        # Loopback http everywhere: result URLs from the simulator included.
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
        "GENRELAY_UPSTREAM_CONCURRENCY": str(SIMULATOR_LIMIT),  # every request forwarded inline
        "GENRELAY_WEB_PROCESSES": str(args.web_processes),
        "GENRELAY_WEB_THREADS": str(args.web_threads),
        "PORT": str(port),
        "XDG_RUNTIME_DIR": str(case_dir),
    }
    auth = {"Authorization": f"Bearer {target.api_key}"}
    post_headers = {**auth, "Content-Type": "application/json"}
    body = json.dumps(SEED_BODY).encode()
    salt = secrets.token_hex(4)
    print(f"-- round {number}, {target.name}", flush=True)
    try:
        processes.start("serve", [GENRELAY, "serve"], env)
        wait_until(lambda: requests.get(f"{api}/readyz", timeout=2).ok, processes, "serve")
        probe = CpuProbe(
            {
                "serve": tree_of(processes.children["serve"]),
                "simulator": tree_of(ctx.shared.children["simulator"]),
                "postgres (this db)": target.db.backends,
                "postgres (server)": target.db.postmaster,
                "bench client": own_process,
            }
        )

        def post(prefix: str) -> Callable[[requests.Session, int], requests.Response]:
            def send(session: requests.Session, n: int) -> requests.Response:
                headers = {**post_headers, "Idempotency-Key": f"{prefix}-{salt}-{n}"}
                if not args.idempotency_key:
                    headers.pop("Idempotency-Key")
                return session.post(
                    f"{api}/v1/generations", data=body, headers=headers, timeout=CLIENT_TIMEOUT
                )

            return send

        def list_page(session: requests.Session, _n: int) -> requests.Response:
            return session.get(
                f"{api}/v1/generations",
                params={"limit": LIST_LIMIT},
                headers=auth,
                timeout=CLIENT_TIMEOUT,
            )

        def check_intake(_n: int, response: requests.Response) -> str | None:
            with contextlib.suppress(ValueError):
                job = (response.json().get("upstream") or {}).get("job")
                if response.json().get("status") == "processing" and job:
                    return None
            return "bad: not forwarded inline"

        def check_list(_n: int, response: requests.Response) -> str | None:
            with contextlib.suppress(ValueError):
                if len(response.json().get("data", [])) == LIST_LIMIT:
                    return None
            return "bad: short page"

        # Warm-up: both gunicorn processes, their pools, PostgreSQL's caches.
        warm = [
            closed_loop(args.warmup, args.concurrency, post(f"warm{number}"), ctx.stop),
            closed_loop(40, args.concurrency, list_page, ctx.stop),
        ]
        ids = [
            str(row[0])
            for row in target.db.rows(
                "SELECT id FROM generations WHERE tenant_id = %s ORDER BY random() LIMIT %s",
                (target.tenant_id, args.reads),
            )
        ]
        if not ids:
            raise BenchError(f"no generations of {TENANT} in {target.name}")

        def read(session: requests.Session, n: int) -> requests.Response:
            return session.get(
                f"{api}/v1/generations/{ids[n % len(ids)]}", headers=auth, timeout=CLIENT_TIMEOUT
            )

        warm.append(closed_loop(40, args.concurrency, read, ctx.stop))
        warm_errors = sum(w.errors for w in warm)
        time.sleep(ROUND_PAUSE)

        snapshots = [probe.snapshot()]
        wal_before = target.db.wal()
        intake = closed_loop(
            args.requests, args.concurrency, post(f"r{number}"), ctx.stop, check_intake
        )
        wal_after = target.db.wal()
        snapshots.append(probe.snapshot())
        listing = closed_loop(args.reads, args.concurrency, list_page, ctx.stop, check_list)
        snapshots.append(probe.snapshot())
        reads = closed_loop(args.reads, args.concurrency, read, ctx.stop)
        snapshots.append(probe.snapshot())
        metrics: list[float] = []
        with requests.Session() as session:
            for _ in range(METRICS_REQUESTS):
                began = time.perf_counter()
                response = session.get(f"{api}/metrics", timeout=CLIENT_TIMEOUT)
                metrics.append(time.perf_counter() - began)
                if response.status_code != 200:
                    raise BenchError(f"/metrics answered {response.status_code}")
        processes.check_alive()
    finally:
        processes.stop_all()
    phases = ("intake", "list", "read")
    cpu = {phase: CpuProbe.delta(snapshots[i], snapshots[i + 1]) for i, phase in enumerate(phases)}
    loads = {"intake": intake, "list": listing, "read": reads}
    result: dict[str, Any] = {
        "target": target.name,
        "round": number,
        "warmup_errors": warm_errors,
        "metrics_latency": latency_stats(metrics),
        "_metrics_raw": metrics,
        "logs": {
            k: v
            for k, v in {"serve": scan_log(processes.log_path("serve"), found_only=True)}.items()
            if v["counts"]
        },
    }
    for phase, load in loads.items():
        result[f"_{phase}_raw"] = load.latencies
        result[phase] = {
            **latency_stats(load.latencies),
            "req_per_s": round(len(load.latencies) / load.wall, 1),
            "errors": load.errors,
            "outcomes": dict(load.outcomes),
            "cpu": cpu_per_request(cpu[phase], load),
        }
    n = max(1, len(intake.latencies))
    result["intake"]["wal"] = {
        "kib_per_request": round((wal_after["lsn"] - wal_before["lsn"]) / 1024 / n, 2),
        "fpi_per_request": round((wal_after["fpi"] - wal_before["fpi"]) / n, 2),
        "records_per_request": round((wal_after["records"] - wal_before["records"]) / n, 1),
        "checkpoints": int(wal_after["checkpoints"] - wal_before["checkpoints"]),
    }
    i = result["intake"]
    print(
        f"   intake {i['req_per_s']} req/s, p50 {i['p50_ms']} ms, p99 {i['p99_ms']} ms, "
        f"{i['errors']} errors; list p50 {result['list']['p50_ms']} ms; "
        f"read p50 {result['read']['p50_ms']} ms; /metrics p50 "
        f"{result['metrics_latency']['p50_ms']} ms",
        flush=True,
    )
    return result


def cpu_per_request(delta: dict[str, Any], load: LoadResult) -> dict[str, Any]:
    groups = delta["groups"]
    ours = sum(s for name, s in groups.items() if name != "postgres (this db)")
    n = max(1, len(load.latencies))
    per = {name: round(1000 * s / n, 2) for name, s in groups.items()}
    per["other (not ours)"] = round(1000 * max(0.0, delta["machine_s"] - ours) / n, 2)
    wall = delta["wall_s"] or 1.0
    return {
        "ms_per_request": per,
        "others_ms_per_request": {
            name: round(1000 * sec / n, 2) for name, sec in delta["others"].items()
        },
        "machine_busy_pct": round(100 * delta["machine_s"] / (wall * machine_facts()["nproc"]), 1),
    }


# -- in-process statement profile and plans ------------------------------------------------


def statement_label(sql: str) -> str:
    """A short name for a statement: verb, table, the columns its WHERE compares."""
    if sql in ("COMMIT", "pre-ping (SELECT 1)"):
        return sql
    text = " ".join(sql.split())
    upper = text.upper()
    if upper.startswith("WITH") and " UPDATE " in upper:
        table = re.search(r"(?i) UPDATE (\w+)", text)
        head = f"UPDATE {table.group(1) if table else '?'} (claim CTE)"
    elif upper.startswith("INSERT INTO"):
        head = f"INSERT {text.split()[2]}"
    elif upper.startswith("UPDATE"):
        head = f"UPDATE {text.split()[1]}"
    elif upper.startswith("DELETE FROM"):
        head = f"DELETE {text.split()[2]}"
    elif upper.startswith("SELECT"):
        table = re.search(r"(?i) FROM (\w+)", text)
        head = f"SELECT {table.group(1) if table else '?'}"
    else:
        head = text[:40]
    where = text.split(" WHERE ", 1)[1] if " WHERE " in text else ""
    columns: list[str] = []
    for column in re.findall(r"\b\w+\.(\w+) (?:=|<=|>=|<|>|IN\b|IS\b)", where):
        if column not in columns:
            columns.append(column)
    tail = " GROUP BY" if " GROUP BY " in upper else ""
    tail += " ORDER BY" if " ORDER BY " in upper else ""
    tail += " FOR UPDATE" if " FOR UPDATE" in upper else ""
    return f"{head} [{', '.join(columns)}]{tail}" if columns else f"{head}{tail}"


class StatementTimer:
    """Times every statement an engine sends (SQLAlchemy cursor events), and its COMMITs and
    pool pre-pings (the dialect's ``do_commit``/``do_ping``, wrapped on this engine's dialect
    object only, in this process, while timing)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.records: list[tuple[str, float]] = []
        self._local = threading.local()

    def _wrap(self, name: str, label: str) -> Callable[..., Any]:
        original = getattr(self.engine.dialect, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.records.append((label, time.perf_counter() - began))

        setattr(self.engine.dialect, name, timed)
        return original

    def _before(self, *_args: Any) -> None:
        self._local.began = time.perf_counter()

    def _after(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.records.append((statement, time.perf_counter() - self._local.began))

    @contextlib.contextmanager
    def timing(self) -> Iterator[list[tuple[str, float]]]:
        self.records = []
        sa.event.listen(self.engine, "before_cursor_execute", self._before)
        sa.event.listen(self.engine, "after_cursor_execute", self._after)
        commit = self._wrap("do_commit", "COMMIT")
        ping = self._wrap("do_ping", "pre-ping (SELECT 1)")
        try:
            yield self.records
        finally:
            sa.event.remove(self.engine, "before_cursor_execute", self._before)
            sa.event.remove(self.engine, "after_cursor_execute", self._after)
            self.engine.dialect.do_commit = commit  # type: ignore[method-assign]
            self.engine.dialect.do_ping = ping  # type: ignore[method-assign]


class _Captured(Exception):
    """Raised by the capture hook to stop a statement before it runs."""


def capture(
    engine: sa.Engine, call: Callable[[], Any], *, abort: Callable[[str], bool] | None = None
) -> list[tuple[str, Any]]:
    """The statements (with parameters) that ``call`` sends; with ``abort``, the first
    statement it matches is recorded and not run (its transaction rolls back)."""
    seen: list[tuple[str, Any]] = []

    def hook(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        seen.append((statement, parameters))
        if abort is not None and abort(statement):
            raise _Captured

    sa.event.listen(engine, "before_cursor_execute", hook)
    try:
        call()
    except _Captured:
        pass
    except sa.exc.StatementError as exc:
        if not isinstance(exc.orig, _Captured):
            raise
    finally:
        sa.event.remove(engine, "before_cursor_execute", hook)
    return seen


def explain(
    engine: sa.Engine, statement: str, parameters: Any, setup: str | None = None
) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) in a transaction that is rolled back (``setup`` first)."""
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            if setup:
                conn.exec_driver_sql(setup)
            lines = [
                str(row[0])
                for row in conn.exec_driver_sql(
                    "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
                )
            ]
        finally:
            transaction.rollback()
    found = re.search(r"Execution Time: ([0-9.]+) ms", "\n".join(lines))
    return {"execution_ms": float(found.group(1)) if found else None, "plan": lines}


class InProcess:
    """genrelay's service graph in this process, on one database (simulator, fake blobs)."""

    def __init__(self, target: Target, sim_url: str) -> None:
        from service.bootstrap import build_services
        from service.config import Config
        from service.devtools.fakes import FakeBlobStore

        config = Config(
            database_url=target.url,
            deepimage_url=sim_url,
            deepimage_api_key=SIMULATOR_KEY,
            gcs_bucket=BUCKET,
            rate_limit=0.0,
            upstream_concurrency=SIMULATOR_LIMIT,
        )
        self.target = target
        self.services = build_services(config, blobs=FakeBlobStore(BUCKET))
        self.engine = self.services.store.engine

    def close(self) -> None:
        self.services.close()

    def intake(self) -> None:
        """What POST /v1/generations does after parsing: auth, create, record the answer."""
        from schemas.generations import GenerationSchema
        from service.generations.service import NewGeneration

        tenant = self.services.api_keys.tenant_for(self.target.api_key)
        assert tenant is not None
        key = f"probe-{uuid.uuid4().hex}"
        generations = self.services.generations
        outcome = generations.create(
            tenant, NewGeneration(input=dict(SEED_BODY["input"])), idempotency_key=key
        )
        assert outcome.generation is not None
        generations.record_response(tenant, key, 202, GenerationSchema().dump(outcome.generation))

    def list_page(self) -> None:
        tenant = self.services.api_keys.tenant_for(self.target.api_key)
        assert tenant is not None
        self.services.generations.list(tenant, limit=LIST_LIMIT)

    def read(self, generation_id: str) -> None:
        tenant = self.services.api_keys.tenant_for(self.target.api_key)
        assert tenant is not None
        self.services.generations.get(tenant, generation_id)


def profile(runner: InProcess, count: int) -> dict[str, Any]:
    """``count`` intakes, lists and reads, one at a time; every statement timed.

    The intakes come first, so the empty database has generations to list and read.
    """
    ids: list[str] = []

    def read(n: int) -> None:
        if not ids:
            ids.extend(
                str(row[0])
                for row in runner.target.db.rows(
                    "SELECT id FROM generations WHERE tenant_id = %s ORDER BY random() LIMIT %s",
                    (runner.target.tenant_id, count),
                )
            )
        runner.read(ids[n % len(ids)])

    operations: dict[str, Callable[[int], None]] = {
        "intake": lambda _n: runner.intake(),
        "list": lambda _n: runner.list_page(),
        "read": read,
    }
    timer = StatementTimer(runner.engine)
    result: dict[str, Any] = {}
    for name, operation in operations.items():
        for n in range(5):  # warm-up: pools, caches, prepared plans
            operation(n)
        walls: list[float] = []
        by_label: dict[str, list[float]] = {}
        wal_before = runner.target.db.wal()
        with timer.timing() as records:
            for n in range(count):
                began = time.perf_counter()
                operation(n)
                walls.append(time.perf_counter() - began)
        wal_after = runner.target.db.wal()
        for statement, seconds in records:
            by_label.setdefault(statement_label(statement), []).append(seconds)
        result[name] = {
            "wall_ms_mean": round(statistics.fmean(walls) * 1000, 2),
            "wall_ms_p50": round(statistics.median(walls) * 1000, 2),
            "db_ms_per_op": round(sum(s for _, s in records) * 1000 / count, 2),
            "statements_per_op": round(
                sum(1 for s, _ in records if s not in ("COMMIT", "pre-ping (SELECT 1)")) / count, 2
            ),
            "wal_kib_per_op": round((wal_after["lsn"] - wal_before["lsn"]) / 1024 / count, 2),
            "statements": {
                label: {
                    "per_op": round(len(times) / count, 2),
                    "mean_ms": round(statistics.fmean(times) * 1000, 3),
                    "max_ms": round(max(times) * 1000, 3),
                }
                for label, times in sorted(by_label.items(), key=lambda kv: -sum(kv[1]))
            },
        }
    return result


# Every pending task due, at distinct times within the last hour (a backlog after an outage).
MAKE_ALL_DUE = (
    "UPDATE tasks SET run_at = now() - random() * interval '1 hour' - interval '1 minute' "
    "WHERE status = 'pending'"
)


def plans(runner: InProcess) -> dict[str, dict[str, Any]]:
    """EXPLAIN ANALYZE of the statements genrelay sends for the suspicious operations."""
    from service.errors import NotFound
    from service.generations.service import NewGeneration
    from service.metrics import DatabaseCollector

    services = runner.services
    engine = runner.engine
    tenant = runner.target.tenant_id
    out: dict[str, dict[str, Any]] = {}

    def first(statements: list[tuple[str, Any]], table: str) -> tuple[str, Any]:
        for statement, parameters in statements:
            if f"FROM {table}" in statement or f"UPDATE {table}" in statement:
                return statement, parameters
        raise BenchError(f"no statement on {table} captured: {[s[:60] for s, _ in statements]}")

    def is_claim(statement: str) -> bool:
        return "UPDATE tasks" in statement

    claim = first(
        capture(engine, lambda: services.queue.claim_due_tasks(limit=1), abort=is_claim), "tasks"
    )
    out["claim_due_tasks, as filled (nothing due)"] = explain(engine, *claim)
    out["claim_due_tasks, every pending task due (rolled back)"] = explain(
        engine,
        *claim,
        setup=MAKE_ALL_DUE,
    )
    out["proposed claim: pending branch alone, every pending task due (rolled back)"] = explain(
        engine,
        "SELECT id FROM tasks WHERE status = 'pending' AND run_at <= now() "
        "ORDER BY run_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        None,
        setup=MAKE_ALL_DUE,
    )
    listing = capture(engine, lambda: services.generations.list(tenant, limit=LIST_LIMIT))
    out["list: first page"] = explain(engine, *first(listing, "generations"))
    listing = capture(
        engine, lambda: services.generations.list(tenant, status="failed", limit=LIST_LIMIT)
    )
    out["list: first page, status=failed"] = explain(engine, *first(listing, "generations"))
    fingerprint = NewGeneration(input=dict(SEED_BODY["input"])).fingerprint()
    lookup = capture(
        engine,
        lambda: services.generations._replay(tenant, f"probe-{uuid.uuid4().hex}", fingerprint),
    )
    out["idempotency lookup (new key)"] = explain(engine, *first(lookup, "idempotency_keys"))
    some_id = runner.target.db.scalar(
        "SELECT id FROM generations WHERE tenant_id = %s LIMIT 1", (tenant,)
    )

    def read_one() -> None:
        with contextlib.suppress(NotFound):  # the empty database has none yet: same query
            services.generations.get(tenant, str(some_id or "gen_" + "0" * 32))

    read = capture(engine, read_one)
    out["read by id"] = explain(engine, *first(read, "generations"))
    auth = capture(engine, lambda: services.api_keys.tenant_for(runner.target.api_key))
    out["api key lookup"] = explain(engine, *first(auth, "api_keys"))
    gauges = capture(engine, lambda: list(DatabaseCollector(services.store).collect()))
    for statement, parameters in gauges:
        out[f"/metrics gauge: {statement_label(statement)}"] = explain(
            engine, statement, parameters
        )
    return out


# -- summary and report --------------------------------------------------------------------


def pooled(rounds: list[dict[str, Any]], target: str, phase: str) -> dict[str, Any]:
    """Latency percentiles over every round of a target (recomputed from the raw figures)."""
    mine = [r for r in rounds if r["target"] == target]
    out = {
        key: round(statistics.fmean(r[phase][key] for r in mine), 2)
        for key in ("req_per_s", "mean_ms")
    }
    out["errors"] = sum(r[phase]["errors"] for r in mine)
    return out


def summarize(
    rounds: list[dict[str, Any]], raw: dict[str, dict[str, list[float]]]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for phase in ("intake", "list", "read", "metrics"):
        per = {}
        for target in TARGETS:
            stats = latency_stats(raw[target][phase])
            if phase != "metrics":
                stats.update(pooled(rounds, target, phase))
            per[target] = stats
        ratios = {
            key: round(per["large"][key] / per["empty"][key], 3) if per["empty"][key] else None
            for key in ("p50_ms", "p90_ms", "p99_ms")
        }
        summary[phase] = {"per_target": per, "large_over_empty": ratios}
    intake = summary["intake"]["large_over_empty"]
    summary["verdict"] = {
        key: {"ratio": intake[key], "pass": intake[key] is not None and intake[key] <= TARGET_RATIO}
        for key in ("p50_ms", "p99_ms")
    }
    return summary


def fmt(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    print()
    print("== genrelay large-table benchmark (PostgreSQL) ==")
    for key, value in report["machine"].items():
        print(f"{key:>26}: {value}")
    filled = report["fill"]
    print()
    print(f"fill of the large database: {filled['seconds']:.1f} s")
    for s in filled["steps"]:
        rows = f"{s['rows']:>12,} rows" if s["rows"] >= 0 else ""
        extra = f" (+ {s['idempotency_keys']:,} keys)" if "idempotency_keys" in s else ""
        print(f"  {s['step']:<34}{s['seconds']:>8.1f} s{rows}{extra}")
    facts = report["large_tables"]
    print(
        "  tables: "
        + ", ".join(
            f"{name} {t['rows']:,} rows / {t['bytes'] / 2**20:,.0f} MiB"
            for name, t in facts["tables"].items()
        )
        + f"; database {facts['database_bytes'] / 2**20:,.0f} MiB"
    )
    print(f"  generations by status: {facts['generations_by_status']}")
    print(f"  tenant {TENANT!r} owns {facts['bench_tenant_generations']:,} generations")
    print(
        "  pending tasks: "
        + ", ".join(
            f"{k} {v['count']:,} ({v['due']} due, soonest in {v['soonest_in']})"
            for k, v in facts["pending_tasks"].items()
        )
    )
    print()
    header = (
        f"{'round':<10}{'intake':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'err':>5}"
        f"{'list p50':>10}{'p99':>8}{'read p50':>10}{'p99':>8}{'/metrics':>10}{'busy':>6}"
    )
    print("latency in ms, client-side; intake = POST /v1/generations (req/s)")
    print(header)
    print("-" * len(header))
    for r in report["rounds"]:
        i, li, rd = r["intake"], r["list"], r["read"]
        print(
            f"{r['target'] + ' ' + str(r['round']):<10}{i['req_per_s']:>8.1f}{i['p50_ms']:>8.1f}"
            f"{i['p90_ms']:>8.1f}{i['p99_ms']:>8.1f}{i['max_ms']:>8.1f}"
            f"{i['errors'] + li['errors'] + rd['errors']:>5}"
            f"{li['p50_ms']:>10.1f}{li['p99_ms']:>8.1f}{rd['p50_ms']:>10.1f}{rd['p99_ms']:>8.1f}"
            f"{r['metrics_latency']['p50_ms']:>10.1f}"
            f"{i['cpu']['machine_busy_pct']:>5.0f}%"
        )
    summary = report["summary"]
    print()
    print("pooled over the rounds: empty | large | large/empty")
    for phase, title in (
        ("intake", "POST /v1/generations"),
        ("list", "GET /v1/generations"),
        ("read", "GET /v1/generations/{id}"),
        ("metrics", "GET /metrics"),
    ):
        s = summary[phase]
        e, g, ratio = s["per_target"]["empty"], s["per_target"]["large"], s["large_over_empty"]
        print(
            f"  {title:<26} p50 {e['p50_ms']:>7.1f} | {g['p50_ms']:>7.1f} | "
            f"x{fmt(ratio['p50_ms'], '.2f'):<6}  p99 {e['p99_ms']:>7.1f} | {g['p99_ms']:>7.1f} | "
            f"x{fmt(ratio['p99_ms'], '.2f')}"
        )
    verdict = summary["verdict"]
    print(
        f"  target intake large/empty <= {TARGET_RATIO}: "
        + ", ".join(
            f"{key.removesuffix('_ms')} x{fmt(v['ratio'], '.2f')} {'PASS' if v['pass'] else 'FAIL'}"
            for key, v in verdict.items()
        )
    )
    print()
    print("WAL per intake request, each round's intake phase (the whole server's: other")
    print("databases' writes count too): KiB (LSN), full-page images and records (pg_stat_wal)")
    for r in report["rounds"]:
        w = r["intake"]["wal"]
        print(
            f"  {r['target'] + ' ' + str(r['round']):<10}{w['kib_per_request']:>8.1f} KiB"
            f"{w['fpi_per_request']:>8.2f} FPI{w['records_per_request']:>8.1f} records"
            f"{w['checkpoints']:>4} checkpoints"
        )
    print()
    print("busiest processes that are not this benchmark's, CPU ms per intake request")
    for r in report["rounds"]:
        others = r["intake"]["cpu"]["others_ms_per_request"]
        listed = ", ".join(f"{name} {ms:.2f}" for name, ms in others.items())
        print(f"  {r['target'] + ' ' + str(r['round']):<10}{listed or '-'}")
    print()
    print("CPU ms per intake request, mean over the rounds: empty | large")
    cpu: dict[str, dict[str, list[float]]] = {}
    for r in report["rounds"]:
        for name, ms in r["intake"]["cpu"]["ms_per_request"].items():
            cpu.setdefault(name, {}).setdefault(r["target"], []).append(ms)
    for name, per in cpu.items():
        cells = [fmt(statistics.fmean(per[t]), ".2f") if per.get(t) else "n/a" for t in TARGETS]
        print(f"  {name:<22}{cells[0]:>8} | {cells[1]:>8}")
    prof = report.get("profile")
    if prof:
        print()
        print(
            f"statement profile, in-process, one at a time ({report['probe']} per operation): "
            "empty | large"
        )
        for op in ("intake", "list", "read"):
            e, g = prof["empty"][op], prof["large"][op]
            print(
                f"  {op:<7} wall p50 {e['wall_ms_p50']:.2f} | {g['wall_ms_p50']:.2f} ms; "
                f"DB {e['db_ms_per_op']:.2f} | {g['db_ms_per_op']:.2f} ms in "
                f"{g['statements_per_op']:g} statements + commits; WAL "
                f"{e['wal_kib_per_op']:.1f} | {g['wal_kib_per_op']:.1f} KiB"
            )
            labels = list(dict.fromkeys([*g["statements"], *e["statements"]]))
            for label in labels:
                se, sg = e["statements"].get(label), g["statements"].get(label)
                print(
                    f"      {label[:70]:<70} x{(sg or se or {}).get('per_op', 0):<4g}"
                    f"{fmt(se and se['mean_ms'], '.3f'):>8} | {fmt(sg and sg['mean_ms'], '.3f'):>8}"
                )
    explained = report.get("plans")
    if explained:
        print()
        print("EXPLAIN (ANALYZE, BUFFERS), execution ms: empty | large")
        for name in explained["large"]:
            e = explained["empty"].get(name, {}).get("execution_ms")
            g = explained["large"][name]["execution_ms"]
            print(f"  {name[:78]:<78}{fmt(e, '.3f'):>9} | {fmt(g, '.3f'):>9}")
        print()
        print("plans on the large database:")
        for name, item in explained["large"].items():
            print(f"\n  -- {name}")
            for line in item["plan"]:
                print(f"     {line}")
    for r in report["rounds"]:
        for name, scan in r["logs"].items():
            print_log_scan(f"{r['target']} {r['round']} {name}", scan)
    print(f"\nmeasuring took {report['seconds']} s")


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=1_000_000, help="rows (1000000)")
    parser.add_argument("--tenants", type=int, default=100, help="tenants, bench included (100)")
    parser.add_argument("--tasks", type=int, default=100_000, help="pending tasks (100000)")
    parser.add_argument("--requests", type=int, default=1000, help="intakes per round (1000)")
    parser.add_argument("--reads", type=int, default=300, help="lists and reads per round (300)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per database (2)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up intakes per round")
    parser.add_argument("--probe", type=int, default=50, help="in-process ops per kind (50)")
    parser.add_argument(
        "--no-idempotency-key",
        dest="idempotency_key",
        action="store_false",
        help="POST without an Idempotency-Key header (default: a fresh key per request)",
    )
    parser.add_argument("--web-processes", type=int, default=2, help="GENRELAY_WEB_PROCESSES")
    parser.add_argument("--web-threads", type=int, default=8, help="GENRELAY_WEB_THREADS")
    add_common_options(parser, postgres_url=DEFAULT_POSTGRES_URL)
    args = parser.parse_args(argv)
    require_positive(
        parser, args, ("requests", "reads", "concurrency", "rounds", "probe", "web_processes")
    )
    if args.generations < 1000 or args.tenants < 1 or args.tasks < 0 or args.warmup < 0:
        parser.error("--generations >= 1000, --tenants >= 1, --tasks and --warmup >= 0")
    return args


def setup(name: str, url: str, desc: str) -> tuple[str, Database]:
    api_key = prepare_database({**base_env(), "GENRELAY_DATABASE_URL": url}, TENANT)
    print(f"{name}: {desc}, migrated, key created", flush=True)
    return api_key, Database(url)


def run(ctx: Context, stack: contextlib.ExitStack) -> dict[str, Any]:
    args = ctx.args
    targets: dict[str, Target] = {}
    for name in TARGETS:
        url, desc = stack.enter_context(
            fresh_database("postgresql", ctx.tmp_dir, args.postgres_url)
        )
        api_key, db = setup(name, url, desc)
        stack.callback(db.close)
        targets[name] = Target(name, url, desc, api_key, db)
    settings = targets["empty"].db.settings()
    print("filling the large database", flush=True)
    filled = fill(targets["large"].db, args)
    targets["empty"].db.execute("VACUUM (ANALYZE)")
    large_tables = table_facts(targets["large"].db)

    # Plans first, while the task queue is as filled (the rounds' intakes add poll tasks
    # that fall due after 2 s: polling-only mode, and no worker runs here).
    print("plans and statement profile (in-process)", flush=True)
    profiles: dict[str, Any] = {}
    explained: dict[str, Any] = {}
    for name in TARGETS:
        runner = InProcess(targets[name], ctx.sim_url)
        try:
            explained[name] = plans(runner)
            profiles[name] = profile(runner, args.probe)
        finally:
            runner.close()
        # The plans' rolled-back UPDATEs left 2 x 100 k dead task rows: vacuum them now,
        # or autovacuum would do it during a round.
        targets[name].db.execute("VACUUM (ANALYZE) tasks")
    targets["large"].db.execute("CHECKPOINT")  # both databases start the rounds alike
    rounds: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        for name in TARGETS:
            rounds.append(measure_round(ctx, targets[name], number))
            ctx.shared.check_alive()
    return {
        "databases": {name: t.desc for name, t in targets.items()},
        "postgres": settings,
        "fill": filled,
        "large_tables": large_tables,
        "rounds": rounds,
        "profile": profiles,
        "plans": explained,
    }


def raw_latencies(rounds: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    raw: dict[str, dict[str, list[float]]] = {t: {} for t in TARGETS}
    for r in rounds:
        for phase in ("intake", "list", "read", "metrics"):
            raw[r["target"]].setdefault(phase, []).extend(r.pop(f"_{phase}_raw"))
    return raw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_signals()
    facts = machine_facts(memory=True)
    began = time.monotonic()
    with work_dirs(args.log_dir) as (tmp_dir, log_dir):
        shared = Processes(log_dir)
        try:
            # The ExitStack drops both databases on the way out (after every process is
            # stopped), Ctrl-C included.
            with (
                contextlib.ExitStack() as stack,
                shared_stack(args, tmp_dir, log_dir, shared, BUCKET, SIM_PROCESSING_TIME) as ctx,
            ):
                measured = run(ctx, stack)
        except BenchError as exc:
            return failed(exc, shared)
        except KeyboardInterrupt:
            return interrupted("every process stopped, databases dropped")
    facts.update(
        {
            "postgres": measured.pop("postgres"),
            "databases": measured.pop("databases"),
            "serve": f"genrelay serve, {args.web_processes} processes x {args.web_threads} "
            "threads, GENRELAY_RATE_LIMIT=0, no public URL, no worker",
            "simulator": f"--processing-time {SIM_PROCESSING_TIME} --concurrency-limit 1000000",
            "fake_gcs": "fake-gcs-server, memory backend (nothing is stored: no worker)",
            "load": f"{args.requests} intakes + {args.reads} lists + {args.reads} reads per "
            f"round, {args.concurrency} client threads, {args.warmup} warm-up intakes",
            "idempotency_key": "a fresh key per POST" if args.idempotency_key else "none",
            "rounds": f"{args.rounds} per database, alternating empty, large",
        }
    )
    raw = raw_latencies(measured["rounds"])
    report = {
        "machine": facts,
        **measured,
        "probe": args.probe,
        "summary": summarize(measured["rounds"], raw),
        "seconds": round(time.monotonic() - began, 1),
    }
    return finish(report, print_report, args.json_out, default=str)


if __name__ == "__main__":
    sys.exit(main())
