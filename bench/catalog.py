"""Catalog (issue 10): a big catalog under Deep-Image's concurrency limit, with genrelay's line
and, in the same run, the code before it (the baseline arm).

Per case and arm: a fresh database and simulator (`--concurrency-limit L --processing-time T`,
callbacks on), `genrelay serve` (2 x 8) and one `genrelay worker --threads 4`. Case `a`:
tenant `catalog` sends N = 2000 generations (L = 10, T = 1 s) while tenant `interactive` sends
one every 2 s. Case `c`: N = 600, L = 2, T = 2 s with the submit budget shrunk to 60 s
(GENRELAY_SUBMIT_MAX_AGE; bench/_baseline_shim gives the baseline the same). Case `intake`: a
10,000-item catalog, timed until it is taken, with the web processes' peak RSS. The baseline
is a checkout of 535494f (`--baseline-path`), skipped with a note where there is none. How to
read it: bench/README.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
from _stack import (
    BENCH_DIR,
    CLIENT_TIMEOUT,
    MIB,
    REPO_DIR,
    TERMINAL,
    BenchError,
    Context,
    Database,
    Processes,
    RssSampler,
    closed_loop,
    create_key,
    epoch,
    free_port,
    fresh_database,
    genrelay_env,
    options,
    percentile,
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
    tree_of,
)

CATALOG, SECOND = "catalog", "interactive"  # the tenants
MAX_BATCH_ITEMS = 10_000
STRANDED_FOR = 15.0  # seconds every open generation must look stranded before we stop waiting
GENERATIONS = (
    "SELECT g.id, t.name, g.status, g.error_code, g.created_at, g.completed_at, {admitted}, "
    "g.submitted_at, g.source_found_at FROM generations g JOIN tenants t ON t.id = g.tenant_id"
)
# Open generations whose submit task is dead with no task left to run: nothing will finish
# them (the baseline could give a submit up without recording it).
STRANDED = (
    "SELECT count(*) FROM generations g JOIN tenants t ON t.id = g.tenant_id "
    "WHERE t.name = ? AND g.status IN ('queued', 'processing') AND EXISTS (SELECT 1 FROM tasks k "
    "WHERE k.generation_id = g.id AND k.kind = 'submit' AND k.status = 'dead') AND NOT EXISTS "
    "(SELECT 1 FROM tasks k WHERE k.generation_id = g.id AND k.status IN ('pending', 'running'))"
)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    catalog: int  # N
    limit: int  # L
    processing_time: float  # T
    second_tenant: float | None = None  # seconds between the second tenant's requests
    submit_max_age: float | None = None
    complete: bool = True  # wait for every generation (False: stop once taken)

    @property
    def bound(self) -> float:
        return self.catalog * self.processing_time / self.limit


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    pythonpath: str
    intake: str  # "single" or "batch"


class SecondTenant(threading.Thread):
    """One generation every `interval` seconds until stopped; when each was sent."""

    def __init__(self, api: str, key: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = f"{api}/v1/generations", interval
        self.headers = {"Authorization": f"Bearer {key}"}
        self.sent: dict[str, float] = {}
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        with requests.Session() as session:
            next_at = time.monotonic()
            while not self.done.wait(max(0.0, next_at - time.monotonic())):
                next_at += self.interval
                sent = time.time()
                try:
                    response = session.post(
                        self.url, json=small_body(), headers=self.headers, timeout=CLIENT_TIMEOUT
                    )
                except requests.RequestException as exc:
                    self.errors.append(type(exc).__name__)
                    continue
                if response.status_code == 202:
                    self.sent[response.json()["id"]] = sent
                else:
                    self.errors.append(str(response.status_code))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=70)


class Run:
    """One case on one arm."""

    def __init__(self, ctx: Context, gcs: str, case: Case, arm: Arm) -> None:
        self.ctx, self.args, self.gcs, self.case, self.arm = ctx, ctx.args, gcs, case, arm
        self.processes: Processes = ctx.new_processes(f"{case.name}-{arm.name}")
        self.gave_up: dict[str, int] = {}  # tenant -> generations left unfinished
        self.stranded: dict[str, int] = {}

    def measure(self, db_url: str) -> dict[str, Any]:
        case, processes = self.case, self.processes
        sim = start_simulator(
            processes, processing_time=case.processing_time, concurrency_limit=case.limit
        )
        env = genrelay_env(
            db_url, sim, self.gcs, free_port(), web=(2, 8), submit_max_age=case.submit_max_age,
            upstream_concurrency=case.limit if self.args.configured_limit else None,
            # A callback that overtakes its submit's answer is refused (409) and the poll
            # finds the result after this; at the smoke test's T = 0.2 s that race is common.
            reconcile_after=2 if self.args.smoke else None,
        )  # fmt: skip
        env["PYTHONPATH"] = self.arm.pythonpath
        catalog_key = prepare_database(env, CATALOG)
        second_key = create_key(env, SECOND)
        api = start_serve(processes, env)
        start_worker(processes, env, "worker", "--threads", "4")
        self.db = Database(db_url)
        second = SecondTenant(api, second_key, case.second_tenant) if case.second_tenant else None
        serve = tree_of(processes.children["serve"])
        for pid in serve():
            reset_peak_rss(pid)
        try:
            with RssSampler(serve) as rss:
                began = time.time()
                if second:
                    second.start()
                intake = self.intake(api, catalog_key)
                if intake["accepted"] != case.catalog:
                    raise BenchError(f"the catalog's intake: {intake}")
                largest = max((proc_status(p).get("VmHWM", 0) for p in serve()), default=0)
                web_rss = {
                    "serve_tree_peak_sampled_mib": round(rss.peak / MIB, 1),
                    "largest_process_vmhwm_mib": round(largest / MIB, 1),
                }
            done = self.wait(CATALOG, began) if case.complete else None
            if second:
                second.stop()
                self.wait(SECOND, began)
            sim_stats = requests.get(f"{sim}/_sim/stats", timeout=CLIENT_TIMEOUT).json()
            batches = [
                requests.get(
                    f"{api}/v1/batches/{batch}",
                    headers={"Authorization": f"Bearer {catalog_key}"},
                    timeout=CLIENT_TIMEOUT,
                ).json()
                for batch in intake.pop("batch_ids")
                if case.complete
            ]
            gens = self.generations()
        finally:
            if second:
                second.stop()
            self.db.__exit__()
        return self.figures(began, intake, web_rss, done, second, sim_stats, gens, batches)

    def intake(self, api: str, key: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        body = small_body(description="catalog item")
        if self.arm.intake == "single":
            bodies = [
                json.dumps({**body, "metadata": {"item": str(n)}}).encode()
                for n in range(self.case.catalog)
            ]

            def send(session: requests.Session, n: int) -> requests.Response:
                url = f"{api}/v1/generations"
                return session.post(url, data=bodies[n], headers=headers, timeout=CLIENT_TIMEOUT)

            load = closed_loop(self.case.catalog, min(8, self.case.catalog), send)
            return {
                "seconds": round(load.wall, 3),
                "outcomes": dict(load.outcomes),
                "accepted": load.outcomes["202"],
                "batch_ids": [],
            }
        accepted, batch_ids, outcomes = 0, [], []
        began = time.perf_counter()
        for first in range(0, self.case.catalog, MAX_BATCH_ITEMS):
            last = min(first + MAX_BATCH_ITEMS, self.case.catalog)
            items = [{**body, "custom_id": f"item-{n}"} for n in range(first, last)]
            response = requests.post(
                f"{api}/v1/batches", json={"items": items}, headers=headers, timeout=(5, 600)
            )
            outcomes.append(response.status_code)
            if response.status_code == 202:
                batch_ids.append(response.json()["id"])
                accepted += int(response.json()["counts"]["total"])
        return {
            "seconds": round(time.perf_counter() - began, 3),
            "outcomes": outcomes,
            "accepted": accepted,
            "batch_ids": batch_ids,
        }

    def statuses(self, tenant: str) -> dict[str, int]:
        rows = self.db.rows(
            "SELECT g.status, count(*) FROM generations g JOIN tenants t ON t.id = g.tenant_id "
            "WHERE t.name = ? GROUP BY g.status",
            (tenant,),
        )
        return {str(status): int(n) for status, n in rows}

    def wait(self, tenant: str, began: float) -> float:
        """Until every generation of `tenant` is finished (bounded, allowing a task lease of
        300 s on top of the work; past it, or once every open one is stranded, what is open
        is left so and counted); time.time() then."""
        case = self.case
        bound = 420 + 4 * case.bound + 2 * case.catalog * case.processing_time
        deadline, note, stuck = time.monotonic() + bound, time.monotonic(), None
        while True:
            self.processes.check_alive()
            counts = self.statuses(tenant)
            left = sum(n for status, n in counts.items() if status not in TERMINAL)
            if counts and not left:
                return time.time()
            if left and self.db.scalar(STRANDED, (tenant,)) == left:
                stuck = stuck or time.monotonic()
                if time.monotonic() - stuck > STRANDED_FOR:
                    self.stranded[tenant] = left
                    return time.time()
            else:
                stuck = None
            if time.monotonic() > deadline:
                self.gave_up[tenant] = left
                return time.time()
            if time.monotonic() - note > 30:
                note = time.monotonic()
                print(f"   {time.time() - began:6.0f} s  {tenant}: {counts}", flush=True)
            time.sleep(0.5)

    def generations(self) -> list[dict[str, Any]]:
        try:
            self.db.rows("SELECT admitted_at FROM generations LIMIT 0")
            admitted = "g.admitted_at"
        except Exception:  # the baseline's schema has none
            admitted = "NULL"
        keys = [
            "id",
            "tenant",
            "status",
            "error",
            "created",
            "completed",
            "admitted",
            "submitted",
            "source_found",
        ]
        gens = [
            dict(zip(keys, row, strict=True))
            for row in self.db.rows(GENERATIONS.format(admitted=admitted))
        ]
        for g in gens:
            for key in keys[4:]:
                g[key] = epoch(g[key])
        return gens

    def figures(
        self, began: float, intake: dict[str, Any], web_rss: dict[str, Any], done: float | None,
        second: SecondTenant | None, sim: dict[str, Any], gens: list[dict[str, Any]],
        batches: list[dict[str, Any]],
    ) -> dict[str, Any]:  # fmt: skip
        case = self.case
        catalog = [g for g in gens if g["tenant"] == CATALOG]
        failed: dict[str, int] = {}
        for g in gens:
            if g["status"] in ("failed", "canceled"):
                key = f"{g['tenant']} {g['status']} {g['error']}"
                failed[key] = failed.get(key, 0) + 1
        result: dict[str, Any] = {
            "case": case.name, "arm": self.arm.name, "N": case.catalog, "L": case.limit,
            "T": case.processing_time, "bound_s": round(case.bound, 1), "intake": intake,
            "intake_items_per_s": round(intake["accepted"] / intake["seconds"], 1),
            "web_rss": web_rss, "generations": len(gens), "failed": failed,
            "unfinished": sum(1 for g in gens if g["status"] not in TERMINAL),
            "stranded": self.stranded, "gave_up": self.gave_up, "batches": batches,
            "simulator": {k: sim.get(k) for k in ("jobs_created", "responses_429", "peak_active")},
            "rejections_per_generation": round(sim["responses_429"] / max(1, len(gens)), 3),
        }  # fmt: skip
        if not case.complete:
            return result
        last = max((g["completed"] for g in catalog if g["completed"]), default=done or began)
        makespan = last - began
        work = len(gens) * case.processing_time / case.limit
        held = spans(catalog, "admitted", "source_found")
        result.update(
            {
                "makespan_s": round(makespan, 1),
                "ratio": round(makespan / case.bound, 3),
                "ratio_all_work": round(makespan / work, 3),
                # Where a catalog generation's slot time goes, p50 and p90 in seconds.
                "per_generation": {
                    "admitted_to_submitted_s": p50_p90(spans(catalog, "admitted", "submitted")),
                    "callback_lag_s": p50_p90(
                        spans(catalog, "submitted", "source_found", case.processing_time)
                    ),
                    "callback_to_succeeded_s": p50_p90(spans(catalog, "source_found", "completed")),
                    "slot_time_held_share": round(sum(held) / (case.limit * makespan), 3)
                    if held
                    else None,
                },
            }
        )
        if second is not None:
            waits = [
                g["completed"] - second.sent[g["id"]]
                for g in gens
                if g["id"] in second.sent and g["status"] == "succeeded" and g["completed"]
            ]
            result["second_tenant"] = {
                "sent": len(second.sent),
                "errors": second.errors,
                "succeeded": len(waits),
                "p50_s": round(percentile(waits, 50), 2),
                "p99_s": round(percentile(waits, 99), 2),
                "max_s": round(max(waits, default=0), 2),
            }
        return result


def spans(gens: list[dict[str, Any]], start: str, end: str, minus: float = 0.0) -> list[float]:
    return [
        g[end] - g[start] - minus
        for g in gens
        if g["status"] == "succeeded" and g[start] is not None and g[end] is not None
    ]


def p50_p90(values: list[float]) -> list[float] | None:
    return [round(percentile(values, 50), 3), round(percentile(values, 90), 3)] if values else None


def code_version(path: Path) -> str:
    """The commit of a checkout, or "unknown"."""
    found = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return found.stdout.strip() or "unknown (not a git checkout)"


def plan(args: Any) -> tuple[list[tuple[Case, Arm]], list[str]]:
    arms, notes = [], []
    if "genrelay" in args.arms:
        arms.append(Arm("genrelay", str(REPO_DIR), args.intake))
    if "baseline" in args.arms:
        if (args.baseline_path / "service" / "bootstrap.py").exists():
            shim = os.pathsep.join([str(args.baseline_path), str(BENCH_DIR / "_baseline_shim")])
            arms.append(Arm("baseline", shim, "single"))
        else:
            notes.append(f"baseline arm skipped: no checkout at {args.baseline_path}")
    s = args.smoke
    cases = {
        "a": Case("a", *((40, 4, 0.2) if s else (2000, 10, 1.0)), args.second_tenant_interval),
        "c": Case("c", *((12, 2, 0.5) if s else (600, 2, 2.0)), submit_max_age=2 if s else 60),
    }
    runs = [(cases[name], arm) for name in ("a", "c") if name in args.cases for arm in arms]
    if "intake" in args.cases and arms and arms[0].name == "genrelay":
        items = 200 if s else 10_000
        runs.append((Case("intake", items, 10, 1.0, complete=False), arms[0]))
    return runs, notes


def measure(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    runs, notes = plan(args)
    gcs = start_gcs(ctx.new_processes("gcs"))
    results = []
    for case, arm in runs:
        print(f"-- case {case.name}, {arm.name}: N={case.catalog} L={case.limit} "
              f"T={case.processing_time:g} s, bound {case.bound:.0f} s", flush=True)  # fmt: skip
        run = Run(ctx, gcs, case, arm)
        with fresh_database(
            args.database, ctx.tmp_dir, args.postgres_url, f"catalog-{case.name}"
        ) as (url, _):
            try:
                results.append(run.measure(url))
            finally:
                run.processes.stop_all()
        print(f"   {results[-1]}", flush=True)
    baseline = any(arm.name == "baseline" for _, arm in runs)
    return {
        "settings": {
            "database": args.database,
            "genrelay code": code_version(REPO_DIR),
            "baseline": f"{args.baseline_path} at {code_version(args.baseline_path)}"
            if baseline
            else "not run",
            "limit": "GENRELAY_UPSTREAM_CONCURRENCY=L"
            if args.configured_limit
            else "learned from 429s",
            "intake": args.intake,
        },
        "runs": results,
        "notes": notes,
    }


def print_report(report: dict[str, Any]) -> None:
    head = ["case", "arm", "N", "L", "T", "intake s", "makespan s", "/N*T/L", "/all work"]
    head += ["429/gen", "peak active", "failed", "unfinished", "2nd p50/p99/max s", "web MiB"]
    rows = []
    for r in report["runs"]:
        second, rss = r.get("second_tenant"), r["web_rss"]
        rows.append(
            [r["case"], r["arm"], r["N"], r["L"], r["T"], r["intake"]["seconds"],
             r.get("makespan_s"), r.get("ratio"), r.get("ratio_all_work"),
             r["rejections_per_generation"], r["simulator"]["peak_active"],
             sum(r["failed"].values()), r["unfinished"],
             f"{second['p50_s']}/{second['p99_s']}/{second['max_s']}" if second else None,
             f"{rss['largest_process_vmhwm_mib']} / {rss['serve_tree_peak_sampled_mib']}"]
        )  # fmt: skip
    print_table(head, rows, ".3f")
    print("(web MiB: the largest web process's VmHWM / the whole serve tree, sampled)")
    for r in report["runs"]:
        details = {
            k: r[k]
            for k in ("per_generation", "failed", "stranded", "gave_up", "batches")
            if r.get(k)
        }
        if details:
            print(f"  {r['case']} {r['arm']}: {details}")
    for note in report["notes"]:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__)
    parser.add_argument("--cases", type=lambda t: t.split(","), default=["a", "c", "intake"])
    parser.add_argument("--arms", type=lambda t: t.split(","), default=["genrelay", "baseline"])
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument(
        "--intake",
        choices=("single", "batch"),
        default="single",
        help="POST /v1/generations per item, or /v1/batches",
    )
    parser.add_argument(
        "--second-tenant-interval", type=float, default=2.0, help="case a (2; 0: none)"
    )
    parser.add_argument(
        "--configured-limit",
        action="store_true",
        help="tell genrelay L (GENRELAY_UPSTREAM_CONCURRENCY)",
    )
    parser.add_argument(
        "--baseline-path",
        type=Path,
        default=Path("/tmp/baseline"),  # noqa: S108 - a checkout made by hand
        help="a checkout of 535494f",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the smoke test)")
    args = parser.parse_args(argv)
    args.baseline_path = args.baseline_path.resolve()
    if args.smoke:
        args.second_tenant_interval = min(args.second_tenant_interval, 0.5)
    args.second_tenant_interval = args.second_tenant_interval or None
    return run_benchmark("catalog benchmark", args, measure, print_report)


if __name__ == "__main__":
    sys.exit(main())
