"""Intake benchmark: genrelay's `POST /v1/generations` next to a minimal Flask forwarder.

What is measured
    Requests/s and latency (p50, p90, p99, max) of ``POST /v1/generations`` carrying the seed's
    text-only body, sent to two targets that run under the same gunicorn settings
    (``service/server/gunicorn_conf.py``: GENRELAY_WEB_PROCESSES x GENRELAY_WEB_THREADS, gthread)
    and
    forward to the same Deep-Image simulator:

    - ``genrelay``: ``genrelay serve`` on a fresh SQLite or PostgreSQL database. Each request is
      authenticated, validated, stored with its ``submit`` task in one transaction, forwarded
      inline to the simulator and its status moved to ``processing``. No worker runs: the
      inline attempt is what is measured.
    - ``forwarder``: ``bench/minimal_forwarder.py``: read JSON, forward ``input``, answer 202.
      No validation, no database. The floor a Flask-on-gunicorn forwarder cannot beat here.

    The simulator runs with ``--processing-time 5 --concurrency-limit 1000000``, so it never
    answers 429 and jobs stay pending as real ones would.

How it is driven
    After a warm-up, each target gets the same closed-loop load: C client threads, each with
    its own ``requests.Session`` (keep-alive), posting until N requests are done. The targets
    alternate (genrelay, forwarder, genrelay, forwarder, ... ``--rounds`` each) so machine
    noise hits both. A request's latency is ``time.perf_counter()`` around the whole call,
    response body included, as the client sees it.

How to read the report
    - ``req/s``: completed requests (errors included) / wall time of the round; the ``all``
      rows pool every round of a target (all requests / summed wall time, percentiles over all
      latencies, nearest-rank).
    - ``errors``: non-2xx answers and client-side failures (timeouts, refused connections).
    - ``queued``: 2xx answers whose body is not ``status: processing`` with an upstream job,
      i.e. genrelay accepted the request but its inline forward did not happen (a worker would
      pick it up later). Should be 0.
    - ``genrelay / forwarder``: the ratios of the pooled figures. req/s below 1 and latency
      above 1 is the price of genrelay's validation, authentication and database work.
    The load generator is Python and shares the machine with both servers and the simulator:
    compare the two targets with each other; absolute figures understate what the servers do.

Run from the repository root:

    .venv/bin/python bench/intake.py [--requests N] [--concurrency C]
        [--database sqlite|postgresql] [--rounds R] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
from _stack import (
    BENCH_DIR,
    CLIENT_TIMEOUT,
    DATABASE_LOCKED,
    GENRELAY,
    GUNICORN_TIMEOUT,
    LOOPBACK,
    SEED_BODY,
    SIMULATOR_KEY,
    SIMULATOR_LIMIT,
    TRACEBACK,
    WARNING_OR_ERROR,
    BenchError,
    Processes,
    add_common_options,
    base_env,
    clean_up,
    closed_loop,
    failed,
    finish,
    free_port,
    fresh_database,
    handle_signals,
    interrupted,
    is_2xx,
    machine_facts,
    percentile,
    postgres_url_from_env,
    prepare_database,
    require_positive,
    scan_log,
    start_simulator,
    wait_until,
    work_dirs,
)

from service.devtools.gcs_emulator import FakeGcsServer

BUCKET = "genrelay-bench"
ROUND_PAUSE = 1.0  # seconds between rounds, to let access logs drain


# -- load --------------------------------------------------------------------------------


@dataclasses.dataclass
class Round:
    """One target driven with N requests."""

    target: str
    number: int
    wall: float
    latencies: list[float]  # seconds, one per request
    outcomes: collections.Counter[str]  # "202", "500", "ReadTimeout", ...
    queued: int  # 2xx but not forwarded inline

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.outcomes.items() if not is_2xx(k))

    @property
    def forwarded(self) -> int:
        return sum(n for k, n in self.outcomes.items() if is_2xx(k)) - self.queued


def drive(
    target: str,
    number: int,
    url: str,
    headers: dict[str, str],
    requests_total: int,
    concurrency: int,
    stop: threading.Event,
) -> Round:
    """Send ``requests_total`` POSTs from ``concurrency`` threads; every latency recorded."""
    body = json.dumps(SEED_BODY).encode()
    headers = {**headers, "Content-Type": "application/json"}
    lock = threading.Lock()
    queued = 0

    def send(session: requests.Session, _n: int) -> requests.Response:
        return session.post(url, data=body, headers=headers, timeout=CLIENT_TIMEOUT)

    def check(_n: int, response: requests.Response) -> None:
        nonlocal queued
        if not forwarded(response):
            with lock:
                queued += 1

    load = closed_loop(requests_total, concurrency, send, stop, check)
    return Round(target, number, load.wall, load.latencies, load.outcomes, queued)


def forwarded(response: requests.Response) -> bool:
    """True if the answer says the job reached the upstream (both targets answer alike)."""
    try:
        body = response.json()
    except ValueError:
        return False
    upstream = body.get("upstream") if isinstance(body, dict) else None
    return (
        body.get("status") == "processing"
        and isinstance(upstream, dict)
        and bool(upstream.get("job"))
    )


# -- statistics --------------------------------------------------------------------------


def summarize(rounds: list[Round]) -> dict[str, Any]:
    """Pooled figures of some rounds: req/s, percentiles in ms, errors."""
    latencies = sorted(x for r in rounds for x in r.latencies)
    wall = sum(r.wall for r in rounds)
    outcomes: collections.Counter[str] = collections.Counter()
    for r in rounds:
        outcomes.update(r.outcomes)
    return {
        "requests": len(latencies),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(latencies) / wall, 1) if wall else math.nan,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p90_ms": round(percentile(latencies, 90) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1) if latencies else math.nan,
        "errors": sum(r.errors for r in rounds),
        "queued": sum(r.queued for r in rounds),
        "outcomes": dict(sorted(outcomes.items())),
    }


# -- logs --------------------------------------------------------------------------------

_LOG_PATTERNS = {
    "warning_or_error": WARNING_OR_ERROR,
    "traceback": TRACEBACK,
    "database_locked": DATABASE_LOCKED,
    "access_5xx": re.compile(r'" 5\d\d '),
    "worker_timeout": GUNICORN_TIMEOUT,
    "worker_boot": re.compile(r"Booting worker with pid"),  # one per process is normal
}


# -- report ------------------------------------------------------------------------------


def run_facts(args: argparse.Namespace, database: str) -> dict[str, Any]:
    return {
        **machine_facts(),
        "database": database,
        "requests_per_round": args.requests,
        "concurrency": args.concurrency,
        "rounds_per_target": args.rounds,
        "warmup_requests": args.warmup,
        "gunicorn": f"{args.processes} processes x {args.threads} threads (gthread)",
        "gunicorn_processes": args.processes,
        "simulator": "--processing-time 5 --concurrency-limit 1000000",
    }


def print_report(report: dict[str, Any]) -> None:
    facts = report["machine"]
    print()
    print("== genrelay intake benchmark ==")
    for key, value in facts.items():
        if key != "gunicorn_processes":  # already in "gunicorn"
            print(f"{key:>24}: {value}")
    print()
    header = (
        f"{'target':<10} {'round':>5} {'requests':>8} {'errors':>6} {'queued':>6} "
        f"{'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = [(r["target"], str(r["round"]), r) for r in report["rounds"]]
    rows += [(name, "all", s) for name, s in report["targets"].items()]
    for target, number, s in rows:
        print(
            f"{target:<10} {number:>5} {s['requests']:>8} {s['errors']:>6} {s['queued']:>6} "
            f"{s['req_per_s']:>8.1f} {s['p50_ms']:>8.1f} {s['p90_ms']:>8.1f} "
            f"{s['p99_ms']:>8.1f} {s['max_ms']:>8.1f}"
        )
    ratios = report["ratios"]
    print()
    print(
        f"genrelay / forwarder: req/s x{ratios['req_per_s']:.2f}, "
        f"p50 x{ratios['p50_ms']:.2f}, p99 x{ratios['p99_ms']:.2f}"
    )
    for name, s in report["targets"].items():
        odd = {k: v for k, v in s["outcomes"].items() if not k.startswith("2")}
        if odd:
            print(f"{name} non-2xx outcomes: {odd}")
    sim = report.get("simulator_stats") or {}
    if sim:
        print(
            f"simulator: jobs_created={sim.get('jobs_created')} "
            f"concurrency_rejections={sim.get('concurrency_rejections')} "
            f"(expected jobs: {report['expected_simulator_jobs']})"
        )
    processes = facts["gunicorn_processes"]
    for name, scan in report["logs"].items():
        counts = dict(scan["counts"])
        boots = counts.pop("worker_boot")
        noisy = {k: v for k, v in counts.items() if v}
        if boots != processes:
            noisy["worker_boot"] = boots  # a worker died and was replaced
        print(f"{name} log: {noisy or 'nothing unusual'} ({boots} gunicorn workers booted)")
        for kind, lines in scan["samples"].items():
            if kind in noisy:
                for line in lines[:3]:
                    print(f"    [{kind}] {line}")


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per round (default 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (16)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per target (2)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests per target")
    parser.add_argument(
        "--processes",
        type=int,
        default=int(os.environ.get("GENRELAY_WEB_PROCESSES", "2")),
        help="gunicorn processes of both targets (GENRELAY_WEB_PROCESSES, default 2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("GENRELAY_WEB_THREADS", "8")),
        help="gunicorn threads per process of both targets (GENRELAY_WEB_THREADS, default 8)",
    )
    add_common_options(parser, postgres_url=postgres_url_from_env())
    args = parser.parse_args(argv)
    require_positive(parser, args, ("requests", "concurrency", "rounds", "processes", "threads"))
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_signals()
    with work_dirs(args.log_dir) as (tmp_dir, log_dir):
        processes = Processes(log_dir)
        stop = threading.Event()
        try:
            # genrelay needs a bucket to be ready (/readyz): fake-gcs-server, memory backend.
            with (
                fresh_database(args.database, tmp_dir, args.postgres_url) as (db_url, db_desc),
                FakeGcsServer(backend="memory") as gcs,
            ):
                gcs.create_bucket(BUCKET)
                try:
                    report = run(args, processes, tmp_dir, db_url, db_desc, stop, gcs.url)
                finally:
                    clean_up(processes, stop)
                report["logs"] = {
                    name: scan_log(processes.log_path(name), _LOG_PATTERNS, excerpts=5)
                    for name in ("genrelay", "forwarder")
                }
        except BenchError as exc:
            return failed(exc, processes)
        except KeyboardInterrupt:
            return interrupted()
    return finish(report, print_report, args.json_out)


def run(
    args: argparse.Namespace,
    processes: Processes,
    tmp_dir: Path,
    db_url: str,
    db_desc: str,
    stop: threading.Event,
    gcs_url: str,
) -> dict[str, Any]:
    genrelay_port, forwarder_port = free_port(), free_port()
    genrelay_url = f"http://{LOOPBACK}:{genrelay_port}"
    forwarder_url = f"http://{LOOPBACK}:{forwarder_port}"
    sim_url = start_simulator(processes, base_env(), 5)
    shared = {
        **base_env(),
        "GENRELAY_DEEPIMAGE_URL": sim_url,
        "GENRELAY_DEEPIMAGE_API_KEY": SIMULATOR_KEY,
        "GENRELAY_WEB_PROCESSES": str(args.processes),
        "GENRELAY_WEB_THREADS": str(args.threads),
    }
    # gunicorn >= 25 opens a control socket at $XDG_RUNTIME_DIR/gunicorn.ctl (else in
    # ~/.gunicorn/) unless the settings disable it. Should they ever turn it back on, one
    # directory each keeps the two masters (and other gunicorns here) off each other's socket.
    runtime = {name: tmp_dir / f"{name}-run" for name in ("genrelay", "forwarder")}
    for path in runtime.values():
        path.mkdir(mode=0o700)
    genrelay_env = {
        **shared,
        "GENRELAY_DATABASE_URL": db_url,
        "GENRELAY_GCS_BUCKET": BUCKET,
        "STORAGE_EMULATOR_HOST": gcs_url,
        "GENRELAY_RATE_LIMIT": "0",
        # Loopback http everywhere: result URLs from the simulator included.
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
        "GENRELAY_UPSTREAM_CONCURRENCY": str(SIMULATOR_LIMIT),  # every request forwarded inline
        "PORT": str(genrelay_port),
        "XDG_RUNTIME_DIR": str(runtime["genrelay"]),
    }
    forwarder_env = {
        **shared,
        "PORT": str(forwarder_port),
        "XDG_RUNTIME_DIR": str(runtime["forwarder"]),
    }

    print(f"database: {db_desc}; migrating and creating a key", flush=True)
    api_key = prepare_database(genrelay_env)

    processes.start("genrelay", [GENRELAY, "serve"], genrelay_env)
    processes.start(
        "forwarder",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:service.server.gunicorn_conf",
            "--chdir",
            str(BENCH_DIR),
            "minimal_forwarder:create_app()",
        ],
        forwarder_env,
    )
    wait_until(
        lambda: requests.get(f"{genrelay_url}/readyz", timeout=1).ok, processes, "genrelay serve"
    )
    wait_until(
        lambda: (
            requests.post(f"{forwarder_url}/v1/generations", json=SEED_BODY, timeout=5).status_code
            == 202
        ),
        processes,
        "the minimal forwarder",
    )
    targets = {
        "genrelay": (f"{genrelay_url}/v1/generations", {"Authorization": f"Bearer {api_key}"}),
        "forwarder": (f"{forwarder_url}/v1/generations", {}),
    }
    facts = run_facts(args, db_desc)
    print(
        f"all up; {args.rounds} rounds x {args.requests} requests per target, "
        f"concurrency {args.concurrency}",
        flush=True,
    )
    forwarded = 1  # the forwarder's readiness POST
    if args.warmup:
        for name, (url, headers) in targets.items():
            warm = drive(name, 0, url, headers, args.warmup, args.concurrency, stop)
            forwarded += warm.forwarded
            print(
                f"warm-up {name}: {warm.errors} errors, {warm.queued} queued "
                f"of {len(warm.latencies)}",
                flush=True,
            )
    rounds: list[Round] = []
    for number in range(1, args.rounds + 1):
        for name, (url, headers) in targets.items():
            processes.check_alive()
            time.sleep(ROUND_PAUSE)
            result = drive(name, number, url, headers, args.requests, args.concurrency, stop)
            rounds.append(result)
            forwarded += result.forwarded
            s = summarize([result])
            print(
                f"round {number} {name}: {s['req_per_s']} req/s, p50 {s['p50_ms']} ms, "
                f"p99 {s['p99_ms']} ms, {s['errors']} errors",
                flush=True,
            )
    processes.check_alive()
    sim_stats: dict[str, Any] = {}
    with contextlib.suppress(requests.RequestException, ValueError):
        sim_stats = requests.get(f"{sim_url}/_sim/stats", timeout=5).json()

    per_target = {name: summarize([r for r in rounds if r.target == name]) for name in targets}
    g, f = per_target["genrelay"], per_target["forwarder"]
    return {
        "machine": facts,
        "rounds": [{"target": r.target, "round": r.number, **summarize([r])} for r in rounds],
        "targets": per_target,
        "ratios": {
            "req_per_s": round(g["req_per_s"] / f["req_per_s"], 3),
            "p50_ms": round(g["p50_ms"] / f["p50_ms"], 3),
            "p99_ms": round(g["p99_ms"] / f["p99_ms"], 3),
        },
        "simulator_stats": sim_stats,
        # Jobs the simulator should have created: every answer that reported one.
        "expected_simulator_jobs": forwarded,
    }


if __name__ == "__main__":
    sys.exit(main())
