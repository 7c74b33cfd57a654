"""Large tables: intake, list and read latency with 1 M generations and 100 k tasks vs empty.

Two fresh PostgreSQL databases; `large` bulk-filled with plain SQL (1,000,000 generations over
100 tenants and 90 days, an idempotency key for every other one, 100,000 pending tasks not yet
due), then `genrelay serve` (2 x 8, no worker, inline submits to the simulator) on each in
turn, alternating rounds of intakes, list pages, reads and /metrics from 8 threads. Also the
plans (EXPLAIN ANALYZE) of the claim and the list queries genrelay sends at 1 M rows. How to
read it: bench/README.md.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import requests
from _stack import (
    BUCKET,
    CLIENT_TIMEOUT,
    SEED_BODY,
    SIMULATOR_KEY,
    SIMULATOR_LIMIT,
    BenchError,
    Context,
    CpuProbe,
    Database,
    base_env,
    closed_loop,
    free_port,
    genrelay_env,
    latency_stats,
    options,
    prepare_database,
    print_table,
    run_benchmark,
    start_gcs,
    start_serve,
    start_simulator,
    tree_of,
)

TARGET_RATIO = 1.2
TARGETS = ("empty", "large")
PHASES = ("intake", "list", "read", "metrics")

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
INSERT INTO tasks (id, kind, generation_id, payload, status, attempts, run_at,
                   created_at, updated_at)
SELECT 'task_' || md5('poll' || id), 'poll', id, jsonb_build_object('delay', 120.0),
  'pending', 0,
  now() + interval '30 minutes' + random() * interval '6 hours', submitted_at, submitted_at
FROM generations WHERE status = 'processing'
LIMIT %(tasks)s
"""

# The rest: deliveries waiting for their next retry (a subscriber that is down).
FILL_DELIVER_TASKS = """
INSERT INTO tasks (id, kind, generation_id, payload, status, attempts, run_at,
                   created_at, updated_at, last_error)
SELECT 'task_' || md5('deliver' || i), 'deliver',
  'gen_' || md5('g' || (%(n)s - mod(i, 50000))),
  jsonb_build_object('delivery_id', 'dlv_' || md5('d' || i)), 'pending', mod(i, 3),
  now() + interval '30 minutes' + random() * interval '6 hours',
  now() - interval '3 hours', now() - interval '1 hour',
  CASE WHEN mod(i, 3) > 0 THEN 'HTTP 503 from the subscriber' END
FROM generate_series(1, %(count)s) AS i
"""


def fill(db: Database, args: Any) -> dict[str, float]:
    """Bulk-fill the large database; seconds per step."""
    steps: dict[str, float] = {}
    params = {"fillers": args.tenants - 1, "n": args.generations, "days": 90, "bucket": BUCKET}
    db.conn.execute("SET synchronous_commit = off")  # this session only: a throwaway database
    for name, sql in (
        ("tenants", FILL_TENANTS),
        ("generations and idempotency keys", FILL_GENERATIONS),
        ("poll tasks", FILL_POLL_TASKS),
        ("deliver tasks", FILL_DELIVER_TASKS),
        ("VACUUM (ANALYZE)", "VACUUM (ANALYZE)"),
        ("CHECKPOINT", "CHECKPOINT"),
    ):
        if name == "deliver tasks":
            polls = db.scalar("SELECT count(*) FROM tasks")
            params["count"] = max(0, args.tasks - int(polls))
        params["tasks"] = args.tasks
        began = time.perf_counter()
        db.conn.execute(sql, {k: v for k, v in params.items() if f"%({k})s" in sql} or None)
        steps[name] = round(time.perf_counter() - began, 1)
        print(f"  {name}: {steps[name]} s", flush=True)
    return steps


def plans(url: str, sim: str, api_key: str) -> dict[str, float | None]:
    """EXPLAIN (ANALYZE) execution ms of statements genrelay sends, captured from its code at
    run time (SQLAlchemy's cursor events): the claim of due tasks (as filled, and with every
    pending task due, rolled back) and the first page of a tenant's list, with and without a
    status filter. The one place this benchmark uses genrelay's internals."""
    import sqlalchemy as sa

    from service.bootstrap import build_services
    from service.config import Config
    from service.devtools.fakes import FakeBlobStore

    config = Config(
        database_url=url, deepimage_url=sim, deepimage_api_key=SIMULATOR_KEY, gcs_bucket=BUCKET
    )
    services = build_services(config, blobs=FakeBlobStore(BUCKET))
    engine = services.store.engine

    class Captured(Exception):
        pass

    def capture(call: Callable[[], Any], table: str, abort: bool = False) -> tuple[str, Any]:
        seen: list[tuple[str, Any]] = []

        def hook(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            if f"FROM {table}" in statement or f"UPDATE {table}" in statement:
                seen.append((statement, parameters))
                if abort:
                    raise Captured

        sa.event.listen(engine, "before_cursor_execute", hook)
        try:
            call()
        except (Captured, sa.exc.StatementError):
            pass
        finally:
            sa.event.remove(engine, "before_cursor_execute", hook)
        if not seen:
            raise BenchError(f"no statement on {table} captured")
        return seen[0]

    def explain(statement: tuple[str, Any], setup: str | None = None) -> float | None:
        with engine.connect() as conn, conn.begin() as transaction:
            if setup:
                conn.exec_driver_sql(setup)
            plan = "\n".join(
                str(row[0])
                for row in conn.exec_driver_sql(f"EXPLAIN ANALYZE {statement[0]}", statement[1])
            )
            transaction.rollback()
        found = re.search(r"Execution Time: ([0-9.]+) ms", plan)
        return float(found[1]) if found else None

    try:
        found = services.api_keys.tenant_for(api_key)
        assert found is not None
        tenant = found.id
        claim = capture(lambda: services.queue.claim_due_tasks(limit=1), "tasks", abort=True)
        due = "UPDATE tasks SET run_at = now() - random() * interval '1 h' WHERE status = 'pending'"
        listing = capture(lambda: services.generations.list(tenant, limit=20), "generations")
        failed = capture(
            lambda: services.generations.list(tenant, status="failed", limit=20), "generations"
        )
        return {
            "claim of due tasks, as filled (none due)": explain(claim),
            "claim of due tasks, every pending task due": explain(claim, due),
            "list: first page": explain(listing),
            "list: first page, status=failed": explain(failed),
        }
    finally:
        services.close()


def waldump() -> str | None:
    """PostgreSQL's pg_waldump, if this machine has it (Debian keeps it off the PATH)."""
    found = shutil.which("pg_waldump")
    if found is None:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_waldump"))
        found = str(candidates[-1]) if candidates else None
    return found


def lsn(position: float) -> str:
    """A WAL position in bytes as PostgreSQL writes it (e.g. 0/1A2B3C4)."""
    value = int(position)
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def fpi_by_relation(db: Database, start: float, end: float) -> dict[str, int] | str:
    """Full-page images written between two WAL positions, by relation of this database
    (pg_waldump on the server's WAL directory); why not, as a string, where they cannot be
    read from here (no pg_waldump, no right to read the settings or the files, another
    machine's server)."""
    tool = waldump()
    if tool is None:
        return "no pg_waldump on this machine"
    try:
        wal_dir = Path(db.scalar("SHOW data_directory")) / "pg_wal"
        database = str(db.scalar("SELECT oid FROM pg_database WHERE datname = current_database()"))
        dump = subprocess.run(
            [tool, "-p", str(wal_dir), "-s", lsn(start), "-e", lsn(end)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    except (psycopg.Error, subprocess.TimeoutExpired) as error:
        return f"not read: {type(error).__name__}: {str(error).strip()[:200]}"
    if dump.returncode != 0:
        return f"pg_waldump failed: {dump.stderr.strip()[:200]}"
    names = dict(db.rows("SELECT relfilenode::text, relname FROM pg_class WHERE relfilenode <> 0"))
    counts: collections.Counter[str] = collections.Counter()
    # rel <tablespace>/<database>/<relfilenode>: a relation of another database (or a shared
    # catalog, database 0) may have the same relfilenode as one of this database's.
    blocks = re.findall(r"rel \d+/(\d+)/(\d+)(?: fork \w+)? blk \d+ FPW", dump.stdout)
    for owner, node in blocks:
        counts[names.get(node, "?") if owner == database else "other databases"] += 1
    return dict(counts.most_common())


class Target:
    """One database with the key of its tenant `bench`."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.name = name
        self.url, self.desc = ctx.database("postgresql", f"large-table-{name}")
        self.key = prepare_database({**base_env(), "GENRELAY_DATABASE_URL": self.url})
        self.db = Database(self.url)
        ctx.later.callback(self.db.__exit__)
        self.tenant = self.db.scalar("SELECT id FROM tenants WHERE name = 'bench'")


def measure_round(
    ctx: Context, urls: tuple[str, str], target: Target, number: int
) -> dict[str, Any]:
    """`genrelay serve` on one database: warm-up, then intakes, lists, reads and /metrics."""
    args = ctx.args
    processes = ctx.new_processes(f"{target.name}-{number}")
    env = genrelay_env(
        target.url, *urls, free_port(), web=(2, 8), callbacks=False,
        upstream_concurrency=SIMULATOR_LIMIT,  # every request forwarded inline
    )  # fmt: skip
    api = start_serve(processes, env)
    auth = {"Authorization": f"Bearer {target.key}"}
    salt = [f"warm-{number}-{time.time_ns()}"]  # a fresh Idempotency-Key per request

    def post(session: requests.Session, n: int) -> requests.Response:
        headers = {**auth, "Idempotency-Key": f"{salt[0]}-{n}"}
        return session.post(
            f"{api}/v1/generations", json=SEED_BODY, headers=headers, timeout=CLIENT_TIMEOUT
        )

    def list_page(session: requests.Session, _n: int) -> requests.Response:
        url = f"{api}/v1/generations?limit=20"
        return session.get(url, headers=auth, timeout=CLIENT_TIMEOUT)

    def read(session: requests.Session, n: int) -> requests.Response:
        url = f"{api}/v1/generations/{ids[n % len(ids)]}"
        return session.get(url, headers=auth, timeout=CLIENT_TIMEOUT)

    def metrics(session: requests.Session, _n: int) -> requests.Response:
        return session.get(f"{api}/metrics", timeout=CLIENT_TIMEOUT)

    def forwarded(response: requests.Response) -> str | None:
        return None if (response.json().get("upstream") or {}).get("job") else "bad: queued"

    closed_loop(args.warmup, args.concurrency, post)
    salt[0] = salt[0].removeprefix("warm-")
    ids = [
        row[0]
        for row in target.db.rows(
            "SELECT id FROM generations WHERE tenant_id = ? ORDER BY random() LIMIT ?",
            (target.tenant, args.reads),
        )
    ]
    closed_loop(40, args.concurrency, list_page)
    closed_loop(40, args.concurrency, read)
    time.sleep(1.0)
    probe = CpuProbe(
        {
            "serve": tree_of(processes.children["serve"]),
            "postgres (this db)": target.db.backends,
            "postgres (server)": target.db.postmaster,
        }
    )
    before, wal = probe.snapshot(), target.db.wal()
    intake = closed_loop(args.requests, args.concurrency, post, forwarded)
    cpu, wal_after = CpuProbe.delta(before, probe.snapshot()), target.db.wal()
    loads = {
        "intake": intake,
        "list": closed_loop(args.reads, args.concurrency, list_page),
        "read": closed_loop(args.reads, args.concurrency, read),
        "metrics": closed_loop(10, 1, metrics),
    }
    processes.stop_all()
    n = len(intake.latencies)
    result: dict[str, Any] = {"target": target.name, "round": number}
    for phase, load in loads.items():
        result[phase] = {**load.stats(), "raw": load.latencies}
    result["intake"]["cpu_ms_per_request"] = {
        name: round(1000 * s / n, 2) for name, s in cpu["groups"].items()
    }
    by_relation = fpi_by_relation(target.db, wal["lsn"], wal_after["lsn"])
    result["intake"]["wal"] = {
        "kib_per_request": round((wal_after["lsn"] - wal["lsn"]) / 1024 / n, 2),
        "fpi_per_request": round((wal_after["fpi"] - wal["fpi"]) / n, 2),
        "fpi_per_request_by_relation": (
            {name: round(count / n, 3) for name, count in by_relation.items()}
            if isinstance(by_relation, dict) else by_relation
        ),
    }  # fmt: skip
    i = result["intake"]
    print(f"  intake p50 {i['p50_ms']} ms, p99 {i['p99_ms']} ms, {i['errors']} errors", flush=True)
    return result


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for phase in PHASES:
        per = {}
        for target in TARGETS:
            mine = [r[phase] for r in rounds if r["target"] == target]
            per[target] = {
                **latency_stats([x for m in mine for x in m.pop("raw")]),
                "errors": sum(m["errors"] for m in mine),
            }
        ratios = {
            key: round(per["large"][key] / per["empty"][key], 3) for key in ("p50_ms", "p99_ms")
        }
        summary[phase] = {"per_target": per, "large_over_empty": ratios}
    return summary


def measure(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    shared = ctx.new_processes("shared")
    sim = start_simulator(shared, processing_time=5, concurrency_limit=SIMULATOR_LIMIT)
    urls = (sim, start_gcs(shared))
    targets = {name: Target(ctx, name) for name in TARGETS}
    print("filling the large database", flush=True)
    filled = fill(targets["large"].db, args)
    targets["empty"].db.execute("VACUUM (ANALYZE)")
    explained = plans(targets["large"].url, sim, targets["large"].key)
    # The plans' rolled-back UPDATE left dead task rows: vacuum them before the rounds.
    targets["large"].db.execute("VACUUM (ANALYZE) tasks")
    targets["large"].db.execute("CHECKPOINT")
    rounds = []
    for number in range(1, args.rounds + 1):
        for name in TARGETS:
            print(f"-- round {number}, {name}", flush=True)
            rounds.append(measure_round(ctx, urls, targets[name], number))
    rows = {
        table: targets["large"].db.scalar(f"SELECT count(*) FROM {table}")  # noqa: S608
        for table in ("generations", "idempotency_keys", "tasks")
    }
    return {
        "settings": {
            "database": f"{targets['large'].desc}, two fresh databases",
            "large": ", ".join(f"{n:,} {table}" for table, n in rows.items()),
            "load": f"{args.requests} intakes, {args.reads} lists, {args.reads} reads and 10 "
            f"/metrics per round, {args.concurrency} threads, {args.rounds} rounds each",
        },
        "fill_s": filled,
        "plans_large_ms": explained,
        "rounds": rounds,
        "summary": summarize(rounds),
    }


def print_report(report: dict[str, Any]) -> None:
    head = ["", "empty p50 / p99 ms", "large p50 / p99 ms", "large / empty"]
    rows = []
    for phase, s in report["summary"].items():
        e, g, r = s["per_target"]["empty"], s["per_target"]["large"], s["large_over_empty"]
        rows.append(
            [phase, f"{e['p50_ms']} / {e['p99_ms']}", f"{g['p50_ms']} / {g['p99_ms']}",
             f"x{r['p50_ms']:.2f} / x{r['p99_ms']:.2f}"]
        )  # fmt: skip
    print_table(head, rows)
    r = report["summary"]["intake"]["large_over_empty"]
    ok = max(r.values()) <= TARGET_RATIO
    print(f"intake, large / empty: target <= {TARGET_RATIO}: {'PASS' if ok else 'FAIL'}\n")
    intake = [(r["target"], r["round"], r["intake"]) for r in report["rounds"]]
    groups = list(intake[0][2]["cpu_ms_per_request"])
    print_table(
        ["intake", "round", "WAL KiB", "full-page images", *(f"CPU ms {g}" for g in groups)],
        [[t, n, i["wal"]["kib_per_request"], i["wal"]["fpi_per_request"],
          *i["cpu_ms_per_request"].values()] for t, n, i in intake],
        ".2f",
    )  # fmt: skip
    print("\nFull-page images per intake, by relation (pg_waldump), the first three:")
    for t, n, i in intake:
        by_relation = i["wal"]["fpi_per_request_by_relation"]
        if isinstance(by_relation, dict):
            by_relation = ", ".join(f"{k} {v}" for k, v in list(by_relation.items())[:3])
        print(f"  {t} {n}: {by_relation or 'none'}")
    print("\nEXPLAIN ANALYZE on the large database, execution ms:")
    for name, ms in report["plans_large_ms"].items():
        print(f"  {name}: {ms}")


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__)
    parser.add_argument("--generations", type=int, default=1_000_000, help="rows (1000000)")
    parser.add_argument("--tenants", type=int, default=100, help="tenants, bench included (100)")
    parser.add_argument("--tasks", type=int, default=100_000, help="pending tasks (100000)")
    parser.add_argument("--requests", type=int, default=1000, help="intakes per round (1000)")
    parser.add_argument("--reads", type=int, default=300, help="lists and reads per round (300)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per database (2)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up intakes per round")
    args = parser.parse_args(argv)
    return run_benchmark("genrelay large-table benchmark", args, measure, print_report)


if __name__ == "__main__":
    sys.exit(main())
