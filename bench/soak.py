"""Soak and crash test: N generations through the whole stack with faults, then invariants.

`genrelay serve` and `worker`, the simulator injecting upstream 5xx (10 %), 429 (5 %), timeouts
(2 %), job failures (5 %), duplicate and lost callbacks (10 % each), fake-gcs-server (files)
stopped for 2-3 s a few times, and a flaky receiver (this script with `--receiver-port`,
answering 20 % of deliveries 5xx, at most 4 times each). With `--crash` the worker and the web
process are SIGKILLed 10 times each and restarted. Submissions go at `--rate`/s, each with an
Idempotency-Key, retried after a connection error. Then every invariant is checked through the
API, the simulator's records, the bucket and the receiver's record: terminal states (failed
exactly where the upstream job failed), one object per success with matching CRC32C, events,
deliveries with valid signatures in lifecycle order, no 5xx, faults injected as planned,
responsiveness around kills, settling in time. Exit status 0 only if all hold.

The test suite runs it at 200 generations: `run_soak(SoakConfig(...))` (tests/e2e/test_soak.py).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import json
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
from typing import Any
from urllib.parse import quote, urlsplit

import requests

# The test suite imports this file as bench.soak; its helpers sit next to it.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
from _stack import (
    BUCKET,
    LOOPBACK,
    POSTGRES_URL,
    TERMINAL,
    BenchError,
    Processes,
    epoch,
    free_port,
    fresh_database,
    genrelay_env,
    machine_facts,
    options,
    percentile,
    prepare_database,
    start_gcs,
    start_simulator,
    wait_for_log,
    wait_until,
)

EVENT_TYPES = [f"generation.{kind}" for kind in ("processing", *TERMINAL)]
CALLBACK_PATH = re.compile(r"/v1/callbacks/deepimage/([^/?#]+)/")
API_TIMEOUT = (3.0, 30.0)
READY_TIMEOUT = 30.0  # until a restarted process answers again
SUBMIT_DEADLINE = 180.0  # how long one generation's POST is retried without an answer
# The receiver fails one delivery at most this many times, so that each fits genrelay's
# 8-attempt schedule (8 failures in a row would be a fault beyond the retry budget).
RECEIVER_MAX_FAILURES = 4
SHOWN = 10  # violations shown per invariant

SoakError = BenchError  # the soak could not run: not a finding


@dataclasses.dataclass(frozen=True)
class Faults:
    upstream_error_rate: float = 0.10
    rate_limit_rate: float = 0.05
    timeout_rate: float = 0.02
    failure_rate: float = 0.05
    duplicate_callback_rate: float = 0.10
    lost_callback_rate: float = 0.10
    receiver_error_rate: float = 0.20
    gcs_windows: int | None = None  # fake-gcs-server outages (None: one per 20 s, at least 3)
    gcs_window_seconds: tuple[float, float] = (2.0, 3.0)
    kills: int = 10  # SIGKILLs of the worker and of the web process each, with `crash`


@dataclasses.dataclass
class SoakConfig:
    generations: int = 2000
    database: str = "sqlite"
    database_url: str | None = None  # an existing empty database; None: a fresh one
    postgres_admin_url: str = POSTGRES_URL
    crash: bool = False
    seed: int = 1
    rate: float = 15.0  # submissions per second (open loop)
    concurrency: int = 8  # submitting threads
    faults: Faults = dataclasses.field(default_factory=Faults)
    drain_timeout: float | None = None  # after the last submission (None: 120 + N/10 s)
    work_dir: Path | None = None  # logs and files, kept (None: a temp dir, kept on failure)
    progress: Callable[[str], None] | None = print

    def settle_timeout(self) -> float:
        return self.drain_timeout if self.drain_timeout is not None else 120 + self.generations / 10

    def fault_window(self) -> tuple[float, float]:
        """Seconds after the first submission within which kills and outages happen."""
        return 0.5, max(2.0, 1.2 * self.generations / self.rate)

    def gcs_windows(self) -> int:
        start, end = self.fault_window()
        return self.faults.gcs_windows or max(3, int((end - start) // 20))


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
    timings: dict[str, Any]
    faults: dict[str, Any]
    statuses: dict[str, int]
    intake: dict[str, Any]
    invariants: list[Invariant]
    log_dir: str

    @property
    def ok(self) -> bool:
        return all(invariant.ok for invariant in self.invariants)

    @property
    def violations(self) -> list[str]:
        return [f"{inv.name}: {v}" for inv in self.invariants for v in inv.violations]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def format(self) -> str:
        t = self.timings
        lines = ["", "== genrelay soak =="]
        lines += [f"{k:>24}: {v}" for k, v in self.config.items()]
        lines += [
            "",
            f"throughput: {t['generations']} generations in {t['end_to_end_s']} s end to end "
            f"({t['generations_per_s']}/s; submission {t['submission_s']} s, settling "
            f"{t['settle_s']} s)",
            f"time to terminal (first POST -> completed_at): {t['time_to_terminal_s']}",
            f"statuses: {self.statuses}",
            f"intake: {self.intake}",
            "faults injected:",
            *(f"  {k}: {v}" for k, v in self.faults.items()),
            "invariants:",
        ]
        for inv in self.invariants:
            extra = f" ({len(inv.violations)} violations)" if inv.violations else ""
            lines.append(f"  {'PASS' if inv.ok else 'FAIL'}  {inv.name}: {inv.summary}{extra}")
            lines += [f"          - {v}" for v in inv.violations[:SHOWN]]
        lines += [f"\nlogs in {self.log_dir}", "RESULT: " + ("PASS" if self.ok else "FAIL")]
        return "\n".join(lines)


def crc32c(data: bytes) -> str:
    """GCS's CRC32C form (base64 of the big-endian value), computed here independently."""
    import google_crc32c

    return base64.b64encode(struct.pack(">I", google_crc32c.value(data))).decode()


def spread(rng: random.Random, count: int, start: float, end: float) -> list[float]:
    """`count` random moments in [start, end], one in each of `count` equal slots."""
    width = (end - start) / max(1, count)
    return [start + width * (k + rng.uniform(0.1, 0.9)) for k in range(count)]


# -- the flaky receiver (a process of its own) ---------------------------------------------


def receiver_main(args: argparse.Namespace) -> int:
    """Verify, answer (5xx at random, seeded per webhook-id and attempt) and record every
    request as a JSON line, until SIGTERM."""
    import standardwebhooks

    webhooks = {"sub": standardwebhooks.Webhook(args.secret)}
    webhooks["gen"] = standardwebhooks.Webhook(args.webhook_secret)
    lock = threading.Lock()
    attempts: collections.Counter[str] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    out = args.record.open("a", encoding="utf-8")
    sequence = 0

    def record(target: str, headers: dict[str, str], body: bytes, complete: bool) -> int:
        nonlocal sequence
        webhook_id = headers.get("webhook-id", "")
        verified, reason, payload = False, "incomplete body", {}
        if complete:
            try:
                webhooks[target].verify(body, headers)
                verified, reason = True, ""
                payload = json.loads(body)
            except Exception as exc:  # a bad signature, an unknown target, garbage
                reason = f"{type(exc).__name__}: {exc}"[:200]
        with lock:
            attempts[webhook_id] += 1
            sequence += 1
            rng = random.Random(f"{args.seed}/{webhook_id}/{attempts[webhook_id]}")
            status = 204 if verified else 401
            fail = rng.random() < args.error_rate
            if verified and fail and failures[webhook_id] < RECEIVER_MAX_FAILURES:
                failures[webhook_id] += 1
                status = rng.choice((500, 502, 503))
            data = payload.get("data") or {}
            line = {
                "seq": sequence, "target": target, "webhook_id": webhook_id,
                "type": payload.get("type"), "generation_id": data.get("id"),
                "verified": verified, "reason": reason, "status": status if complete else 0,
                "incomplete": not complete,
            }  # fmt: skip
            out.write(json.dumps(line) + "\n")
            out.flush()
        return status

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.answer(200)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            target = urlsplit(self.path).path.strip("/")
            # A body that stops short: its sender was SIGKILLed mid-request. Dropped.
            status = record(target, headers, body, len(body) == length)
            if len(body) < length:
                self.close_connection = True
            else:
                self.answer(status)

        def answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            if not isinstance(sys.exc_info()[1], ConnectionError):  # a killed worker's reset
                super().handle_error(request, client_address)

    server = Server((LOOPBACK, args.receiver_port), Handler)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.1)
    out.close()
    return 0


# -- the run -------------------------------------------------------------------------------


@dataclasses.dataclass
class Submission:
    index: int
    key: str
    webhook: bool
    first_attempt: float = 0.0
    connection_errors: int = 0
    replays: int = 0
    generation_id: str | None = None
    error: str | None = None


class Soak:
    def __init__(self, config: SoakConfig, work_dir: Path) -> None:
        self.config, self.work_dir = config, work_dir
        self.rng = random.Random(config.seed)
        self.processes = Processes(work_dir)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.local = threading.local()
        self.submissions: list[Submission] = []
        self.five_xx: list[str] = []  # 5xx answers genrelay gave the driver
        self.connection_errors: collections.Counter[str] = collections.Counter()
        self.kills: list[dict[str, Any]] = []
        self.gcs_windows: list[dict[str, Any]] = []
        self.injector_errors: list[str] = []
        self.unresponsive: list[str] = []
        self.unsettled: str | None = None
        self.intake_latencies: list[float] = []
        self.t0 = 0.0

    def say(self, message: str) -> None:
        if self.config.progress is not None:
            self.config.progress(f"[soak {time.strftime('%H:%M:%S')}] {message}")

    def http(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        session: requests.Session = self.local.session
        return session

    def api(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        """Call genrelay; retry refused connections and 5xx (each 5xx recorded) for 60 s."""
        give_up = time.monotonic() + 60
        while True:
            try:
                response = self.http().request(
                    method, self.base + path, headers=self.auth, timeout=API_TIMEOUT, **kwargs
                )
                if response.status_code < 500:
                    return response
                with self.lock:
                    self.five_xx.append(f"{what}: {method} {path}: {response.status_code}")
            except requests.RequestException:
                with self.lock:
                    self.connection_errors[what] += 1
            if time.monotonic() > give_up:
                raise SoakError(f"{method} {path}: no answer but 5xx or errors for 60 s")
            time.sleep(0.2)

    def get(self, url: str, **kwargs: Any) -> Any:
        response = self.http().get(url, timeout=API_TIMEOUT, **kwargs)
        response.raise_for_status()
        return response.json()

    # -- set-up -----------------------------------------------------------------------------

    def start_serve(self) -> None:
        metrics = self.work_dir / "metrics" / str(self.processes.incarnations["serve"])
        metrics.mkdir(parents=True)
        env = {**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
        self.processes.genrelay("serve", "serve", env=env)

    def start_worker(self) -> None:
        self.processes.genrelay(
            "worker", "worker", "--threads", "4", "--poll-interval", "0.2", env=self.env
        )

    def serve_ready(self) -> bool:
        self.processes.check_alive(["serve"])
        return self.http().get(f"{self.base}/healthz", timeout=(0.5, 2)).ok

    def worker_ready(self) -> bool:
        self.processes.check_alive(["worker"])
        started = self.processes.log_text("worker").count("worker started")
        return started >= self.processes.incarnations["worker"]

    def set_up(self, database_url: str) -> None:
        config, faults = self.config, self.config.faults
        self.gcs = start_gcs(self.processes, root=self.work_dir / "gcs")
        self.sim = start_simulator(
            self.processes, processing_time=0.5, concurrency_limit=1_000_000,
            max_jobs=max(10_000, config.generations * 5), seed=config.seed,
            upstream_error_rate=faults.upstream_error_rate, rate_limit_rate=faults.rate_limit_rate,
            timeout_rate=faults.timeout_rate, timeout_seconds=2.0, failure_rate=faults.failure_rate,
            duplicate_callback_rate=faults.duplicate_callback_rate,
            lost_callback_rate=faults.lost_callback_rate,
        )  # fmt: skip
        port, receiver_port = free_port(), free_port()
        self.base, self.receiver = f"http://{LOOPBACK}:{port}", f"http://{LOOPBACK}:{receiver_port}"
        self.env = genrelay_env(
            database_url, self.sim, self.gcs, port, web=(2, 8), deepimage_timeout=1,
            reconcile_after=2, webhook_retry_schedule="0,0.5,1,2,4,8,8,8", task_lease=5,
            log_level="INFO",
        )  # fmt: skip
        self.auth = {"Authorization": f"Bearer {prepare_database(self.env, 'soak')}"}
        self.start_serve()
        self.start_worker()
        wait_until(self.serve_ready, "genrelay serve", 60, self.processes)
        wait_for_log(self.processes, "worker", "worker started")
        subscription = self.api(
            "POST", "/v1/subscriptions", "setup",
            json={"url": f"{self.receiver}/sub", "events": EVENT_TYPES, "format": "standard"},
        ).json()  # fmt: skip
        default = self.api("GET", "/v1/webhooks/default/secret", "setup").json()["secret"]
        self.records = self.work_dir / "receiver-records.jsonl"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--receiver-port",
            str(receiver_port),
        ]
        argv += ["--secret", subscription["secret"], "--webhook-secret", default]
        argv += ["--record", str(self.records), "--seed", str(config.seed)]
        argv += ["--error-rate", str(faults.receiver_error_rate)]
        self.processes.start("receiver", argv, self.env)
        wait_until(
            lambda: self.http().get(self.receiver, timeout=1).ok, "the receiver", 30, self.processes
        )

    # -- load and faults --------------------------------------------------------------------

    def submit(self, s: Submission) -> None:
        width, height, fmt = ((256, 256, "png"), (320, 240, "jpeg"), (256, 192, "webp"))[
            s.index % 3
        ]
        background = {"generate": {"description": f"soak {self.config.seed}/{s.index}"}}
        body: dict[str, Any] = {
            "input": {"width": width, "height": height, "output_format": fmt,
                      "background": background},
            "metadata": {"soak": str(s.index)},
        }  # fmt: skip
        if s.webhook:
            body["webhook"] = f"{self.receiver}/gen"
        headers = {**self.auth, "Idempotency-Key": s.key}
        s.first_attempt = time.time()
        give_up = time.monotonic() + SUBMIT_DEADLINE
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                response = self.http().post(
                    f"{self.base}/v1/generations", json=body, headers=headers, timeout=API_TIMEOUT
                )
            except requests.RequestException as exc:
                s.connection_errors += 1
                if time.monotonic() > give_up:
                    s.error = f"no answer for {SUBMIT_DEADLINE:.0f} s: {exc!r}"[:300]
                    return
                time.sleep(0.2)
                continue
            with self.lock:
                self.intake_latencies.append(time.monotonic() - began)
            if response.status_code >= 500:
                with self.lock:
                    self.five_xx.append(f"intake: {response.status_code} {response.text[:200]}")
                time.sleep(0.2)
                continue
            if response.status_code != 202:
                s.error = f"answered {response.status_code}: {response.text[:300]}"
                return
            s.replays += response.headers.get("Idempotent-Replayed") == "true"
            s.generation_id = response.json()["id"]
            return

    def submit_all(self) -> None:
        config = self.config
        share = random.Random(f"{config.seed}/webhooks")
        self.submissions = [
            Submission(
                i, f"soak-{config.seed}-{i:06d}-{secrets.token_hex(4)}", share.random() < 0.5
            )
            for i in range(config.generations)
        ]
        phase_end = self.t0 + max(120.0, 4 * config.generations / config.rate)

        def one(s: Submission) -> None:
            self.stop.wait(max(0.0, self.t0 + s.index / config.rate - time.monotonic()))
            if time.monotonic() > phase_end:
                s.error = "not submitted: the submission phase ran out of time"
            else:
                self.submit(s)
            if (s.index + 1) % max(1, config.generations // 10) == 0:
                self.say(f"submitted {s.index + 1}/{config.generations}")

        with ThreadPoolExecutor(config.concurrency) as pool:
            list(pool.map(one, self.submissions))

    def poller(self) -> None:
        """GETs random generations while the run goes on (a 5xx is a finding)."""
        rng = random.Random(f"{self.config.seed}/poller")
        while not self.stop.wait(0.1):
            known = [s.generation_id for s in self.submissions if s.generation_id]
            if known:
                with contextlib.suppress(requests.RequestException):
                    gid = rng.choice(known)
                    response = self.http().get(
                        f"{self.base}/v1/generations/{gid}", headers=self.auth, timeout=API_TIMEOUT
                    )
                    if response.status_code >= 500:
                        with self.lock:
                            self.five_xx.append(f"poll: {gid}: {response.status_code}")

    def crasher(self, name: str, moments: list[float]) -> None:
        """SIGKILL `name` at each moment (once it is up) and restart it at once."""
        ready = self.serve_ready if name == "serve" else self.worker_ready
        restart = self.start_serve if name == "serve" else self.start_worker
        try:
            for number, moment in enumerate(moments, 1):
                if self.stop.wait(max(0.0, self.t0 + moment - time.monotonic())):
                    return
                if not self.ready_within(ready):
                    self.unresponsive.append(f"{name} not ready before kill {number}")
                killed = time.monotonic()
                self.processes.kill(name)
                restart()
                if not self.ready_within(ready):
                    self.unresponsive.append(
                        f"{name} not ready {READY_TIMEOUT:.0f} s after kill {number}"
                    )
                back = round(time.monotonic() - killed, 2)
                self.kills.append(
                    {"process": name, "at_s": round(killed - self.t0, 2), "back_after_s": back}
                )
        except Exception as exc:
            self.injector_errors.append(f"{name} crasher: {exc}")

    def ready_within(self, ready: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self.stop.is_set():
            with contextlib.suppress(requests.RequestException):
                if ready():
                    return True
            time.sleep(0.05)
        return False

    def gcs_outages(self, moments: list[float]) -> None:
        """Stop fake-gcs-server for a few seconds at each moment; the same port after."""
        rng = random.Random(f"{self.config.seed}/gcs")
        try:
            for moment in moments:
                if self.stop.wait(max(0.0, self.t0 + moment - time.monotonic())):
                    return
                began = time.monotonic()
                self.processes.stop("gcs")
                self.stop.wait(rng.uniform(*self.config.faults.gcs_window_seconds))
                self.processes.restart("gcs")
                wait_until(self.gcs_up, "fake-gcs-server", 30)
                down = round(time.monotonic() - began, 2)
                self.gcs_windows.append({"at_s": round(began - self.t0, 2), "down_s": down})
        except Exception as exc:
            self.injector_errors.append(f"GCS outages: {exc}")

    def gcs_up(self) -> bool:
        return requests.get(f"{self.gcs}/_internal/healthcheck", timeout=1).ok

    def settled(self) -> bool:
        for path, status in (
            ("generations", "queued"),
            ("generations", "processing"),
            ("deliveries", "pending"),
        ):
            page = self.api("GET", f"/v1/{path}", "settle", params={"status": status, "limit": 1})
            if page.json()["data"]:
                return False
        return True

    def run_load(self) -> dict[str, float]:
        config = self.config
        start, end = config.fault_window()
        injectors = [
            threading.Thread(
                target=self.gcs_outages, args=(spread(self.rng, config.gcs_windows(), start, end),)
            )
        ]
        if config.crash:
            for name in ("worker", "serve"):
                moments = spread(self.rng, config.faults.kills, start, end)
                injectors.append(threading.Thread(target=self.crasher, args=(name, moments)))
        threads = [threading.Thread(target=self.poller), *injectors]
        self.t0, wall0 = time.monotonic(), time.time()
        for thread in threads:
            thread.daemon = True
            thread.start()
        try:
            self.submit_all()
            submitted = time.monotonic()
            self.say(f"all {config.generations} submitted in {submitted - self.t0:.1f} s; settling")
            deadline = submitted + config.settle_timeout()
            for thread in injectors:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            while True:
                if self.injector_errors:
                    raise SoakError("; ".join(self.injector_errors))
                self.processes.check_alive()
                if not any(t.is_alive() for t in injectors) and self.settled():
                    break
                if time.monotonic() > deadline:  # checked anyway: what is open shows up
                    self.unsettled = (
                        f"not settled {config.settle_timeout():.0f} s after the last submission"
                    )
                    break
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

    def paged(self, path: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self.api("GET", path, "check", params=params).json()
            items += page["data"]
            if not page.get("next_cursor"):
                return items
            params["cursor"] = page["next_cursor"]

    def collect(self) -> dict[str, Any]:
        """Everything the checks need, read while the stack still runs."""
        self.say("collecting generations, events, deliveries, jobs and objects")
        data: dict[str, Any] = {
            "generations": {g["id"]: g for g in self.paged("/v1/generations")},
            "events": self.paged("/v1/events"),
            "deliveries": self.paged("/v1/deliveries"),
            "sim_stats": self.get(f"{self.sim}/_sim/stats"),
        }
        job_ids = [job["job"] for job in self.get(f"{self.sim}/_sim/jobs")["jobs"]]
        objects: dict[str, dict[str, Any]] = {}
        params: dict[str, Any] = {"maxResults": 1000}
        while True:
            listing = self.get(f"{self.gcs}/storage/v1/b/{BUCKET}/o", params=params)
            objects.update({item["name"]: item for item in listing.get("items", [])})
            if not listing.get("nextPageToken"):
                break
            params["pageToken"] = listing["nextPageToken"]

        def bytes_crc(url: str, **params: Any) -> str:
            response = self.http().get(url, params=params, timeout=API_TIMEOUT)
            return crc32c(response.content) if response.ok else f"HTTP {response.status_code}"

        with ThreadPoolExecutor(8) as pool:
            jobs = dict(
                zip(
                    job_ids,
                    pool.map(lambda j: self.get(f"{self.sim}/_sim/jobs/{j}"), job_ids),
                    strict=True,
                )
            )
            urls = [
                f"{self.gcs}/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}" for name in objects
            ]
            data["object_crcs"] = dict(
                zip(objects, pool.map(lambda u: bytes_crc(u, alt="media"), urls), strict=True)
            )
            results = sorted({j["result_url"] for j in jobs.values() if j.get("result_url")})
            data["upstream_crcs"] = dict(zip(results, pool.map(bytes_crc, results), strict=True))
        data.update(jobs=jobs, objects=objects)
        return data

    def job_generation(self, job: dict[str, Any]) -> str | None:
        url = ((job.get("request") or {}).get("webhooks") or {}).get("complete") or ""
        match = CALLBACK_PATH.search(url)
        return match.group(1) if match else None

    def check(self, data: dict[str, Any], records: list[dict[str, Any]]) -> list[Invariant]:
        gens, jobs = data["generations"], data["jobs"]
        invariants = [self.check_terminal(gens, jobs), self.check_objects(gens, jobs, data)]
        invariants += self.check_notifications(gens, data, records)
        invariants.append(self.check_no_5xx(jobs))
        planned = self.config.faults.kills if self.config.crash else 0
        injected = list(self.injector_errors)
        for name in ("worker", "serve"):
            done = sum(1 for kill in self.kills if kill["process"] == name)
            if done != planned:
                injected.append(f"{done} kills of {name}, {planned} planned")
        if len(self.gcs_windows) != self.config.gcs_windows():
            injected.append(
                f"{len(self.gcs_windows)} GCS windows, {self.config.gcs_windows()} planned"
            )
        summary = f"{len(self.kills)} kills, {len(self.gcs_windows)} GCS windows"
        invariants.append(Invariant("faults injected as planned", summary, injected))
        if self.config.crash:
            summary = f"serve and worker ready within {READY_TIMEOUT:.0f} s around every kill"
            invariants.append(Invariant("responsive", summary, self.unresponsive))
        summary = f"all terminal, no delivery pending within {self.config.settle_timeout():.0f} s"
        invariants.append(Invariant("settled", summary, [self.unsettled] if self.unsettled else []))
        return invariants

    def check_terminal(self, gens: dict[str, Any], jobs: dict[str, Any]) -> Invariant:
        """Failed `upstream_job_failed` exactly where the simulator's job failed, else
        succeeded; one generation per Idempotency-Key; none unaccounted for."""
        violations: list[str] = []
        ids = [s.generation_id for s in self.submissions if s.generation_id]
        violations += [
            f"request {s.index}: {s.error}" for s in self.submissions if not s.generation_id
        ]
        if len(set(ids)) != len(ids):
            violations.append("two requests got the same generation")
        violations += [
            f"{g} exists but no request got it" for g in sorted(set(gens) - set(ids))[:50]
        ]
        counts: collections.Counter[str] = collections.Counter()
        expected_failures = 0
        for gid in ids:
            if gid not in gens:
                violations.append(f"{gid} is not listed")
                continue
            g = gens[gid]
            status, error = g["status"], (g.get("error") or {}).get("code")
            counts[f"{status}/{error}" if error else status] += 1
            job = jobs.get((g.get("upstream") or {}).get("job") or "")
            if job is None or self.job_generation(job) != gid:
                violations.append(
                    f"{gid} ({status}/{error}): its upstream job is unknown or another's"
                )
            elif job["will_fail"]:
                expected_failures += 1
                if (status, error) != ("failed", "upstream_job_failed"):
                    violations.append(f"{gid}: its job failed upstream, yet it is {status}/{error}")
            elif status != "succeeded":
                violations.append(
                    f"{gid}: its job completed, yet it is {status}/{error}: {g.get('error')}"
                )
        summary = f"{len(ids)} generations, {dict(counts)}; {expected_failures} job failures"
        return Invariant("terminal states", summary, violations)

    def check_objects(
        self, gens: dict[str, Any], jobs: dict[str, Any], data: dict[str, Any]
    ) -> Invariant:
        """One object per success, none for the others; CRC32C of the record, the object,
        its bytes and the simulator's image all equal."""
        violations: list[str] = []
        by_generation: dict[str, list[str]] = collections.defaultdict(list)
        for name in data["objects"]:  # names end in `{generation id}.{extension}`
            by_generation[name.rsplit("/", 1)[-1].split(".", 1)[0]].append(name)
        succeeded = 0
        for gid, g in gens.items():
            mine = by_generation.get(gid, [])
            if g["status"] != "succeeded":
                violations += [f"{gid} is {g['status']} but has {mine}"] if mine else []
                continue
            succeeded += 1
            result = g.get("result") or {}
            name = (result.get("uri") or "").removeprefix(f"gs://{BUCKET}/")
            if mine != [name]:
                violations.append(f"{gid}: result {result.get('uri')!r}, objects {mine}")
                continue
            job = jobs.get((g.get("upstream") or {}).get("job") or "") or {}
            crcs = {
                result.get("crc32c"),
                data["objects"][name].get("crc32c"),
                data["object_crcs"][name],
                data["upstream_crcs"].get(job.get("result_url") or "", "no result_url"),
            }
            if len(crcs) != 1:
                violations.append(f"{gid}: CRC32C differ: {crcs}")
        violations += [
            f"objects {n} belong to no generation"
            for g, n in by_generation.items()
            if g not in gens
        ]
        return Invariant(
            "objects", f"{len(data['objects'])} objects, {succeeded} succeeded", violations
        )

    def check_notifications(
        self, gens: dict[str, Any], data: dict[str, Any], records: list[dict[str, Any]]
    ) -> list[Invariant]:
        events, deliveries = data["events"], data["deliveries"]
        # Events: exactly `processing` and the terminal one per generation.
        event_violations = []
        types: dict[str, list[str]] = collections.defaultdict(list)
        for event in events:
            types[event["generation_id"]].append(event["type"])
        for gid, g in gens.items():
            expected = sorted(["generation.processing", f"generation.{g['status']}"])
            if sorted(types.get(gid, [])) != expected:
                event_violations.append(
                    f"{gid} ({g['status']}): events {sorted(types.get(gid, []))}"
                )
        event_violations += [f"events of an unknown generation {g}" for g in set(types) - set(gens)]
        # Deliveries: one per (event, target), accepted once with a valid signature.
        rows: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
        for delivery in deliveries:
            rows[(delivery["event_id"], urlsplit(delivery["url"]).path.strip("/"))].append(delivery)
        received: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for r in records:
            received[r["webhook_id"]].append(r)
        bad = [r for r in records if not r["verified"] and not r["incomplete"]]
        violations = [
            f"bad signature on {r['webhook_id']} /{r['target']}: {r['reason']}" for r in bad[:50]
        ]
        pairs = delivered = 0
        for event in events:
            for target in ["sub"] + (
                ["gen"] if gens.get(event["generation_id"], {}).get("webhook") else []
            ):
                pairs += 1
                where = f"{event['type']} of {event['generation_id']} to /{target}"
                found = rows.get((event["id"], target), [])
                if len(found) != 1:
                    violations.append(f"{where}: {len(found)} deliveries")
                    if not found:
                        continue
                row = found[0]
                if row["status"] != "succeeded":
                    violations.append(
                        f"{where}: {row['status']} after {row['attempt_count']} attempts"
                    )
                accepted = [
                    r for r in received.get(row["webhook_id"], [])
                    if r["target"] == target and r["verified"] and 200 <= r["status"] < 300
                ]  # fmt: skip
                if not accepted:
                    violations.append(f"{where}: never accepted by the receiver")
                elif any(
                    (r["type"], r["generation_id"]) != (event["type"], event["generation_id"])
                    for r in accepted
                ):
                    violations.append(f"{where}: the received body is another event's")
                else:
                    delivered += 1
        stray = sorted(set(received) - {d["webhook_id"] for d in deliveries})
        violations += [f"received {webhook_id}, which no delivery has" for webhook_id in stray[:20]]
        # Lifecycle order: per (generation, target), the terminal event reaches the receiver
        # only after the processing event was accepted there.
        first: dict[tuple[str, str], dict[str, int]] = collections.defaultdict(dict)
        for r in records:
            if r["verified"] and r["generation_id"]:
                key = (r["generation_id"], r["target"])
                if r["type"] != "generation.processing":
                    first[key].setdefault("terminal", r["seq"])
                elif 200 <= r["status"] < 300:
                    first[key].setdefault("processing", r["seq"])
        order = [
            f"{gid} /{target}: terminal event #{seen['terminal']} before processing accepted"
            for (gid, target), seen in first.items()
            if "terminal" in seen and seen.get("processing", sys.maxsize) > seen["terminal"]
        ]
        statuses = dict(collections.Counter(d["status"] for d in deliveries))
        summary = (
            f"{delivered}/{pairs} (event, target) pairs delivered; deliveries {statuses}; "
            f"{len(records)} requests received, {sum(r['status'] >= 500 for r in records)} "
            f"answered 5xx; {len(bad)} bad signatures"
        )
        return [
            Invariant(
                "events", f"{len(events)} events for {len(gens)} generations", event_violations
            ),
            Invariant("deliveries", summary, violations),
            Invariant("lifecycle order", f"{len(first)} (generation, target) pairs", order),
        ]

    def check_no_5xx(self, jobs: dict[str, Any]) -> Invariant:
        """None to the driver, none in the access logs, none to the simulator's callbacks (a
        refused connection while the web process is down is not a 5xx)."""
        violations = list(self.five_xx)
        for line in self.processes.log_text("serve").splitlines():
            if line.startswith("{") and '"gunicorn.access"' in line:
                with contextlib.suppress(ValueError):
                    request = json.loads(line).get("httpRequest") or {}
                    if (request.get("status") or 0) >= 500:
                        violations.append(f"{request.get('requestUrl')}: {request['status']}")
        self.callbacks: collections.Counter[str] = collections.Counter()
        for job_id, job in jobs.items():
            for callback in job.get("callbacks") or []:
                if not callback.get("lost"):
                    code = callback.get("status_code")
                    self.callbacks[str(code or callback.get("error"))] += 1
                    if code and code >= 500:
                        violations.append(f"callback of job {job_id} answered {code}")
        summary = (
            f"callback answers {dict(self.callbacks)}; "
            f"connection errors (process down) {dict(self.connection_errors)}"
        )
        return Invariant("no 5xx", summary, violations)

    # -- the whole run ----------------------------------------------------------------------

    def run(self, database_url: str) -> SoakReport:
        config = self.config
        try:
            self.set_up(database_url)
            self.say(
                f"submitting {config.generations} at {config.rate}/s"
                + (" with crashes" if config.crash else "")
            )
            phases = self.run_load()
            data = self.collect()
        finally:
            self.stop.set()
            self.processes.stop_all()
        lines = self.records.read_text().splitlines() if self.records.exists() else []
        records = [json.loads(line) for line in lines]
        invariants = self.check(data, records)
        gens = data["generations"]
        durations, last = [], phases["wall0"]
        for s in self.submissions:
            done = epoch(gens.get(s.generation_id or "", {}).get("completed_at"))
            if done:
                durations.append(done - s.first_attempt)
                last = max(last, done)
        first = min((s.first_attempt for s in self.submissions if s.first_attempt), default=last)
        end_to_end = max(last - first, 1e-9)
        stats = data["sim_stats"]
        return SoakReport(
            config={
                **machine_facts(),
                **{
                    k: v
                    for k, v in dataclasses.asdict(config).items()
                    if k not in ("progress", "database_url", "postgres_admin_url")
                },
            },
            timings={
                "generations": len(self.submissions),
                "submission_s": round(phases["submission_s"], 2),
                "settle_s": round(phases["settle_s"], 2),
                "end_to_end_s": round(end_to_end, 2),
                "generations_per_s": round(len(self.submissions) / end_to_end, 2),
                "time_to_terminal_s": {
                    **{f"p{p}": round(percentile(durations, p), 2) for p in (50, 90, 99)},
                    "max": round(max(durations, default=0), 2),
                },
            },
            faults={
                "simulator": {
                    k: v
                    for k, v in stats.items()
                    if k.startswith(("injected_", "callbacks_", "jobs_"))
                },
                "callback_answers": dict(self.callbacks),
                "receiver_5xx": sum(r["status"] >= 500 for r in records),
                "receiver_incomplete": sum(r["incomplete"] for r in records),
                "gcs_windows": self.gcs_windows,
                "kills": self.kills,
            },
            statuses=dict(
                collections.Counter(
                    g["status"] + (f"/{g['error']['code']}" if g.get("error") else "")
                    for g in gens.values()
                )
            ),
            intake={
                "answered_latency_p50_p99_s": [
                    round(percentile(self.intake_latencies, p), 3) for p in (50, 99)
                ],
                "generations_retried_after_a_connection_error": sum(
                    1 for s in self.submissions if s.connection_errors
                ),
                "replayed_answers": sum(s.replays for s in self.submissions),
            },
            invariants=invariants,
            log_dir=str(self.work_dir),
        )


@contextlib.contextmanager
def soak_database(config: SoakConfig, work_dir: Path) -> Iterator[str]:
    if config.database_url is not None:
        yield config.database_url
        return
    with fresh_database(config.database, work_dir, config.postgres_admin_url, "soak") as (url, _):
        yield url


def run_soak(config: SoakConfig) -> SoakReport:
    """One soak; SoakError (with the ends of the process logs) if it could not run."""
    work_dir = config.work_dir or Path(tempfile.mkdtemp(prefix="genrelay-soak-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    soak = Soak(config, work_dir)
    report = None
    try:
        with soak_database(config, work_dir) as url:
            try:
                report = soak.run(url)
            except SoakError as exc:
                raise SoakError(f"{exc}\n\n{soak.processes.logs(3000)}") from None
        return report
    finally:
        if config.work_dir is None and report is not None and report.ok:
            shutil.rmtree(work_dir, ignore_errors=True)


def interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__)
    parser.add_argument("--generations", type=int, default=2000, help="(2000)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--crash", action="store_true", help="SIGKILL worker and web 10x each")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=15.0, help="submissions/s (15)")
    receiver = parser.add_argument_group("receiver mode (started by the soak itself)")
    receiver.add_argument("--receiver-port", type=int)
    receiver.add_argument("--secret")
    receiver.add_argument("--webhook-secret")
    receiver.add_argument("--record", type=Path)
    receiver.add_argument("--error-rate", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.receiver_port:
        return receiver_main(args)
    signal.signal(signal.SIGTERM, interrupt)
    config = SoakConfig(
        generations=args.generations, database=args.database, postgres_admin_url=args.postgres_url,
        crash=args.crash, seed=args.seed, rate=args.rate, work_dir=args.log_dir,
    )  # fmt: skip
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
        args.json_out.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        print(f"JSON report: {args.json_out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
