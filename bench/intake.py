"""Intake: genrelay's `POST /v1/generations` next to a minimal Flask forwarder, next to the
same forwarder made durable (each request written down before it is forwarded and its job
after, in a database of the same kind), and on PostgreSQL next to the statement floor
(genrelay's own SQL statements with nothing but Flask and psycopg around them).

All run under the same gunicorn settings (2 processes x 8 threads) against the same
simulator and take the same closed-loop load, alternating; how to read it: bench/README.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import sys
import time
from typing import Any

import requests
from _stack import (
    BENCH_DIR,
    CLIENT_TIMEOUT,
    SEED_BODY,
    SIMULATOR_KEY,
    SIMULATOR_LIMIT,
    BenchError,
    Context,
    CpuProbe,
    Database,
    Load,
    Processes,
    Sampler,
    base_env,
    closed_loop,
    free_port,
    genrelay_env,
    latency_stats,
    libpq_dsn,
    options,
    prepare_database,
    print_table,
    run_benchmark,
    start_gcs,
    start_serve,
    start_simulator,
    tree_of,
    wait_until,
)
from minimal_forwarder import create_journal
from sqlalchemy.engine import make_url
from statement_floor import install_functions

WEB = (2, 8)  # gunicorn processes x threads of every target
FLOOR = "statement floor"  # statement_floor.py: genrelay's SQL with nothing around it
FUNCTION_FLOOR = "function floor"  # the same SQL, one function call per transaction
RATIO_KEYS = ("req_per_s", "p50_ms", "p99_ms")


def forwarded(response: requests.Response) -> str | None:
    """None if the answer says the job reached the simulator (both targets answer alike)."""
    body = response.json()
    if body.get("status") == "processing" and (body.get("upstream") or {}).get("job"):
        return None
    return "queued"


# CPU of the round, per request: the target's web processes, the simulator, PostgreSQL's
# backends of the bench database (none for SQLite or the forwarder).
CPU_GROUPS = ("web", "simulator", "postgres (this db)")


def pooled(loads: list[tuple[Load, dict[str, float]]]) -> dict[str, Any]:
    latencies = [x for load, _ in loads for x in load.latencies]
    wall = sum(load.wall for load, _ in loads)
    cpu = {group: sum(c.get(group, 0.0) for _, c in loads) for group in CPU_GROUPS}
    return {
        "requests": len(latencies),
        "errors": sum(load.errors - load.outcomes["queued"] for load, _ in loads),
        "queued": sum(load.outcomes["queued"] for load, _ in loads),
        "req_per_s": round(len(latencies) / wall, 1),
        **latency_stats(latencies),
        "cpu_ms_per_request": {
            group: round(1000 * seconds / max(1, len(latencies)), 2)
            for group, seconds in cpu.items()
        },
    }


def measure(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    processes = ctx.new_processes()
    db_url, db_desc = ctx.database(args.database)
    sim = start_simulator(processes, processing_time=5, concurrency_limit=SIMULATOR_LIMIT)
    gcs = start_gcs(processes)
    env = genrelay_env(
        db_url, sim, gcs, free_port(), web=WEB, callbacks=False,
        upstream_concurrency=SIMULATOR_LIMIT,  # every request forwarded inline
    )  # fmt: skip
    key = prepare_database(env)
    genrelay = start_serve(processes, env, "genrelay")
    authorized = {"Authorization": f"Bearer {key}"}
    durable_url, _ = ctx.database(args.database, "durable")
    # name: (its process, its URL, its request headers, its database if any)
    targets: dict[str, tuple[str, str, dict[str, str], str | None]] = {
        "genrelay": ("genrelay", genrelay, authorized, db_url)
    }
    if args.database == "postgresql":
        floor = start_floor(processes, sim, genrelay, db_url, authorized)
        targets[FLOOR] = ("floor", floor, authorized, db_url)
        one_call = start_floor(processes, sim, genrelay, db_url, authorized, one_call=True)
        targets[FUNCTION_FLOOR] = ("function floor", one_call, authorized, db_url)
    targets["forwarder"] = ("forwarder", start_forwarder(processes, sim, "forwarder"), {}, None)
    durable = start_forwarder(processes, sim, "durable", durable_url)
    targets["durable forwarder"] = ("durable", durable, {}, durable_url)
    probes = {}
    jobs_ending: JobsEnding | None = None
    databases: dict[str, Database] = {}
    for name, (process, _url, _headers, database) in targets.items():
        db = None
        if database is not None:
            if database not in databases:  # the floor shares genrelay's
                databases[database] = ctx.later.enter_context(Database(database))
            db = databases[database]
        if name == "genrelay" and db is not None and args.jobs_end:
            jobs_ending = ctx.later.enter_context(JobsEnding(db))
        probes[name] = CpuProbe(
            {
                "web": tree_of(processes.children[process]),
                "simulator": tree_of(processes.children["simulator"]),
                "postgres (this db)": db.backends if db is not None and db.postgres else list,
            }
        )

    def drive(name: str, count: int) -> tuple[Load, dict[str, float]]:
        _process, url, headers, _database = targets[name]

        def send(session: requests.Session, _n: int) -> requests.Response:
            return session.post(
                f"{url}/v1/generations", json=SEED_BODY, headers=headers, timeout=CLIENT_TIMEOUT
            )

        before = probes[name].snapshot()
        load = closed_loop(count, args.concurrency, send, forwarded)
        return load, CpuProbe.delta(before, probes[name].snapshot())["groups"]

    for name in targets:
        if args.warmup:
            drive(name, args.warmup)
    rounds: list[tuple[str, int, tuple[Load, dict[str, float]]]] = []
    for number in range(1, args.rounds + 1):
        for name in targets:
            time.sleep(1.0)  # let the access logs drain
            processes.check_alive()
            if jobs_ending is not None:
                jobs_ending.check()
            load = drive(name, args.requests)
            rounds.append((name, number, load))
            print(f"round {number} {name}: {pooled([load])}", flush=True)
    if jobs_ending is not None:
        jobs_ending.check()
    per_target = {name: pooled([r for n, _, r in rounds if n == name]) for name in targets}
    g, f, d = (per_target[name] for name in ("genrelay", "forwarder", "durable forwarder"))
    floor_ratios = {}
    if FLOOR in per_target:
        s, o = per_target[FLOOR], per_target[FUNCTION_FLOOR]
        floor_ratios = {
            "ratios_to_floor": {k: round(g[k] / s[k], 3) for k in RATIO_KEYS},
            "floor_to_forwarder": {k: round(s[k] / f[k], 3) for k in RATIO_KEYS},
            "ratios_to_function_floor": {k: round(g[k] / o[k], 3) for k in RATIO_KEYS},
            "function_floor_to_forwarder": {k: round(o[k] / f[k], 3) for k in RATIO_KEYS},
        }
    return {
        "settings": {
            "database": db_desc,
            "load": f"{args.rounds} x {args.requests} requests per target, "
            f"{args.concurrency} client threads, {args.warmup} warm-up",
            "gunicorn": f"{WEB[0]} processes x {WEB[1]} threads (gthread), every target",
        },
        "rounds": [{"target": n, "round": i, **pooled([r])} for n, i, r in rounds],
        "targets": per_target,
        "ratios": {k: round(g[k] / f[k], 3) for k in RATIO_KEYS},
        "ratios_to_durable": {k: round(g[k] / d[k], 3) for k in RATIO_KEYS},
        "durable_to_forwarder": {k: round(d[k] / f[k], 3) for k in RATIO_KEYS},
        **floor_ratios,
    }


class JobsEnding(Sampler):
    """Deep-Image finishing genrelay's jobs, as far as its line can tell: every 0.25 s each
    generation in flight gets `source_found_at`, what a completion callback records first
    (it frees the slot). Without it every intake of the run stays in flight (no callbacks, no
    worker), and the admission count reads them all, thousands of index entries per intake
    by the end, where a deployment stops at the account's limit.

    PostgreSQL: the UPDATE runs on the CPU probe's own connection, whose CPU is not counted
    as genrelay's. SQLite: on a connection of its own, in line with genrelay's writers (the
    flock of `<database>-writers`, README "Tasks")."""

    SQL = (
        "UPDATE generations SET source_found_at = CURRENT_TIMESTAMP "
        "WHERE source_found_at IS NULL AND admitted_at IS NOT NULL AND status = 'processing'"
    )

    def __init__(self, db: Database) -> None:
        super().__init__(interval=0.25)
        self.db = db
        self.error: Exception | None = None

    def check(self) -> None:
        """BenchError if ending the jobs failed (they would no longer end)."""
        if self.error is not None:
            raise BenchError(f"ending the jobs failed: {self.error!r}")

    def sample(self) -> None:
        try:
            self._end_jobs()
        except Exception as exc:  # reported by check(), between rounds
            self.error = self.error or exc

    def _end_jobs(self) -> None:
        if self.db.postgres:
            self.db.rows(self.SQL)
            return
        path = os.path.abspath(self.db.name)
        with (
            contextlib.closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as sql,
            open(f"{path}-writers", "a+b") as writers,
        ):
            fcntl.flock(writers, fcntl.LOCK_EX)
            try:
                sql.execute(self.SQL)
            finally:
                fcntl.flock(writers, fcntl.LOCK_UN)


def journal_database(database_url: str) -> str:
    """The durable forwarder's FORWARDER_DATABASE for a bench database (a SQLAlchemy URL),
    its journal table made."""
    parsed = make_url(database_url)
    if parsed.get_backend_name() == "sqlite":
        journal = f"sqlite:{parsed.database}"
    else:
        journal = libpq_dsn(database_url)
    create_journal(journal)
    return journal


def start_forwarder(
    processes: Processes, sim: str, name: str, database_url: str | None = None
) -> str:
    """minimal_forwarder.py under gunicorn as `name` (durable with `database_url`); its URL."""
    env = {}
    if database_url is not None:
        env["FORWARDER_DATABASE"] = journal_database(database_url)
    return _start_app(processes, sim, name, "minimal_forwarder:create_app()", env, {})


def _start_app(
    processes: Processes, sim: str, name: str, app: str, env: dict[str, str],
    headers: dict[str, str],
) -> str:  # fmt: skip
    """A bench/ app under gunicorn with genrelay's settings, once it forwards a request; its
    URL."""
    port = free_port()
    env = {
        **base_env(),
        "GENRELAY_DEEPIMAGE_URL": sim,
        "GENRELAY_DEEPIMAGE_API_KEY": SIMULATOR_KEY,
        "GENRELAY_WEB_PROCESSES": str(WEB[0]),
        "GENRELAY_WEB_THREADS": str(WEB[1]),
        "PORT": str(port),
        **env,
    }
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "python:service.server.gunicorn_conf"]
    gunicorn += ["--chdir", str(BENCH_DIR), app]
    processes.start(name, gunicorn, env)
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: requests.post(
            f"{url}/v1/generations", json=SEED_BODY, headers=headers, timeout=5
        ).status_code == 202,
        f"the {name} app", 60, processes,
    )  # fmt: skip
    return url


def start_floor(
    processes: Processes, sim: str, genrelay: str, database_url: str, headers: dict[str, str],
    one_call: bool = False,
) -> str:  # fmt: skip
    """statement_floor.py under gunicorn, on genrelay's database; its URL. It runs genrelay's
    statements on the rows genrelay makes, so genrelay makes them first: the account's row
    comes with its first intake. `one_call`: the function floor, its functions installed."""
    first = requests.post(
        f"{genrelay}/v1/generations", json=SEED_BODY, headers=headers, timeout=CLIENT_TIMEOUT
    )
    if first.status_code != 202:
        raise BenchError(f"genrelay's first intake answered {first.status_code}: {first.text}")
    dsn = libpq_dsn(database_url)
    if one_call:
        install_functions(dsn)
    name = "function floor" if one_call else "floor"
    return _start_app(
        processes, sim, name, f"statement_floor:create_app(one_call={one_call})",
        {"FLOOR_DATABASE": dsn}, headers,
    )  # fmt: skip


def print_report(report: dict[str, Any]) -> None:
    columns = ["requests", "errors", "queued", "req_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms"]
    rows = [[r["target"], r["round"], *(r[c] for c in columns)] for r in report["rounds"]]
    rows += [[name, "all", *(s[c] for c in columns)] for name, s in report["targets"].items()]
    print_table(["target", "round", *columns], rows)
    print("\nCPU per request (ms):")
    cpu_rows = [
        [name, *(s["cpu_ms_per_request"][g] for g in CPU_GROUPS)]
        for name, s in report["targets"].items()
    ]
    print_table(["target", *CPU_GROUPS], cpu_rows)
    print()
    for label, key in (
        ("genrelay / forwarder", "ratios"),
        ("genrelay / durable forwarder", "ratios_to_durable"),
        ("durable forwarder / forwarder", "durable_to_forwarder"),
        (f"genrelay / {FLOOR}", "ratios_to_floor"),
        (f"{FLOOR} / forwarder", "floor_to_forwarder"),
        (f"genrelay / {FUNCTION_FLOOR}", "ratios_to_function_floor"),
        (f"{FUNCTION_FLOOR} / forwarder", "function_floor_to_forwarder"),
    ):
        if key not in report:
            continue  # no floor on SQLite
        r = report[key]
        print(
            f"{label}: req/s x{r['req_per_s']:.2f}, p50 x{r['p50_ms']:.2f}, p99 x{r['p99_ms']:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__)
    # Many short rounds: the machine's slow spells then fall on every target alike (2 x 2000
    # gave x0.35-0.43 in three runs of the same code, 6 x 700 x0.33-0.34 in four).
    parser.add_argument("--requests", type=int, default=700, help="per round (700)")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (16)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per target (6)")
    parser.add_argument("--warmup", type=int, default=100, help="requests per target, uncounted")
    parser.add_argument(
        "--no-jobs-end", dest="jobs_end", action="store_false",
        help="leave every generation in flight (the method before 2026-12-06)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    return run_benchmark("genrelay intake benchmark", args, measure, print_report)


if __name__ == "__main__":
    sys.exit(main())
