"""Intake benchmark: genrelay's `POST /v1/generations` next to a minimal Flask forwarder.

What is measured
    Requests/s and latency (p50, p90, p99, max) of ``POST /v1/generations`` carrying the seed's
    text-only body, sent to two targets that run under the same gunicorn settings
    (``service/gunicorn_conf.py``: GENRELAY_WEB_PROCESSES x GENRELAY_WEB_THREADS, gthread) and
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
import datetime
import json
import math
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import requests

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
GENRELAY = str(Path(sys.executable).parent / "genrelay")
SIMULATOR_KEY = "sim-key"
LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

SEED_BODY: dict[str, Any] = {
    "input": {
        "width": 2048,
        "height": 1024,
        "background": {
            "generate": {
                "description": "woman in a futuristic suit holding a gun in her hand, looking at "
                "the camera, cyberpunk art, neo-figurative, anime"
            }
        },
    }
}

CLIENT_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds, for every benchmark request
SETUP_TIMEOUT = 120.0  # migrate, keys create
START_TIMEOUT = 60.0  # until a server answers
STOP_TIMEOUT = 25.0  # SIGTERM grace before SIGKILL (gunicorn's graceful_timeout is 20)
ROUND_PAUSE = 1.0  # seconds between rounds, to let access logs drain


class BenchError(RuntimeError):
    """The benchmark could not run; the message says why (process logs are printed too)."""


# -- processes ---------------------------------------------------------------------------


class Processes:
    """Child processes, each in its own session (Ctrl-C reaches only us), logs in files."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with self.log_path(name).open("wb") as log:
            self.children[name] = subprocess.Popen(
                argv,
                env=env,
                cwd=REPO_DIR,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.children.items() if p.poll() is not None}
        if dead:
            raise BenchError(f"process exited early: {dead}")

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for name in self.children:
            text = self.log_path(name).read_text(errors="replace")
            parts.append(f"--- {name} (last {tail} characters) ---\n{text[-tail:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        """SIGTERM every child, wait, SIGKILL what is left (the child's whole group)."""
        for process in self.children.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, process in self.children.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s: killing", flush=True)
        for process in self.children.values():
            # The group id is the child's pid (start_new_session); it also holds the gunicorn
            # workers, which must not outlive a killed master.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], processes: Processes, what: str) -> None:
    """Poll ``check`` until it is true; fail if a child dies or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        processes.check_alive()
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer within {START_TIMEOUT:.0f} s")


def run_command(argv: list[str], env: dict[str, str]) -> str:
    """Run a set-up command to completion; its stdout, or BenchError with its output."""
    done = subprocess.run(
        argv, env=env, cwd=REPO_DIR, capture_output=True, text=True, timeout=SETUP_TIMEOUT
    )
    if done.returncode != 0:
        raise BenchError(
            f"{' '.join(argv[1:])} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def base_env() -> dict[str, str]:
    """Our environment without any genrelay setting, so both targets get only ours."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GENRELAY_") and k != "PORT"}


# -- database ----------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(kind: str, tmp_dir: Path, admin_url: str) -> Iterator[tuple[str, str]]:
    """A new, empty database: (GENRELAY_DATABASE_URL, description); dropped afterwards."""
    if kind == "sqlite":
        path = tmp_dir / "genrelay-bench.db"
        yield f"sqlite:///{path}", f"sqlite {sqlite_version()} (file in {tmp_dir})"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    if url.host not in LOOPBACK_NAMES:
        raise BenchError(f"refusing a non-loopback PostgreSQL host: {url.host}")
    name = f"genrelay_bench_{secrets.token_hex(4)}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        version = str(row[0]) if row else "?"
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        target = url.set(drivername="postgresql+psycopg", database=name)
        yield target.render_as_string(hide_password=False), f"postgresql {version} ({name})"
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        print(f"dropped database {name}", flush=True)


def sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


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


def is_2xx(outcome: str) -> bool:
    return outcome.isdigit() and outcome.startswith("2")


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
    issued = 0
    latencies: list[float] = []
    outcomes: collections.Counter[str] = collections.Counter()
    queued = 0
    start = threading.Barrier(concurrency + 1)

    def client() -> None:
        nonlocal issued, queued
        my_latencies: list[float] = []
        my_outcomes: collections.Counter[str] = collections.Counter()
        my_queued = 0
        with requests.Session() as session:
            with contextlib.suppress(threading.BrokenBarrierError):
                start.wait(timeout=30)
            while not stop.is_set():
                with lock:
                    if issued >= requests_total:
                        break
                    issued += 1
                began = time.perf_counter()
                try:
                    response = session.post(url, data=body, headers=headers, timeout=CLIENT_TIMEOUT)
                    outcome = str(response.status_code)
                except requests.RequestException as exc:
                    response, outcome = None, type(exc).__name__
                my_latencies.append(time.perf_counter() - began)
                my_outcomes[outcome] += 1
                if response is not None and response.ok and not forwarded(response):
                    my_queued += 1
        with lock:
            latencies.extend(my_latencies)
            outcomes.update(my_outcomes)
            queued += my_queued

    threads = [
        threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    start.wait(timeout=30)
    began = time.perf_counter()
    # Each request is bounded by CLIENT_TIMEOUT, so each thread is bounded too.
    deadline = time.monotonic() + requests_total * sum(CLIENT_TIMEOUT) + 60
    for thread in threads:
        while thread.is_alive():
            if time.monotonic() > deadline:
                stop.set()
                raise BenchError(f"{target} round {number} did not finish in time")
            thread.join(timeout=0.5)  # short joins keep Ctrl-C responsive
    wall = time.perf_counter() - began
    return Round(target, number, wall, latencies, outcomes, queued)


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


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


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

_ACCESS_5XX = re.compile(r'" 5\d\d ')
_LOG_PATTERNS = {
    "warning_or_error": re.compile(r'"severity": "(WARNING|ERROR|CRITICAL)"|\[(WARNING|ERROR)\]'),
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
    "database_locked": re.compile(r"database is locked", re.IGNORECASE),
    "access_5xx": _ACCESS_5XX,
    "worker_timeout": re.compile(r"WORKER TIMEOUT|was sent SIGKILL", re.IGNORECASE),
    "worker_boot": re.compile(r"Booting worker with pid"),  # one per process is normal
}


def scan_log(path: Path, excerpts: int = 5) -> dict[str, Any]:
    """Counts (and a few first lines) of the log lines worth a look."""
    counts: dict[str, int] = dict.fromkeys(_LOG_PATTERNS, 0)
    samples: dict[str, list[str]] = {name: [] for name in _LOG_PATTERNS}
    if not path.exists():
        return {"counts": counts, "samples": samples}
    with path.open(errors="replace") as log:
        for line in log:
            for name, pattern in _LOG_PATTERNS.items():
                if pattern.search(line):
                    counts[name] += 1
                    if len(samples[name]) < excerpts:
                        samples[name].append(line.rstrip()[:400])
    return {"counts": counts, "samples": {k: v for k, v in samples.items() if v}}


# -- report ------------------------------------------------------------------------------


def machine_facts(args: argparse.Namespace, database: str) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
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
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("GENRELAY_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="an existing database to connect to for CREATE/DROP DATABASE (loopback only)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--log-dir", type=Path, help="keep the process logs here")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "rounds", "processes", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C (even when started from a shell that ignores it, as `cmd &` does) and SIGTERM
    # both end in the clean-up below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with tempfile.TemporaryDirectory(prefix="genrelay-bench-") as tmp:
        tmp_dir = Path(tmp)
        log_dir = args.log_dir or tmp_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        processes = Processes(log_dir)
        stop = threading.Event()
        try:
            with fresh_database(args.database, tmp_dir, args.postgres_url) as (db_url, db_desc):
                try:
                    report = run(args, processes, tmp_dir, db_url, db_desc, stop)
                finally:
                    stop.set()
                    signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the clean-up
                    processes.stop_all()
                report["logs"] = {
                    name: scan_log(processes.log_path(name)) for name in ("genrelay", "forwarder")
                }
        except BenchError as exc:
            print(f"\nbenchmark failed: {exc}\n\n{processes.logs()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; every process stopped", file=sys.stderr)
            return 130
    print_report(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON report: {args.json_out}")
    return 0


def run(
    args: argparse.Namespace,
    processes: Processes,
    tmp_dir: Path,
    db_url: str,
    db_desc: str,
    stop: threading.Event,
) -> dict[str, Any]:
    """Measure with a GCS emulator running: genrelay needs a bucket to be ready (/readyz)."""
    from service.gcs_emulator import FakeGcsServer

    with FakeGcsServer(backend="memory") as gcs:
        gcs.create_bucket(BENCH_BUCKET)
        return _run(args, processes, tmp_dir, db_url, db_desc, stop, gcs_url=gcs.url)


BENCH_BUCKET = "genrelay-bench"


def _run(
    args: argparse.Namespace,
    processes: Processes,
    tmp_dir: Path,
    db_url: str,
    db_desc: str,
    stop: threading.Event,
    *,
    gcs_url: str,
) -> dict[str, Any]:
    sim_port, genrelay_port, forwarder_port = free_port(), free_port(), free_port()
    sim_url = f"http://{LOOPBACK}:{sim_port}"
    genrelay_url = f"http://{LOOPBACK}:{genrelay_port}"
    forwarder_url = f"http://{LOOPBACK}:{forwarder_port}"
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
        "GENRELAY_GCS_BUCKET": BENCH_BUCKET,
        "STORAGE_EMULATOR_HOST": gcs_url,
        "GENRELAY_RATE_LIMIT": "0",
        "PORT": str(genrelay_port),
        "XDG_RUNTIME_DIR": str(runtime["genrelay"]),
    }
    forwarder_env = {
        **shared,
        "PORT": str(forwarder_port),
        "XDG_RUNTIME_DIR": str(runtime["forwarder"]),
    }

    print(f"database: {db_desc}; migrating and creating a key", flush=True)
    run_command([GENRELAY, "migrate"], genrelay_env)
    api_key = run_command([GENRELAY, "keys", "create", "bench"], genrelay_env).strip()
    if not api_key or "\n" in api_key:
        raise BenchError("genrelay keys create did not print a key alone on stdout")

    processes.start(
        "simulator",
        [
            GENRELAY,
            "simulator",
            "--host",
            LOOPBACK,
            "--port",
            str(sim_port),
            "--api-key",
            SIMULATOR_KEY,
            "--processing-time",
            "5",
            "--concurrency-limit",
            "1000000",
            "--log-level",
            "WARNING",
        ],
        shared,
    )
    wait_until(
        lambda: requests.get(f"{sim_url}/_sim/health", timeout=1).ok, processes, "the simulator"
    )
    processes.start("genrelay", [GENRELAY, "serve"], genrelay_env)
    processes.start(
        "forwarder",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:service.gunicorn_conf",
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
    facts = machine_facts(args, db_desc)
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
