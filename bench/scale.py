"""Scale-out: generations/s through the whole path with 1 and 2 worker processes.

PostgreSQL, `genrelay serve` (2 x 8), N `genrelay worker --threads T`, the simulator (0.2 s
jobs, callbacks on) and fake-gcs-server. `whole`: G generations posted as fast as they are
answered, timed from the first POST to the last `completed_at`; `backlog`: the store and poll
tasks of G generations, posted with no worker running, drained by workers started afterwards.
`--worker-cpu CORES` puts each worker in a cgroup capped at CORES (bench/_cpulimit.py). How to
read it: bench/README.md.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import requests
from _cpulimit import CpuQuota, CpuQuotaError, available
from _stack import (
    CLIENT_TIMEOUT,
    SIMULATOR_LIMIT,
    BenchError,
    Context,
    CpuProbe,
    Database,
    Load,
    Processes,
    WaitSampler,
    closed_loop,
    free_port,
    fresh_database,
    genrelay_env,
    options,
    prepare_database,
    print_table,
    run_benchmark,
    small_body,
    start_gcs,
    start_serve,
    start_simulator,
    tree_of,
    wait_for_log,
)

TARGET_RATIO = 1.8
MODES = ("whole", "backlog")
STATUSES = "SELECT status, count(*) FROM generations GROUP BY 1"
OPEN_GENERATIONS = (
    "SELECT count(*) FROM generations WHERE status NOT IN ('succeeded', 'failed', 'canceled')"
)
LAST_COMPLETED = "SELECT extract(epoch FROM max(completed_at))::float8 FROM generations"
# Tasks but the singletons (the hourly sweep, the line's pass): always pending, not the load.
RUN_AT = (
    "UPDATE tasks SET run_at = {} WHERE status = 'pending' AND kind NOT IN ('housekeeping', 'line')"
)
OPEN_TASKS = (
    "SELECT count(*) FROM tasks "
    "WHERE status IN ('pending', 'running') AND kind NOT IN ('housekeeping', 'line')"
)
LAST_FINISHED = (
    "SELECT extract(epoch FROM greatest(max(finished_at), "
    "(SELECT max(completed_at) FROM generations)))::float8 FROM tasks"
)


class Run:
    """One mode with N workers on a fresh database, `genrelay serve` up."""

    def __init__(
        self, ctx: Context, shared: Processes, urls: tuple[str, str], label: str, workers: int
    ) -> None:
        self.ctx, self.args, self.workers = ctx, ctx.args, workers
        self.sim, self.gcs = urls
        self.processes = ctx.new_processes(label)
        self.quotas: list[CpuQuota] = []
        self.shared = shared

    def measure(self, mode: str, db_url: str) -> dict[str, Any]:
        args = self.args
        self.env = genrelay_env(
            db_url, self.sim, self.gcs, free_port(), web=(2, 8), reconcile_after=2,
            upstream_concurrency=SIMULATOR_LIMIT,  # no waiting in the line
        )  # fmt: skip
        self.auth = {"Authorization": f"Bearer {prepare_database(self.env)}"}
        self.api = start_serve(self.processes, self.env)
        try:
            self.quotas = [
                CpuQuota(f"genrelay-bench-worker-{n}", args.worker_cpu)
                for n in range(1, self.workers + 1)
                if args.worker_cpu
            ]
        except (CpuQuotaError, OSError) as exc:
            raise BenchError(f"--worker-cpu: {exc}") from None
        for quota in self.quotas:
            self.ctx.later.callback(quota.close)  # also when the run fails
        with Database(db_url) as self.db:
            groups = {
                "serve": tree_of(self.processes.children["serve"]),
                **{f"worker-{n}": self.worker_pids(n) for n in range(1, self.workers + 1)},
                "simulator": tree_of(self.shared.children["simulator"]),
                "fake-gcs": tree_of(self.shared.children["gcs"]),
                "postgres (this db)": self.db.backends,
                "postgres (server)": self.db.postmaster,
            }
            self.probe = CpuProbe(groups)
            result = self.whole() if mode == "whole" else self.backlog()
        self.processes.stop_all()
        stats = [quota.stats() for quota in self.quotas]
        for quota in self.quotas:
            quota.close()  # its workers have exited
        if stats:
            result["worker_quota"] = {
                "cores_each": args.worker_cpu,
                "throttled_pct_of_periods": [
                    round(100 * s["throttled_periods"] / max(1, s["periods"]), 1) for s in stats
                ],
            }
        return result

    def worker_pids(self, n: int) -> Callable[[], list[int]]:
        return lambda: tree_of(self.processes.children.get(f"worker-{n}"))()

    def start_workers(self) -> None:
        for n in range(1, self.workers + 1):
            process = self.processes.genrelay(
                f"worker-{n}", "worker", "--threads", str(self.args.threads),
                "--poll-interval", "0.1", env=self.env,
            )  # fmt: skip
            if self.quotas:
                self.quotas[n - 1].add(process.pid)  # before it has started a thread
        for n in range(1, self.workers + 1):
            wait_for_log(self.processes, f"worker-{n}", "worker started")
        time.sleep(1.0)

    def wait(self, done: Any, bound: float | None = None) -> None:
        deadline = time.monotonic() + (bound or 60 + self.args.generations * 0.5)
        while not done():
            self.processes.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"timed out: {self.db.rows(STATUSES)}")
            time.sleep(0.05)

    def submit(self) -> Load:
        def send(session: requests.Session, _n: int) -> requests.Response:
            url = f"{self.api}/v1/generations"
            return session.post(url, json=small_body(), headers=self.auth, timeout=CLIENT_TIMEOUT)

        def check(response: requests.Response) -> str | None:
            return None if (response.json().get("upstream") or {}).get("job") else "bad: no job"

        return closed_loop(self.args.generations, self.args.concurrency, send, check)

    def sim_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = requests.get(f"{self.sim}/_sim/stats", timeout=10).json()
        return stats

    def finished(self, start: float, end: float, before: Any, waits: WaitSampler) -> dict[str, Any]:
        done = int(self.db.scalar("SELECT count(*) FROM generations WHERE status = 'succeeded'"))
        delta = CpuProbe.delta(before, self.probe.snapshot())
        wall = delta["wall_s"]
        return {
            "generations": int(self.db.scalar("SELECT count(*) FROM generations")),
            "succeeded": done,
            "elapsed_s": round(end - start, 3),
            "gen_per_s": round(done / (end - start), 2),
            "cpu": {
                "wall_s": wall,
                "machine_pct": round(100 * delta["machine_s"] / (wall * cores()), 1),
                "seconds": delta["groups"],
            },
            "db_waits": {"samples": waits.samples, "counts": dict(waits.counts)},
        }

    def whole(self) -> dict[str, Any]:
        self.start_workers()
        with WaitSampler(self.db) as waits:
            before = self.probe.snapshot()
            load = self.submit()
            self.wait(lambda: not self.db.scalar(OPEN_GENERATIONS))
            end = float(self.db.scalar(LAST_COMPLETED))
            result = self.finished(load.started_at, end, before, waits)
        result["tail_s"] = round(end - max(load.ended_at), 3)  # last 202 to last succeeded
        result["intake_errors"] = load.errors
        return result

    def backlog(self) -> dict[str, Any]:
        before = self.sim_stats()["callbacks_sent"]
        load = self.submit()  # no worker yet: intake and callbacks only
        self.wait(lambda: self.sim_stats()["callbacks_sent"] - before >= load.ok)
        parked = self.db.execute(RUN_AT.format("now() + interval '1 hour'"))
        self.start_workers()
        with WaitSampler(self.db) as waits:
            snapshot = self.probe.snapshot()
            start = time.time()
            self.db.execute(RUN_AT.format("now()"))
            self.wait(lambda: not self.db.scalar(OPEN_TASKS))
            end = float(self.db.scalar(LAST_FINISHED))
            result = self.finished(start, end, snapshot, waits)
        result["backlog_tasks"] = parked
        result["intake_errors"] = load.errors
        return result


def cores() -> int:
    return len(os.sched_getaffinity(0))


def summarize(cases: list[dict[str, Any]], workers: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in MODES:
        per: dict[str, Any] = {}
        for n in workers:
            runs = [c for c in cases if c["mode"] == mode and c["workers"] == n]
            if not runs:
                continue
            done = sum(c["succeeded"] for c in runs)
            wall = sum(c["cpu"]["wall_s"] for c in runs)
            seconds: dict[str, float] = {}
            waits: dict[str, float] = {}
            for c in runs:
                for name, s in c["cpu"]["seconds"].items():
                    seconds[name] = seconds.get(name, 0.0) + s
                for state, count in c["db_waits"]["counts"].items():
                    waits[state] = waits.get(state, 0) + count
            samples = max(1, sum(c["db_waits"]["samples"] for c in runs))
            per[str(n)] = {
                "gen_per_s": round(done / sum(c["elapsed_s"] for c in runs), 2),
                "gen_per_s_each": [c["gen_per_s"] for c in runs],
                "cpu_ms_per_gen": {
                    k: round(1000 * s / max(1, done), 1) for k, s in seconds.items()
                },
                "machine_pct": round(
                    100
                    * sum(c["cpu"]["machine_pct"] * c["cpu"]["wall_s"] for c in runs)
                    / wall
                    / 100,
                    1,
                ),
                "db_backends": {
                    k: round(v / samples, 3)
                    for k, v in sorted(waits.items(), key=lambda kv: -kv[1])
                },
                "throttled_pct": [
                    p
                    for c in runs
                    for p in (c.get("worker_quota") or {}).get("throttled_pct_of_periods", [])
                ],
            }
        first, last = per.get(str(workers[0])), per.get(str(workers[-1]))
        ratio = (
            round(last["gen_per_s"] / first["gen_per_s"], 3)
            if first and last and len(workers) > 1
            else None
        )
        summary[mode] = {
            "per_workers": per,
            "ratio": ratio,
            "pass": ratio is not None and ratio >= TARGET_RATIO,
        }
    return summary


def measure(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    shared = ctx.new_processes("shared")
    sim = start_simulator(shared, processing_time=0.2, concurrency_limit=SIMULATOR_LIMIT)
    gcs = start_gcs(shared)
    cases = []
    for repeat in range(1, args.repeats + 1):
        for mode in args.modes:
            # The worker counts alternate: 1, 2 in odd repeats, 2, 1 in even ones.
            for workers in args.workers if repeat % 2 else args.workers[::-1]:
                print(f"-- {mode}, {workers} worker(s), #{repeat}", flush=True)
                run = Run(ctx, shared, (sim, gcs), f"{mode}-{workers}w-{repeat}", workers)
                with fresh_database("postgresql", ctx.tmp_dir, args.postgres_url, "scale") as (
                    url,
                    _,
                ):
                    result = run.measure(mode, url)
                result.update(mode=mode, workers=workers, repeat=repeat)
                print(f"   {result['succeeded']} in {result['elapsed_s']} s", flush=True)
                cases.append(result)
    cap = (
        f"each worker capped at {args.worker_cpu} core"
        if args.worker_cpu
        else "none (every process shares the cores)"
    )
    return {
        "settings": {
            "database": "PostgreSQL, a fresh database per run",
            "load": f"{args.generations} generations per run, {args.concurrency} client threads",
            "workers": f"{args.workers} x genrelay worker --threads {args.threads}; CPU cap: {cap}",
        },
        "cases": cases,
        "summary": summarize(cases, args.workers),
    }


def print_report(report: dict[str, Any]) -> None:
    rows = [
        [f"{c['mode']} {c['workers']}w #{c['repeat']}", c["succeeded"], c["elapsed_s"],
         c["gen_per_s"], c.get("tail_s"), c["cpu"]["machine_pct"],
         (c.get("worker_quota") or {}).get("throttled_pct_of_periods")]
        for c in report["cases"]
    ]  # fmt: skip
    print_table(
        ["run", "succeeded", "elapsed s", "gen/s", "tail s", "machine busy %", "throttled %"],
        rows,
        ".2f",
    )
    for mode, s in report["summary"].items():
        if not s["per_workers"]:
            continue
        rates = [f"{n} worker(s) {v['gen_per_s']} gen/s" for n, v in s["per_workers"].items()]
        if s["ratio"]:
            verdict = "PASS" if s["pass"] else "FAIL"
            rates.append(f"x{s['ratio']:.2f} (target >= {TARGET_RATIO}: {verdict})")
        print(f"\n{mode}: {', '.join(rates)}")
        per = s["per_workers"]
        names = list(dict.fromkeys(k for v in per.values() for k in v["cpu_ms_per_gen"]))
        print_table(
            ["CPU ms per generation", *(f"{n}w" for n in per)],
            [[k, *(v["cpu_ms_per_gen"].get(k) for v in per.values())] for k in names],
        )
        states = list(dict.fromkeys(k for v in per.values() for k in v["db_backends"]))
        if states:
            print_table(
                ["PostgreSQL client backends, mean", *(f"{n}w" for n in per)],
                [[k, *(v["db_backends"].get(k) for v in per.values())] for k in states],
                ".3f",
            )


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__)
    parser.add_argument("--generations", type=int, default=400, help="per run (400)")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (16)")
    parser.add_argument(
        "--workers",
        type=lambda t: [int(n) for n in t.split(",")],
        default=[1, 2],
        help="worker counts (1,2); the ratio is last/first",
    )
    parser.add_argument("--threads", type=int, default=4, help="genrelay worker --threads (4)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode and count (2)")
    parser.add_argument(
        "--modes", type=lambda t: t.split(","), default=list(MODES), help="whole,backlog"
    )
    parser.add_argument(
        "--worker-cpu",
        type=float,
        metavar="CORES",
        help="cap each worker at CORES (a cgroup; needs root)",
    )
    args = parser.parse_args(argv)
    if set(args.modes) - set(MODES):
        parser.error("--modes takes whole, backlog")
    if args.worker_cpu and (reason := available()):
        parser.error(f"--worker-cpu needs a cgroup CPU quota: {reason}")
    return run_benchmark("genrelay scale-out benchmark", args, measure, print_report)


if __name__ == "__main__":
    sys.exit(main())
