"""Intake cost: the instructions one `POST /v1/generations` costs the web process, for genrelay,
the minimal forwarder and the durable forwarder, counted by callgrind.

intake.py measures req/s under load, which on a shared 2-core machine varies by about ±0.02
in the ratio from run to run: too much to see a change of a few percent. An instruction count
repeats to about 1 %. Each target's app (`create_app()`, what gunicorn serves) runs in
one process under Flask's test client, against the same simulator and database kinds as
intake.py. Under `valgrind --tool=callgrind`, one run makes BASE requests and another BASE + N;
the difference over N is the cost of one request, with start-up and imports cancelled out. It
counts the web process alone: the database server's work is not in it (intake.py measures
that), and no gunicorn. `--against DIR` also counts genrelay from another checkout (its own
database, same simulator), to compare two commits. It also lists the SQL statements of one
genrelay intake, and the thread's user and system CPU time over N requests (noisy, but the
system time shows what the instructions leave out: the kernel's side of each round trip).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from _intake_cost_child import WARMUP
from _stack import (
    BENCH_DIR,
    REPO_DIR,
    SEED_BODY,
    SIMULATOR_KEY,
    SIMULATOR_LIMIT,
    BenchError,
    Context,
    base_env,
    free_port,
    genrelay_env,
    options,
    prepare_database,
    print_table,
    run_benchmark,
    start_gcs,
    start_simulator,
)
from intake import JobsEnding, journal_database

BASE = 50  # requests of the shorter run, warm-up included
CHILD = BENCH_DIR / "_intake_cost_child.py"


class Runner:
    """Runs the child for a target, with its environment, under valgrind or not."""

    def __init__(self, ctx: Context, sim: str, gcs: str) -> None:
        self.ctx, self.sim, self.gcs = ctx, sim, gcs
        self.envs: dict[str, dict[str, str]] = {}

    def add_genrelay(self, name: str, checkout: Path) -> None:
        db_url, _ = self.ctx.database(self.ctx.args.database, name)
        env = genrelay_env(
            db_url, self.sim, self.gcs, free_port(), callbacks=False,
            upstream_concurrency=SIMULATOR_LIMIT,  # every request forwarded inline
        )  # fmt: skip
        env["PYTHONPATH"] = str(checkout)
        self.envs[name] = {**env, "INTAKE_COST_TARGET": "genrelay"}
        self.envs[name]["INTAKE_COST_KEY"] = prepare_database(env)

    def add_forwarder(self, name: str, database: str | None) -> None:
        env = {
            **base_env(),
            "GENRELAY_DEEPIMAGE_URL": self.sim,
            "GENRELAY_DEEPIMAGE_API_KEY": SIMULATOR_KEY,
            "INTAKE_COST_TARGET": "forwarder",
        }
        if database is not None:
            db_url, _ = self.ctx.database(database, "durable")
            env["FORWARDER_DATABASE"] = journal_database(db_url)
        self.envs[name] = env

    def run(self, name: str, count: int, *, valgrind: bool = False, **extra: str) -> str:
        """The child's output after `count` counted requests to target `name`."""
        argv = [sys.executable, str(CHILD)]
        if valgrind:
            argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv]
        env = {
            **self.envs[name],
            "INTAKE_COST_COUNT": str(count),
            "INTAKE_COST_BODY": json.dumps(SEED_BODY),
            "INTAKE_COST_END_JOBS": JobsEnding.SQL,
            **extra,
        }
        done = subprocess.run(
            argv, env=env, cwd=REPO_DIR, capture_output=True, text=True, timeout=1800
        )
        if done.returncode != 0:
            raise BenchError(f"{name} ({count} requests) failed:\n{done.stderr[-3000:]}")
        return done.stdout + done.stderr

    def instructions(self, name: str, extra: int) -> float:
        """Instructions per request: the runs of BASE and BASE + extra requests, differenced."""
        counts = []
        for count in (BASE - WARMUP, BASE - WARMUP + extra):
            found = re.search(r"Collected : (\d+)", self.run(name, count, valgrind=True))
            if found is None:
                raise BenchError(f"callgrind printed no count for {name}")
            counts.append(int(found[1]))
        return (counts[1] - counts[0]) / extra


def measure(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    processes = ctx.new_processes()
    sim = start_simulator(processes, processing_time=5, concurrency_limit=SIMULATOR_LIMIT)
    runner = Runner(ctx, sim, start_gcs(processes))
    runner.add_genrelay("genrelay", REPO_DIR)
    if args.against:
        runner.add_genrelay("genrelay (against)", args.against.resolve())
    runner.add_forwarder("forwarder", None)
    runner.add_forwarder("durable forwarder", args.database)
    valgrind = shutil.which("valgrind") is not None and not args.no_valgrind
    if not valgrind:
        why = "--no-valgrind" if args.no_valgrind else "valgrind is not installed"
        print(f"instructions not counted: {why}")
    targets: dict[str, dict[str, Any]] = {}
    for name in runner.envs:
        times = re.search(r"USER ([0-9.]+) SYSTEM ([0-9.]+)", runner.run(name, args.requests))
        if times is None:
            raise BenchError(f"{name} printed no CPU times")
        user, system = (1000 * float(t) / args.requests for t in times.groups())
        targets[name] = {
            "user_ms_per_request": round(user, 2),
            "system_ms_per_request": round(system, 2),
        }
        if valgrind:
            per_request = runner.instructions(name, args.requests)
            targets[name]["instructions_per_request"] = round(per_request)
        print(f"{name}: {targets[name]}", flush=True)
    statements = [
        line.removeprefix("STATEMENT ")
        for line in runner.run("genrelay", 0, INTAKE_COST_STATEMENTS="1").splitlines()
        if line.startswith("STATEMENT ")
    ]
    report: dict[str, Any] = {
        "settings": {
            "database": args.database,
            "requests": f"{args.requests} per target (and {BASE} for the base run), "
            f"{WARMUP} warm-up, in one process (Flask's test client)",
            "counted by": "valgrind --tool=callgrind" if valgrind else "nothing (no valgrind)",
        },
        "targets": targets,
        "genrelay_statements": statements,
    }
    if valgrind:
        g = targets["genrelay"]["instructions_per_request"]
        report["ratios"] = {
            name: round(g / t["instructions_per_request"], 3)
            for name, t in targets.items()
            if name != "genrelay"
        }
    return report


def print_report(report: dict[str, Any]) -> None:
    columns = ["instructions_per_request", "user_ms_per_request", "system_ms_per_request"]
    rows = [[name, *(t.get(c, "—") for c in columns)] for name, t in report["targets"].items()]
    print_table(["target", "instructions per request", "user CPU ms", "system CPU ms"], rows)
    for name, ratio in report.get("ratios", {}).items():
        print(f"genrelay / {name}: instructions x{ratio:.3f}")
    print(f"\nThe statements of one genrelay intake ({len(report['genrelay_statements'])}):")
    for statement in report["genrelay_statements"]:
        print(f"  {statement}")


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="postgresql")
    parser.add_argument("--requests", type=int, default=200, help="counted per target (200)")
    parser.add_argument("--against", type=Path, help="another checkout's genrelay, counted too")
    parser.add_argument("--no-valgrind", action="store_true", help="time only, count nothing")
    args = parser.parse_args(argv)
    return run_benchmark("genrelay intake cost", args, measure, print_report)


if __name__ == "__main__":
    sys.exit(main())
