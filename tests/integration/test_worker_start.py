"""The worker's start and its loop when the database cannot be used: a database that is not
migrated stops it at once with the fix named; a failing loop backs off and says so once,
not in a traceback per thread per half second."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.bootstrap import Services
from service.runtime.worker import Worker


def _run_worker(database_url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`genrelay worker` on `database_url`, to its end (a worker that starts its loop runs
    until the timeout, which fails the test)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GENRELAY_")},
        "GENRELAY_DATABASE_URL": database_url,
        "GENRELAY_DEEPIMAGE_URL": "http://127.0.0.1:9",
        "GENRELAY_DEEPIMAGE_API_KEY": "unused",
        "GENRELAY_GCS_BUCKET": "unused",
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
    }
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_worker_on_a_database_that_is_not_migrated_stops_and_says_to_migrate(
    tmp_path: Path,
) -> None:
    done = _run_worker(f"sqlite:///{tmp_path / 'never-migrated.db'}")
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "is not migrated" in last and "genrelay migrate" in last
    assert "Traceback" not in done.stderr


def test_a_worker_on_a_database_one_migration_behind_stops_and_says_to_migrate(
    tmp_path: Path,
) -> None:
    """Its start check read the tasks table only, which a database at the migration before
    the newest has: the worker started, and its statements on the newer columns failed."""
    from alembic import command

    from service.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'behind.db'}"
    command.upgrade(alembic_config(url), "head")
    command.downgrade(alembic_config(url), "-1")
    done = _run_worker(url, timeout=30)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"genrelay: the database {tmp_path / 'behind.db'} is not migrated to this release: "
        "run `genrelay migrate`"
    )
    assert "Traceback" not in done.stderr


def test_a_failing_worker_loop_backs_off_and_logs_its_traceback_once(
    services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(services.runner, threads=1, poll_interval=0.05)
    tries: list[float] = []

    def database_away() -> int:
        tries.append(time.monotonic())
        raise ConnectionError("the database is away")

    monkeypatch.setattr(worker, "run_once", database_away)
    loop = threading.Thread(target=worker._loop)
    with caplog.at_level(logging.INFO, logger="genrelay.worker"):
        loop.start()
        time.sleep(1.6)
        worker.stop()
        loop.join(5)
    assert not loop.is_alive()
    # Waits of 0.05, 0.1, 0.2, 0.4, 0.8 s: about 5 tries in 1.6 s, where a fixed poll
    # interval made 30.
    assert 3 <= len(tries) <= 7
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
