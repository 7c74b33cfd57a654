"""Scale-out benchmark: generations/s through the whole path with 1 and 2 worker processes.

What is measured
    Generations per second from ``POST /v1/generations`` to ``succeeded`` (result stored in
    GCS), on PostgreSQL, with N ``genrelay worker --threads T`` processes (N = 1 and 2 by
    default; T = 4). The issue's target: 2 workers give at least 1.8x the rate of 1.

    The path of one generation: the web process validates and stores it, then submits it to
    Deep-Image inline (in the request); the simulator finishes the job after 0.2 s and POSTs
    its callback to the same web server, which records the result URL and queues a ``store``
    task; a worker claims it, confirms the job (``GET /rest_api/result``), streams the image
    from the simulator into fake-gcs-server and marks the generation ``succeeded``. Each
    generation also has a ``poll`` task, the fallback for a lost callback, due
    ``GENRELAY_RECONCILE_AFTER`` after the submit (``--reconcile-after``, 2 s here, 120 s by
    default): it finds the result already known and does nothing, as every generation's poll
    eventually does in a steady state; and it rescues the generations whose callback came
    before the submit had recorded the job (genrelay answers such a callback 409: the
    ``cb 409`` column). So the workers run the ``store`` and ``poll`` tasks; intake (with
    the first submit) and callbacks are the web server's work.

    Two variants, each with a fresh database, repeated ``--repeats`` times (the worker counts
    alternate: 1, 2 in odd repeats, 2, 1 in even ones):

    - ``whole``: the workers run from the start; G generations (default 400) are posted as
      fast as 16 client threads can; the clock runs from the first POST to the last
      ``completed_at``. The report splits it into the submit phase (first POST to last 202)
      and the tail (last 202 to last ``succeeded``), and gives per-generation medians: inline
      submit (``created_at -> submitted_at``), upstream + callback (``-> source_found_at``),
      store (``-> completed_at``: waiting for a worker thread, then the copy).
    - ``backlog``: G generations are posted with no worker running, and every callback has
      been answered (the simulator's counters). Every pending task (G ``store`` and G ``poll``
      tasks, less the 409s' store tasks) gets its ``run_at`` moved an hour ahead, the workers
      are started, and once they have logged "worker started" the tasks are made due again
      in one UPDATE. The clock runs from that UPDATE until the last task has finished (the
      last ``finished_at`` or ``completed_at``): the workers' throughput alone, their
      start-up excluded, with an idle web server. In ``whole`` the clock stops at the last
      ``succeeded``; the poll tasks that fall due later are left out (the tasks line shows
      how many were still pending).

How to read the report
    - ``gen/s``: generations succeeded / elapsed; ``mid80``: the rate between the 10th and the
      90th percentile of ``completed_at`` (start-up and tail left out). Pooled rows: all
      generations / summed elapsed time over the repeats. ``2/1``: pooled rate with 2
      workers / with 1, printed with PASS or FAIL against 1.8 (the exit code stays 0).
    - ``CPU``: CPU seconds each process group used in the measured window, from
      ``/proc/<pid>/stat`` (utime + stime of the processes alive at the snapshots), as % of
      one core over the window and as ms per generation. ``postgres (this db)`` sums the
      backends of the run's database; ``postgres (server)`` every PostgreSQL process (other
      databases' too); ``other`` is the machine's busy time (``/proc/stat``) minus all of
      ours: load that is not this benchmark (the busiest such processes are listed by name).
      ``machine`` is busy time as % of nproc cores: near 100 % means CPU-saturated, and then
      a second worker can only take CPU from the other processes.
    - ``store copy``: the worker's own "stored ... in X s" log line (confirm + download +
      upload; 10 ms steps), median per run: the per-task work without the queue wait.
    - ``PostgreSQL client backends``: pg_stat_activity of the run's database every 50 ms,
      mean number of backends in each state and wait event (lock waits would show
      contention between workers; WALWrite/WALSync are commit flushes).
    Everything (client, web, workers, simulator, fake-gcs-server, PostgreSQL) shares this
    machine; the ratio says how genrelay scales *here*, the CPU table says what bounds it.

Worker CPU cap (``--worker-cpu CORES``)
    In production each worker process runs on an instance of its own (a Cloud Run instance
    with 1 vCPU, say), so a second worker brings its own CPU. Here a second worker can only
    take CPU from the web server, the simulator, fake-gcs-server and PostgreSQL, which share
    the same two cores. With ``--worker-cpu 0.25`` each worker process is put in a cgroup of
    its own limited to 0.25 core (CFS quota; ``_cpulimit.py``): a small "instance" per worker,
    the rest of the stack keeping the remaining cores. The ratio then says whether worker
    capacity adds up, i.e. whether anything in genrelay (the claim, locks, the database)
    serializes the workers. The report prints, per worker, the share of 100 ms periods in
    which it hit its cap: near 100 % means the workers were the bottleneck, as the
    comparison needs. Needs root or a delegated cgroup (the option says why when it cannot).

Run from the repository root:

    .venv/bin/python bench/scale.py [--generations 400] [--workers 1,2] [--threads 4]
        [--repeats 2] [--worker-cpu CORES] [--json-out FILE] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import sys
import time
from typing import Any

import requests
from _cpulimit import CpuQuota, CpuQuotaError
from _cpulimit import available as quotas_available
from _stack import (
    CLIENT_TIMEOUT,
    DEFAULT_POSTGRES_URL,
    GENRELAY,
    LOOPBACK,
    SIMULATOR_KEY,
    SIMULATOR_LIMIT,
    BenchError,
    Context,
    CpuProbe,
    Database,
    LoadResult,
    PidSource,
    Processes,
    WaitSampler,
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
    wait_for_log,
    wait_until,
    work_dirs,
)

BUCKET = "genrelay-bench"
SIM_PROCESSING_TIME = 0.2
TARGET_RATIO = 1.8
SETTLE = 1.0  # seconds after the workers said "worker started", before the clock starts
DB_POLL = 0.05  # seconds between the benchmark's counts of finished generations
MODES = ("whole", "backlog")
# Task queries below leave out kind 'housekeeping': the workers' own hourly sweep
# (service/housekeeping.py) is always pending and is not the workload.
_STORED = re.compile(r"stored \S+ \(\d+ bytes, [^)]*\) in ([0-9.]+) s")


# -- one run -------------------------------------------------------------------------------


def run_case(ctx: Context, mode: str, workers: int, repeat: int) -> dict[str, Any]:
    """One measured run on a fresh database; every process of the run is stopped after it."""
    args = ctx.args
    label = f"{mode} {workers}w #{repeat}"
    case_dir = ctx.log_dir / f"{mode}-{workers}w-{repeat}"
    case_dir.mkdir(parents=True, exist_ok=True)
    processes = Processes(case_dir)
    quotas: list[CpuQuota] = []
    print(f"-- {label}", flush=True)
    with fresh_database("postgresql", ctx.tmp_dir, args.postgres_url) as (db_url, db_desc):
        port = free_port()
        api = f"http://{LOOPBACK}:{port}"
        env = {
            **base_env(),
            "GENRELAY_DATABASE_URL": db_url,
            "GENRELAY_DEEPIMAGE_URL": ctx.sim_url,
            "GENRELAY_DEEPIMAGE_API_KEY": SIMULATOR_KEY,
            "GENRELAY_PUBLIC_URL": api,
            "GENRELAY_CALLBACK_SECRET": secrets.token_hex(16),
            "GENRELAY_GCS_BUCKET": BUCKET,
            "STORAGE_EMULATOR_HOST": ctx.gcs.url,
            "GENRELAY_RATE_LIMIT": "0",
            # Loopback http everywhere: result URLs from the simulator included.
            "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
            "GENRELAY_UPSTREAM_CONCURRENCY": str(SIMULATOR_LIMIT),  # no waiting in the line
            "GENRELAY_RECONCILE_AFTER": str(args.reconcile_after),
            "GENRELAY_WEB_PROCESSES": str(args.web_processes),
            "GENRELAY_WEB_THREADS": str(args.web_threads),
            "PORT": str(port),
            "XDG_RUNTIME_DIR": str(case_dir),
        }
        api_key = prepare_database(env)
        if args.pg_set:
            with Database(db_url) as db:
                for name, value in args.pg_set:
                    db.execute(f'ALTER DATABASE "{db.name}" SET {name} = {value}')
        try:
            with Database(db_url) as db:
                processes.start("serve", [GENRELAY, "serve"], env)
                wait_until(lambda: requests.get(f"{api}/readyz", timeout=2).ok, processes, "serve")
                groups: dict[str, PidSource] = {
                    "serve": tree_of(processes.children["serve"]),
                    **{f"worker-{n}": worker_pids(processes, n) for n in range(1, workers + 1)},
                    "simulator": tree_of(ctx.shared.children["simulator"]),
                    "fake-gcs": tree_of(ctx.gcs.process),
                    "postgres (this db)": db.backends,
                    "postgres (server)": db.postmaster,
                    "bench client": own_process,
                }
                probe = CpuProbe(groups)
                quotas = make_quotas(args.worker_cpu, workers)
                run = Run(ctx, processes, db, env, api, api_key, workers, probe, quotas)
                result = run.whole() if mode == "whole" else run.backlog()
                result["worker_quota"] = quota_figures(quotas, result["cpu"]["wall_s"])
        finally:
            processes.stop_all()
            for quota in quotas:
                quota.close()
        logs = {
            name: scan_log(processes.log_path(name), found_only=True) for name in processes.children
        }
    copies = []
    for n in range(1, workers + 1):
        text = processes.log_path(f"worker-{n}").read_text(errors="replace")
        copies += [float(m.group(1)) for m in _STORED.finditer(text)]
    result.update(
        {
            "label": label,
            "mode": mode,
            "workers": workers,
            "repeat": repeat,
            "database": db_desc,
            "store_copy_ms_p50": round(statistics.median(copies) * 1000, 1) if copies else None,
            "store_copies_logged": len(copies),
            "logs": {k: v for k, v in logs.items() if v["counts"]},
        }
    )
    print(
        f"   {result['succeeded']}/{result['generations']} succeeded in "
        f"{result['elapsed_s']:.2f} s: {result['gen_per_s']:.1f} gen/s "
        f"(machine busy {result['cpu']['machine_pct']:.0f} % of {result['cpu']['nproc']} cores)",
        flush=True,
    )
    return result


def make_quotas(cores: float | None, workers: int) -> list[CpuQuota]:
    """One CPU quota per worker process (none without --worker-cpu)."""
    quotas: list[CpuQuota] = []
    if not cores:
        return quotas
    try:
        for n in range(1, workers + 1):
            quotas.append(CpuQuota(f"genrelay-bench-worker-{n}", cores))
    except (CpuQuotaError, OSError) as exc:
        for quota in quotas:
            quota.close()
        raise BenchError(f"--worker-cpu: {exc}") from None
    return quotas


def quota_figures(quotas: list[CpuQuota], wall_s: float) -> dict[str, Any] | None:
    """How hard each worker pressed against its quota in the run (throttled periods)."""
    if not quotas:
        return None
    each = [quota.stats() for quota in quotas]
    return {
        "cores_each": quotas[0].cores,
        "throttled_pct_of_periods": [
            round(100 * s["throttled_periods"] / s["periods"], 1) if s["periods"] else None
            for s in each
        ],
        "throttled_s": [round(s["throttled_s"], 2) for s in each],
        "wall_s": wall_s,
    }


def worker_pids(processes: Processes, number: int) -> PidSource:
    """The pids of worker N, once it is started (none before)."""

    def pids() -> list[int]:
        return list(tree_of(processes.children.get(f"worker-{number}"))())

    return pids


class Run:
    """The measurement of one case, on a database with `genrelay serve` already up."""

    def __init__(
        self,
        ctx: Context,
        processes: Processes,
        db: Database,
        env: dict[str, str],
        api: str,
        api_key: str,
        workers: int,
        probe: CpuProbe,
        quotas: list[CpuQuota],
    ) -> None:
        self.ctx = ctx
        self.processes = processes
        self.db = db
        self.env = env
        self.api = api
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.workers = workers
        self.probe = probe
        self.quotas = quotas
        size = ctx.args.image_size
        text_only = {"generate": {"description": "bench"}}
        body = {"input": {"width": size, "height": size, "background": text_only}}
        self.body = json.dumps(body).encode()

    def start_workers(self) -> None:
        args = self.ctx.args
        for n in range(1, self.workers + 1):
            argv = [GENRELAY, "worker", "--threads", str(args.threads)]
            argv += ["--poll-interval", str(args.worker_poll_interval)]
            process = self.processes.start(f"worker-{n}", argv, self.env)
            if self.quotas:
                self.quotas[n - 1].add(process.pid)  # before it has started a thread
        for n in range(1, self.workers + 1):
            wait_for_log(self.processes, f"worker-{n}", "worker started")
        time.sleep(SETTLE)

    def submit(self) -> LoadResult:
        """POST G generations from C client threads as fast as they are answered."""
        args = self.ctx.args
        url = f"{self.api}/v1/generations"

        def send(session: requests.Session, _n: int) -> requests.Response:
            return session.post(url, data=self.body, headers=self.headers, timeout=CLIENT_TIMEOUT)

        def check(_n: int, response: requests.Response) -> str | None:
            try:
                body = response.json()
            except ValueError:
                return "bad: not JSON"
            # "processing", or already "succeeded" when the callback and the store overtook
            # this answer; without an upstream job the inline submit failed.
            if not (body.get("upstream") or {}).get("job"):
                return f"bad: {body.get('status')} without a job"
            return None

        load = closed_loop(args.generations, args.concurrency, send, self.ctx.stop, check)
        if load.errors:
            print(f"   intake errors: {dict(load.outcomes)}", flush=True)
        return load

    def wait_finished(self, expected: int) -> None:
        """Until every generation in the database is finished (and there are `expected`)."""
        bound = 60 + self.ctx.args.generations * 0.5
        deadline = time.monotonic() + bound
        while True:
            self.processes.check_alive()
            total, finished = self.db.rows(
                "SELECT count(*), count(*) FILTER (WHERE status IN "
                "('succeeded', 'failed', 'canceled')) FROM generations"
            )[0]
            if total >= expected and finished == total:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{total - finished} of {total} not finished after {bound:.0f} s")
            time.sleep(DB_POLL)

    def sim_stats(self) -> dict[str, int]:
        response = requests.get(f"{self.ctx.sim_url}/_sim/stats", timeout=CLIENT_TIMEOUT)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return {k: int(v) for k, v in body.items() if isinstance(v, int)}

    def callbacks(self, before: dict[str, int]) -> dict[str, int]:
        """The simulator's callback counters since `before` (it serves every run)."""
        after = self.sim_stats()
        names = ("jobs_created", "callbacks_sent", "callbacks_delivered", "callbacks_failed")
        return {name: after[name] - before[name] for name in names}

    def wait_callbacks(self, before: dict[str, int], expected: int) -> dict[str, int]:
        """Until the simulator has sent `expected` callbacks since `before` (bounded)."""
        bound = 60 + self.ctx.args.generations * 0.1
        deadline = time.monotonic() + bound
        while True:
            self.processes.check_alive()
            counts = self.callbacks(before)
            if counts["callbacks_sent"] >= expected:
                return counts
            if time.monotonic() > deadline:
                raise BenchError(f"{counts['callbacks_sent']} of {expected} callbacks in {bound} s")
            time.sleep(DB_POLL)

    def wait_drained(self) -> float:
        """Until no task is pending or running; the epoch time the last one finished."""
        bound = 60 + self.ctx.args.generations * 0.5
        deadline = time.monotonic() + bound
        while True:
            self.processes.check_alive()
            left = self.db.scalar(
                "SELECT count(*) FROM tasks WHERE status IN ('pending', 'running') "
                "AND kind <> 'housekeeping'"
            )
            if left == 0:
                return float(
                    self.db.scalar(
                        "SELECT extract(epoch FROM greatest(max(t.finished_at), "
                        "(SELECT max(completed_at) FROM generations)))::float8 FROM tasks t"
                    )
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{left} tasks still pending or running after {bound:.0f} s")
            time.sleep(DB_POLL)

    def tasks(self) -> dict[str, int]:
        rows = self.db.rows("SELECT kind, status, count(*) FROM tasks GROUP BY 1, 2 ORDER BY 1, 2")
        return {f"{kind} {status}": int(n) for kind, status, n in rows}

    def generations(self) -> list[dict[str, Any]]:
        rows = self.db.rows(
            "SELECT status, extract(epoch FROM created_at)::float8, "
            "extract(epoch FROM submitted_at)::float8, "
            "extract(epoch FROM source_found_at)::float8, "
            "extract(epoch FROM completed_at)::float8 FROM generations"
        )
        keys = ("status", "created", "submitted", "source_found", "completed")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def whole(self) -> dict[str, Any]:
        self.start_workers()
        sim_before = self.sim_stats()
        with WaitSampler(self.db) as waits:
            before = self.probe.snapshot()
            load = self.submit()
            accepted = sum(n for k, n in load.outcomes.items() if k.startswith("2"))
            self.wait_finished(accepted)
            after = self.probe.snapshot()
        callbacks = self.callbacks(sim_before)
        gens = self.generations()
        done = [g for g in gens if g["status"] == "succeeded"]
        end = max((g["completed"] for g in gens if g["completed"]), default=time.time())
        last_answer = max(load.ended_at)
        result = figures(gens, start=load.started_at, end=end)
        result.update(
            {
                "submit_phase_s": round(last_answer - load.started_at, 3),
                "intake_per_s": round(len(load.latencies) / (last_answer - load.started_at), 1),
                "tail_s": round(end - last_answer, 3),
                "intake_latency": latency_stats(load.latencies),
                "intake_outcomes": dict(load.outcomes),
                "phases_p50_ms": {
                    "inline_submit": median_ms(done, "created", "submitted"),
                    "upstream_and_callback": median_ms(done, "submitted", "source_found"),
                    "store_wait_and_copy": median_ms(done, "source_found", "completed"),
                    "post_to_succeeded": median_ms(done, "created", "completed"),
                },
                "post_to_succeeded_p90_ms": percentile_ms(done, "created", "completed", 90),
                "cpu": cpu_figures(self.probe.delta(before, after), len(done)),
                "callbacks": callbacks,
                "tasks": self.tasks(),
                "db_waits": {"samples": waits.samples, "counts": dict(waits.counts)},
            }
        )
        return result

    def backlog(self) -> dict[str, Any]:
        sim_before = self.sim_stats()
        load = self.submit()  # no worker yet: intake and callbacks only
        accepted = sum(n for k, n in load.outcomes.items() if k.startswith("2"))
        intake_s = max(load.ended_at) - load.started_at
        callbacks = self.wait_callbacks(sim_before, accepted)
        callbacks_in = time.time()
        parked = self.db.rows(
            "UPDATE tasks SET run_at = now() + interval '1 hour' WHERE status = 'pending' "
            "AND kind <> 'housekeeping' "
            "RETURNING kind"
        )
        backlog = {kind: sum(1 for (k,) in parked if k == kind) for kind in ("store", "poll")}
        self.start_workers()
        with WaitSampler(self.db) as waits:
            before = self.probe.snapshot()
            released_at = time.time()
            released = self.db.execute(
                "UPDATE tasks SET run_at = now() "
                "WHERE status = 'pending' AND kind <> 'housekeeping'"
            )
            if released != len(parked):
                raise BenchError(f"parked {len(parked)} tasks but released {released}")
            end = self.wait_drained()  # every released task, the no-op polls included
            after = self.probe.snapshot()
        gens = self.generations()
        done = [g for g in gens if g["status"] == "succeeded"]
        result = figures(gens, start=released_at, end=end)
        result.update(
            {
                "backlog": released,
                "backlog_by_kind": backlog,
                "callbacks": callbacks,
                "db_waits": {"samples": waits.samples, "counts": dict(waits.counts)},
                "tasks": self.tasks(),
                "intake_s": round(intake_s, 3),
                "intake_per_s": round(len(load.latencies) / intake_s, 1),
                "callbacks_in_s": round(callbacks_in - load.started_at, 3),
                "intake_latency": latency_stats(load.latencies),
                "intake_outcomes": dict(load.outcomes),
                "cpu": cpu_figures(self.probe.delta(before, after), len(done)),
            }
        )
        return result


def figures(gens: list[dict[str, Any]], *, start: float, end: float) -> dict[str, Any]:
    """Counts and rates of one run, timed from `start` to `end` (epoch seconds)."""
    done = sorted(g["completed"] for g in gens if g["status"] == "succeeded")
    elapsed = end - start
    mid80 = None
    if len(done) >= 10:
        low, high = int(len(done) * 0.1), int(len(done) * 0.9) - 1
        if done[high] > done[low]:
            mid80 = round((high - low) / (done[high] - done[low]), 1)
    return {
        "generations": len(gens),
        "succeeded": len(done),
        "failed": sum(1 for g in gens if g["status"] != "succeeded"),
        "elapsed_s": round(elapsed, 3),
        "gen_per_s": round(len(done) / elapsed, 2) if elapsed > 0 else None,
        "mid80_gen_per_s": mid80,
    }


def median_ms(rows: list[dict[str, Any]], start: str, end: str) -> float | None:
    values = [r[end] - r[start] for r in rows if r[start] is not None and r[end] is not None]
    return round(statistics.median(values) * 1000, 1) if values else None


def percentile_ms(rows: list[dict[str, Any]], start: str, end: str, p: float) -> float | None:
    values = sorted(r[end] - r[start] for r in rows if r[start] is not None and r[end] is not None)
    if not values:
        return None
    return round(values[max(0, int(len(values) * p / 100 + 0.999999) - 1)] * 1000, 1)


def cpu_figures(delta: dict[str, Any], generations: int) -> dict[str, Any]:
    """CPU seconds by group, plus what the machine did beyond our processes."""
    groups = dict(delta["groups"])
    ours = sum(s for name, s in groups.items() if name != "postgres (this db)")
    groups["other (not ours)"] = round(max(0.0, delta["machine_s"] - ours), 3)
    wall = delta["wall_s"]
    nproc = len(os.sched_getaffinity(0))
    return {
        "wall_s": wall,
        "nproc": nproc,
        "machine_s": delta["machine_s"],
        "machine_pct": round(100 * delta["machine_s"] / (wall * nproc), 1) if wall else None,
        "seconds": groups,
        "generations": generations,
        "others": delta["others"],
    }


# -- summary and report --------------------------------------------------------------------


def summarize(cases: list[dict[str, Any]], workers: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in MODES:
        per: dict[str, Any] = {}
        for n in workers:
            runs = [c for c in cases if c["mode"] == mode and c["workers"] == n]
            if not runs:
                continue
            succeeded = sum(c["succeeded"] for c in runs)
            elapsed = sum(c["elapsed_s"] for c in runs)
            wall = sum(c["cpu"]["wall_s"] for c in runs)
            seconds: dict[str, float] = {}
            for c in runs:
                for name, s in c["cpu"]["seconds"].items():
                    seconds[name] = seconds.get(name, 0.0) + s
            nproc = runs[0]["cpu"]["nproc"]
            machine = sum(c["cpu"]["machine_s"] for c in runs)
            per[str(n)] = {
                "runs": len(runs),
                "gen_per_s": round(succeeded / elapsed, 2) if elapsed else None,
                "gen_per_s_each": [c["gen_per_s"] for c in runs],
                "mid80_each": [c["mid80_gen_per_s"] for c in runs],
                "mid80_mean": mean_of([c["mid80_gen_per_s"] for c in runs]),
                "cpu_pct_of_core": {k: round(100 * s / wall, 1) for k, s in seconds.items()},
                "cpu_ms_per_gen": {k: round(1000 * s / succeeded, 1) for k, s in seconds.items()},
                "machine_pct": round(100 * machine / (wall * nproc), 1),
                "db_backends": db_waits(runs),
            }
        ratio = ratio_mid80 = None
        if len(workers) >= 2 and str(workers[0]) in per and str(workers[-1]) in per:
            first, last = per[str(workers[0])], per[str(workers[-1])]
            low, high = first["gen_per_s"], last["gen_per_s"]
            ratio = round(high / low, 3) if low else None
            low, high = first["mid80_mean"], last["mid80_mean"]
            ratio_mid80 = round(high / low, 3) if low and high else None
        summary[mode] = {
            "per_workers": per,
            "ratio": ratio,
            "ratio_mid80": ratio_mid80,
            "ratio_of": f"{workers[-1]}/{workers[0]}" if len(workers) >= 2 else None,
            "pass": None if ratio is None else ratio >= TARGET_RATIO,
        }
    return summary


def db_waits(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean number of the database's client backends in each state, over every sample."""
    samples = sum(c["db_waits"]["samples"] for c in runs)
    counts: dict[str, int] = {}
    for c in runs:
        for key, n in c["db_waits"]["counts"].items():
            counts[key] = counts.get(key, 0) + n
    ordered = sorted(counts.items(), key=lambda kv: -kv[1])
    return {k: round(n / samples, 3) for k, n in ordered} if samples else {}


def mean_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.fmean(known), 2) if known else None


def fmt(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


# (title, unit, width) of each column of the two tables
# fmt: off
WHOLE_COLUMNS = [
    ("run", "", 14), ("ok", "", 5), ("err", "", 5), ("submit s", "", 10), ("intake/s", "", 10),
    ("tail s", "", 8), ("elapsed", "s", 9), ("gen/s", "", 8), ("mid80", "gen/s", 8),
    ("e2e p50", "ms", 9), ("e2e p90", "ms", 9), ("store", "copy ms", 8),
    ("machine", "busy %", 9), ("cb", "409", 5),
]
BACKLOG_COLUMNS = [
    ("run", "", 14), ("ok", "", 5), ("err", "", 5), ("intake/s", "(no wkr)", 10),
    ("backlog", "store+poll", 10), ("drain s", "", 9), ("gen/s", "", 8), ("mid80", "gen/s", 8),
    ("store", "copy ms", 9), ("machine", "busy %", 9), ("cb", "409", 5),
]
# fmt: on


def print_header(columns: list[tuple[str, str, int]]) -> None:
    """A table's head: (title, unit, width) per column, the first one left-aligned."""
    first, *rest = columns
    for row in (0, 1):  # the titles, then the units
        print(f"{first[row]:<{first[2]}}" + "".join(f"{c[row]:>{c[2]}}" for c in rest))
    print("-" * sum(width for _, _, width in columns))


def print_report(report: dict[str, Any]) -> None:
    print()
    print("== genrelay scale-out benchmark (PostgreSQL) ==")
    for key, value in report["machine"].items():
        print(f"{key:>26}: {value}")
    cases = report["cases"]
    whole = [c for c in cases if c["mode"] == "whole"]
    backlog = [c for c in cases if c["mode"] == "backlog"]
    if whole:
        print()
        print("whole path: POST -> inline submit -> simulator -> callback -> store (worker)")
        print_header(WHOLE_COLUMNS)
        for c in whole:
            print(
                f"{c['label']:<14}{c['succeeded']:>5}{c['failed']:>5}"
                f"{c['submit_phase_s']:>10.2f}{c['intake_per_s']:>10.1f}{c['tail_s']:>8.2f}"
                f"{c['elapsed_s']:>9.2f}{fmt(c['gen_per_s']):>8}{fmt(c['mid80_gen_per_s']):>8}"
                f"{fmt(c['phases_p50_ms']['post_to_succeeded'], '.0f'):>9}"
                f"{fmt(c['post_to_succeeded_p90_ms'], '.0f'):>9}"
                f"{fmt(c['store_copy_ms_p50']):>8}{c['cpu']['machine_pct']:>9.0f}"
                f"{c['callbacks']['callbacks_failed']:>5}"
            )
        print()
        print("  medians per generation, ms: inline submit / upstream + callback / store")
        for c in whole:
            p = c["phases_p50_ms"]
            print(
                f"  {c['label']:<14}{fmt(p['inline_submit'], '.0f'):>6} / "
                f"{fmt(p['upstream_and_callback'], '.0f'):>6} / "
                f"{fmt(p['store_wait_and_copy'], '.0f'):>6}   "
                f"intake p50 {c['intake_latency']['p50_ms']:.0f} ms, "
                f"p99 {c['intake_latency']['p99_ms']:.0f} ms"
            )
    if backlog:
        print()
        print("backlog drain: G store tasks pending (intake and callbacks done), workers released")
        print_header(BACKLOG_COLUMNS)
        for c in backlog:
            print(
                f"{c['label']:<14}{c['succeeded']:>5}{c['failed']:>5}{c['intake_per_s']:>10.1f}"
                f"{c['backlog_by_kind']['store']:>6}+{c['backlog_by_kind']['poll']:<3}"
                f"{c['elapsed_s']:>9.2f}{fmt(c['gen_per_s']):>8}"
                f"{fmt(c['mid80_gen_per_s']):>8}{fmt(c['store_copy_ms_p50']):>9}"
                f"{c['cpu']['machine_pct']:>9.0f}{c['callbacks']['callbacks_failed']:>5}"
            )
    print()
    print("tasks at the end of each run (kind status: count)")
    for c in cases:
        print(f"  {c['label']:<14}" + ", ".join(f"{k}: {n}" for k, n in c["tasks"].items()))
    summary = report["summary"]
    print()
    print(f"pooled over the repeats (all generations / summed elapsed); target >= {TARGET_RATIO}x")
    for mode in MODES:
        s = summary.get(mode)
        if not s or not s["per_workers"]:
            continue
        rates = ", ".join(
            f"{n} worker{'s' if n != '1' else ''} {v['gen_per_s']:.1f} gen/s "
            f"(runs: {', '.join(fmt(x) for x in v['gen_per_s_each'])})"
            for n, v in s["per_workers"].items()
        )
        verdict = "" if s["ratio"] is None else ("PASS" if s["pass"] else "FAIL")
        print(f"  {mode:<8} {rates}; {s['ratio_of'] or ''} = {fmt(s['ratio'], '.2f')}x {verdict}")
        mid = ", ".join(f"{n}w {fmt(v['mid80_mean'])}" for n, v in s["per_workers"].items())
        mid_verdict = ""
        if s["ratio_mid80"] is not None:
            mid_verdict = "PASS" if s["ratio_mid80"] >= TARGET_RATIO else "FAIL"
        print(
            f"  {'':<8} mid80 (10th to 90th percentile of completions, mean of runs): {mid}; "
            f"{fmt(s['ratio_mid80'], '.2f')}x {mid_verdict}"
        )
    print()
    print("CPU in the measured window, pooled: % of one core (CPU ms per generation)")
    columns = [
        (mode, n, v)
        for mode in MODES
        for n, v in summary.get(mode, {}).get("per_workers", {}).items()
    ]
    if columns:
        names: list[str] = []
        for _, _, v in columns:
            names += [k for k in v["cpu_pct_of_core"] if k not in names]
        print(f"{'':<20}" + "".join(f"{f'{mode} {n}w':>18}" for mode, n, _ in columns))
        for name in names:
            cells = []
            for _, _, v in columns:
                pct, ms = v["cpu_pct_of_core"].get(name), v["cpu_ms_per_gen"].get(name)
                cells.append("-" if pct is None else f"{pct:.0f} % ({ms:.1f})")
            print(f"{name:<20}" + "".join(f"{c:>18}" for c in cells))
        nproc = cases[0]["cpu"]["nproc"] if cases else 0
        busy = [f"{v['machine_pct']:.0f} % of {nproc}" for _, _, v in columns]
        print(f"{'machine busy':<20}" + "".join(f"{cell:>18}" for cell in busy))
    if cases:
        print()
        print("busiest processes that are not this benchmark's, CPU s in each run's window")
        for c in cases:
            others = ", ".join(f"{name} {sec:.2f}" for name, sec in c["cpu"]["others"].items())
            print(f"  {c['label']:<14}{others or '-'}")
    if columns:
        print()
        print(
            "PostgreSQL client backends of the run's database, sampled every 50 ms: mean number "
            "in each state"
        )
        states: list[str] = []
        for _, _, v in columns:
            states += [k for k in v["db_backends"] if k not in states]
        print(f"{'':<36}" + "".join(f"{f'{mode} {n}w':>12}" for mode, n, _ in columns))
        for state in states:
            cells = [fmt(v["db_backends"].get(state), ".2f") for _, _, v in columns]
            print(f"{state[:36]:<36}" + "".join(f"{cell:>12}" for cell in cells))
    noisy = {c["label"]: c["logs"] for c in cases if c["logs"]}
    if noisy:
        print()
        for label, logs in noisy.items():
            for name, scan in logs.items():
                print_log_scan(f"{label} {name}", scan)
    capped = [c for c in cases if c.get("worker_quota")]
    if capped:
        print()
        print(
            f"worker CPU cap: {capped[0]['worker_quota']['cores_each']} core per worker process; "
            "% of 100 ms periods in which each worker hit its cap (throttled s)"
        )
        for c in capped:
            q = c["worker_quota"]
            each = ", ".join(
                f"{fmt(pct, '.0f')} % ({sec:.1f} s)"
                for pct, sec in zip(q["throttled_pct_of_periods"], q["throttled_s"], strict=True)
            )
            print(f"  {c['label']:<14}{each}")
    print(f"\nmeasuring took {report['seconds']} s")


# -- main ----------------------------------------------------------------------------------


def pg_setting(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    if not re.fullmatch(r"[a-z_]+", name) or not re.fullmatch(r"[A-Za-z0-9_.]+", value):
        raise argparse.ArgumentTypeError(f"not NAME=VALUE (a PostgreSQL setting): {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=400, help="per run (400)")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (16)")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(part) for part in text.split(",") if part.strip()],
        default=[1, 2],
        help="worker process counts to compare, e.g. 1,2 (default); the ratio is last/first",
    )
    parser.add_argument("--threads", type=int, default=4, help="genrelay worker --threads (4)")
    parser.add_argument(
        "--worker-poll-interval",
        type=float,
        default=0.1,
        help="genrelay worker --poll-interval (0.1; genrelay's default is 0.5)",
    )
    parser.add_argument(
        "--worker-cpu",
        type=float,
        default=None,
        metavar="CORES",
        help="cap each worker process at CORES of CPU with a cgroup quota (e.g. 0.25), as if "
        "each ran on its own instance; default: no cap (every process shares the machine)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode and count (2)")
    parser.add_argument(
        "--modes",
        type=lambda text: [part for part in text.split(",") if part.strip()],
        default=list(MODES),
        help="whole,backlog (default both)",
    )
    parser.add_argument(
        "--reconcile-after",
        type=float,
        default=2.0,
        help="GENRELAY_RECONCILE_AFTER: seconds before a generation's poll task is due (2)",
    )
    parser.add_argument(
        "--pg-set",
        action="append",
        default=[],
        type=pg_setting,
        metavar="NAME=VALUE",
        help="ALTER DATABASE ... SET NAME = VALUE on each run's database, for experiments "
        "(e.g. synchronous_commit=off); repeatable; none by default",
    )
    parser.add_argument("--image-size", type=int, default=256, help="result width=height (256)")
    parser.add_argument("--web-processes", type=int, default=2, help="GENRELAY_WEB_PROCESSES")
    parser.add_argument("--web-threads", type=int, default=8, help="GENRELAY_WEB_THREADS")
    add_common_options(parser, postgres_url=DEFAULT_POSTGRES_URL)
    args = parser.parse_args(argv)
    require_positive(
        parser, args, ("generations", "concurrency", "threads", "repeats", "web_processes")
    )
    if not args.workers or min(args.workers) < 1:
        parser.error("--workers needs counts of at least 1")
    if set(args.modes) - set(MODES) or not args.modes:
        parser.error(f"--modes takes {', '.join(MODES)}")
    if not 16 <= args.image_size <= 4096:
        parser.error("--image-size must be between 16 and 4096")
    if args.worker_cpu is not None:
        if not 0.05 <= args.worker_cpu <= 8:
            parser.error("--worker-cpu must be between 0.05 and 8 cores")
        reason = quotas_available()
        if reason:
            parser.error(f"--worker-cpu needs a cgroup CPU quota, and here: {reason}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_signals()
    facts = machine_facts(memory=True)
    began = time.monotonic()
    with work_dirs(args.log_dir) as (tmp_dir, log_dir):
        shared = Processes(log_dir)
        cases: list[dict[str, Any]] = []
        try:
            # Memory backend: the results are small (a 256x256 PNG is about 20 KB).
            with shared_stack(args, tmp_dir, log_dir, shared, BUCKET, SIM_PROCESSING_TIME) as ctx:
                with Database(args.postgres_url) as admin:
                    facts["postgres"] = admin.settings()
                for repeat in range(1, args.repeats + 1):
                    order = args.workers if repeat % 2 else list(reversed(args.workers))
                    for mode in args.modes:
                        for workers in order:
                            cases.append(run_case(ctx, mode, workers, repeat))
                            shared.check_alive()
        except BenchError as exc:
            return failed(exc, shared)
        except KeyboardInterrupt:
            return interrupted("every process stopped, databases dropped")
    facts.update(
        {
            "path": "POST /v1/generations -> inline submit -> simulator -> callback -> store",
            "simulator": f"--processing-time {SIM_PROCESSING_TIME} --concurrency-limit 1000000",
            "result image": f"{args.image_size}x{args.image_size} PNG (text-only input)",
            "fake_gcs": "fake-gcs-server, memory backend",
            "serve": f"genrelay serve, {args.web_processes} processes x {args.web_threads} "
            f"threads, GENRELAY_RATE_LIMIT=0, GENRELAY_RECONCILE_AFTER={args.reconcile_after:g}",
            "workers": f"genrelay worker --threads {args.threads} --poll-interval "
            f"{args.worker_poll_interval}, counts {args.workers}",
            "worker CPU cap": f"{args.worker_cpu} core per worker process (cgroup CFS quota)"
            if args.worker_cpu
            else "none: every process shares the machine's cores",
            "load": f"{args.generations} generations per run, {args.concurrency} client threads",
            "repeats": f"{args.repeats}, each on a fresh database",
            "database settings": ", ".join(f"{n}={v}" for n, v in args.pg_set) or "server's",
        }
    )
    report = {
        "machine": facts,
        "cases": cases,
        "summary": summarize(cases, args.workers),
        "seconds": round(time.monotonic() - began, 1),
    }
    return finish(report, print_report, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
