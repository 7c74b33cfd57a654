"""Fault-injection soak and crash test: N generations through the whole stack, with faults.

What runs (every process on 127.0.0.1, each in its own session, all stopped in ``finally``)
    ``genrelay serve`` (gunicorn) and ``genrelay worker`` on a fresh SQLite file or a
    PostgreSQL database; ``genrelay simulator`` (Deep-Image) with fault knobs; fake-gcs-server
    (``service.devtools.gcs_emulator.FakeGcsServer``, filesystem backend, so objects survive a
    restart);
    and a flaky webhook receiver, this script in receiver mode (``--receiver-port``) as a
    process of its own, so the driver's GIL does not slow what is measured. A subscription for
    all four event types points at the receiver (``/sub``); half of the generations also carry
    their own ``webhook`` (``/gen``, signed with the tenant's default secret).

Faults (defaults; ``Faults``)
    Simulator: upstream 5xx on 10 % of process calls, random 429 on 5 %, 2 % of process and
    result calls held 2 s (genrelay runs with ``GENRELAY_DEEPIMAGE_TIMEOUT=1``, so it sees a
    read timeout; a held process call still creates its job), 5 % of jobs fail, 10 % of
    callbacks sent twice, 10 % never sent. Receiver: 20 % of deliveries answered 500/502/503,
    decided by a seeded RNG per (webhook-id, attempt), at most 4 times per delivery (so each
    fits genrelay's 8-attempt schedule: faults stay within what the retries absorb). GCS:
    fake-gcs-server stopped for 2-3 s a few times and started again on the same port (one
    window per 20 s of load, at least 3). With ``--crash``: the worker and the web
    process (gunicorn master and workers: the process group) are SIGKILLed 10 times each, at
    random moments spread over the run, and restarted at once with the same settings;
    ``GENRELAY_TASK_LEASE=5`` lets a killed holder's tasks run again soon.

The driver
    Submits N generations open-loop at ``--rate`` per second from ``--concurrency`` threads,
    each with its own ``Idempotency-Key``; a POST that fails without an answer (the web process
    was killed) is sent again with the same key until it is answered. Meanwhile one thread
    polls random generations. Then it waits until every generation is terminal and no delivery
    is pending, and checks, through the API, the simulator's introspection, the bucket and the
    receiver's record:

    - terminal states: a generation whose recorded upstream job failed (the simulator's
      ``will_fail``) is ``failed`` with ``upstream_job_failed``; every other one ``succeeded``;
      exactly one generation per Idempotency-Key, none unaccounted for;
    - objects: exactly one object per succeeded generation, none for the others; the CRC32C
      of the bytes downloaded from the bucket = the object's = ``result.crc32c`` = the
      simulator's image for that job;
    - events: each generation has exactly its ``processing`` event and the one of its
      terminal status;
    - deliveries: every (event, target) has one delivery, delivered (2xx) at least once with a
      valid signature; no request with a bad signature; no delivery left dead or failed;
    - lifecycle order: per generation and target, the terminal event reaches the receiver only
      after the processing event was accepted there (genrelay sends a later event only once
      the earlier one left ``pending``);
    - no 5xx: none answered to the driver, none in the web access logs, none answered to the
      simulator's callbacks (a refused connection while the web process is down is not a 5xx;
      those are counted apart);
    - faults injected: as many kills and GCS windows happened as were planned;
    - responsive (with ``--crash``): around every kill, the web process answered ``/healthz``
      and the worker started within 30 s (a process that does not answer is killed anyway);
    - settled: everything finished within ``drain_timeout`` of the last submission (default
      120 s + N/10 s); the submission phase itself is cut off after max(120 s, 4 N/rate).
    A request whose body stops short (its sender was SIGKILLed mid-send) is dropped by the
    receiver as any server would, recorded as incomplete, and not taken for a bad signature.

    The report gives the throughput (generations / (last completion - first submission)),
    time to terminal (first POST attempt -> ``completed_at``, p50/p90/p99/max), the faults
    actually injected (simulator stats, receiver counts, GCS windows, kills), upstream jobs per
    generation (a timed-out or killed submit can leave an extra job upstream: expected, not a
    failure), each invariant PASS/FAIL with counts and the first violations, and noteworthy log
    lines. The exit status is 0 only if every invariant holds.

Run from the repository root:

    .venv/bin/python bench/soak.py [--generations 2000] [--database sqlite|postgresql]
        [--crash] [--seed 1] [--rate 15] [--json-out FILE] [--log-dir DIR]

The test suite imports it: ``run_soak(SoakConfig(...)) -> SoakReport`` (``report.violations``).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote, urlsplit

import requests

# The shared helpers sit next to this file; the test suite imports it as bench.soak.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
from _stack import (
    DATABASE_LOCKED,
    DEFAULT_POSTGRES_URL,
    GENRELAY,
    LOOPBACK,
    SIMULATOR_KEY,
    BenchError,
    Processes,
    add_common_options,
    base_env,
    free_port,
    fresh_database,
    handle_signals,
    percentile,
    postgres_url_from_env,
    prepare_database,
    scan_log,
    start_simulator,
    wait_until,
)

BUCKET = "genrelay-soak"
EVENT_TYPES = (
    "generation.processing",
    "generation.succeeded",
    "generation.failed",
    "generation.canceled",
)
TERMINAL = ("succeeded", "failed", "canceled")
TARGETS = ("sub", "gen")  # receiver paths: the subscription, the generations' own webhook
CALLBACK_PATH = re.compile(r"/v1/callbacks/deepimage/([^/?#]+)/")

API_TIMEOUT = (3.0, 30.0)  # (connect, read) seconds of every call to genrelay
SIM_TIMEOUT = (3.0, 30.0)
READY_TIMEOUT = 30.0  # until a restarted process answers again
SUBMIT_DEADLINE = 180.0  # how long one generation's POST is retried without an answer
RETRY_PAUSE = 0.2  # between POST retries after a connection error
POLL_EVERY = 0.1  # the poller's pace
# The receiver fails one delivery at most this many times (then accepts it), so every delivery
# fits genrelay's 8-attempt retry schedule: without a cap, 8 failures in a row (0.2^8 per
# delivery) would kill about one delivery in a 2000-generation run, a fault beyond the budget.
RECEIVER_MAX_FAILURES = 4
SHOWN_VIOLATIONS = 10


# The soak could not run (a process did not start, a deadline passed): not a finding.
SoakError = BenchError


# -- configuration -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Faults:
    """What is injected, and how often."""

    upstream_error_rate: float = 0.10
    rate_limit_rate: float = 0.05
    timeout_rate: float = 0.02
    failure_rate: float = 0.05
    duplicate_callback_rate: float = 0.10
    lost_callback_rate: float = 0.10
    receiver_error_rate: float = 0.20
    # fake-gcs-server stopped this many times (None: one per 20 s of the run, at least 3)...
    gcs_windows: int | None = None
    # ... for a random time in this range (seconds).
    gcs_window_seconds: tuple[float, float] = (2.0, 3.0)
    # SIGKILLs of the worker and of the web process each, when crashing.
    kills: int = 10


@dataclasses.dataclass
class SoakConfig:
    """One soak run. Defaults are the CLI's."""

    generations: int = 2000
    database: str = "sqlite"  # "sqlite" or "postgresql"
    # An existing, empty PostgreSQL database (the test suite's); None: a fresh one is made
    # (SQLite: a file in the work dir; PostgreSQL: CREATE DATABASE through postgres_admin_url).
    database_url: str | None = None
    postgres_admin_url: str = DEFAULT_POSTGRES_URL
    crash: bool = False
    seed: int = 1
    rate: float = 15.0  # generations submitted per second (open loop)
    concurrency: int = 8  # submitting threads
    webhook_share: float = 0.5  # generations that also carry their own `webhook`
    faults: Faults = dataclasses.field(default_factory=Faults)
    web_processes: int = 2
    web_threads: int = 8
    worker_threads: int = 4
    worker_poll_interval: float = 0.2
    task_lease: float = 5.0  # GENRELAY_TASK_LEASE
    deepimage_timeout: float = 1.0  # GENRELAY_DEEPIMAGE_TIMEOUT (read timeout)
    sim_timeout_seconds: float = 2.0  # how long the simulator holds a "timed out" answer
    processing_time: float = 0.5  # simulated job duration
    reconcile_after: float = 2.0  # GENRELAY_RECONCILE_AFTER
    retry_schedule: str = "0,0.5,1,2,4,8,8,8"  # GENRELAY_WEBHOOK_RETRY_SCHEDULE
    # Seconds allowed after the last submission for everything to settle (None: 120 + N/10).
    drain_timeout: float | None = None
    # Where logs and files go (kept); None: a temp dir, deleted unless the run failed.
    work_dir: Path | None = None
    progress: Callable[[str], None] | None = print

    def settle_timeout(self) -> float:
        return self.drain_timeout if self.drain_timeout is not None else 120 + self.generations / 10

    def submit_seconds(self) -> float:
        return self.generations / self.rate

    def submit_phase_limit(self) -> float:
        """Seconds after which the generations not yet submitted are given up."""
        return max(120.0, 4 * self.submit_seconds())

    def fault_window(self) -> tuple[float, float]:
        """Seconds after the first submission within which kills and GCS windows happen."""
        span = self.submit_seconds()
        return 0.5, max(2.0, span * 1.2)

    def gcs_windows(self) -> int:
        if self.faults.gcs_windows is not None:
            return self.faults.gcs_windows
        start, end = self.fault_window()
        return max(3, int((end - start) // 20))

    def public(self) -> dict[str, Any]:
        """The settings as shown in the report (no URLs with credentials)."""
        return {
            "generations": self.generations,
            "database": self.database,
            "crash": self.crash,
            "seed": self.seed,
            "rate_per_s": self.rate,
            "concurrency": self.concurrency,
            "webhook_share": self.webhook_share,
            "web": f"{self.web_processes} processes x {self.web_threads} threads",
            "worker_threads": self.worker_threads,
            "worker_poll_interval": self.worker_poll_interval,
            "task_lease_s": self.task_lease,
            "deepimage_timeout_s": self.deepimage_timeout,
            "sim_timeout_seconds": self.sim_timeout_seconds,
            "sim_processing_time_s": self.processing_time,
            "reconcile_after_s": self.reconcile_after,
            "webhook_retry_schedule": self.retry_schedule,
            "faults": {
                **dataclasses.asdict(self.faults),
                "gcs_windows": self.gcs_windows(),
                "kills": self.faults.kills if self.crash else 0,
            },
        }


# -- report --------------------------------------------------------------------------------


@dataclasses.dataclass
class Invariant:
    name: str
    summary: str
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclasses.dataclass
class SoakReport:
    config: dict[str, Any]
    facts: dict[str, Any]
    timings: dict[str, Any]
    faults: dict[str, Any]
    intake: dict[str, Any]
    statuses: dict[str, Any]
    upstream_jobs_per_generation: dict[str, int]
    invariants: list[Invariant]
    logs: dict[str, Any]
    log_dir: str

    @property
    def ok(self) -> bool:
        return all(invariant.ok for invariant in self.invariants)

    @property
    def violations(self) -> list[str]:
        return [f"{inv.name}: {v}" for inv in self.invariants for v in inv.violations]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        for invariant in data["invariants"]:
            invariant["ok"] = not invariant["violations"]
        return data

    def format(self) -> str:
        lines = ["", "== genrelay soak =="]
        for key, value in {**self.facts, **self.config}.items():
            if key != "faults":
                lines.append(f"{key:>26}: {value}")
        lines.append(f"{'faults configured':>26}: {self.config['faults']}")
        t = self.timings
        lines += [
            "",
            f"throughput: {t['generations']} generations in {t['end_to_end_s']:.1f} s end to end"
            f" = {t['generations_per_s']:.2f}/s (submission took {t['submission_s']:.1f} s,"
            f" settling {t['settle_s']:.1f} s)",
            "time to terminal (first POST attempt -> completed_at): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in t["time_to_terminal_s"].items()),
            f"statuses: {self.statuses}",
            f"upstream jobs per generation: {self.upstream_jobs_per_generation}",
            f"intake: {self.intake}",
            "",
            "faults injected:",
        ]
        for key, value in self.faults.items():
            if key != "kills":
                lines.append(f"  {key}: {value}")
        kills = self.faults.get("kills") or []
        for name in ("worker", "serve"):
            mine = [k for k in kills if k["process"] == name]
            if mine:
                back = [k["back_after_s"] for k in mine]
                lines.append(
                    f"  kills of {name}: {len(mine)} at "
                    + ", ".join(f"{k['at_s']:.1f}" for k in mine)
                    + f" s; back after {min(back):.2f}-{max(back):.2f} s"
                )
        lines += ["", "invariants:"]
        for inv in self.invariants:
            mark = "PASS" if inv.ok else "FAIL"
            extra = f" ({len(inv.violations)} violations)" if inv.violations else ""
            lines.append(f"  {mark}  {inv.name}: {inv.summary}{extra}")
            for violation in inv.violations[:SHOWN_VIOLATIONS]:
                lines.append(f"          - {violation}")
            if len(inv.violations) > SHOWN_VIOLATIONS:
                lines.append(f"          ... and {len(inv.violations) - SHOWN_VIOLATIONS} more")
        lines += ["", "logs (count of lines by kind, first lines):"]
        for name, scan in self.logs.items():
            counts = {k: v for k, v in scan["counts"].items() if v}
            lines.append(f"  {name}: {counts or 'nothing unusual'}")
            for kind, samples in scan["samples"].items():
                for sample in samples[:2]:
                    lines.append(f"      [{kind}] {sample}")
        lines.append(f"\nlogs kept in {self.log_dir}")
        lines.append("RESULT: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


def spread(rng: random.Random, count: int, start: float, end: float) -> list[float]:
    """`count` random moments in [start, end], one in each of `count` equal slots."""
    if count <= 0:
        return []
    width = (end - start) / count
    return [start + width * (k + rng.uniform(0.1, 0.9)) for k in range(count)]


def crc32c_b64(data: bytes) -> str:
    """GCS's CRC32C form (base64 of the big-endian value), computed here independently."""
    import google_crc32c

    return base64.b64encode(struct.pack(">I", google_crc32c.value(data))).decode()


def parse_time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@contextlib.contextmanager
def soak_database(config: SoakConfig, work_dir: Path) -> Iterator[tuple[str, str]]:
    """(GENRELAY_DATABASE_URL, description): the given database, or a fresh one (a made-up
    PostgreSQL database is dropped after)."""
    if config.database_url is not None:
        yield config.database_url, f"{config.database} (given)"
        return
    with fresh_database(
        config.database, work_dir, config.postgres_admin_url, name="genrelay-soak"
    ) as found:
        yield found


# -- the flaky receiver (a process of its own) ---------------------------------------------


class ReceiverState:
    """Verifies, answers (5xx at random, seeded) and records every delivery, in order."""

    def __init__(
        self, secrets_by_target: dict[str, str], error_rate: float, seed: int, record: Path
    ) -> None:
        import standardwebhooks

        self.webhooks = {t: standardwebhooks.Webhook(s) for t, s in secrets_by_target.items()}
        self.error_rate = error_rate
        self.seed = seed
        self.lock = threading.Lock()
        self.attempts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.failures: collections.Counter[tuple[str, str]] = collections.Counter()
        self.sequence = 0
        self.out = record.open("a", encoding="utf-8")

    def receive(self, path: str, headers: dict[str, str], body: bytes) -> int:
        target = urlsplit(path).path.strip("/").split("/")[0]
        headers = {k.lower(): v for k, v in headers.items()}
        webhook_id = headers.get("webhook-id", "")
        verified, reason = False, "unknown target"
        webhook = self.webhooks.get(target)
        if webhook is not None:
            try:
                webhook.verify(body, headers, json_parse=False)
                verified, reason = True, ""
            except Exception as exc:  # the library's own error, or ValueError on garbage
                reason = f"{type(exc).__name__}: {exc}"[:200]
        event_type = generation_id = generation_status = None
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            payload = json.loads(body)
            event_type = payload.get("type")
            data = payload.get("data") or {}
            generation_id, generation_status = data.get("id"), data.get("status")
        with self.lock:
            self.attempts[(target, webhook_id)] += 1
            attempt = self.attempts[(target, webhook_id)]
            self.sequence += 1
            if not verified:
                status = 401
            else:
                # Per (webhook-id, attempt): the same delivery fails the same way in every run.
                rng = random.Random(f"{self.seed}/{webhook_id}/{attempt}")
                fail = rng.random() < self.error_rate
                if fail and self.failures[(target, webhook_id)] < RECEIVER_MAX_FAILURES:
                    self.failures[(target, webhook_id)] += 1
                    status = rng.choice((500, 502, 503))
                else:
                    status = 204
            record = {
                "seq": self.sequence,
                "time": time.time(),
                "target": target,
                "webhook_id": webhook_id,
                "attempt": attempt,
                "type": event_type,
                "generation_id": generation_id,
                "generation_status": generation_status,
                "verified": verified,
                "reason": reason,
                "status": status,
            }
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()
        return status

    def incomplete(self, path: str, headers: dict[str, str], expected: int, got: int) -> None:
        """A request whose body stopped short: the sender died mid-request (a SIGKILLed worker).

        Servers drop such a request without handling it; it is recorded, not verified.
        """
        target = urlsplit(path).path.strip("/").split("/")[0]
        webhook_id = {k.lower(): v for k, v in headers.items()}.get("webhook-id", "")
        with self.lock:
            self.sequence += 1
            record = {
                "seq": self.sequence,
                "time": time.time(),
                "target": target,
                "webhook_id": webhook_id,
                "attempt": None,
                "type": None,
                "generation_id": None,
                "generation_status": None,
                "verified": False,
                "reason": f"incomplete body: {got} of {expected} bytes",
                "incomplete": True,
                "status": 0,
            }
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()

    def close(self) -> None:
        with self.lock:
            self.out.close()


def receiver_main(args: argparse.Namespace) -> int:
    """Receiver mode: serve until SIGTERM/SIGINT."""
    secrets_by_target = {"sub": args.secret}
    if args.webhook_secret:
        secrets_by_target["gen"] = args.webhook_secret
    state = ReceiverState(secrets_by_target, args.error_rate, args.seed, args.record)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer(200 if self.path == "/health" else 404)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if len(body) < length:
                state.incomplete(self.path, dict(self.headers.items()), length, len(body))
                self.close_connection = True
                return
            self._answer(state.receive(self.path, dict(self.headers.items()), body))

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the record file says everything

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A killed worker resets its kept-alive connections: not worth a traceback.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server((LOOPBACK, args.receiver_port), Handler)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"receiver listening on {LOOPBACK}:{args.receiver_port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        state.close()
    return 0


# -- the run -------------------------------------------------------------------------------


@dataclasses.dataclass
class Submission:
    index: int
    key: str
    webhook: bool
    first_attempt: float = 0.0  # wall clock
    last_attempt: float = 0.0  # wall clock, of the attempt that was answered
    attempts: int = 0
    connection_errors: int = 0
    replays: int = 0
    generation_id: str | None = None
    error: str | None = None


class Soak:
    """One run: set-up, load with faults, settling, then the checks."""

    def __init__(self, config: SoakConfig, work_dir: Path) -> None:
        self.config = config
        self.work_dir = work_dir
        self.rng = random.Random(config.seed)
        self.processes = Processes(work_dir, numbered_logs=True)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sessions: list[requests.Session] = []
        self.local = threading.local()
        self.submissions: list[Submission] = []
        self.five_xx: list[str] = []  # 5xx answers genrelay gave the driver
        self.connection_errors: collections.Counter[str] = collections.Counter()
        self.poll_statuses: collections.Counter[str] = collections.Counter()
        self.kills: list[dict[str, Any]] = []
        self.gcs_windows: list[dict[str, Any]] = []
        self.injector_errors: list[str] = []
        self.unsettled: str | None = None
        self.unresponsive: list[str] = []  # a restarted or running process that did not answer
        self.intake_latencies: list[float] = []
        self.gcs: Any = None
        self.t0 = 0.0

    # -- plumbing ---------------------------------------------------------------------------

    def say(self, message: str) -> None:
        if self.config.progress is not None:
            self.config.progress(f"[soak {time.strftime('%H:%M:%S')}] {message}")

    def http(self) -> requests.Session:
        session: requests.Session | None = getattr(self.local, "session", None)
        if session is None:
            session = requests.Session()
            self.local.session = session
            with self.lock:
                self.sessions.append(session)
        return session

    def api(
        self,
        method: str,
        path: str,
        *,
        what: str,
        deadline: float = 60.0,
        **kwargs: Any,
    ) -> requests.Response:
        """Call genrelay; retry refused connections and 5xx (each 5xx recorded) until answered."""
        give_up = time.monotonic() + deadline
        while True:
            try:
                response = self.http().request(
                    method, self.base + path, headers=self.auth, timeout=API_TIMEOUT, **kwargs
                )
            except requests.RequestException as exc:
                with self.lock:
                    self.connection_errors[what] += 1
                if time.monotonic() > give_up:
                    raise SoakError(f"{method} {path}: no answer for {deadline:.0f} s") from exc
                time.sleep(RETRY_PAUSE)
                continue
            if response.status_code >= 500:
                self.record_5xx(what, method, path, response)
                if time.monotonic() > give_up:
                    raise SoakError(f"{method} {path}: still {response.status_code}")
                time.sleep(RETRY_PAUSE)
                continue
            return response

    def record_5xx(self, what: str, method: str, path: str, response: requests.Response) -> None:
        with self.lock:
            self.five_xx.append(
                f"{what}: {method} {path} answered {response.status_code}: {response.text[:200]!r}"
            )

    def ready_within(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Whether `ready` holds within `timeout`; a process that exited raises SoakError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stop.is_set():
                raise SoakError("stopped")
            try:
                if ready():
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False

    def get_json(self, url: str, **kwargs: Any) -> Any:
        response = self.http().get(url, timeout=SIM_TIMEOUT, **kwargs)
        response.raise_for_status()
        return response.json()

    # -- set-up -----------------------------------------------------------------------------

    def start_serve(self) -> None:
        incarnation = self.processes.incarnations["serve"]
        metrics = self.work_dir / "metrics" / f"serve-{incarnation}"
        metrics.mkdir(parents=True, exist_ok=True)
        self.processes.start(
            "serve",
            [GENRELAY, "serve"],
            {**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
        )

    def start_worker(self) -> None:
        self.processes.start(
            "worker",
            [
                GENRELAY,
                "worker",
                "--threads",
                str(self.config.worker_threads),
                "--poll-interval",
                str(self.config.worker_poll_interval),
            ],
            self.env,
        )

    def serve_ready(self) -> bool:
        self.processes.check_alive(("serve",))
        response = self.http().get(f"{self.base}/healthz", timeout=(0.5, 2))
        return response.status_code == 200

    def worker_ready(self) -> bool:
        self.processes.check_alive(("worker",))
        return "worker started" in self.processes.log_path("worker").read_text(errors="replace")

    def set_up(self, database_url: str) -> None:
        config, faults = self.config, self.config.faults
        from service.devtools.gcs_emulator import FakeGcsServer

        self.gcs = FakeGcsServer(
            port=free_port(),
            backend="filesystem",
            root=self.work_dir / "gcs",
            log_path=self.work_dir / "fake-gcs-server.log",
        )
        self.gcs.start()
        self.gcs.create_bucket(BUCKET)
        self.sim = start_simulator(
            self.processes,
            base_env(),
            config.processing_time,
            concurrency_limit=1_000_000,  # only the injected 429s
            max_jobs=max(10_000, config.generations * 5),
            upstream_error_rate=faults.upstream_error_rate,
            rate_limit_rate=faults.rate_limit_rate,
            timeout_rate=faults.timeout_rate,
            timeout_seconds=config.sim_timeout_seconds,
            failure_rate=faults.failure_rate,
            duplicate_callback_rate=faults.duplicate_callback_rate,
            lost_callback_rate=faults.lost_callback_rate,
            seed=config.seed,
        )
        web_port, self.receiver_port = free_port(), free_port()
        self.base = f"http://{LOOPBACK}:{web_port}"
        self.receiver = f"http://{LOOPBACK}:{self.receiver_port}"
        self.env = {
            **base_env(),
            "GENRELAY_DATABASE_URL": database_url,
            "GENRELAY_DEEPIMAGE_URL": self.sim,
            "GENRELAY_DEEPIMAGE_API_KEY": SIMULATOR_KEY,
            "GENRELAY_DEEPIMAGE_TIMEOUT": str(config.deepimage_timeout),
            "GENRELAY_PUBLIC_URL": self.base,
            "GENRELAY_CALLBACK_SECRET": secrets.token_urlsafe(32),
            "GENRELAY_RECONCILE_AFTER": str(config.reconcile_after),
            "GENRELAY_GCS_BUCKET": BUCKET,
            "STORAGE_EMULATOR_HOST": self.gcs.url,
            "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
            "GENRELAY_WEBHOOK_RETRY_SCHEDULE": config.retry_schedule,
            "GENRELAY_TASK_LEASE": str(config.task_lease),
            "GENRELAY_RATE_LIMIT": "0",
            "GENRELAY_WEB_PROCESSES": str(config.web_processes),
            "GENRELAY_WEB_THREADS": str(config.web_threads),
            "GENRELAY_LOG_LEVEL": "INFO",
            "PORT": str(web_port),
        }
        api_key = prepare_database(self.env, "soak")
        self.auth = {"Authorization": f"Bearer {api_key}"}
        self.start_serve()
        self.start_worker()
        wait_until(self.serve_ready, self.processes, "genrelay serve")
        wait_until(self.worker_ready, self.processes, "genrelay worker")
        subscription = self.api(
            "POST",
            "/v1/subscriptions",
            what="setup",
            json={
                "url": f"{self.receiver}/sub",
                "events": list(EVENT_TYPES),
                "format": "standard",
                "description": "soak receiver",
            },
        )
        if subscription.status_code != 201:
            raise SoakError(f"subscription: {subscription.status_code} {subscription.text}")
        self.subscription_id = subscription.json()["id"]
        default_secret = self.api("GET", "/v1/webhooks/default/secret", what="setup").json()
        self.records = self.work_dir / "receiver-records.jsonl"
        self.processes.start(
            "receiver",
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--receiver-port",
                str(self.receiver_port),
                "--secret",
                subscription.json()["secret"],
                "--webhook-secret",
                default_secret["secret"],
                "--record",
                str(self.records),
                "--error-rate",
                str(faults.receiver_error_rate),
                "--seed",
                str(config.seed),
            ],
            self.env,
        )
        wait_until(
            lambda: self.http().get(f"{self.receiver}/health", timeout=1).ok,
            self.processes,
            "the receiver",
        )

    # -- load and faults --------------------------------------------------------------------

    def body(self, submission: Submission) -> dict[str, Any]:
        i = submission.index
        width, height, fmt = ((256, 256, "png"), (320, 240, "jpeg"), (256, 192, "webp"))[i % 3]
        body: dict[str, Any] = {
            "input": {
                "width": width,
                "height": height,
                "output_format": fmt,
                "background": {"generate": {"description": f"soak {self.config.seed}/{i}"}},
            },
            "metadata": {"soak": str(i)},
        }
        if submission.webhook:
            body["webhook"] = f"{self.receiver}/gen"
        return body

    def submit(self, submission: Submission) -> None:
        body = self.body(submission)
        headers = {**self.auth, "Idempotency-Key": submission.key}
        submission.first_attempt = time.time()
        give_up = time.monotonic() + SUBMIT_DEADLINE
        while not self.stop.is_set():
            submission.attempts += 1
            submission.last_attempt = time.time()
            started = time.monotonic()
            try:
                response = self.http().post(
                    f"{self.base}/v1/generations", json=body, headers=headers, timeout=API_TIMEOUT
                )
                with self.lock:
                    self.intake_latencies.append(time.monotonic() - started)
            except requests.RequestException as exc:
                submission.connection_errors += 1
                if time.monotonic() > give_up:
                    submission.error = f"no answer for {SUBMIT_DEADLINE:.0f} s: {exc!r}"[:300]
                    return
                time.sleep(RETRY_PAUSE)
                continue
            if response.status_code >= 500:
                self.record_5xx("intake", "POST", "/v1/generations", response)
                if time.monotonic() > give_up:
                    submission.error = f"still {response.status_code}"
                    return
                time.sleep(RETRY_PAUSE)
                continue
            if response.status_code != 202:
                submission.error = f"answered {response.status_code}: {response.text[:300]}"
                return
            if response.headers.get("Idempotent-Replayed") == "true":
                submission.replays += 1
            submission.generation_id = response.json()["id"]
            return

    def submit_all(self) -> None:
        config = self.config
        share_rng = random.Random(f"{config.seed}/webhooks")
        self.submissions = [
            Submission(
                index=i,
                key=f"soak-{config.seed}-{i:06d}-{secrets.token_hex(4)}",
                webhook=share_rng.random() < config.webhook_share,
            )
            for i in range(config.generations)
        ]
        counter = iter(range(config.generations))
        counter_lock = threading.Lock()
        # A bound on the whole phase: a slow intake must not stretch the run without end.
        phase_end = self.t0 + config.submit_phase_limit()

        def client() -> None:
            while not self.stop.is_set():
                with counter_lock:
                    index = next(counter, None)
                if index is None:
                    return
                if time.monotonic() > phase_end:
                    self.submissions[index].error = (
                        f"not submitted: the submission phase ran out of its "
                        f"{config.submit_phase_limit():.0f} s"
                    )
                    continue
                due = self.t0 + index / config.rate
                self.stop.wait(max(0.0, due - time.monotonic()))
                self.submit(self.submissions[index])
                done = index + 1
                if done % max(1, config.generations // 10) == 0:
                    self.say(f"submitted {done}/{config.generations}")

        pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="submit")
        try:
            futures = [pool.submit(client) for _ in range(config.concurrency)]
            for future in futures:
                future.result()
        except BaseException:
            self.stop.set()  # the clients stop at their next step
            raise
        finally:
            pool.shutdown(wait=True)

    def poller(self) -> None:
        """GETs random generations while the run goes on (5xx are findings)."""
        rng = random.Random(f"{self.config.seed}/poller")
        while not self.stop.wait(POLL_EVERY):
            known = [s.generation_id for s in self.submissions if s.generation_id]
            if not known:
                continue
            generation_id = rng.choice(known)
            try:
                response = self.http().get(
                    f"{self.base}/v1/generations/{generation_id}",
                    headers=self.auth,
                    timeout=API_TIMEOUT,
                )
            except requests.RequestException:
                with self.lock:
                    self.connection_errors["poll"] += 1
                continue
            if response.status_code >= 500:
                self.record_5xx("poll", "GET", f"/v1/generations/{generation_id}", response)
            else:
                with self.lock:
                    self.poll_statuses[str(response.status_code)] += 1

    def crasher(self, name: str, moments: list[float]) -> None:
        """SIGKILL `name` at the given moments (once it is up again) and restart it at once."""
        ready = self.serve_ready if name == "serve" else self.worker_ready
        restart = self.start_serve if name == "serve" else self.start_worker
        what = "answer /healthz" if name == "serve" else "start its loop"
        try:
            for number, moment in enumerate(moments, 1):
                if self.stop.wait(max(0.0, self.t0 + moment - time.monotonic())):
                    return
                if not self.ready_within(ready, READY_TIMEOUT):
                    with self.lock:
                        self.unresponsive.append(
                            f"{name} did not {what} within {READY_TIMEOUT:.0f} s before kill "
                            f"{number} (killed anyway)"
                        )
                killed_at = time.monotonic()
                self.processes.kill(name)
                restart()
                back = self.ready_within(ready, READY_TIMEOUT)
                with self.lock:
                    if not back:
                        self.unresponsive.append(
                            f"{name} did not {what} within {READY_TIMEOUT:.0f} s after kill "
                            f"{number}"
                        )
                    self.kills.append(
                        {
                            "process": name,
                            "at_s": round(killed_at - self.t0, 2),
                            "back_after_s": round(time.monotonic() - killed_at, 2),
                        }
                    )
        except Exception as exc:
            with self.lock:
                self.injector_errors.append(f"{name} crasher: {exc}")

    def gcs_outages(self, moments: list[float]) -> None:
        """Stop fake-gcs-server for a few seconds at the given moments; same port after."""
        low, high = self.config.faults.gcs_window_seconds
        rng = random.Random(f"{self.config.seed}/gcs")
        try:
            for moment in moments:
                if self.stop.wait(max(0.0, self.t0 + moment - time.monotonic())):
                    return
                began = time.monotonic()
                self.gcs.stop()
                self.stop.wait(rng.uniform(low, high))
                self.gcs.start()
                with self.lock:
                    self.gcs_windows.append(
                        {
                            "at_s": round(began - self.t0, 2),
                            "down_s": round(time.monotonic() - began, 2),
                        }
                    )
        except Exception as exc:
            with self.lock:
                self.injector_errors.append(f"GCS outages: {exc}")

    def settled(self) -> bool:
        """No generation queued or processing, no delivery pending."""
        for status in ("queued", "processing"):
            page = self.api(
                "GET", "/v1/generations", what="settle", params={"status": status, "limit": 1}
            ).json()
            if page["data"]:
                return False
        page = self.api(
            "GET", "/v1/deliveries", what="settle", params={"status": "pending", "limit": 1}
        ).json()
        return not page["data"]

    def run_load(self) -> dict[str, float]:
        config = self.config
        start, end = config.fault_window()
        threads = [threading.Thread(target=self.poller, name="poller", daemon=True)]
        if config.crash:
            for name in ("worker", "serve"):
                moments = spread(self.rng, config.faults.kills, start, end)
                threads.append(
                    threading.Thread(
                        target=self.crasher, args=(name, moments), name=f"crash-{name}", daemon=True
                    )
                )
        gcs_moments = spread(self.rng, config.gcs_windows(), start, end)
        threads.append(threading.Thread(target=self.gcs_outages, args=(gcs_moments,), daemon=True))
        self.t0 = time.monotonic()
        wall0 = time.time()
        for thread in threads:
            thread.start()
        injectors = threads[1:]
        try:
            self.submit_all()
            submitted = time.monotonic()
            self.say(f"all {config.generations} submitted in {submitted - self.t0:.1f} s; settling")
            deadline = submitted + config.settle_timeout()
            for thread in injectors:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            last_note = 0.0
            while True:
                if self.injector_errors:
                    raise SoakError("; ".join(self.injector_errors))
                self.processes.check_alive()
                if not any(t.is_alive() for t in injectors) and self.settled():
                    break
                if time.monotonic() > deadline:
                    # Checked anyway: what is unfinished shows up as violations.
                    self.unsettled = (
                        f"not settled {config.settle_timeout():.0f} s after the last submission"
                    )
                    self.say(self.unsettled)
                    break
                if time.monotonic() - last_note > 10:
                    last_note = time.monotonic()
                    self.say("waiting for every generation and delivery to finish")
                time.sleep(0.5)
            settled = time.monotonic()
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=READY_TIMEOUT + 5)
        self.stop.clear()
        return {
            "wall0": wall0,
            "submission_s": submitted - self.t0,
            "settle_s": settled - submitted,
        }

    # -- the checks -------------------------------------------------------------------------

    def paged(self, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        for _ in range(100_000):
            query = {**(params or {}), "limit": 100}
            if cursor:
                query["cursor"] = cursor
            response = self.api("GET", path, what="check", params=query)
            if response.status_code != 200:
                raise SoakError(f"GET {path}: {response.status_code} {response.text[:300]}")
            page = response.json()
            items += page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return items
        raise SoakError(f"GET {path}: pagination did not end")

    def collect(self) -> dict[str, Any]:
        """Everything the checks need, read while the stack still runs."""
        self.say("collecting generations, events, deliveries, simulator jobs and objects")
        generations = {g["id"]: g for g in self.paged("/v1/generations")}
        events = self.paged("/v1/events")
        deliveries = self.paged("/v1/deliveries")
        sim_stats = self.get_json(f"{self.sim}/_sim/stats")
        job_ids = [j["job"] for j in self.get_json(f"{self.sim}/_sim/jobs")["jobs"]]
        with ThreadPoolExecutor(8) as pool:
            jobs = dict(
                zip(
                    job_ids,
                    pool.map(lambda j: self.get_json(f"{self.sim}/_sim/jobs/{j}"), job_ids),
                    strict=True,
                )
            )
        objects: dict[str, dict[str, Any]] = {}
        token = None
        for _ in range(100_000):
            params: dict[str, Any] = {"maxResults": 1000}
            if token:
                params["pageToken"] = token
            listing = self.get_json(f"{self.gcs.url}/storage/v1/b/{BUCKET}/o", params=params)
            for item in listing.get("items", []):
                if item["name"] in objects:
                    objects[item["name"] + " (listed twice)"] = item
                objects[item["name"]] = item
            token = listing.get("nextPageToken")
            if not token:
                break

        def object_crc(name: str) -> str:
            url = f"{self.gcs.url}/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}"
            response = self.http().get(url, params={"alt": "media"}, timeout=SIM_TIMEOUT)
            response.raise_for_status()
            return crc32c_b64(response.content)

        def upstream_crc(url: str) -> str:
            response = self.http().get(url, timeout=SIM_TIMEOUT)
            return crc32c_b64(response.content) if response.ok else f"HTTP {response.status_code}"

        with ThreadPoolExecutor(8) as pool:
            names = list(objects)
            object_crcs = dict(zip(names, pool.map(object_crc, names), strict=True))
            result_urls = sorted({j["result_url"] for j in jobs.values() if j.get("result_url")})
            upstream_crcs = dict(zip(result_urls, pool.map(upstream_crc, result_urls), strict=True))
        return {
            "generations": generations,
            "events": events,
            "deliveries": deliveries,
            "sim_stats": sim_stats,
            "jobs": jobs,
            "objects": objects,
            "object_crcs": object_crcs,
            "upstream_crcs": upstream_crcs,
        }

    def read_records(self) -> list[dict[str, Any]]:
        if not self.records.exists():
            return []
        lines = self.records.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def check(self, data: dict[str, Any], records: list[dict[str, Any]]) -> list[Invariant]:
        generations: dict[str, dict[str, Any]] = data["generations"]
        jobs: dict[str, dict[str, Any]] = data["jobs"]
        invariants = [
            self.check_terminal(generations, jobs),
            self.check_objects(generations, jobs, data),
        ]
        invariants += self.check_notifications(generations, data, records)
        invariants.append(self.check_no_5xx(jobs))
        invariants.append(self.check_injection())
        if self.config.crash:
            invariants.append(
                Invariant(
                    "responsive",
                    f"serve answered /healthz and the worker started within "
                    f"{READY_TIMEOUT:.0f} s around every kill",
                    list(self.unresponsive),
                )
            )
        settle = self.config.settle_timeout()
        invariants.append(
            Invariant(
                "settled",
                f"every generation terminal and no delivery pending within {settle:.0f} s "
                "of the last submission",
                [self.unsettled] if self.unsettled else [],
            )
        )
        return invariants

    def job_generation(self, job: dict[str, Any]) -> str | None:
        url = ((job.get("request") or {}).get("webhooks") or {}).get("complete") or ""
        match = CALLBACK_PATH.search(url)
        return match.group(1) if match else None

    def check_terminal(
        self, generations: dict[str, dict[str, Any]], jobs: dict[str, dict[str, Any]]
    ) -> Invariant:
        violations: list[str] = []
        unsubmitted = [s for s in self.submissions if s.generation_id is None]
        if unsubmitted:
            violations.append(
                f"{len(unsubmitted)} of {len(self.submissions)} requests got no generation"
            )
        by_key: dict[str, str] = {}
        seen: set[str] = set()
        for s in self.submissions:
            if s.generation_id is None:
                violations.append(f"request {s.index} got no generation: {s.error}")
            elif s.generation_id in seen:
                violations.append(f"request {s.index} got {s.generation_id}, another one's")
            else:
                by_key[s.key] = s.generation_id
                seen.add(s.generation_id)
        unaccounted = set(generations) - set(by_key.values())
        for generation_id in sorted(unaccounted)[:50]:
            violations.append(f"{generation_id} exists but no request of the soak got it")
        counts: collections.Counter[str] = collections.Counter()
        expected_failures = 0
        for generation_id in by_key.values():
            generation = generations.get(generation_id)
            if generation is None:
                violations.append(f"{generation_id} is not listed by GET /v1/generations")
                continue
            status = generation["status"]
            error = (generation.get("error") or {}).get("code")
            counts[f"{status}/{error}" if error else status] += 1
            job_id = (generation.get("upstream") or {}).get("job")
            job = jobs.get(job_id) if job_id else None
            if job is None:
                violations.append(
                    f"{generation_id} is {status}/{error}; its upstream job {job_id!r} "
                    "is unknown to the simulator"
                )
                continue
            if self.job_generation(job) != generation_id:
                violations.append(f"{generation_id} records job {job_id} of another generation")
            if job["will_fail"]:
                expected_failures += 1
                if (status, error) != ("failed", "upstream_job_failed"):
                    violations.append(
                        f"{generation_id}: its job {job_id} failed upstream, yet it is "
                        f"{status}/{error}"
                    )
            elif status != "succeeded":
                message = (generation.get("error") or {}).get("message")
                violations.append(
                    f"{generation_id}: its job {job_id} completed, yet it is {status}/{error}"
                    f" ({message})"
                )
        summary = (
            f"{len(by_key)} generations, {dict(counts)}; {expected_failures} upstream job "
            "failures expected"
        )
        return Invariant("terminal states", summary, violations)

    def check_objects(
        self,
        generations: dict[str, dict[str, Any]],
        jobs: dict[str, dict[str, Any]],
        data: dict[str, Any],
    ) -> Invariant:
        violations: list[str] = []
        objects: dict[str, dict[str, Any]] = data["objects"]
        object_crcs: dict[str, str] = data["object_crcs"]
        upstream_crcs: dict[str, str] = data["upstream_crcs"]
        claimed: set[str] = set()
        succeeded = 0
        # Object names end in `{generation id}.{extension}`.
        by_generation: dict[str, list[str]] = collections.defaultdict(list)
        for name in objects:
            by_generation[name.rsplit("/", 1)[-1].split(".", 1)[0]].append(name)
        for generation_id, generation in generations.items():
            mine = by_generation.get(generation_id, [])
            if generation["status"] != "succeeded":
                if mine:
                    violations.append(f"{generation_id} is {generation['status']} but has {mine}")
                continue
            succeeded += 1
            result = generation.get("result") or {}
            uri = result.get("uri") or ""
            name = uri.removeprefix(f"gs://{BUCKET}/")
            if len(mine) != 1 or mine[0] != name:
                violations.append(f"{generation_id}: result {uri!r}, objects {mine}")
                continue
            claimed.add(name)
            item = objects[name]
            crcs = {
                "result.crc32c": result.get("crc32c"),
                "object metadata": item.get("crc32c"),
                "object bytes": object_crcs.get(name),
            }
            job = jobs.get((generation.get("upstream") or {}).get("job") or "")
            if job is not None and job.get("result_url"):
                crcs["simulator image"] = upstream_crcs.get(job["result_url"])
            else:
                crcs["simulator image"] = "no result_url"
            if len(set(crcs.values())) != 1:
                violations.append(f"{generation_id}: CRC32C differ: {crcs}")
            if str(result.get("size")) != str(item.get("size")):
                violations.append(
                    f"{generation_id}: size {result.get('size')} != object {item.get('size')}"
                )
        for stem, names in sorted(by_generation.items()):
            if stem not in generations:
                violations.append(f"objects {names} belong to no generation")
        summary = f"{len(objects)} objects for {succeeded} succeeded generations"
        return Invariant("objects", summary, violations)

    def check_notifications(
        self,
        generations: dict[str, dict[str, Any]],
        data: dict[str, Any],
        records: list[dict[str, Any]],
    ) -> list[Invariant]:
        events: list[dict[str, Any]] = data["events"]
        deliveries: list[dict[str, Any]] = data["deliveries"]
        # -- events: exactly processing + the terminal one, per generation
        event_violations: list[str] = []
        types_by_generation: dict[str, list[str]] = collections.defaultdict(list)
        for event in events:
            types_by_generation[event["generation_id"]].append(event["type"])
        for generation_id, generation in generations.items():
            got = sorted(types_by_generation.get(generation_id, []))
            if generation["status"] not in TERMINAL:
                event_violations.append(f"{generation_id} is still {generation['status']}: {got}")
                continue
            expected = sorted(["generation.processing", f"generation.{generation['status']}"])
            if got != expected:
                event_violations.append(
                    f"{generation_id} ({generation['status']}): events {got}, expected {expected}"
                )
        for generation_id in set(types_by_generation) - set(generations):
            event_violations.append(f"events for an unknown generation {generation_id}")
        # -- deliveries: one per (event, target), each accepted once with a valid signature
        webhook_of = {g: bool(generations[g].get("webhook")) for g in generations}
        by_pair: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
        for delivery in deliveries:
            target = urlsplit(delivery["url"]).path.strip("/")
            by_pair[(delivery["event_id"], target)].append(delivery)
        receipts: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for record in records:
            receipts[record["webhook_id"]].append(record)
        delivery_violations: list[str] = []
        bad_signatures = [r for r in records if not r["verified"] and not r.get("incomplete")]
        for record in bad_signatures[:50]:
            delivery_violations.append(
                f"bad signature on {record['webhook_id']} ({record['type']}, "
                f"{record['generation_id']}, /{record['target']}): {record['reason']}"
            )
        expected_pairs = 0
        delivered_pairs = 0
        statuses: collections.Counter[str] = collections.Counter(d["status"] for d in deliveries)
        for event in events:
            targets = ["sub"] + (["gen"] if webhook_of.get(event["generation_id"]) else [])
            for target in targets:
                expected_pairs += 1
                rows = by_pair.get((event["id"], target), [])
                where = f"{event['type']} of {event['generation_id']} to /{target}"
                if len(rows) != 1:
                    delivery_violations.append(f"{where}: {len(rows)} deliveries")
                    if not rows:
                        continue
                row = rows[0]
                if row["status"] != "succeeded":
                    delivery_violations.append(
                        f"{where}: delivery {row['id']} is {row['status']} after "
                        f"{row['attempt_count']} attempts ({row['last_error']})"
                    )
                accepted = [
                    r
                    for r in receipts.get(row["webhook_id"], [])
                    if r["target"] == target and r["verified"] and 200 <= r["status"] < 300
                ]
                if not accepted:
                    delivery_violations.append(
                        f"{where}: {row['webhook_id']} never accepted by the receiver "
                        f"({len(receipts.get(row['webhook_id'], []))} receipts)"
                    )
                    continue
                if any(
                    (r["type"], r["generation_id"]) != (event["type"], event["generation_id"])
                    for r in accepted
                ):
                    delivery_violations.append(f"{where}: the received body is another event's")
                delivered_pairs += 1
        known_ids = {d["webhook_id"] for d in deliveries}
        stray = sorted({r["webhook_id"] for r in records} - known_ids)
        for webhook_id in stray[:20]:
            delivery_violations.append(f"received {webhook_id}, which no delivery has")
        # -- lifecycle order per (generation, target)
        order_violations: list[str] = []
        firsts: dict[tuple[str, str], dict[str, dict[str, int]]] = collections.defaultdict(dict)
        for record in records:
            if not record["verified"] or not record["generation_id"]:
                continue
            key = (record["generation_id"], record["target"])
            kind = "processing" if record["type"] == "generation.processing" else "terminal"
            slot = firsts[key].setdefault(kind, {})
            slot.setdefault("first", record["seq"])
            if 200 <= record["status"] < 300:
                slot.setdefault("accepted", record["seq"])
        checked = 0
        for (generation_id, target), kinds in firsts.items():
            terminal = kinds.get("terminal", {}).get("first")
            if terminal is None:
                continue
            checked += 1
            processing = kinds.get("processing", {}).get("accepted")
            if processing is None or processing > terminal:
                order_violations.append(
                    f"{generation_id} /{target}: terminal event received (#{terminal}) before "
                    f"the processing event was accepted (#{processing})"
                )
        receiver_5xx = sum(1 for r in records if r["status"] >= 500)
        duplicates = len(records) - len({(r["webhook_id"], r["target"]) for r in records})
        return [
            Invariant(
                "events",
                f"{len(events)} events for {len(generations)} generations",
                event_violations,
            ),
            Invariant(
                "deliveries",
                f"{delivered_pairs}/{expected_pairs} (event, target) pairs delivered; "
                f"deliveries {dict(statuses)}; {len(records)} requests received, "
                f"{receiver_5xx} answered 5xx, {duplicates} repeats; "
                f"{len(bad_signatures)} bad signatures",
                delivery_violations,
            ),
            Invariant(
                "lifecycle order",
                f"{checked} (generation, target) pairs checked",
                order_violations,
            ),
        ]

    def check_no_5xx(self, jobs: dict[str, dict[str, Any]]) -> Invariant:
        violations = list(self.five_xx)
        lines = 0
        for path in self.processes.logs_of("serve"):
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{") or '"gunicorn.access"' not in line:
                    continue
                lines += 1
                with contextlib.suppress(ValueError):
                    request = json.loads(line).get("httpRequest") or {}
                    if (request.get("status") or 0) >= 500:
                        violations.append(
                            f"{path.name}: {request.get('requestMethod')} "
                            f"{request.get('requestUrl')} answered {request.get('status')}"
                        )
        callbacks: collections.Counter[str] = collections.Counter()
        for job_id, job in jobs.items():
            for callback in job.get("callbacks") or []:
                if callback.get("lost"):
                    continue
                code = callback.get("status_code")
                callbacks[str(code) if code is not None else str(callback.get("error"))] += 1
                if code is not None and code >= 500:
                    violations.append(f"callback of job {job_id} answered {code}")
        self.callback_answers = dict(callbacks)
        summary = (
            f"{len(self.five_xx)} 5xx to the driver; {lines} access-log lines read; "
            f"callback answers {dict(callbacks)}; connection errors (process down) "
            f"{dict(self.connection_errors)}"
        )
        return Invariant("no 5xx", summary, violations)

    def check_injection(self) -> Invariant:
        violations = list(self.injector_errors)
        planned_kills = self.config.faults.kills if self.config.crash else 0
        for name in ("worker", "serve"):
            done = sum(1 for k in self.kills if k["process"] == name)
            if done != planned_kills:
                violations.append(f"{done} kills of {name}, {planned_kills} planned")
        if len(self.gcs_windows) != self.config.gcs_windows():
            violations.append(
                f"{len(self.gcs_windows)} GCS windows, {self.config.gcs_windows()} planned"
            )
        summary = f"{len(self.kills)} kills, {len(self.gcs_windows)} GCS windows"
        return Invariant("faults injected as planned", summary, violations)

    # -- report pieces ----------------------------------------------------------------------

    def scan_logs(self) -> dict[str, Any]:
        patterns = {
            "error": re.compile(r'"severity": "(ERROR|CRITICAL)"|\bERROR\b'),
            "traceback": re.compile(r"Traceback|\"exc_info\""),
            "database_locked": DATABASE_LOCKED,
            "task_dead": re.compile(r"is dead after"),
            "task_retry": re.compile(r"attempt \d+ failed"),
        }
        scans: dict[str, Any] = {}
        for name in sorted(self.processes.incarnations):
            scan = scan_log(self.processes.logs_of(name), patterns, width=300)
            scan["samples"].pop("task_retry", None)
            scans[name] = scan
        return scans

    def timings(
        self, generations: dict[str, dict[str, Any]], phases: dict[str, float]
    ) -> dict[str, Any]:
        durations = []
        last = phases["wall0"]
        for s in self.submissions:
            generation = generations.get(s.generation_id or "")
            if generation and generation.get("completed_at"):
                done = parse_time(generation["completed_at"])
                durations.append(done - s.first_attempt)
                last = max(last, done)
        durations.sort()
        first = min(
            (s.first_attempt for s in self.submissions if s.first_attempt),
            default=phases["wall0"],
        )
        end_to_end = max(last - first, 1e-9)
        return {
            "generations": len(self.submissions),
            "submission_s": round(phases["submission_s"], 2),
            "settle_s": round(phases["settle_s"], 2),
            "end_to_end_s": round(end_to_end, 2),
            "generations_per_s": round(len(self.submissions) / end_to_end, 2),
            "time_to_terminal_s": {
                "p50": round(percentile(durations, 50, empty=0.0), 2),
                "p90": round(percentile(durations, 90, empty=0.0), 2),
                "p99": round(percentile(durations, 99, empty=0.0), 2),
                "max": round(durations[-1] if durations else 0.0, 2),
            },
        }

    def injected(self, data: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
        stats = data["sim_stats"]
        return {
            "simulator": {
                key: stats.get(key)
                for key in (
                    "jobs_created",
                    "injected_upstream_errors",
                    "injected_rate_limits",
                    "injected_timeouts",
                    "jobs_failed",
                    "jobs_completed",
                    "callbacks_duplicated",
                    "callbacks_lost",
                    "callbacks_sent",
                    "callbacks_failed",
                    "responses_by_status",
                )
            },
            "simulator_callback_answers": getattr(self, "callback_answers", {}),
            "receiver": {
                "requests": len(records),
                "incomplete_sender_died": sum(1 for r in records if r.get("incomplete")),
                "answered_5xx": sum(1 for r in records if r["status"] >= 500),
                "answered_2xx": sum(1 for r in records if 200 <= r["status"] < 300),
            },
            "gcs_windows": self.gcs_windows,
            "kills": self.kills,
        }

    def upstream_jobs(self, jobs: dict[str, dict[str, Any]]) -> dict[str, int]:
        per_generation: collections.Counter[str] = collections.Counter()
        for job in jobs.values():
            generation_id = self.job_generation(job)
            if generation_id:
                per_generation[generation_id] += 1
        histogram: collections.Counter[int] = collections.Counter()
        for s in self.submissions:
            histogram[per_generation.get(s.generation_id or "", 0)] += 1
        return {str(k): v for k, v in sorted(histogram.items())}

    # -- the whole run ----------------------------------------------------------------------

    def run(self, database_url: str, database_desc: str) -> SoakReport:
        config = self.config
        try:
            self.say(f"setting up on {database_desc} in {self.work_dir}")
            self.set_up(database_url)
            self.say(
                f"submitting {config.generations} generations at {config.rate}/s"
                + (" with crashes" if config.crash else "")
            )
            phases = self.run_load()
            data = self.collect()
        except BaseException:
            self.stop.set()
            self.cleanup()
            raise
        self.cleanup()
        records = self.read_records()
        invariants = self.check(data, records)
        generations = data["generations"]
        statuses = collections.Counter(
            g["status"] + (f"/{g['error']['code']}" if g.get("error") else "")
            for g in generations.values()
        )
        # A retry after a connection error that found the generation already stored: the
        # killed request had committed it (answered as a replay or as the generation now).
        found_stored = sum(
            1
            for s in self.submissions
            if s.connection_errors
            and s.generation_id in generations
            and parse_time(generations[s.generation_id]["created_at"]) < s.last_attempt
        )
        latencies = sorted(self.intake_latencies)
        intake = {
            "requests": sum(s.attempts for s in self.submissions),
            "answered_latency_s": {
                "p50": round(percentile(latencies, 50, empty=0.0), 3),
                "p99": round(percentile(latencies, 99, empty=0.0), 3),
                "max": round(latencies[-1] if latencies else 0.0, 3),
            },
            "connection_errors_retried": sum(s.connection_errors for s in self.submissions),
            "generations_retried": sum(1 for s in self.submissions if s.connection_errors),
            "retries_finding_it_stored": found_stored,
            "replayed_answers": sum(s.replays for s in self.submissions),
            "poll_answers": dict(self.poll_statuses),
        }
        return SoakReport(
            config=config.public(),
            facts={
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "nproc": len(os.sched_getaffinity(0)),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
                "database_desc": database_desc,
            },
            timings=self.timings(generations, phases),
            faults=self.injected(data, records),
            intake=intake,
            statuses=dict(statuses),
            upstream_jobs_per_generation=self.upstream_jobs(data["jobs"]),
            invariants=invariants,
            logs=self.scan_logs(),
            log_dir=str(self.work_dir),
        )

    def cleanup(self) -> None:
        self.processes.stop_all()
        if self.gcs is not None:
            self.gcs.stop()
        with self.lock:
            sessions, self.sessions = self.sessions, []
        for session in sessions:
            session.close()


def run_soak(config: SoakConfig) -> SoakReport:
    """Run one soak; raises SoakError (with the processes' log tails) if it could not run."""
    made_dir = config.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="genrelay-soak-")) if made_dir else config.work_dir
    assert work_dir is not None
    work_dir.mkdir(parents=True, exist_ok=True)
    soak = Soak(config, work_dir)
    keep = True
    try:
        with soak_database(config, work_dir) as (database_url, database_desc):
            try:
                report = soak.run(database_url, database_desc)
            except SoakError as exc:
                raise SoakError(f"{exc}\n\n{soak.processes.logs(3000)}") from None
        keep = not report.ok
        return report
    finally:
        if made_dir and not keep:
            shutil.rmtree(work_dir, ignore_errors=True)


# -- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=2000, help="default 2000")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--crash", action="store_true", help="SIGKILL worker and web 10x each")
    parser.add_argument("--kills", type=int, default=10, help="kills per process with --crash")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=15.0, help="submissions/s (default 15)")
    parser.add_argument("--concurrency", type=int, default=8, help="submitting threads (8)")
    add_common_options(parser, postgres_url=postgres_url_from_env(), logs="logs and files")
    receiver = parser.add_argument_group("receiver mode (started by the soak itself)")
    receiver.add_argument("--receiver-port", type=int, help="run as the flaky receiver")
    receiver.add_argument("--secret", help="whsec_ secret of the subscription (/sub)")
    receiver.add_argument("--webhook-secret", help="whsec_ secret of per-request webhooks (/gen)")
    receiver.add_argument("--record", type=Path, help="JSON-lines file of every request")
    receiver.add_argument("--error-rate", type=float, default=0.2, help="share answered 5xx")
    args = parser.parse_args(argv)
    if args.receiver_port is not None:
        if not args.secret or args.record is None:
            parser.error("receiver mode needs --secret and --record")
    elif args.generations < 1 or args.rate <= 0 or args.concurrency < 1 or args.kills < 0:
        parser.error("--generations, --rate and --concurrency must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.receiver_port is not None:
        return receiver_main(args)
    handle_signals()
    config = SoakConfig(
        generations=args.generations,
        database=args.database,
        postgres_admin_url=args.postgres_url,
        crash=args.crash,
        seed=args.seed,
        rate=args.rate,
        concurrency=args.concurrency,
        faults=Faults(kills=args.kills),
        work_dir=args.log_dir,
    )
    try:
        report = run_soak(config)
    except SoakError as exc:
        print(f"\nsoak could not run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; every process stopped", file=sys.stderr)
        return 130
    print(report.format())
    if args.json_out:
        args.json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"JSON report: {args.json_out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
