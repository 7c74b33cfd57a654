"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests
import sqlalchemy as sa

from service.bootstrap import Services
from service.models import IdempotencyKey, Task

T = TypeVar("T")

FIXTURES = Path(__file__).parent / "fixtures"


class Statements:
    """The SQL statements run on an engine while the block runs, each as one line."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.seen: list[str] = []

    def __enter__(self) -> Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self._see)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._see)

    def _see(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.seen.append(" ".join(statement.split()))

    def count(self, start: str) -> int:
        """How many began with `start` (e.g. "INSERT INTO events")."""
        return sum(1 for statement in self.seen if statement.startswith(start))

    def matching(self, fragment: str) -> list[str]:
        """Those that contain `fragment` (e.g. a column's qualified name)."""
        return [statement for statement in self.seen if fragment in statement]


def seed_examples() -> dict[str, dict[str, Any]]:
    """The JSON examples of the seed's "Image generation" page, and a few more from Deep-Image's
    other pages, by name."""
    return json.loads((FIXTURES / "seed_examples.json").read_text())  # type: ignore[no-any-return]


def set_simulator(simulator_url: str, **knobs: Any) -> None:
    """Change the simulator's fault knobs at run time, over HTTP like any other client."""
    response = requests.post(f"{simulator_url}/_sim/settings", json=knobs, timeout=5)
    response.raise_for_status()


def drain(services: Services, seconds: float = 10.0, horizon: float = 5.0) -> None:
    """Run the worker until no task is running or due within `horizon` seconds, and no
    generation waits in the line.

    Tasks due later (the fallback poll of callback mode, an hour out) do not hold it up; the
    line's own periodic task runs as it would in a worker, but never counts as work left.
    """
    from service.generations.line import WAITING, ensure_line_task
    from service.models import Generation
    from service.runtime.kinds import LINE
    from service.runtime.worker import Worker

    ensure_line_task(services.queue)
    worker = Worker(services.runner, threads=1)
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    while dt.datetime.now(dt.UTC) < deadline:
        worker.run_once()
        with services.store.read() as session:
            active = session.scalar(
                sa.select(sa.func.count())
                .select_from(Task)
                .where(
                    Task.kind != LINE,
                    sa.or_(
                        Task.status == "running",
                        sa.and_(
                            Task.status == "pending",
                            Task.run_at <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=horizon),
                        ),
                    ),
                )
            )
            waiting = session.scalar(sa.select(Generation.id).where(WAITING).limit(1))
        if not active and waiting is None:
            return
        time.sleep(0.02)
    raise AssertionError("tasks still active")


class LoopbackServer:
    """A WSGI app served on a loopback address (a free port) from a thread, until `stop`."""

    def serve(self, app: Any, path: str = "/", *, address: str = "127.0.0.1") -> None:
        from werkzeug.serving import make_server

        self._server = make_server(address, 0, app, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://{address}:{self.port}{path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Receiver(LoopbackServer):
    """A webhook receiver on loopback that answers a script of statuses and records requests.

    `statuses` are used in order; the last one repeats. A 3xx answer carries a Location
    pointing at `/elsewhere` on the same server, so a followed redirect would show up there.
    """

    def __init__(self, statuses: list[int] | None = None) -> None:
        from werkzeug.wrappers import Request, Response

        self.statuses = list(statuses or [204])
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

        @Request.application  # type: ignore[misc]
        def app(request: Request) -> Response:
            with self._lock:
                self.requests.append(
                    {
                        "path": request.path,
                        "headers": dict(request.headers),
                        "body": request.get_data(),
                    }
                )
                index = min(len(self.requests), len(self.statuses)) - 1
                status = self.statuses[index]
            headers = {"Location": "/elsewhere"} if 300 <= status < 400 else {}
            return Response(b"receiver says hi", status=status, headers=headers)

        self.serve(app, "/hook")


def forget_answers(services: Services) -> None:
    """As if no request with an Idempotency-Key had answered yet (or each died before it
    could): the kept responses removed."""
    with services.store.transaction() as session:
        session.execute(
            sa.update(IdempotencyKey).values(response_status=None, response_body=sa.null())
        )


def kept_answers(services: Services) -> list[Any]:
    """The response kept for each Idempotency-Key (None: none yet)."""
    with services.store.read() as session:
        return list(session.scalars(sa.select(IdempotencyKey.response_body)))


def deadlocked_on_the_account(services: Services, generation_id: str, act: Callable[[], T]) -> T:
    """`act()`, run in a thread while a transaction of this test holds the upstream account's
    row lock; once `act` waits for that lock, the test's transaction writes the generation's
    row, which `act` holds: a cycle PostgreSQL breaks (within deadlock_timeout, 1 s) by aborting
    the transaction that waited first, `act`'s. What `act` returned."""
    engine = services.store.engine
    results: list[T] = []
    watching = engine.execution_options(isolation_level="AUTOCOMMIT")  # a fresh view per read
    with engine.connect() as holder, watching.connect() as watcher:
        holder.execute(sa.text("SELECT 1 FROM upstream_accounts WHERE id = 'deepimage' FOR UPDATE"))
        thread = threading.Thread(target=lambda: results.append(act()))
        thread.start()
        waiting_for_account = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%upstream_accounts%FOR UPDATE%' "
            "AND pid <> pg_backend_pid()"
        )
        deadline = time.monotonic() + 10
        while not watcher.execute(waiting_for_account).scalar():
            assert time.monotonic() < deadline, "it never waited for the account"
            time.sleep(0.01)
        holder.execute(
            sa.text("UPDATE generations SET updated_at = updated_at WHERE id = :id"),
            {"id": generation_id},
        )
        holder.commit()
        thread.join(timeout=30)
    assert not thread.is_alive()
    (result,) = results
    return result
