"""Completion path: the simulator's callback -> result streamed into GCS -> `succeeded`.

Per result size: the callback -> `completed_at` time, split with the store task's row (queued,
claimed, stored), next to a bare script streaming the same bytes from the simulator into the
same fake-gcs-server bucket; then the worker's peak RSS growth while it stores one large
result (target: <= 32 MiB). How to read it: bench/README.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import requests
from _stack import (
    BUCKET,
    CLIENT_TIMEOUT,
    MIB,
    SIMULATOR_LIMIT,
    TERMINAL,
    BenchError,
    Context,
    Database,
    Processes,
    RssSampler,
    epoch,
    free_port,
    genrelay_env,
    median,
    options,
    prepare_database,
    print_table,
    proc_status,
    reset_peak_rss,
    run_benchmark,
    small_body,
    start_gcs,
    start_serve,
    start_simulator,
    start_worker,
)

TRANSFER_TIMEOUT = (5.0, 120.0)
RSS_TARGET = 32 * MIB
# The simulator renders a result on its first GET; the callback waits this long (plus some
# per MiB) so that the benchmark's HEAD has rendered it before genrelay hears of the job.
CALLBACK_DELAY = 0.3
CALLBACK_DELAY_PER_MIB = 0.012


class Stack:
    def __init__(self, ctx: Context, processes: Processes, largest: int) -> None:
        db_url, _ = ctx.database("sqlite")
        self.processes = processes
        self.sim = start_simulator(
            processes, processing_time=0.05, concurrency_limit=SIMULATOR_LIMIT
        )
        # Files, not memory: fake-gcs-server would hold every 512 MiB object in its RAM.
        self.gcs = start_gcs(processes, root=ctx.tmp_dir / "gcs")
        env = genrelay_env(
            db_url, self.sim, self.gcs, free_port(), reconcile_after=600,  # callbacks only
            max_result_bytes=max(1024 * MIB, 2 * largest),
        )  # fmt: skip
        self.auth = {"Authorization": f"Bearer {prepare_database(env)}"}
        self.api = start_serve(processes, env)
        self.worker = start_worker(processes, env, "worker", "--threads", "2").pid
        self.db = Database(db_url)
        self.http = requests.Session()

    def call(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self.http.request(method, url, timeout=CLIENT_TIMEOUT, **kwargs)
        if not response.ok:
            raise BenchError(f"{method} {url}: {response.status_code} {response.text[:300]}")
        return response.json()

    def generation(self, target: int, padding: int) -> dict[str, Any]:
        """One generation of about `target` bytes through the callback; its timings."""
        delay = CALLBACK_DELAY + CALLBACK_DELAY_PER_MIB * target / MIB
        settings = {"result_padding_bytes": padding, "callback_delay": delay}
        self.call("POST", f"{self.sim}/_sim/settings", json=settings)
        generation = self.call(
            "POST", f"{self.api}/v1/generations", json=small_body(), headers=self.auth
        )
        gid = generation["id"]
        deadline = time.monotonic() + 15
        while not (job_id := (generation.get("upstream") or {}).get("job")):
            if time.monotonic() > deadline:
                raise BenchError(f"{gid} has no upstream job: {generation}")
            time.sleep(0.05)
            generation = self.call("GET", f"{self.api}/v1/generations/{gid}", headers=self.auth)
        while (job := self.call("GET", f"{self.sim}/_sim/jobs/{job_id}"))["state"] != "complete":
            if time.monotonic() > deadline:
                raise BenchError(f"simulator job {job_id} is {job['state']}")
            time.sleep(0.01)
        head = self.http.head(job["result_url"], timeout=TRANSFER_TIMEOUT)  # renders it
        rendered_at = time.time()
        claimed_at = None
        deadline = time.monotonic() + 60 + target / (2 * MIB)
        while generation["status"] not in TERMINAL:
            self.processes.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{gid} not finished in time")
            task = self.db.rows(
                "SELECT status, updated_at FROM tasks WHERE kind = 'store' AND generation_id = ?",
                (gid,),
            )
            if task and task[0][0] == "running" and claimed_at is None:
                claimed_at = epoch(task[0][1])  # set by the claim
            time.sleep(0.01)
            generation = self.call("GET", f"{self.api}/v1/generations/{gid}", headers=self.auth)
        callbacks = self.call("GET", f"{self.sim}/_sim/jobs/{job_id}")["callbacks"]
        sent = epoch(callbacks[0]["sent_at"]) if callbacks else None
        queued_at, attempts = self.db.rows(
            "SELECT created_at, attempts FROM tasks WHERE kind = 'store' AND generation_id = ?",
            (gid,),
        )[0]
        result, done = generation.get("result") or {}, epoch(generation.get("completed_at"))
        problems = [
            f"{generation['status']}: {generation.get('error')}"
            if generation["status"] != "succeeded"
            else "",
            "render overlapped the callback" if sent and rendered_at > sent else "",
            f"callbacks {[c.get('status_code') for c in callbacks]}"
            if len(callbacks) != 1 or not 200 <= (callbacks[0].get("status_code") or 0) < 300
            else "",
            f"store task ran {attempts} times" if attempts != 1 else "",
        ]
        return {
            "id": gid,
            "status": generation["status"],
            "result_url": job["result_url"],
            "content_type": head.headers.get("Content-Type", "application/octet-stream"),
            "bytes": result.get("size"),
            "crc32c": result.get("crc32c"),
            "phases": {
                "server": span(sent, done),
                "callback_to_queued": span(sent, epoch(queued_at)),
                "queued_to_claimed": span(epoch(queued_at), claimed_at),
                "store_work": span(claimed_at, done),
            },
            "problems": [p for p in problems if p],
        }


def span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 4)


class ChunkReader:
    """A download's chunks as a file for the uploader: reads filled to the size asked."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.buffer, self.position = chunks, bytearray(), 0

    def read(self, size: int | None = -1) -> bytes:
        while size is None or size < 0 or len(self.buffer) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        size = len(self.buffer) if size is None or size < 0 else size
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.position += len(out)
        return out

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset == self.position:  # the client "seeks" to where it is
            return offset
        raise OSError("a download cannot be rewound")


def bare_stream(gcs_url: str, url: str, content_type: str) -> tuple[float, str | None]:
    """Seconds to stream `url` into a new object as genrelay does it, without genrelay (the
    official client, 4 MiB chunks, CRC32C checked), and the object's CRC32C."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="bench",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs_url},
    )
    blob = client.bucket(BUCKET).blob(f"bare/{time.time_ns()}")
    blob.chunk_size = 4 * MIB
    began = time.perf_counter()
    with requests.get(url, stream=True, timeout=TRANSFER_TIMEOUT) as response:
        response.raise_for_status()
        size = int(response.headers["Content-Length"])
        reader = ChunkReader(response.iter_content(MIB))
        blob.upload_from_file(
            reader, size=size, content_type=content_type, if_generation_match=0,
            checksum="crc32c", timeout=TRANSFER_TIMEOUT,
        )  # fmt: skip
    seconds = time.perf_counter() - began
    crc32c: str | None = blob.crc32c
    blob.delete()
    client.close()
    return seconds, crc32c


def measure(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    processes = ctx.new_processes()
    stack = Stack(ctx, processes, max([*args.sizes, 0 if args.skip_rss else args.rss_size]))
    base = stack.generation(0, 0)  # also warms every code path up
    if base["status"] != "succeeded":
        raise BenchError(f"the first generation did not succeed: {base['problems']}")
    sizes = []
    for target in args.sizes:
        padding = max(0, target - base["bytes"])
        runs, growth = [], []
        for number in range(1 - args.warmup, args.repeats + 1):
            before = proc_status(stack.worker)["VmRSS"]
            reset = reset_peak_rss(stack.worker)
            run = stack.generation(target, padding)
            if reset:
                growth.append((proc_status(stack.worker)["VmHWM"] - before) / MIB)
            if number > 0:
                seconds, crc = bare_stream(stack.gcs, run["result_url"], run["content_type"])
                run["bare_stream"] = seconds
                if crc != run["crc32c"]:
                    run["problems"].append(f"CRC32C {run['crc32c']}, bare {crc}")
                runs.append(run)
                print(f"  {label(target)} #{number}: {run['phases']}, bare {seconds:.3f} s")
        sizes.append(
            {
                "label": label(target),
                "bytes": median(r["bytes"] for r in runs),
                "phases": {
                    phase: {"median": median(r["phases"][phase] for r in runs)}
                    for phase in runs[0]["phases"]
                },
                "raw": {"stream": {"median": median(r["bare_stream"] for r in runs)}},
                "worker_peak_growth_mib": median(growth),
                "problems": [p for r in runs for p in r["problems"]],
            }
        )
    rss = None
    if not args.skip_rss:
        time.sleep(1.0)  # let the worker settle
        status = proc_status(stack.worker)
        reset = reset_peak_rss(stack.worker)
        with RssSampler(lambda: [stack.worker], 0.02) as sampler:
            run = stack.generation(args.rss_size, max(0, args.rss_size - base["bytes"]))
        # Where VmHWM could not be reset this can only understate.
        peak = status["VmRSS"] if reset else max(status["VmHWM"], status["VmRSS"])
        grown = proc_status(stack.worker)["VmHWM"] - peak
        bare, _ = bare_stream(stack.gcs, run["result_url"], run["content_type"])
        rss = {
            "label": label(args.rss_size),
            "status": run["status"],
            "hwm_reset": reset,
            "growth_mib": round(grown / MIB, 1),
            "sampled_growth_mib": round((sampler.peak - status["VmRSS"]) / MIB, 1),
            "pass": grown <= RSS_TARGET and run["status"] == "succeeded",
            "phases": run["phases"],
            "bare_stream": round(bare, 3),
            "problems": run["problems"],
        }
    return {
        "settings": {
            "database": "SQLite; fake-gcs-server, filesystem backend",
            "runs": f"{args.repeats} per size (+{args.warmup} warm-up); worker --threads 2",
        },
        "sizes": sizes,
        "rss": rss,
    }


def label(size: int) -> str:
    return f"{size / MIB:g} MiB" if size >= MIB else f"{size / 1024:g} KiB"


def print_report(report: dict[str, Any]) -> None:
    phases = ("server", "callback_to_queued", "queued_to_claimed", "store_work")
    rows = [
        [s["label"], *(s["phases"][p]["median"] for p in phases), s["raw"]["stream"]["median"],
         s["worker_peak_growth_mib"]]
        for s in report["sizes"]
    ]  # fmt: skip
    print("seconds, medians; callback -> succeeded (server) = queued + claimed + store")
    head = ["result", "callback->succeeded", "->queued", "->claimed", "store", "bare stream"]
    print_table([*head, "worker VmHWM growth MiB"], rows, ".3f")
    for s in report["sizes"]:
        if s["problems"]:
            print(f"  {s['label']}: {s['problems']}")
    rss = report["rss"]
    if rss:
        verdict = "PASS" if rss["pass"] else "FAIL"
        print(
            f"\nworker memory while storing {rss['label']} ({rss['status']}): VmHWM grew "
            f"{rss['growth_mib']} MiB (target <= 32: {verdict}; sampled every 20 ms: "
            f"{rss['sampled_growth_mib']} MiB{'' if rss['hwm_reset'] else '; VmHWM not reset'})"
            f"; store {rss['phases']['store_work']} s, bare stream {rss['bare_stream']} s"
            + (f"; {rss['problems']}" if rss["problems"] else "")
        )


def parse_size(text: str) -> int:
    """`1MB`, `50MiB`, `64KB`: KB and MB are read as KiB and MiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(match[1]) * 1024 ** " KMG".index(match[2] or " "))


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__)
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(part) for part in text.split(",")],
        default=[MIB, 50 * MIB],
        help="result sizes (1MB,50MB)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per size (5)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted runs per size (1)")
    parser.add_argument("--rss-size", type=parse_size, default=512 * MIB, help="(512MB)")
    parser.add_argument("--skip-rss", action="store_true", help="no memory run")
    args = parser.parse_args(argv)
    return run_benchmark("genrelay completion-path benchmark", args, measure, print_report)


if __name__ == "__main__":
    sys.exit(main())
