"""Running genrelay's commands as processes, for the end-to-end tests."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from bench._stack import (
    GENRELAY,
    Processes,
    free_port,
    genrelay_env,
    start_serve,
    start_simulator,
    start_worker,
    wait_until,
)
from service.database import Store
from service.generations.line import IN_FLIGHT
from service.models import Generation

__all__ = ["GENRELAY", "Deployment", "SlotWatcher", "Stack", "deployment", "free_port", "wait_for"]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until true (AssertionError after `timeout` s)."""
    wait_until(check, what, timeout)


class Stack(Processes):
    """bench/_stack.py's processes of one test, with `env` by default; logs in `tmp_path`."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        super().__init__(tmp_path)
        self.tmp_path = tmp_path
        self.env = env

    def start(  # type: ignore[override]
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `genrelay ARGS` with its output in `<name>.log` (`env` replaces the default)."""
        return super().start(name, [GENRELAY, *args], env or self.env)

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """The latest process of each name."""
        return self.children

    def alive(self) -> bool:
        self.check_alive()
        return True

    def logs(self, tail: int | None = 3000) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-(tail or 0) :]}"
            for p in sorted(self.tmp_path.glob("*.log"))
        )


TERMINAL = ("succeeded", "failed", "canceled")


@dataclasses.dataclass
class Deployment:
    """genrelay as in production: gunicorn web and worker processes on one database, in front
    of the simulator (as its own process) and fake-gcs-server. Callbacks go to `web[0]`."""

    stack: Stack
    env: dict[str, str]
    database_url: str
    sim: str  # the simulator's base URL
    web: list[str]  # each web process's base URL
    store: Store  # for the checks that read the database

    def create_key(self, tenant: str) -> dict[str, str]:
        """`genrelay keys create TENANT` against the same database; the auth header."""
        created = subprocess.run(
            [GENRELAY, "keys", "create", tenant],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return {"Authorization": f"Bearer {created.stdout.strip()}"}

    def start_worker(self, name: str, *, threads: int = 4) -> None:
        """Start `genrelay worker` and wait until it says it has started."""
        start_worker(
            self.stack, self.env, name, "--threads", str(threads), "--poll-interval", "0.1"
        )

    def create(self, auth: Mapping[str, str], body: Mapping[str, Any], *, web: int = 0) -> Any:
        """POST /v1/generations (through web process `web`); the generation, as answered."""
        response = requests.post(
            f"{self.web[web]}/v1/generations", json=dict(body), headers=dict(auth), timeout=60
        )
        assert response.status_code == 202, response.text
        return response.json()

    def get(self, auth: Mapping[str, str], generation_id: str) -> Any:
        response = requests.get(
            f"{self.web[0]}/v1/generations/{generation_id}", headers=dict(auth), timeout=30
        )
        assert response.status_code == 200, response.text
        return response.json()

    def sim_stats(self) -> Any:
        return requests.get(f"{self.sim}/_sim/stats", timeout=30).json()

    def set_simulator(self, **knobs: Any) -> None:
        response = requests.post(f"{self.sim}/_sim/settings", json=knobs, timeout=30)
        response.raise_for_status()

    def statuses(self) -> dict[str, int]:
        """How many generations are in each status, from the database."""
        with self.store.read() as session:
            rows = session.execute(
                sa.select(Generation.status, sa.func.count()).group_by(Generation.status)
            ).all()
        return {str(status): int(count) for status, count in rows}

    def wait_all_finished(self, count: int, timeout: float) -> dict[str, int]:
        """Wait until `count` generations exist and every one has finished; the statuses."""
        found: dict[str, int] = {}

        def finished() -> bool:
            self.stack.alive()
            found.clear()
            found.update(self.statuses())
            return sum(found.values()) == count and set(found) <= set(TERMINAL)

        try:
            wait_for(finished, timeout, f"all {count} generations to finish")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {found}") from None
        return found

    def slots_in_use(self) -> int:
        """Generations holding an upstream slot of the line, from the database."""
        with self.store.read() as session:
            return int(session.scalar(sa.select(sa.func.count()).where(IN_FLIGHT)) or 0)


class SlotWatcher:
    """Samples the database's count of slots in use, in a thread, while in its `with` block:
    the line's own view of what is in flight, which must never pass its limit."""

    def __init__(self, deployed: Deployment, interval: float = 0.05) -> None:
        self.deployed = deployed
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="slot-watcher", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.peak = max(self.peak, self.deployed.slots_in_use())
                self.samples += 1
                self._stop.wait(self.interval)
        except BaseException as exc:  # reported by __exit__
            self._error = exc

    def __enter__(self) -> SlotWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._error is not None:
            raise AssertionError(f"the slot watcher failed: {self._error!r}")


@contextlib.contextmanager
def deployment(
    tmp_path: Path,
    database_url: str,
    gcs_url: str,
    bucket: str,
    *,
    simulator: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    web: int = 1,
    workers: int = 1,
) -> Iterator[Deployment]:
    """Start the simulator (with `simulator` as extra flags), `web` gunicorn processes (one
    worker process each) and `workers` workers named worker-1...; print every log on failure.

    `env` adds to or overrides the defaults (`GENRELAY_UPSTREAM_CONCURRENCY` is unset unless
    given, so the line learns the limit by default).
    """
    ports = [free_port() for _ in range(web)]
    full_env = {
        **{k: v for k, v in os.environ.items() if k != "GENRELAY_UPSTREAM_CONCURRENCY"},
        **genrelay_env(database_url, "", gcs_url, ports[0], web_processes=1),
        "GENRELAY_GCS_BUCKET": bucket,
        **(env or {}),
    }
    del full_env["PORT"]  # each web process gets its own
    stack = Stack(tmp_path, full_env)
    store = Store(database_url)
    try:
        sim = start_simulator(stack, *simulator, env=full_env)
        full_env["GENRELAY_DEEPIMAGE_URL"] = sim
        for n, port in enumerate(ports):
            start_serve(stack, {**full_env, "PORT": str(port)}, f"serve-{n}")
        deployed = Deployment(
            stack=stack,
            env=full_env,
            database_url=database_url,
            sim=sim,
            web=[f"http://127.0.0.1:{port}" for port in ports],
            store=store,
        )
        for n in range(1, workers + 1):
            deployed.start_worker(f"worker-{n}")
        yield deployed
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop_all()
        store.dispose()
