"""Scale-out on PostgreSQL: two `genrelay serve` and two `genrelay worker` processes share one
database; 500 generations go through the simulator (with faults) and fake-gcs-server."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import secrets
import subprocess
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from service.devtools.ports import free_port
from service.models import Base
from tests.e2e.processes import GENRELAY, Stack, wait_for
from tests.helpers import seed_examples

pytestmark = pytest.mark.e2e

GENERATIONS = 500
TERMINAL = ("succeeded", "failed", "canceled")


def run_intervals(log_paths: list[Path]) -> dict[str, list[tuple[dt.datetime, dt.datetime]]]:
    """Each task's run intervals, from the workers' 'task started/finished' log lines."""
    open_runs: dict[tuple[int, str], dt.datetime] = {}
    runs: dict[str, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    for path in log_paths:
        for line in path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if "task_id" not in entry:
                continue
            moment = dt.datetime.fromisoformat(entry["time"])
            # A worker thread runs one task at a time; (pid, task) pairs start with finish.
            key = (entry["pid"], entry["task_id"])
            if entry["message"].startswith("task started"):
                open_runs[key] = moment
            elif entry["message"].startswith("task finished"):
                runs[entry["task_id"]].append((open_runs.pop(key), moment))
    assert not open_runs, f"runs that never finished: {list(open_runs)[:5]}"
    return runs


def test_two_web_and_two_worker_processes_share_one_postgresql(
    tmp_path: Path, postgres_database: str, gcs_server: Any, gcs_bucket: str
) -> None:
    engine = sa.create_engine(postgres_database)
    with engine.begin() as connection:
        # Every table (batches refer to tenants: a partial list cannot be truncated).
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        connection.execute(sa.text(f"TRUNCATE {tables}"))
    sim_port, web_a, web_b = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "GENRELAY_DATABASE_URL": postgres_database,
        "GENRELAY_DEEPIMAGE_URL": f"http://127.0.0.1:{sim_port}",
        "GENRELAY_DEEPIMAGE_API_KEY": "sim-key",
        "GENRELAY_PUBLIC_URL": f"http://127.0.0.1:{web_a}",
        "GENRELAY_CALLBACK_SECRET": secrets.token_urlsafe(32),
        "GENRELAY_RECONCILE_AFTER": "1",  # lost callbacks are polled for soon
        "GENRELAY_GCS_BUCKET": gcs_bucket,
        "STORAGE_EMULATOR_HOST": gcs_server.url,
        "GENRELAY_WEB_PROCESSES": "1",
        "GENRELAY_RATE_LIMIT": "0",
        # Loopback http everywhere: the simulator's result URLs included.
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
        # The simulator's limit (below): every intake finds a slot and submits inline, as this
        # test of scale-out expects; the line itself is tested in test_line_processes.py.
        "GENRELAY_UPSTREAM_CONCURRENCY": "100000",
        "GENRELAY_LOG_LEVEL": "DEBUG",
    }
    stack = Stack(tmp_path, env)
    try:
        keys = subprocess.run(
            [GENRELAY, "keys", "create", "acme"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        auth = {"Authorization": f"Bearer {keys.stdout.strip()}"}
        stack.start(
            "simulator",
            "simulator",
            "--port",
            str(sim_port),
            "--processing-time",
            "0.3",
            "--failure-rate",
            "0.1",
            "--duplicate-callback-rate",
            "0.2",
            "--lost-callback-rate",
            "0.1",
            "--concurrency-limit",
            "100000",
            "--seed",
            "7",
        )
        stack.start("serve-a", "serve", env={**env, "PORT": str(web_a)})
        stack.start("serve-b", "serve", env={**env, "PORT": str(web_b)})
        stack.start("worker-1", "worker", "--threads", "4", "--poll-interval", "0.1")
        stack.start("worker-2", "worker", "--threads", "4", "--poll-interval", "0.1")
        for port in (web_a, web_b):
            wait_for(
                lambda port=port: (
                    stack.alive() and requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).ok
                ),
                30,
                "genrelay serve",
            )

        def submit(n: int) -> str:
            base = f"http://127.0.0.1:{(web_a, web_b)[n % 2]}"
            response = requests.post(
                f"{base}/v1/generations",
                json={"input": seed_examples()["text_only"]},
                headers=auth,
                timeout=30,
            )
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(GENERATIONS)))
        assert len(set(ids)) == GENERATIONS

        def all_finished() -> bool:
            with engine.connect() as connection:
                unfinished = connection.scalar(
                    sa.text(
                        "SELECT count(*) FROM generations WHERE status NOT IN "
                        "('succeeded', 'failed', 'canceled')"
                    )
                )
            return unfinished == 0

        wait_for(all_finished, 180, "every generation to finish")
        time.sleep(0.5)  # let the workers log the end of their last tasks
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop_all()

    with engine.connect() as connection:
        statuses = dict(
            connection.execute(
                sa.text("SELECT status, count(*) FROM generations GROUP BY status")
            ).all()
        )
        succeeded = {
            row[0]: row[1]
            for row in connection.execute(
                sa.text("SELECT id, result->>'uri' FROM generations WHERE status = 'succeeded'")
            )
        }
        failures = dict(
            connection.execute(
                sa.text(
                    "SELECT error_code, count(*) FROM generations WHERE status = 'failed' "
                    "GROUP BY error_code"
                )
            ).all()
        )
    engine.dispose()
    assert sum(statuses.values()) == GENERATIONS
    assert set(statuses) <= set(TERMINAL)
    assert set(failures) <= {"upstream_job_failed"}, failures  # only the injected failures
    assert statuses.get("succeeded", 0) >= GENERATIONS * 0.8

    # Exactly one object per succeeded generation, and none for the others.
    listing = requests.get(
        f"{gcs_server.url}/storage/v1/b/{gcs_bucket}/o", params={"maxResults": 10000}, timeout=30
    ).json()
    names = sorted(item["name"] for item in listing.get("items", []))
    assert len(names) == len(set(names)) == len(succeeded)
    assert {f"gs://{gcs_bucket}/{name}" for name in names} == set(succeeded.values())

    # No task ran twice at the same time: submits run inline in the web processes (or in a
    # worker after a failure), the rest in the workers; all four logs are read.
    logs = [tmp_path / f"{name}.log" for name in ("serve-a", "serve-b", "worker-1", "worker-2")]
    runs = run_intervals(logs)
    # A submit per generation (its poll, if one ran, is the same task) and a store per success.
    assert len(runs) >= GENERATIONS + len(succeeded)
    for task_id, intervals in runs.items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, f"task {task_id} ran twice at once: {intervals}"
    pids = {
        json.loads(line)["pid"]
        for path in logs
        for line in path.read_text().splitlines()
        if line.startswith("{") and "task started" in line
    }
    assert len(pids) >= 4  # both web processes and both workers ran tasks
