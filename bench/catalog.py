"""Catalog benchmark (issue 10, "Catalog scale"): a big catalog under Deep-Image's concurrency
limit, with genrelay's line and without it, in the same run.

What runs
    Per case and arm: a fresh database, a fresh simulator
    (``genrelay simulator --concurrency-limit L --processing-time T``: at most L active jobs
    per API key, a ``429`` beyond), fake-gcs-server (memory backend, shared), ``genrelay
    serve`` (gunicorn) with callbacks on (``GENRELAY_PUBLIC_URL`` and
    ``GENRELAY_CALLBACK_SECRET``) and one ``genrelay worker``. Two tenants: ``catalog`` sends
    the catalog of N generations; ``interactive`` (case a only) sends one generation every
    ``--second-tenant-interval`` seconds while the catalog runs.

    - ``a`` (cases (a) and (b) of the issue, together): N = 2000, L = 10, T = 1 s.
    - ``c``: a catalog that keeps the cap full far longer than the submit task's whole retry
      budget, shrunk through ``GENRELAY_SUBMIT_MAX_AGE`` (default: L = 2, T = 2 s, N = 600,
      60 s).
    - ``intake``: a 10,000-item catalog (L = 10, T = 1 s) is sent and the run stops once it is
      taken: the intake time and the web process's peak RSS meanwhile. genrelay arm only.

    Arms:
    - ``genrelay``: this worktree's code (``PYTHONPATH`` = the repository).
    - ``baseline``: the code before the line (``--baseline-path``, a checkout of 535494f by
      default at /tmp/baseline; make it with ``git worktree add --detach /tmp/baseline
      535494f``): every generation is submitted at intake, a 429 is a failed attempt retried
      with backoff (2 s doubling, 10 attempts, the submit budget). It has no
      ``GENRELAY_SUBMIT_MAX_AGE``: ``bench/_baseline_shim`` gives it one (the same budget as
      the genrelay arm's in case c). Always sent generation by generation (``/v1/batches``
      does not exist there). Skipped, with a note, when the path does not exist.

    The catalog goes in through ``POST /v1/generations``, one request per item from
    ``--intake-threads`` client threads (``--intake single``, the default), or through
    ``POST /v1/batches`` (``--intake batch``: up to 10,000 items a request, body
    ``{items: [{input, custom_id}]}``, 202 with ``{id, status, counts}``; ``GET
    /v1/batches/{id}`` is checked at the end). ``GENRELAY_RATE_LIMIT=0`` so the per-key rate
    limit does not throttle the catalog's intake.

What is reported
    - ``makespan``: the first POST (client clock) to the last catalog generation's
      ``completed_at`` (the database; same machine, same clock). ``bound``: N·T/L, the
      shortest possible time for N jobs of T seconds L at a time. ``ratio`` =
      makespan / bound (target ≤ 1.10). ``ratio (all)`` divides by the bound of every
      generation of the run, the second tenant's included (they take slots too).
    - ``429/gen``: the simulator's 429 answers / generations of the run (target ≤ 0.05);
      ``peak active``: the most jobs the simulator had active at once for genrelay's key
      (must be ≤ L).
    - ``failed``: generations that ended ``failed`` or ``canceled`` (target 0).
    - second tenant: POST (client clock) to ``completed_at`` of each of its generations,
      p50 / p99 / max, and p99 / T (target ≤ 3).
    - ``intake``: first POST to last 202 of the catalog; ``web RSS``: peak VmHWM of the
      largest gunicorn process (reset before the intake) and the largest sampled sum over the
      whole ``genrelay serve`` tree (every 50 ms).

Run from the repository root:

    .venv/bin/python bench/catalog.py                          # a, c and intake, full size
    .venv/bin/python bench/catalog.py --cases a --catalog 200  # a short one
    .venv/bin/python bench/catalog.py --smoke                  # tiny sizes (the smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
from _stack import (
    BENCH_DIR,
    CLIENT_TIMEOUT,
    GENRELAY,
    LOOPBACK,
    REPO_DIR,
    SIMULATOR_KEY,
    BenchError,
    Database,
    LoadResult,
    Processes,
    TreeRssSampler,
    add_common_options,
    base_env,
    closed_loop,
    failed,
    finish,
    free_port,
    fresh_database,
    handle_signals,
    interrupted,
    machine_facts,
    percentile,
    postgres_url_from_env,
    prepare_database,
    print_log_scan,
    proc_status,
    reset_peak_rss,
    run_command,
    scan_log,
    start_simulator,
    tree_of,
    wait_for_log,
    wait_until,
    work_dirs,
)

BUCKET = "genrelay-catalog"
DEFAULT_BASELINE = Path("/tmp/baseline")  # noqa: S108 - a checkout made by hand, see above
BASELINE_SHIM = BENCH_DIR / "_baseline_shim"
CATALOG_TENANT = "catalog"
SECOND_TENANT = "interactive"
TERMINAL = ("succeeded", "failed", "canceled")
DB_POLL = 0.5  # seconds between looks at the generations' statuses
STRANDED_FOR = 15.0  # seconds every open generation must look stranded before we stop waiting
MAX_BATCH_ITEMS = 10_000
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    catalog: int  # N
    limit: int  # L: the simulator's concurrency limit
    processing_time: float  # T
    second_tenant: float | None = None  # seconds between the second tenant's requests
    submit_max_age: float | None = None  # GENRELAY_SUBMIT_MAX_AGE
    complete: bool = True  # wait for every generation (False: stop once taken)

    @property
    def bound(self) -> float:
        return self.catalog * self.processing_time / self.limit


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    pythonpath: str
    intake: str  # "single" or "batch"


def epoch(value: Any) -> float | None:
    """Seconds since the epoch of a database timestamp; naive ones are UTC (SQLite's)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return float(value.timestamp())


class Reader:
    """Read-only queries on the run's database, PostgreSQL or SQLite."""

    def __init__(self, db_url: str) -> None:
        self.pg: Database | None = None
        self.lite: Any = None
        if db_url.startswith("sqlite"):
            import sqlite3

            path = db_url.split("sqlite:///", 1)[1]
            self.lite = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None
            )
        else:
            self.pg = Database(db_url, "genrelay-catalog-bench")

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.pg is not None:
            return self.pg.rows(sql)
        return list(self.lite.execute(sql).fetchall())

    def statuses(self) -> dict[str, dict[str, int]]:
        """{tenant name: {status: count}}."""
        found: dict[str, dict[str, int]] = {}
        for tenant, status, count in self.rows(
            "SELECT t.name, g.status, count(*) FROM generations g "
            "JOIN tenants t ON t.id = g.tenant_id GROUP BY t.name, g.status"
        ):
            found.setdefault(str(tenant), {})[str(status)] = int(count)
        return found

    def has_admitted_at(self) -> bool:
        try:
            self.rows("SELECT admitted_at FROM generations LIMIT 0")
        except Exception:  # the baseline's schema has no admitted_at
            return False
        return True

    def stranded(self, tenant: str) -> int:
        """Open generations of `tenant` whose submit task is dead and that have no task left
        to run: nothing will ever finish them (the baseline's retry could give a task up
        without recording its outcome when the budget ran out between two jitter draws)."""
        name = tenant.replace("'", "")
        return int(
            self.rows(
                "SELECT count(*) FROM generations g JOIN tenants t ON t.id = g.tenant_id "  # noqa: S608 - our own constant
                f"WHERE t.name = '{name}' AND g.status IN ('queued', 'processing') "
                "AND EXISTS (SELECT 1 FROM tasks k WHERE k.generation_id = g.id "
                "AND k.kind = 'submit' AND k.status = 'dead') "
                "AND NOT EXISTS (SELECT 1 FROM tasks k WHERE k.generation_id = g.id "
                "AND k.status IN ('pending', 'running'))"
            )[0][0]
        )

    def generations(self) -> list[dict[str, Any]]:
        admitted = "g.admitted_at" if self.has_admitted_at() else "NULL"
        rows = self.rows(
            "SELECT g.id, t.name, g.status, g.error_code, g.created_at, g.completed_at, "  # noqa: S608 - no input
            f"{admitted}, g.submitted_at, g.source_found_at "
            "FROM generations g JOIN tenants t ON t.id = g.tenant_id"
        )
        keys = ("created", "completed", "admitted", "submitted", "source_found")
        return [
            {
                "id": row[0],
                "tenant": row[1],
                "status": row[2],
                "error": row[3],
                **{key: epoch(value) for key, value in zip(keys, row[4:], strict=True)},
            }
            for row in rows
        ]

    def close(self) -> None:
        if self.pg is not None:
            self.pg.close()
        if self.lite is not None:
            self.lite.close()


def unfinished(counts: dict[str, int]) -> int:
    return sum(n for status, n in counts.items() if status not in TERMINAL)


class SecondTenant:
    """One generation every `interval` seconds, on a thread, until stopped."""

    def __init__(self, api: str, key: str, body: dict[str, Any], interval: float) -> None:
        self.url = f"{api}/v1/generations"
        self.headers = {"Authorization": f"Bearer {key}"}
        self.body = body
        self.interval = interval
        self.sent: dict[str, float] = {}  # generation id -> time.time() just before its POST
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="second-tenant", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=CLIENT_TIMEOUT[0] + CLIENT_TIMEOUT[1] + 5)

    def _run(self) -> None:
        with requests.Session() as session:
            next_at = time.monotonic()
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                next_at += self.interval
                sent = time.time()
                try:
                    response = session.post(
                        self.url, json=self.body, headers=self.headers, timeout=CLIENT_TIMEOUT
                    )
                except requests.RequestException as exc:
                    self.errors.append(type(exc).__name__)
                    continue
                if response.status_code != 202:
                    self.errors.append(str(response.status_code))
                    continue
                self.sent[response.json()["id"]] = sent


class Run:
    """One case on one arm: its processes, database and measurements."""

    def __init__(
        self,
        args: argparse.Namespace,
        case: Case,
        arm: Arm,
        gcs: Any,
        tmp_dir: Path,
        log_dir: Path,
    ) -> None:
        self.args = args
        self.case = case
        self.arm = arm
        self.gcs = gcs
        self.tmp_dir = tmp_dir
        self.dir = log_dir / f"{case.name}-{arm.name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.processes = Processes(self.dir)
        self.gave_up: dict[str, int] = {}  # tenant -> generations left unfinished
        self.stranded: dict[str, int] = {}  # tenant -> open generations nothing will finish
        size = args.image_size
        text_only = {"generate": {"description": "catalog item"}}
        self.input = {"width": size, "height": size, "background": text_only}

    def env(self, db_url: str, sim_url: str, api: str, port: int) -> dict[str, str]:
        env = {
            **base_env(),
            "PYTHONPATH": self.arm.pythonpath,
            "GENRELAY_DATABASE_URL": db_url,
            "GENRELAY_DEEPIMAGE_URL": sim_url,
            "GENRELAY_DEEPIMAGE_API_KEY": SIMULATOR_KEY,
            "GENRELAY_PUBLIC_URL": api,
            "GENRELAY_CALLBACK_SECRET": secrets.token_hex(16),
            "GENRELAY_GCS_BUCKET": BUCKET,
            "STORAGE_EMULATOR_HOST": self.gcs.url,
            "GENRELAY_RATE_LIMIT": "0",
            # Loopback http everywhere: result URLs from the simulator included.
            "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
            "GENRELAY_WEB_PROCESSES": str(self.args.web_processes),
            "GENRELAY_WEB_THREADS": str(self.args.web_threads),
            "PORT": str(port),
            "XDG_RUNTIME_DIR": str(self.dir),
        }
        if self.case.submit_max_age is not None:
            env["GENRELAY_SUBMIT_MAX_AGE"] = f"{self.case.submit_max_age:g}"
        if self.args.configured_limit:
            env["GENRELAY_UPSTREAM_CONCURRENCY"] = str(self.case.limit)
        return env

    def measure(self) -> dict[str, Any]:
        case, arm = self.case, self.arm
        print(
            f"-- case {case.name}, {arm.name}: N={case.catalog} L={case.limit} "
            f"T={case.processing_time:g} s, bound {case.bound:.0f} s, intake {arm.intake}",
            flush=True,
        )
        with fresh_database(
            self.args.database,
            self.tmp_dir,
            self.args.postgres_url,
            name=f"catalog-{case.name}-{arm.name}",
        ) as (db_url, db_desc):
            try:
                result = self._measure(db_url)
            finally:
                self.processes.stop_all()
        logs = {
            name: scan_log(self.processes.log_path(name), found_only=True)
            for name in self.processes.children
        }
        result.update(
            {
                "case": case.name,
                "arm": arm.name,
                "database": db_desc,
                "logs": {k: v for k, v in logs.items() if v["counts"]},
            }
        )
        print(
            f"   intake {result['intake']['seconds']:.1f} s, makespan "
            f"{fmt(result.get('makespan_s'), '.1f')} s (ratio {fmt(result.get('ratio'), '.3f')}),"
            f" 429/gen {fmt(result['rejections_per_generation'], '.3f')}, peak active "
            f"{result['simulator']['peak_active']}, statuses {result['statuses']}",
            flush=True,
        )
        return result

    def _measure(self, db_url: str) -> dict[str, Any]:
        case, args = self.case, self.args
        sim_url = start_simulator(
            self.processes,
            {**base_env(), "PYTHONPATH": str(REPO_DIR)},
            case.processing_time,
            concurrency_limit=case.limit,
        )
        port = free_port()
        api = f"http://{LOOPBACK}:{port}"
        env = self.env(db_url, sim_url, api, port)
        catalog_key = prepare_database(env, CATALOG_TENANT)
        second_key = run_command([GENRELAY, "keys", "create", SECOND_TENANT], env).strip()
        serve = self.processes.start("serve", [GENRELAY, "serve"], env)
        self.processes.start("worker", [GENRELAY, "worker", "--threads", str(args.threads)], env)
        wait_until(lambda: requests.get(f"{api}/readyz", timeout=2).ok, self.processes, "serve")
        wait_for_log(self.processes, "worker", "worker started")
        reader = Reader(db_url)
        second = None
        if case.second_tenant:
            body = {"input": self.input, "metadata": {"tenant": SECOND_TENANT}}
            second = SecondTenant(api, second_key, body, case.second_tenant)
        serve_pids = tree_of(serve)
        for pid in serve_pids():
            reset_peak_rss(pid)
        try:
            with TreeRssSampler(serve_pids) as rss:
                began = time.time()
                if second is not None:
                    second.start()
                intake = self.intake(api, catalog_key)
                if intake["accepted"] != case.catalog:
                    raise BenchError(
                        f"the catalog's intake took {intake['accepted']} of {case.catalog} "
                        f"items: {intake['outcomes']}"
                    )
                intake_rss = {
                    "serve_tree_peak_sampled_mib": round(rss.peak_total / MIB, 1),
                    "largest_process_vmhwm_mib": round(
                        max((proc_status(p).get("VmHWM", 0) for p in serve_pids()), default=0)
                        / MIB,
                        1,
                    ),
                }
                catalog_done = None
                if case.complete:
                    catalog_done = self.wait(reader, CATALOG_TENANT, began)
                if second is not None:
                    second.stop()
                    self.wait(reader, SECOND_TENANT, began)
            sim = requests.get(f"{sim_url}/_sim/stats", timeout=CLIENT_TIMEOUT).json()
            batches = self.check_batches(api, catalog_key, intake) if case.complete else None
            gens = reader.generations()
        finally:
            if second is not None:
                second.stop()
            reader.close()
        return self.figures(began, intake, intake_rss, catalog_done, second, sim, gens, batches)

    # -- intake ------------------------------------------------------------------------

    def intake(self, api: str, key: str) -> dict[str, Any]:
        """Send the catalog; when it began and ended (time.time()), and how it went."""
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        if self.arm.intake == "batch":
            return self.intake_batches(api, headers)
        url = f"{api}/v1/generations"
        bodies = [
            json.dumps({"input": self.input, "metadata": {"item": str(n)}}).encode()
            for n in range(self.case.catalog)
        ]

        def send(session: requests.Session, n: int) -> requests.Response:
            return session.post(url, data=bodies[n], headers=headers, timeout=CLIENT_TIMEOUT)

        stop = threading.Event()
        threads = min(self.args.intake_threads, self.case.catalog)
        load: LoadResult = closed_loop(self.case.catalog, threads, send, stop)
        if load.errors:
            print(f"   intake errors: {dict(load.outcomes)}", flush=True)
        return {
            "mode": "single",
            "threads": threads,
            "began": load.started_at,
            "ended": max(load.ended_at, default=load.started_at),
            "seconds": round(load.wall, 3),
            "outcomes": dict(load.outcomes),
            "accepted": sum(n for k, n in load.outcomes.items() if k == "202"),
            "batch_ids": [],
        }

    def intake_batches(self, api: str, headers: dict[str, str]) -> dict[str, Any]:
        outcomes: dict[str, int] = {}
        batch_ids: list[str] = []
        accepted = 0
        began = time.time()
        started = time.perf_counter()
        with requests.Session() as session:
            for first in range(0, self.case.catalog, MAX_BATCH_ITEMS):
                items = [
                    {"input": self.input, "custom_id": f"item-{n}"}
                    for n in range(first, min(first + MAX_BATCH_ITEMS, self.case.catalog))
                ]
                body = json.dumps({"items": items, "metadata": {"bench": "catalog"}}).encode()
                try:
                    response = session.post(
                        f"{api}/v1/batches", data=body, headers=headers, timeout=(5.0, 600.0)
                    )
                    outcome = str(response.status_code)
                except requests.RequestException as exc:
                    outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                    continue
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if response.status_code != 202:
                    print(f"   batch refused: {outcome} {response.text[:300]}", flush=True)
                    continue
                answer = response.json()
                batch_ids.append(answer["id"])
                accepted += int(answer["counts"]["total"])
        wall = time.perf_counter() - started
        return {
            "mode": "batch",
            "threads": 1,
            "began": began,
            "ended": began + wall,
            "seconds": round(wall, 3),
            "outcomes": outcomes,
            "accepted": accepted,
            "batch_ids": batch_ids,
        }

    def check_batches(
        self, api: str, key: str, intake: dict[str, Any]
    ) -> list[dict[str, Any]] | None:
        """GET /v1/batches/{id} of each batch once everything finished: its counts."""
        if not intake["batch_ids"]:
            return None
        found = []
        for batch_id in intake["batch_ids"]:
            response = requests.get(
                f"{api}/v1/batches/{batch_id}",
                headers={"Authorization": f"Bearer {key}"},
                timeout=CLIENT_TIMEOUT,
            )
            response.raise_for_status()
            body = response.json()
            found.append({"id": batch_id, "status": body.get("status"), "counts": body["counts"]})
        return found

    # -- waiting -------------------------------------------------------------------------

    def wait(self, reader: Reader, tenant: str, began: float) -> float:
        """Until every generation of `tenant` is finished; time.time() when that was seen.

        Bounded: past the bound the generations still open are left so (the report counts
        them as not finished) and the run goes on. The bound allows a task lease (300 s: a
        task claimed by a process that lost it runs again only then) on top of the work.
        """
        case = self.case
        bound = 420 + 4 * case.bound + 2 * case.catalog * case.processing_time
        deadline = time.monotonic() + bound
        last_note = time.monotonic()
        stuck_since: float | None = None
        while True:
            self.processes.check_alive()
            counts = reader.statuses().get(tenant, {})
            if counts and not unfinished(counts):
                return time.time()
            # Every open generation stranded, for STRANDED_FOR seconds: stop waiting.
            if counts and reader.stranded(tenant) == unfinished(counts):
                stuck_since = stuck_since or time.monotonic()
                if time.monotonic() - stuck_since > STRANDED_FOR:
                    print(f"   {tenant}: {counts}, every open one stranded", flush=True)
                    self.stranded[tenant] = unfinished(counts)
                    return time.time()
            else:
                stuck_since = None
            if time.monotonic() > deadline:
                print(f"   {tenant}: {counts} after {bound:.0f} s: giving up", flush=True)
                self.gave_up[tenant] = unfinished(counts)
                return time.time()
            if time.monotonic() - last_note > 30:
                last_note = time.monotonic()
                print(f"   {time.time() - began:6.0f} s  {tenant}: {counts}", flush=True)
            time.sleep(DB_POLL)

    def phases(self, catalog: list[dict[str, Any]], makespan: float) -> dict[str, Any]:
        """Where a catalog generation's slot time goes, median and p90 in seconds.

        A slot is held from the admission (`admitted_at`, genrelay only) until the result is
        known (`source_found_at`, the callback); upstream, the job takes T of that.
        """
        t = self.case.processing_time
        held = spans(catalog, "admitted", "source_found")
        return {
            "admitted_to_submitted_s": p50_p90(spans(catalog, "admitted", "submitted")),
            "submitted_to_callback_minus_T_s": p50_p90(
                spans(catalog, "submitted", "source_found", t)
            ),
            "callback_to_succeeded_s": p50_p90(spans(catalog, "source_found", "completed")),
            # Slot-seconds genrelay held for the catalog over slot-seconds available.
            "slot_time_held_share": round(sum(held) / (self.case.limit * makespan), 3)
            if held and makespan > 0
            else None,
        }

    # -- figures -------------------------------------------------------------------------

    def figures(
        self,
        began: float,
        intake: dict[str, Any],
        intake_rss: dict[str, Any],
        catalog_done: float | None,
        second: SecondTenant | None,
        sim: dict[str, Any],
        gens: list[dict[str, Any]],
        batches: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        case = self.case
        catalog = [g for g in gens if g["tenant"] == CATALOG_TENANT]
        others = [g for g in gens if g["tenant"] == SECOND_TENANT]
        statuses: dict[str, dict[str, int]] = {}
        errors: dict[str, int] = {}
        for g in gens:
            by = statuses.setdefault(g["tenant"], {})
            by[g["status"]] = by.get(g["status"], 0) + 1
            if g["status"] in ("failed", "canceled"):
                key = f"{g['tenant']} {g['status']} {g['error']}"
                errors[key] = errors.get(key, 0) + 1
        result: dict[str, Any] = {
            "N": case.catalog,
            "L": case.limit,
            "T": case.processing_time,
            "bound_s": round(case.bound, 1),
            "intake": {k: v for k, v in intake.items() if k not in ("began", "ended")},
            "intake_items_per_s": round(intake["accepted"] / intake["seconds"], 1)
            if intake["seconds"]
            else None,
            "web_rss": intake_rss,
            "generations": len(gens),
            "statuses": statuses,
            "not_succeeded": errors,
            "failed": sum(1 for g in gens if g["status"] in ("failed", "canceled")),
            "unfinished": sum(1 for g in gens if g["status"] not in TERMINAL),
            "stranded": self.stranded,
            "simulator": {
                k: sim.get(k)
                for k in (
                    "jobs_created",
                    "jobs_completed",
                    "responses_429",
                    "concurrency_rejections",
                    "peak_active",
                    "callbacks_delivered",
                    "callbacks_failed",
                )
            },
            "batches": batches,
        }
        result["rejections_per_generation"] = (
            round(sim["responses_429"] / len(gens), 3) if gens else None
        )
        if not case.complete:
            return result
        completed = [g["completed"] for g in catalog if g["completed"] is not None]
        last = max(completed, default=catalog_done or began)
        makespan = last - began
        work = len(gens) * case.processing_time / case.limit
        result.update(
            {
                "makespan_s": round(makespan, 1),
                "ratio": round(makespan / case.bound, 3),
                "ratio_all_work": round(makespan / work, 3) if work else None,
                "catalog_done_seen_s": round((catalog_done or last) - began, 1),
            }
        )
        result["per_generation"] = self.phases(catalog, makespan)
        if second is not None:
            waits = sorted(
                g["completed"] - second.sent[g["id"]]
                for g in others
                if g["status"] == "succeeded" and g["completed"] and g["id"] in second.sent
            )
            result["second_tenant"] = {
                "interval_s": case.second_tenant,
                "sent": len(second.sent),
                "errors": second.errors,
                "succeeded": len(waits),
                "p50_s": round(percentile(waits, 50), 2),
                "p99_s": round(percentile(waits, 99), 2),
                "max_s": round(waits[-1], 2) if waits else None,
                "p99_over_T": round(percentile(waits, 99) / case.processing_time, 2),
            }
        return result


def spans(gens: list[dict[str, Any]], start: str, end: str, minus: float = 0.0) -> list[float]:
    return sorted(
        g[end] - g[start] - minus
        for g in gens
        if g["status"] == "succeeded" and g[start] is not None and g[end] is not None
    )


def p50_p90(values: list[float]) -> list[float] | None:
    if not values:
        return None
    return [round(percentile(values, 50), 3), round(percentile(values, 90), 3)]


# -- report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_report(report: dict[str, Any]) -> None:
    print("\n== catalog benchmark ==")
    for key, value in report["machine"].items():
        print(f"{key:>24}: {value}")
    runs = report["runs"]
    for case in ("a", "c"):
        rows = [r for r in runs if r["case"] == case]
        if not rows:
            continue
        first = rows[0]
        print(
            f"\ncase {case}: N={first['N']} L={first['L']} T={first['T']:g} s, "
            f"bound N*T/L = {first['bound_s']:g} s"
        )
        header = (
            f"{'arm':<9} {'intake':>7} {'makespan':>9} {'ratio':>6} {'r(all)':>6} "
            f"{'429/gen':>7} {'peak':>5} {'failed':>6} {'open':>6}  statuses"
        )
        print(header)
        print("-" * len(header))
        for r in rows:
            print(
                f"{r['arm']:<9} {fmt(r['intake']['seconds'], '.1f'):>7} "
                f"{fmt(r.get('makespan_s'), '.1f'):>9} {fmt(r.get('ratio'), '.3f'):>6} "
                f"{fmt(r.get('ratio_all_work'), '.3f'):>6} "
                f"{fmt(r['rejections_per_generation'], '.3f'):>7} "
                f"{fmt(r['simulator']['peak_active']):>5} {r['failed']:>6} {r['unfinished']:>6}  "
                f"{r['statuses']}"
            )
        for r in rows:
            s = r.get("second_tenant")
            if s:
                print(
                    f"{r['arm']:<9} second tenant (1 every {s['interval_s']:g} s): "
                    f"{s['succeeded']}/{s['sent']} succeeded, POST -> succeeded "
                    f"p50 {fmt(s['p50_s'])} s, p99 {fmt(s['p99_s'])} s, max {fmt(s['max_s'])} s; "
                    f"p99/T = {fmt(s['p99_over_T'])}"
                    + (f"; errors {s['errors']}" if s["errors"] else "")
                )
        for r in rows:
            ph = r.get("per_generation")
            if ph:
                print(
                    f"{r['arm']:<9} per catalog generation, p50/p90 s: admitted -> submitted "
                    f"{ph['admitted_to_submitted_s']}, submitted -> callback recorded - T "
                    f"{ph['submitted_to_callback_minus_T_s']}, callback -> succeeded "
                    f"{ph['callback_to_succeeded_s']}; slot time held {ph['slot_time_held_share']}"
                )
        for r in rows:
            if r["arm"] != "genrelay":
                continue
            checks = [f"failed = {r['failed']}: {verdict(r['failed'] == 0)}"]
            if case == "a":
                checks += [
                    f"ratio {fmt(r['ratio'], '.3f')} <= 1.10: {verdict(r['ratio'] <= 1.10)}",
                    f"429/gen {fmt(r['rejections_per_generation'], '.3f')} <= 0.05: "
                    f"{verdict(r['rejections_per_generation'] <= 0.05)}",
                    f"peak active {r['simulator']['peak_active']} <= L: "
                    f"{verdict(r['simulator']['peak_active'] <= r['L'])}",
                ]
                s = r.get("second_tenant")
                if s and s["succeeded"]:
                    checks.append(
                        f"second tenant p99 {fmt(s['p99_s'])} s <= 3T: "
                        f"{verdict(s['p99_s'] <= 3 * r['T'])}"
                    )
            print("genrelay: " + "; ".join(checks))
        for r in rows:
            if r["not_succeeded"]:
                print(f"{r['arm']:<9} not succeeded: {r['not_succeeded']}")
            if r["stranded"]:
                print(
                    f"{r['arm']:<9} stranded (open, submit task dead, nothing left to run): "
                    f"{r['stranded']}"
                )
            if r["batches"]:
                print(f"{r['arm']:<9} batches: {r['batches']}")
    for r in (r for r in runs if r["case"] == "intake"):
        rss = r["web_rss"]
        print(
            f"\nintake: {r['intake']['accepted']} of {r['N']} items taken in "
            f"{r['intake']['seconds']:.1f} s ({r['intake']['mode']}, "
            f"{r['intake_items_per_s']} items/s, {r['intake']['outcomes']}); web RSS peak: "
            f"largest process {rss['largest_process_vmhwm_mib']} MiB (VmHWM), "
            f"serve tree {rss['serve_tree_peak_sampled_mib']} MiB (sampled sum)"
        )
    for r in runs:
        print(
            f"{r['case']}/{r['arm']}: web RSS during the intake: largest process "
            f"{r['web_rss']['largest_process_vmhwm_mib']} MiB, tree "
            f"{r['web_rss']['serve_tree_peak_sampled_mib']} MiB"
        )
        for name, scan in r["logs"].items():
            print_log_scan(f"  {r['case']}/{r['arm']} {name}", scan)
    for note in report["notes"]:
        print(f"note: {note}")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cases", default="a,c,intake", help="a, c, intake (a,c,intake)")
    parser.add_argument("--arms", default="genrelay,baseline", help="genrelay,baseline")
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--intake", choices=("single", "batch"), default="single")
    parser.add_argument("--intake-threads", type=int, default=8, help="single intake (8)")
    parser.add_argument("--catalog", type=int, default=2000, help="case a: N (2000)")
    parser.add_argument("--limit", type=int, default=10, help="case a: L (10)")
    parser.add_argument("--processing-time", type=float, default=1.0, help="case a: T (1)")
    parser.add_argument(
        "--second-tenant-interval",
        type=float,
        default=2.0,
        help="case a: seconds between the second tenant's requests (2; 0: none)",
    )
    parser.add_argument("--c-catalog", type=int, default=600, help="case c: N (600)")
    parser.add_argument("--c-limit", type=int, default=2, help="case c: L (2)")
    parser.add_argument("--c-processing-time", type=float, default=2.0, help="case c: T (2)")
    parser.add_argument(
        "--c-submit-max-age", type=float, default=60.0, help="case c: GENRELAY_SUBMIT_MAX_AGE"
    )
    parser.add_argument("--intake-items", type=int, default=10_000, help="intake case (10000)")
    parser.add_argument(
        "--configured-limit",
        action="store_true",
        help="set GENRELAY_UPSTREAM_CONCURRENCY=L (default: genrelay learns it from 429s)",
    )
    parser.add_argument("--threads", type=int, default=4, help="genrelay worker --threads (4)")
    parser.add_argument("--web-processes", type=int, default=2)
    parser.add_argument("--web-threads", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256, help="result side in px (256)")
    parser.add_argument(
        "--baseline-path", type=Path, default=DEFAULT_BASELINE, help="checkout of 535494f"
    )
    parser.add_argument(
        "--genrelay-path",
        type=Path,
        default=REPO_DIR,
        help="the genrelay arm's code (PYTHONPATH; default: this repository)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (a: N=40 L=4 T=0.2; c: N=12 L=2 T=0.5, budget 2 s; intake 200)",
    )
    add_common_options(parser, postgres_url=postgres_url_from_env())
    args = parser.parse_args(argv)
    args.baseline_path = args.baseline_path.resolve()
    args.genrelay_path = args.genrelay_path.resolve()
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if set(args.cases) - {"a", "c", "intake"} or set(args.arms) - {"genrelay", "baseline"}:
        parser.error("--cases takes a, c, intake; --arms genrelay, baseline")
    if args.smoke:
        args.catalog, args.limit, args.processing_time = 40, 4, 0.2
        args.second_tenant_interval = 0.5
        args.c_catalog, args.c_limit, args.c_processing_time = 12, 2, 0.5
        args.c_submit_max_age = 2.0
        args.intake_items = 200
    if args.intake == "batch" and args.intake_items > MAX_BATCH_ITEMS * 100:
        parser.error("--intake-items is too large")
    for name in ("catalog", "limit", "c_catalog", "c_limit", "intake_items", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def plan(args: argparse.Namespace) -> tuple[list[tuple[Case, Arm]], list[str]]:
    notes: list[str] = []
    arms = [Arm("genrelay", str(args.genrelay_path), args.intake)]
    if "baseline" in args.arms:
        if (args.baseline_path / "service" / "line.py").exists():
            notes.append(
                f"{args.baseline_path} has service/generations/line.py: is it the baseline?"
            )
        if (args.baseline_path / "service" / "bootstrap.py").exists():
            shim = os.pathsep.join([str(args.baseline_path), str(BASELINE_SHIM)])
            arms.append(Arm("baseline", shim, "single"))
        else:
            notes.append(
                f"baseline arm skipped: no checkout at {args.baseline_path} "
                "(git worktree add --detach /tmp/baseline 535494f)"
            )
    if "genrelay" not in args.arms:
        arms = arms[1:]
    cases = []
    if "a" in args.cases:
        second = args.second_tenant_interval or None
        cases.append(Case("a", args.catalog, args.limit, args.processing_time, second))
    if "c" in args.cases:
        cases.append(
            Case(
                "c",
                args.c_catalog,
                args.c_limit,
                args.c_processing_time,
                submit_max_age=args.c_submit_max_age,
            )
        )
    runs = [(case, arm) for case in cases for arm in arms]
    if "intake" in args.cases and any(a.name == "genrelay" for a in arms):
        intake = Case("intake", args.intake_items, args.limit, args.processing_time, complete=False)
        runs.append((intake, arms[0]))
    return runs, notes


def code_version(path: Path) -> str:
    """The commit of a checkout (and whether it has changes), or "unknown"."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_signals()
    facts = machine_facts(memory=True)
    runs, notes = plan(args)
    began = time.monotonic()
    results: list[dict[str, Any]] = []
    with work_dirs(args.log_dir) as (tmp_dir, log_dir):
        from service.devtools.gcs_emulator import FakeGcsServer

        gcs = FakeGcsServer(backend="memory", log_path=log_dir / "gcs.log")
        current: Run | None = None
        try:
            gcs.start()
            gcs.create_bucket(BUCKET)
            for case, arm in runs:
                current = Run(args, case, arm, gcs, tmp_dir, log_dir)
                results.append(current.measure())
        except BenchError as exc:
            return failed(exc, current.processes if current else Processes(log_dir))
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                if current is not None:
                    current.processes.stop_all()
            return interrupted("every process stopped, databases dropped")
        finally:
            gcs.stop()
    facts.update(
        {
            "database": args.database,
            "genrelay code": f"{args.genrelay_path}: {code_version(args.genrelay_path)}",
            "simulator": "genrelay simulator --concurrency-limit L --processing-time T, "
            "callbacks on (GENRELAY_PUBLIC_URL)",
            "serve": f"genrelay serve, {args.web_processes} x {args.web_threads}, "
            "GENRELAY_RATE_LIMIT=0",
            "worker": f"1 x genrelay worker --threads {args.threads}",
            "limit": "GENRELAY_UPSTREAM_CONCURRENCY=L"
            if args.configured_limit
            else "learned from 429s (GENRELAY_UPSTREAM_CONCURRENCY unset)",
            "intake": f"{args.intake}"
            + (f", {args.intake_threads} client threads" if args.intake == "single" else ""),
            "result image": f"{args.image_size}x{args.image_size} PNG, fake-gcs-server (memory)",
            "baseline": f"{args.baseline_path}: {code_version(args.baseline_path)} "
            "(PYTHONPATH), single intake"
            if any(a.name == "baseline" for _, a in runs)
            else "not run",
        }
    )
    report = {
        "machine": facts,
        "runs": results,
        "notes": notes,
        "seconds": round(time.monotonic() - began, 1),
    }
    return finish(report, print_report, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
