"""Webhook deliveries: one `genrelay worker` draining a backlog next to a bare requests pool.

Each round builds N pending deliveries to a fresh subscription; one `genrelay worker
--threads T` sends them, then a ThreadPoolExecutor(T) signs and posts the same bodies; both
to the same receiver, an asyncio server in a process of its own. How to read it:
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import datetime as dt
import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from _stack import (
    LOOPBACK,
    BenchError,
    Context,
    Database,
    base_env,
    epoch,
    free_port,
    machine_busy,
    options,
    percentile,
    prepare_database,
    print_table,
    process_cpu,
    run_benchmark,
    wait_until,
)

EVENT = "generation.succeeded"
WORKER_APP = "genrelay-bench-worker"  # finds the worker's PostgreSQL backends


# -- the receiver: `python bench/deliveries.py --receiver-port PORT` ------------------------


def serve_receiver(port: int) -> int:
    """HTTP/1.1 with keep-alive: 204 to every POST; GET /_stats (and /_reset) its counters."""
    state: dict[str, Any] = {}

    def reset() -> None:
        state.update(posts=0, first=None, last=None, ids=set(), samples=[])

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                lines = self.buffer[:end].decode("latin-1").split("\r\n")
                headers = dict(line.lower().split(": ", 1) for line in lines[1:])
                length = int(headers.get("content-length", "0"))
                if len(self.buffer) < end + 4 + length:
                    return
                body = self.buffer[end + 4 : end + 4 + length]
                self.buffer = self.buffer[end + 4 + length :]
                self.answer(lines[0].split(" ")[:2], headers, body)

        def answer(self, request: list[str], headers: dict[str, str], body: bytes) -> None:
            if request[0] == "POST":
                state["first"] = state["first"] or time.time()
                state["last"] = time.time()
                state["posts"] += 1
                state["ids"].add(headers.get("webhook-id"))
                if len(state["samples"]) < 3:
                    state["samples"].append({"headers": headers, "body": body.decode()})
                self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                return
            stats = {**state, "ids": len(state["ids"])}
            if request[1] == "/_reset":
                reset()
            payload = json.dumps(stats).encode()
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)
            self.transport.write(head + payload)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Protocol, LOOPBACK, port, backlog=1024)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        server.close()

    reset()
    asyncio.run(serve())
    return 0


# -- backlog -------------------------------------------------------------------------------


def build_backlog(db_url: str, receiver: str, size: int) -> tuple[str, str]:
    """A fresh subscription to `receiver` and `size` pending deliveries to it, each of its own
    generation's event (as a stream of finished generations makes them); (its id, secret).

    The one place bench/ uses genrelay's internals: the rows and tasks a notification makes,
    written as genrelay writes them, without running generations to make them.
    """
    import sqlalchemy as sa

    from service.database import Store
    from service.models import Event, Subscription, utcnow
    from service.notifications.events import queue_delivery

    store = Store(db_url)
    try:
        with store.transaction() as session:
            tenant = session.scalar(sa.text("SELECT id FROM tenants WHERE name = 'bench'"))
            secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
            subscription = Subscription(
                id=f"sub_{uuid.uuid4().hex}", tenant_id=tenant, url=receiver, events=[EVENT],
                format="standard", secret=secret,
            )  # fmt: skip
            session.add(subscription)
        for first in range(0, size, 500):
            with store.transaction() as session:
                for n in range(first, min(size, first + 500)):
                    generation = f"gen_{uuid.uuid4().hex}"
                    data = {"id": generation, "status": "succeeded", "metadata": {"n": str(n)}}
                    event = Event(
                        id=f"evt_{uuid.uuid4().hex}", tenant_id=tenant, generation_id=generation,
                        type=EVENT, data=data, created_at=utcnow(),
                    )  # fmt: skip
                    session.add(event)
                    queue_delivery(
                        session,
                        event,
                        url=receiver,
                        fmt="standard",
                        subscription_id=subscription.id,
                    )
        return subscription.id, secret
    finally:
        store.dispose()


# -- rounds --------------------------------------------------------------------------------

BATCH_TASKS = (
    "FROM tasks t JOIN events e ON e.generation_id = t.generation_id "
    "JOIN deliveries d ON d.event_id = e.id WHERE d.subscription_id = ? AND t.kind = 'deliver'"
)


def cpu_now(*pids: int) -> list[float]:
    return [process_cpu(pid) or 0.0 for pid in pids]


def genrelay_round(
    ctx: Context, db: Database, db_url: str, receiver: Any, subscription: str, number: int
) -> dict[str, Any]:
    """One worker drains the backlog: from the first POST the receiver sees to the last
    delivery or task finished (the worker's start-up left out)."""
    args = ctx.args
    processes = ctx.processes[0]
    if db.postgres:
        db_url += f"?application_name={WORKER_APP}"
    env = {
        **base_env(),
        "GENRELAY_DATABASE_URL": db_url,
        "GENRELAY_DEEPIMAGE_API_KEY": "x",  # never called: no submit, poll or store tasks
        "GENRELAY_DEEPIMAGE_URL": f"http://{LOOPBACK}:1",
        "GENRELAY_GCS_BUCKET": "unused",
        "STORAGE_EMULATOR_HOST": f"http://{LOOPBACK}:1",
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
    }
    receiver.reset()
    worker = processes.genrelay(
        f"worker-{number}", "worker", "--threads", str(args.threads), "--poll-interval", "0.05",
        env=env,
    ).pid  # fmt: skip
    deadline = time.monotonic() + args.round_timeout
    while not receiver.stats()["posts"]:
        if time.monotonic() > deadline:
            raise BenchError("the worker sent nothing")
        processes.check_alive()
        time.sleep(0.01)
    backends = backend_pids(db)
    began, cpu_before = time.monotonic(), cpu_now(worker, receiver.pid, *backends)
    machine = machine_busy()
    while db.scalar(
        f"SELECT count(*) {BATCH_TASKS} AND t.status IN ('pending', 'running')", (subscription,)
    ):  # fmt: skip
        if time.monotonic() > deadline:
            raise BenchError(f"round {number}: not drained in {args.round_timeout:.0f} s")
        processes.check_alive()
        time.sleep(0.05)
    window = time.monotonic() - began
    cpu = [a - b for a, b in zip(cpu_now(worker, receiver.pid, *backends), cpu_before, strict=True)]
    machine = machine_busy() - machine
    stats = receiver.stats()
    processes.stop(f"worker-{number}")
    attempts = db.rows(
        "SELECT a.status_code, a.duration_ms FROM delivery_attempts a "
        "JOIN deliveries d ON d.id = a.delivery_id WHERE d.subscription_id = ?",
        (subscription,),
    )
    finished = db.scalar(f"SELECT max(t.finished_at) {BATCH_TASKS}", (subscription,))
    wall = max(stats["last"], epoch(finished) or 0) - stats["first"]
    return {
        "target": "genrelay",
        "round": number,
        "deliveries": args.deliveries,
        "wall_s": round(wall, 3),
        "errors": sum(1 for code, _ in attempts if not 200 <= (code or 0) < 300),
        "attempts": len(attempts),
        "send_ms": [float(ms) for _, ms in attempts],
        "cpu_s": {"sender": cpu[0], "receiver": cpu[1], "database": sum(cpu[2:]) or None},
        "machine_s": machine,
        "window_s": window,
        "received": stats["ids"],
    }


def backend_pids(db: Database) -> list[int]:
    if not db.postgres:
        return []
    rows = db.rows("SELECT pid FROM pg_stat_activity WHERE application_name = ?", (WORKER_APP,))
    return [int(pid) for (pid,) in rows]


def bare_round(
    ctx: Context, db: Database, receiver: Any, subscription: str, secret: str, number: int
) -> dict[str, Any]:
    """The same bodies signed (the Standard Webhooks library) and posted from a plain pool."""
    import standardwebhooks

    rows = db.rows(
        "SELECT url, body, webhook_id FROM deliveries WHERE subscription_id = ? "
        "ORDER BY created_at",
        (subscription,),
    )
    webhook = standardwebhooks.Webhook(secret)
    local = threading.local()

    def send(row: tuple[str, str, str]) -> tuple[int, float]:
        url, body, webhook_id = row
        now = dt.datetime.now(dt.UTC)
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": webhook.sign(webhook_id, now, body),
            "content-type": "application/json",
        }
        if not hasattr(local, "session"):
            local.session = requests.Session()
        began = time.perf_counter()
        try:
            code = local.session.post(
                url, data=body.encode(), headers=headers, timeout=15
            ).status_code
        except requests.RequestException:
            code = 0
        return code, (time.perf_counter() - began) * 1000

    receiver.reset()
    cpu_before, machine = cpu_now(receiver.pid), machine_busy()
    process_before = time.process_time()
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(ctx.args.threads) as pool:
        results = list(pool.map(send, rows))
    wall = time.perf_counter() - began
    return {
        "target": "bare",
        "round": number,
        "deliveries": len(rows),
        "wall_s": round(wall, 3),
        "errors": sum(1 for code, _ in results if not 200 <= code < 300),
        "attempts": len(results),
        "send_ms": [ms for _, ms in results],
        "cpu_s": {
            "sender": time.process_time() - process_before,
            "receiver": cpu_now(receiver.pid)[0] - cpu_before[0],
            "database": None,
        },
        "machine_s": machine_busy() - machine,
        "window_s": wall,
        "received": receiver.stats()["ids"],
    }


class Receiver:
    def __init__(self, port: int, pid: int) -> None:
        self.url, self.pid = f"http://{LOOPBACK}:{port}", pid

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = requests.get(f"{self.url}/_stats", timeout=10).json()
        return stats

    def reset(self) -> dict[str, Any]:
        stats: dict[str, Any] = requests.get(f"{self.url}/_reset", timeout=10).json()
        return stats


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    deliveries = sum(r["deliveries"] for r in rounds)
    wall = sum(r["wall_s"] for r in rounds)
    window = sum(r["window_s"] for r in rounds)
    send = [ms for r in rounds for ms in r["send_ms"]]
    cpu = {
        role: round(100 * sum(r["cpu_s"][role] or 0 for r in rounds) / window, 1)
        if rounds[0]["cpu_s"][role] is not None
        else None
        for role in ("sender", "database", "receiver")
    }
    return {
        "deliveries": deliveries,
        "errors": sum(r["errors"] for r in rounds),
        "attempts": sum(r["attempts"] for r in rounds),
        "received": sum(r["received"] for r in rounds),
        "deliveries_per_s": round(deliveries / wall, 1),
        "send_p50_ms": round(percentile(send, 50), 2),
        "send_p99_ms": round(percentile(send, 99), 2),
        "sender_cpu_ms_per_delivery": round(
            1000 * sum(r["cpu_s"]["sender"] for r in rounds) / deliveries, 2
        ),
        "cpu_pct": {**cpu, "machine": round(100 * sum(r["machine_s"] for r in rounds) / window)},
    }


def measure(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    processes = ctx.new_processes()
    db_url, db_desc = ctx.database(args.database)
    prepare_database({**base_env(), "GENRELAY_DATABASE_URL": db_url})
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--receiver-port", str(port)]
    receiver = Receiver(port, processes.start("receiver", argv, base_env()).pid)
    wait_until(lambda: bool(receiver.stats()), "the receiver", 30, processes)
    rounds = []
    with Database(db_url) as db:
        for number in range(1, args.rounds + 1):
            subscription, secret = build_backlog(db_url, f"{receiver.url}/hook", args.deliveries)
            rounds.append(genrelay_round(ctx, db, db_url, receiver, subscription, number))
            rounds.append(bare_round(ctx, db, receiver, subscription, secret, number))
            for r in rounds[-2:]:
                print(f"round {number} {r['target']}: {pooled([r])}", flush=True)
    targets = {
        name: pooled([r for r in rounds if r["target"] == name]) for name in ("genrelay", "bare")
    }
    return {
        "settings": {
            "database": db_desc,
            "load": f"{args.rounds} rounds x {args.deliveries} deliveries per target",
            "senders": f"genrelay worker and ThreadPoolExecutor, {args.threads} threads each",
        },
        "rounds": [{k: v for k, v in r.items() if k != "send_ms"} for r in rounds],
        "targets": targets,
        "ratio_deliveries_per_s": round(
            targets["genrelay"]["deliveries_per_s"] / targets["bare"]["deliveries_per_s"], 3
        ),
    }


def print_report(report: dict[str, Any]) -> None:
    head = ["target", "deliveries", "errors", "received", "deliveries/s", "send p50 ms"]
    head += ["send p99 ms", "sender CPU ms/delivery", "CPU % sender", "database", "receiver"]
    head += ["machine"]
    rows = []
    for name, s in report["targets"].items():
        cpu = s["cpu_pct"]
        rows.append(
            [name, s["deliveries"], s["errors"], s["received"], s["deliveries_per_s"],
             s["send_p50_ms"], s["send_p99_ms"], s["sender_cpu_ms_per_delivery"], cpu["sender"],
             cpu["database"], cpu["receiver"], cpu["machine"]]
        )  # fmt: skip
    print_table(head, rows)
    print(f"\ngenrelay / bare: deliveries/s x{report['ratio_deliveries_per_s']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__)
    parser.add_argument("--deliveries", type=int, default=2000, help="per round (2000)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads = pool size (8)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per target (2)")
    parser.add_argument("--round-timeout", type=float, default=180.0, help="seconds (180)")
    parser.add_argument("--receiver-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver_port:
        return serve_receiver(args.receiver_port)
    return run_benchmark("genrelay webhook-delivery benchmark", args, measure, print_report)


if __name__ == "__main__":
    sys.exit(main())
