"""Shared helpers of the benchmark scripts (``intake.py``, ``completion.py``, ``deliveries.py``,
``soak.py``, ``scale.py``, ``large_table.py``).

Not a benchmark itself. Every script imports from here, never from another script:

- Set-up: the paths, ``genrelay`` and the simulator's key, the seed's text-only body,
  ``BenchError``, ``base_env``, ``run_command``, ``prepare_database`` (migrate and an API key),
  ``fresh_database`` (a SQLite file or a throwaway PostgreSQL database) and ``free_port``.
- ``Processes``: child processes in their own sessions, one log file each (or one per
  incarnation, for the soak's restarts), checked for early exits, stopped with SIGTERM and then
  SIGKILL of their process groups; ``wait_until``, ``wait_for_log`` and ``start_simulator``.
- A script's ``main``: ``add_common_options`` (``--postgres-url``, ``--json-out``,
  ``--log-dir``), ``require_positive``, ``handle_signals``, ``work_dirs``, ``clean_up``,
  ``failed``, ``interrupted`` and ``finish`` (print the report, write it as JSON). ``Context`` and
  ``shared_stack``: the simulator and fake-gcs-server that every run of ``scale.py`` and
  ``large_table.py`` shares.
- ``proc_status``, ``reset_peak_rss`` and ``TreeRssSampler``: memory of processes from
  ``/proc/<pid>/status`` (VmRSS, VmHWM).
- ``CpuProbe``: CPU seconds of named groups of processes (a process tree, the PostgreSQL
  backends of one database, the whole PostgreSQL server) and of the machine, from
  ``/proc/<pid>/stat`` (utime + stime of the processes alive at each snapshot) and
  ``/proc/stat``, between two snapshots; ``process_cpu`` and ``machine_busy`` alone.
- ``Database``: an autocommit psycopg connection to the benchmark's database (loopback only);
  ``WaitSampler``, what its client backends wait for (a ``Sampler``: a thread in a ``with``).
- ``closed_loop``: C client threads, each with its own keep-alive ``requests.Session``, sending
  N requests built by a callback; every latency and outcome recorded. ``percentile`` and
  ``latency_stats``.
- ``scan_log`` and ``print_log_scan``: counts and first lines of the log lines worth a look;
  ``machine_facts``.
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
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Self

import requests

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
GENRELAY = str(Path(sys.executable).parent / "genrelay")
SIMULATOR_KEY = "sim-key"
LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

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

# The simulator's concurrency limit unless a script asks for another: never a 429 for too many
# jobs. Scripts that measure intake or throughput, not the line, tell genrelay the same limit
# (GENRELAY_UPSTREAM_CONCURRENCY): it would otherwise learn it from 2 upwards and keep
# generations waiting (`queued`, not forwarded inline) meanwhile.
SIMULATOR_LIMIT = 1_000_000

CLIENT_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds, for every benchmark request
SETUP_TIMEOUT = 120.0  # migrate, keys create
START_TIMEOUT = 60.0  # until a process answers
STOP_TIMEOUT = 25.0  # SIGTERM grace before SIGKILL (gunicorn's graceful_timeout is 20)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark could not run; the message says why (process logs are printed too)."""


# -- set-up --------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """Our environment without any genrelay, Prometheus or GCS setting, so the children get
    only the benchmark's."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GENRELAY_", "PROMETHEUS_"))
        and k not in ("PORT", "STORAGE_EMULATOR_HOST")
    }


def run_command(argv: list[str], env: dict[str, str]) -> str:
    """Run a set-up command to completion; its stdout, or BenchError with its output."""
    done = subprocess.run(
        argv, env=env, cwd=REPO_DIR, capture_output=True, text=True, timeout=SETUP_TIMEOUT
    )
    if done.returncode != 0:
        raise BenchError(
            f"{' '.join(argv[1:])} exited {done.returncode}:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def prepare_database(env: dict[str, str], tenant: str = "bench") -> str:
    """``genrelay migrate`` and ``genrelay keys create TENANT``; the new API key."""
    run_command([GENRELAY, "migrate"], env)
    api_key = run_command([GENRELAY, "keys", "create", tenant], env).strip()
    if not api_key or "\n" in api_key:
        raise BenchError("genrelay keys create did not print a key alone on stdout")
    return api_key


@contextlib.contextmanager
def fresh_database(
    kind: str,
    tmp_dir: Path,
    admin_url: str,
    *,
    name: str = "genrelay-bench",
    settings: tuple[str, ...] = (),
) -> Iterator[tuple[str, str]]:
    """A new, empty database: (GENRELAY_DATABASE_URL, description); dropped afterwards.

    SQLite: ``<name>.db`` in ``tmp_dir``. PostgreSQL: ``<name>_<random>`` made through
    ``admin_url`` (loopback only); the description names the server's version and the
    ``settings`` asked for (``SHOW`` names).
    """
    if kind == "sqlite":
        import sqlite3

        path = tmp_dir / f"{name}.db"
        yield f"sqlite:///{path}", f"sqlite {sqlite3.sqlite_version} (file in {tmp_dir})"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    if url.host not in LOOPBACK_NAMES:
        raise BenchError(f"refusing a non-loopback PostgreSQL host: {url.host}")
    database = f"{name.replace('-', '_')}_{secrets.token_hex(4)}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        shown = {}
        for setting in ("server_version", *settings):
            row = conn.execute(f"SHOW {setting}").fetchone()
            shown[setting] = str(row[0]) if row else "?"
        conn.execute(f'CREATE DATABASE "{database}"')
    version = shown.pop("server_version")
    details = "; " + ", ".join(f"{k}={v}" for k, v in shown.items()) if shown else ""
    try:
        target = url.set(drivername="postgresql+psycopg", database=database)
        yield (
            target.render_as_string(hide_password=False),
            f"postgresql {version} ({database}{details})",
        )
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        print(f"dropped database {database}", flush=True)


def free_port() -> int:
    """A free loopback TCP port below the ephemeral range.

    A server may be stopped and started again on its port (the soak's GCS windows and kills).
    A port from the ephemeral range could meanwhile be taken as the local port of some outgoing
    connection, and the restart would fail; ports below the range are only ever taken on
    purpose.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# -- processes -----------------------------------------------------------------------------


class Processes:
    """Child processes, each in its own session (Ctrl-C reaches only us), logs in files.

    A name can be started again once it was stopped or killed (the soak restarts the web
    process and the worker): each start is an incarnation, and ``children`` holds the latest.
    With ``numbered_logs`` every incarnation logs to ``<name>-<n>.log`` (n from 0), else to
    ``<name>.log``. Safe to use from several threads.
    """

    def __init__(self, log_dir: Path, *, numbered_logs: bool = False) -> None:
        self.log_dir = log_dir
        self.numbered_logs = numbered_logs
        self.children: dict[str, subprocess.Popen[bytes]] = {}  # the latest incarnations
        self.started: list[subprocess.Popen[bytes]] = []  # every incarnation
        self.incarnations: collections.Counter[str] = collections.Counter()
        self.stopped: set[str] = set()  # stopped or killed on purpose: not a crash
        self._lock = threading.Lock()

    def log_path(self, name: str, incarnation: int | None = None) -> Path:
        """The log of the latest (or the given) incarnation of ``name``."""
        if not self.numbered_logs:
            return self.log_dir / f"{name}.log"
        n = self.incarnations[name] - 1 if incarnation is None else incarnation
        return self.log_dir / f"{name}-{n}.log"

    def logs_of(self, name: str) -> list[Path]:
        """The logs of every incarnation of ``name``, oldest first."""
        paths = [self.log_path(name, n) for n in range(self.incarnations[name])]
        return list(dict.fromkeys(paths))

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self._lock:
            self.incarnations[name] += 1
            with self.log_path(name).open("wb") as log:
                process = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=REPO_DIR,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.children[name] = process
            self.started.append(process)
            self.stopped.discard(name)
            return process

    def check_alive(self, names: Collection[str] | None = None) -> None:
        """BenchError if a child (of ``names``; all by default) exited without being stopped."""
        with self._lock:
            items = [
                (n, p)
                for n, p in self.children.items()
                if n not in self.stopped and (names is None or n in names)
            ]
        dead = {n: p.returncode for n, p in items if p.poll() is not None}
        if dead:
            raise BenchError(f"process exited early: {dead}")

    def logs(self, tail: int = 4000) -> str:
        """The end of every child's latest log, for a failure message."""
        parts = []
        for name in list(self.children):
            path = self.log_path(name)
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name} (last {tail} characters) ---\n{text[-tail:]}")
        return "\n".join(parts)

    def kill(self, name: str) -> None:
        """SIGKILL the process group of ``name`` (a gunicorn master and its workers) at once."""
        with self._lock:
            process = self.children[name]
            self.stopped.add(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, name: str) -> int | None:
        """SIGTERM one child, wait up to STOP_TIMEOUT, then SIGKILL its group; its exit code."""
        with self._lock:
            process = self.children[name]
            self.stopped.add(name)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s: killing", flush=True)
        self._kill_group(process)
        return process.returncode

    def stop_all(self) -> None:
        """SIGTERM every running child, wait, then SIGKILL the group of every incarnation."""
        with self._lock:
            running = [(n, p) for n, p in self.children.items() if p.poll() is None]
            started = list(self.started)
            self.stopped.update(self.children)
        for _, process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s: killing", flush=True)
        for process in started:
            self._kill_group(process)

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes]) -> None:
        # The group id is the child's pid (start_new_session); it also holds the gunicorn
        # workers, which must not outlive a killed master.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


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


def wait_for_log(processes: Processes, name: str, text: str) -> None:
    """Until ``text`` appears in the log of ``name`` (bounded; fails if a child dies)."""
    wait_until(
        lambda: text in processes.log_path(name).read_text(errors="replace"), processes, name
    )


def start_simulator(
    processes: Processes,
    env: dict[str, str],
    processing_time: float,
    name: str = "simulator",
    **knobs: object,
) -> str:
    """``genrelay simulator`` on a free port; its base URL once it answers.

    Each knob is a flag (``failure_rate=0.1``: ``--failure-rate 0.1``). The concurrency limit
    is 1000000 (never a 429 for too many jobs) unless ``concurrency_limit`` says otherwise.
    """
    port = free_port()
    argv = [GENRELAY, "simulator", "--host", LOOPBACK, "--port", str(port)]
    argv += ["--api-key", SIMULATOR_KEY, "--log-level", "WARNING"]
    knobs = {"processing_time": processing_time, "concurrency_limit": SIMULATOR_LIMIT, **knobs}
    for knob, value in knobs.items():
        argv += [f"--{knob.replace('_', '-')}", str(value)]
    processes.start(name, argv, env)
    url = f"http://{LOOPBACK}:{port}"
    wait_until(lambda: requests.get(f"{url}/_sim/health", timeout=1).ok, processes, name)
    return url


# -- a script's main -----------------------------------------------------------------------


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def handle_signals() -> None:
    """Ctrl-C (even when started from a shell that ignores it, as ``cmd &`` does) and SIGTERM
    both raise KeyboardInterrupt, so every clean-up runs."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)


@contextlib.contextmanager
def work_dirs(keep: Path | None) -> Iterator[tuple[Path, Path]]:
    """(temp dir, log dir): the temp dir is deleted afterwards; the logs go to ``keep`` (the
    script's ``--log-dir``) if given, else into the temp dir."""
    with tempfile.TemporaryDirectory(prefix="genrelay-bench-") as tmp:
        tmp_dir = Path(tmp)
        log_dir = keep or tmp_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        yield tmp_dir, log_dir


def postgres_url_from_env() -> str:
    """GENRELAY_TEST_POSTGRES_URL (the test suite's server), else DEFAULT_POSTGRES_URL."""
    return os.environ.get("GENRELAY_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def add_common_options(
    parser: argparse.ArgumentParser,
    *,
    postgres_url: str | None = None,
    logs: str = "the process logs",
) -> None:
    """``--postgres-url`` (if the script takes one: its default), ``--json-out``, ``--log-dir``."""
    if postgres_url is not None:
        parser.add_argument(
            "--postgres-url",
            default=postgres_url,
            help="an existing database used only to CREATE/DROP DATABASE (loopback only)",
        )
    parser.add_argument("--json-out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--log-dir", type=Path, help=f"keep {logs} here")


def require_positive(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]
) -> None:
    """``parser.error`` unless each of these options is at least 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def clean_up(processes: Processes, stop: threading.Event | None = None) -> None:
    """Set ``stop`` and stop every process, SIGINT ignored meanwhile: a second Ctrl-C cannot
    cut the clean-up short."""
    if stop is not None:
        stop.set()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes.stop_all()


def failed(exc: BaseException, processes: Processes) -> int:
    """Say why the benchmark could not run, with the ends of the process logs; exit status 1."""
    print(f"\nbenchmark failed: {exc}\n\n{processes.logs()}", file=sys.stderr)
    return 1


def interrupted(what: str = "every process stopped") -> int:
    """Say that Ctrl-C or SIGTERM ended the run; exit status 130."""
    print(f"\ninterrupted; {what}", file=sys.stderr)
    return 130


def finish(
    report: dict[str, Any],
    print_report: Callable[[dict[str, Any]], None],
    json_out: Path | None,
    **json_options: Any,
) -> int:
    """Print the report, write it as JSON to ``json_out`` if given; exit status 0."""
    print_report(report)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2, **json_options) + "\n")
        print(f"\nJSON report: {json_out}")
    return 0


@dataclasses.dataclass
class Context:
    """What every run of a script shares: options, directories, the processes that outlive a
    run (the simulator), fake-gcs-server, the stop event."""

    args: argparse.Namespace
    tmp_dir: Path
    log_dir: Path
    shared: Processes
    gcs: Any  # service.devtools.gcs_emulator.FakeGcsServer
    sim_url: str
    stop: threading.Event


@contextlib.contextmanager
def shared_stack(
    args: argparse.Namespace,
    tmp_dir: Path,
    log_dir: Path,
    shared: Processes,
    bucket: str,
    processing_time: float,
) -> Iterator[Context]:
    """fake-gcs-server (memory backend) with ``bucket``, and the simulator in ``shared``;
    on the way out ``clean_up``, then fake-gcs-server stopped."""
    from service.devtools.gcs_emulator import FakeGcsServer

    gcs = FakeGcsServer(backend="memory", log_path=log_dir / "gcs.log")
    stop = threading.Event()
    try:
        gcs.start()
        gcs.create_bucket(bucket)
        sim_url = start_simulator(shared, base_env(), processing_time)
        yield Context(args, tmp_dir, log_dir, shared, gcs, sim_url, stop)
    finally:
        clean_up(shared, stop)
        gcs.stop()


# -- memory --------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (and the other Vm* lines) of a process, in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Vm") and line.endswith(" kB"):
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); False where it is refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


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


class Sampler:
    """A daemon thread running ``_run`` while in a ``with`` block; ``_stop`` is set on the way
    out. ``began`` is ``time.monotonic()`` at the start."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.began = 0.0

    def __enter__(self) -> Self:
        self.began = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        raise NotImplementedError


class WaitSampler(Sampler):
    """What the database's client backends are doing, sampled from pg_stat_activity.

    Every ``interval`` seconds, each client backend of the database (but the benchmark's own)
    is counted under its state and wait event: ``active`` with no wait event is running on a
    CPU (or queued for one), ``active Lock/...`` waits for a row or transaction lock,
    ``active LWLock/WALWrite`` or ``IO/WALSync`` waits for a commit to reach the disk,
    ``idle in transaction`` waits for the application between two statements. ``averages``
    divides the counts by the number of samples: the mean number of backends in each state.
    """

    def __init__(self, db: Database, interval: float = 0.05) -> None:
        super().__init__("wait-sampler")
        self.db = db
        self.interval = interval
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0

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


class TreeRssSampler(Sampler):
    """VmRSS of a process tree (a gunicorn master and its workers) every ``interval`` s.

    ``peak_by_pid``: the largest sample of each process; ``peak_total``: the largest sum of
    one sample round. Samples miss spikes shorter than the interval: read VmHWM (after a
    ``reset_peak_rss``) for the true peak of one process.
    """

    def __init__(self, pids: Callable[[], Iterable[int]], interval: float = 0.05) -> None:
        super().__init__("tree-rss-sampler")
        self.pids = pids
        self.interval = interval
        self.peak_by_pid: dict[int, int] = {}
        self.peak_total = 0

    def _run(self) -> None:
        while True:
            total = 0
            for pid in self.pids():
                with contextlib.suppress(OSError, KeyError):
                    rss = proc_status(pid)["VmRSS"]
                    total += rss
                    self.peak_by_pid[pid] = max(self.peak_by_pid.get(pid, 0), rss)
            self.peak_total = max(self.peak_total, total)
            if self._stop.wait(self.interval):
                return


# -- load ----------------------------------------------------------------------------------

Send = Callable[[requests.Session, int], requests.Response]
Check = Callable[[int, requests.Response], str | None]


def is_2xx(outcome: str) -> bool:
    """Whether an outcome ("202", "500", "ReadTimeout", ...) is a 2xx answer."""
    return outcome.isdigit() and outcome.startswith("2")


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
        return sum(n for k, n in self.outcomes.items() if not is_2xx(k))


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


def percentile(ordered: list[float], p: float, empty: float = math.nan) -> float:
    """Nearest-rank percentile of an ascending list (``empty`` if there is nothing)."""
    if not ordered:
        return empty
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


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


# -- logs ----------------------------------------------------------------------------------

WARNING_OR_ERROR = re.compile(r'"severity": "(WARNING|ERROR|CRITICAL)"|\[(WARNING|ERROR)\]')
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")
DATABASE_LOCKED = re.compile(r"database is locked", re.IGNORECASE)
GUNICORN_TIMEOUT = re.compile(r"WORKER TIMEOUT|was sent SIGKILL", re.IGNORECASE)

# What is worth a look in the logs of genrelay serve and worker, the simulator, fake-gcs-server.
LOG_PATTERNS = {
    "warning_or_error": WARNING_OR_ERROR,
    "traceback": TRACEBACK,
    "task_retry": re.compile(r"attempt \d+ failed|crashed|is dead after"),
    "database_locked": DATABASE_LOCKED,
    "gunicorn_timeout": GUNICORN_TIMEOUT,
    "fake_gcs_error": re.compile(r'level=error|"level":"error"', re.IGNORECASE),
}


def scan_log(
    paths: Path | Iterable[Path],
    patterns: dict[str, re.Pattern[str]] = LOG_PATTERNS,
    *,
    excerpts: int = 3,
    width: int = 400,
    found_only: bool = False,
) -> dict[str, Any]:
    """Counts (and the first ``excerpts`` lines, cut at ``width``) of the lines of one log, or
    of several together, that match each pattern: {"counts", "samples"}. "counts" holds every
    pattern, or with ``found_only`` those that matched; "samples" those that matched."""
    counts: dict[str, int] = dict.fromkeys(patterns, 0)
    samples: dict[str, list[str]] = {name: [] for name in patterns}
    for path in [paths] if isinstance(paths, Path) else paths:
        if not path.exists():
            continue
        with path.open(errors="replace") as log:
            for line in log:
                for name, pattern in patterns.items():
                    if pattern.search(line):
                        counts[name] += 1
                        if len(samples[name]) < excerpts:
                            samples[name].append(line.rstrip()[:width])
    return {
        "counts": {k: v for k, v in counts.items() if v or not found_only},
        "samples": {k: v for k, v in samples.items() if v},
    }


def print_log_scan(title: str, scan: dict[str, Any], lines: int = 2) -> None:
    """``<title> log:`` the kinds of lines found (or "nothing unusual"), then the first
    ``lines`` of each kind."""
    found = {k: v for k, v in scan["counts"].items() if v}
    print(f"{title} log: {found or 'nothing unusual'}")
    for kind, samples in scan["samples"].items():
        for line in samples[:lines]:
            print(f"    [{kind}] {line}")


# -- report --------------------------------------------------------------------------------


def machine_facts(*, memory: bool = False) -> dict[str, Any]:
    """Date, nproc, CPU model (and with ``memory`` the RAM), load average, Python, platform."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    facts: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model,
    }
    if memory:
        facts["memory"] = ""
        with contextlib.suppress(OSError, IndexError, ValueError):
            kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
            facts["memory"] = f"{kib / 1024 / 1024:.1f} GiB"
    facts.update(
        {
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
    )
    return facts
