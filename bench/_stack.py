"""Shared helpers of ``bench/scale.py`` and ``bench/large_table.py``.

Not a benchmark itself. The process handling, the throwaway PostgreSQL database, the
percentiles and the log scan come from the existing benchmarks (``completion.py`` and
``intake.py``) and are re-exported here; what is new:

- ``CpuProbe``: CPU seconds of named groups of processes (a process tree, the PostgreSQL
  backends of one database, the whole PostgreSQL server) and of the machine, from
  ``/proc/<pid>/stat`` (utime + stime of the processes alive at each snapshot) and
  ``/proc/stat``, between two snapshots.
- ``closed_loop``: C client threads, each with its own keep-alive ``requests.Session``, sending
  N requests built by a callback; every latency and outcome recorded.
- ``Database``: an autocommit psycopg connection to the benchmark's database (loopback only).
- ``start_simulator``, ``wait_for_log`` and ``machine_facts``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import requests
from completion import (
    BenchError,
    Processes,
    base_env,
    free_port,
    run_command,
    scan_log,
    wait_until,
)
from intake import (
    DEFAULT_POSTGRES_URL,
    GENRELAY,
    LOOPBACK,
    LOOPBACK_NAMES,
    SIMULATOR_KEY,
    fresh_database,
    percentile,
)
from intake import BenchError as IntakeBenchError

__all__ = [
    "BENCH_ERRORS",
    "DEFAULT_POSTGRES_URL",
    "GENRELAY",
    "LOOPBACK",
    "SIMULATOR_KEY",
    "BenchError",
    "CpuProbe",
    "CpuSnapshot",
    "Database",
    "LoadResult",
    "PidSource",
    "Processes",
    "WaitSampler",
    "base_env",
    "closed_loop",
    "free_port",
    "fresh_database",
    "latency_stats",
    "machine_busy",
    "machine_facts",
    "own_process",
    "percentile",
    "run_command",
    "scan_log",
    "start_simulator",
    "tree_of",
    "wait_for_log",
    "wait_until",
]

# Both modules define their own BenchError: catch either.
BENCH_ERRORS: tuple[type[Exception], ...] = (BenchError, IntakeBenchError)

CLIENT_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds, for every benchmark request
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if the pid is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return text.rsplit(")", 1)[1].split()


def process_cpu(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds (None if it is gone).

    cutime/cstime are left out on purpose: a child's whole lifetime is added to them when it
    is reaped, so a PostgreSQL backend of another session that exits in the window would add
    minutes of CPU spent before it.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive right now."""
    seen: list[int] = []
    todo = [pid]
    while todo and len(seen) < 10_000:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return seen


def machine_busy() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK


PidSource = Callable[[], Iterable[int]]


def process_name(pid: int) -> str:
    """A short name: the command and its first argument, or the kernel thread's name."""
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        words = [p.decode(errors="replace") for p in parts if p]
    except OSError:
        return "?"
    if not words:
        with contextlib.suppress(OSError):
            return "[" + Path(f"/proc/{pid}/comm").read_text().strip() + "]"
        return "?"
    if words[0].startswith("postgres:"):  # a backend's title: "postgres: 15/main: user db ..."
        title = words[0].split()
        return " ".join(title[:5]) if len(title) > 4 else words[0]
    head = [Path(words[0]).name] + [Path(w).name for w in words[1:3] if not w.startswith("-")]
    return " ".join(head)[:60]


def all_processes() -> dict[int, tuple[str, float]]:
    """Name and CPU seconds (utime + stime) of every process on the machine."""
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            seconds = process_cpu(int(entry.name))
            if seconds is not None:
                found[int(entry.name)] = (process_name(int(entry.name)), seconds)
    return found


@dataclasses.dataclass
class CpuSnapshot:
    at: float  # time.monotonic()
    groups: dict[str, dict[int, float]]  # group -> pid -> CPU seconds
    machine: float
    everyone: dict[int, tuple[str, float]]  # every process on the machine: name, seconds


class CpuProbe:
    """CPU seconds used by named groups of processes between two snapshots.

    Each group is a function returning its pids at snapshot time. A pid seen in both
    snapshots contributes its difference, a new pid all of its time (it started in between),
    a pid that exited in between nothing (short-lived processes, such as PostgreSQL's
    parallel query workers, are missed; the machine's busy time still has them).
    """

    def __init__(self, groups: dict[str, PidSource]) -> None:
        self.groups = groups

    def snapshot(self) -> CpuSnapshot:
        taken: dict[str, dict[int, float]] = {}
        for name, source in self.groups.items():
            pids: dict[int, float] = {}
            try:
                found = list(source())
            except Exception:  # a group whose process is gone (or a failed query): empty
                found = []
            for pid in found:
                seconds = process_cpu(pid)
                if seconds is not None:
                    pids[pid] = seconds
            taken[name] = pids
        return CpuSnapshot(time.monotonic(), taken, machine_busy(), all_processes())

    @staticmethod
    def delta(before: CpuSnapshot, after: CpuSnapshot, top: int = 6) -> dict[str, Any]:
        """{"wall_s", "machine_s", "groups": {name: cpu seconds}, "others": {process name:
        cpu seconds}} between two snapshots; "others" are the busiest processes that belong
        to no group (other users of the machine), alive at the second snapshot."""
        groups: dict[str, float] = {}
        ours: set[int] = set()
        for name, pids in after.groups.items():
            earlier = before.groups.get(name, {})
            groups[name] = round(sum(s - earlier.get(pid, 0.0) for pid, s in pids.items()), 3)
            ours |= set(pids) | set(earlier)
        others: dict[str, float] = {}
        for pid, (name, seconds) in after.everyone.items():
            used = seconds - before.everyone.get(pid, (name, 0.0))[1]
            if pid not in ours and used > 0:
                others[name] = others.get(name, 0.0) + used
        ranked = sorted(others.items(), key=lambda kv: -kv[1])[:top]
        return {
            "wall_s": round(after.at - before.at, 3),
            "machine_s": round(after.machine - before.machine, 3),
            "groups": groups,
            "others": {name: round(s, 3) for name, s in ranked},
        }


def tree_of(process: Any) -> PidSource:
    """The pids of a Popen's process tree (gunicorn master and workers, ...)."""

    def pids() -> list[int]:
        if process is None or process.poll() is not None:
            return []
        return process_tree(int(process.pid))

    return pids


def own_process() -> list[int]:
    return [os.getpid()]


# -- PostgreSQL ----------------------------------------------------------------------------


class Database:
    """An autocommit psycopg connection to one benchmark database (loopback only)."""

    def __init__(self, sqlalchemy_url: str, application_name: str = "genrelay-bench") -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(sqlalchemy_url)
        if url.host not in LOOPBACK_NAMES:
            raise BenchError(f"refusing a non-loopback PostgreSQL host: {url.host}")
        self.name = str(url.database)
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.conn = psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, application_name=application_name
        )
        self.backend_pid = int(self.scalar("SELECT pg_backend_pid()"))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        cursor = self.conn.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []

    def scalar(self, sql: str, params: Any = None) -> Any:
        found = self.rows(sql, params)
        return found[0][0] if found else None

    def execute(self, sql: str, params: Any = None) -> int:
        """Run a statement; the number of rows it touched."""
        return int(self.conn.execute(sql, params).rowcount)

    def backends(self) -> list[int]:
        """Backends connected to this database, except this connection's own."""
        return [
            int(pid)
            for (pid,) in self.rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
                (self.name, self.backend_pid),
            )
        ]

    def postmaster(self) -> list[int]:
        """Every process of the PostgreSQL server (other databases' backends included)."""
        postmaster = parent_pid(self.backend_pid)
        return [] if postmaster is None else process_tree(postmaster)

    def wal(self) -> dict[str, float]:
        """The server's WAL position and counters, and its checkpoints so far: cluster-wide,
        so other databases' writes count too. pg_stat_wal lags: backends flush their
        counters at most once a second (and idle ones later); the LSN does not lag."""
        records, fpi, size, lsn = self.rows(
            "SELECT wal_records, wal_fpi, wal_bytes, pg_current_wal_lsn() - '0/0'::pg_lsn "
            "FROM pg_stat_wal"
        )[0]
        checkpoints = self.scalar(
            "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
        )
        return {
            "records": float(records),
            "fpi": float(fpi),
            "bytes": float(size),
            "lsn": float(lsn),
            "checkpoints": float(checkpoints),
        }

    def settings(self) -> dict[str, str]:
        names = (
            "server_version",
            "shared_buffers",
            "work_mem",
            "synchronous_commit",
            "max_connections",
            "max_parallel_workers_per_gather",
            "checkpoint_timeout",
            "max_wal_size",
            "full_page_writes",
        )
        return {name: str(self.scalar(f"SHOW {name}")) for name in names}


class WaitSampler:
    """What the database's client backends are doing, sampled from pg_stat_activity.

    Every ``interval`` seconds, each client backend of the database (but the benchmark's own)
    is counted under its state and wait event: ``active`` with no wait event is running on a
    CPU (or queued for one), ``active Lock/...`` waits for a row or transaction lock,
    ``active LWLock/WALWrite`` or ``IO/WALSync`` waits for a commit to reach the disk,
    ``idle in transaction`` waits for the application between two statements. ``averages``
    divides the counts by the number of samples: the mean number of backends in each state.
    """

    def __init__(self, db: Database, interval: float = 0.05) -> None:
        self.db = db
        self.interval = interval
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wait-sampler", daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rows = self.db.rows(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> %s AND backend_type = 'client backend'",
                    (self.db.name, self.db.backend_pid),
                )
            except Exception:  # the database is going away: stop sampling
                return
            self.samples += 1
            for state, kind, event in rows:
                if state == "idle":
                    continue
                wait = (
                    f" {kind}/{event}"
                    if kind and not (state == "idle in transaction" and event == "ClientRead")
                    else ""
                )
                self.counts[f"{state}{wait}"] += 1

    def averages(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {k: round(n / self.samples, 3) for k, n in self.counts.most_common()}


# -- processes -----------------------------------------------------------------------------


def start_simulator(
    processes: Processes, env: dict[str, str], processing_time: float, name: str = "simulator"
) -> str:
    """``genrelay simulator`` that never answers 429; its base URL once it answers."""
    port = free_port()
    argv = [GENRELAY, "simulator", "--host", LOOPBACK, "--port", str(port)]
    argv += ["--api-key", SIMULATOR_KEY, "--processing-time", str(processing_time)]
    argv += ["--concurrency-limit", "1000000", "--log-level", "WARNING"]
    processes.start(name, argv, env)
    url = f"http://{LOOPBACK}:{port}"
    wait_until(lambda: requests.get(f"{url}/_sim/health", timeout=1).ok, processes, name)
    return url


def wait_for_log(processes: Processes, name: str, text: str) -> None:
    """Until ``text`` appears in the log of ``name`` (bounded; fails if a child dies)."""
    wait_until(
        lambda: text in processes.log_path(name).read_text(errors="replace"), processes, name
    )


# -- load ----------------------------------------------------------------------------------

Send = Callable[[requests.Session, int], requests.Response]
Check = Callable[[int, requests.Response], str | None]


@dataclasses.dataclass
class LoadResult:
    """N requests sent by C client threads."""

    wall: float  # seconds from releasing the threads to the last answer
    started_at: float  # time.time() when the threads were released
    latencies: list[float]  # seconds, one per request
    ended_at: list[float]  # time.time() at each answer
    outcomes: collections.Counter[str]  # "202", "500", "ReadTimeout", "bad: ..." ...

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.outcomes.items() if not (k.isdigit() and k[0] == "2"))


def closed_loop(
    total: int, concurrency: int, send: Send, stop: threading.Event, check: Check | None = None
) -> LoadResult:
    """Send ``total`` requests from ``concurrency`` threads: ``send(session, i)`` makes
    request i (with a timeout); ``check(i, response)`` may turn a 2xx into a named failure."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    ended: list[float] = []
    outcomes: collections.Counter[str] = collections.Counter()
    barrier = threading.Barrier(concurrency + 1)

    def client() -> None:
        nonlocal issued
        mine: list[float] = []
        my_ends: list[float] = []
        my_outcomes: collections.Counter[str] = collections.Counter()
        with requests.Session() as session:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=30)
            while not stop.is_set():
                with lock:
                    if issued >= total:
                        break
                    number = issued
                    issued += 1
                began = time.perf_counter()
                try:
                    response = send(session, number)
                    outcome = str(response.status_code)
                    if check is not None and response.ok:
                        outcome = check(number, response) or outcome
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                mine.append(time.perf_counter() - began)
                my_ends.append(time.time())
                my_outcomes[outcome] += 1
        with lock:
            latencies.extend(mine)
            ended.extend(my_ends)
            outcomes.update(my_outcomes)

    threads = [
        threading.Thread(target=client, name=f"client-{n}", daemon=True) for n in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=30)
    began, started_at = time.perf_counter(), time.time()
    # Every request is bounded by CLIENT_TIMEOUT, so every thread is bounded too.
    deadline = time.monotonic() + total * sum(CLIENT_TIMEOUT) / concurrency + 120
    for thread in threads:
        while thread.is_alive():
            if time.monotonic() > deadline:
                stop.set()
                raise BenchError(f"{total} requests did not finish in time")
            thread.join(timeout=0.5)  # short joins keep Ctrl-C responsive
    return LoadResult(time.perf_counter() - began, started_at, latencies, ended, outcomes)


def latency_stats(latencies: list[float]) -> dict[str, float]:
    """n, mean, p50, p90, p99 and max in milliseconds (nearest-rank percentiles)."""
    ordered = sorted(latencies)
    if not ordered:
        return {"n": 0, "mean_ms": math.nan, "p50_ms": math.nan, "p90_ms": math.nan,
                "p99_ms": math.nan, "max_ms": math.nan}  # fmt: skip
    return {
        "n": len(ordered),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
        "p50_ms": round(percentile(ordered, 50) * 1000, 2),
        "p90_ms": round(percentile(ordered, 90) * 1000, 2),
        "p99_ms": round(percentile(ordered, 99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


# -- report --------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model,
        "memory": memory,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
