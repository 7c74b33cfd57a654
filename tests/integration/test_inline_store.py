"""A web process stores an accepted callback's result itself, on its few inline threads
(service/runtime/inline.py): once, only with an idle thread, and never losing the task."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from service.app import create_app
from service.bootstrap import Services, build_services
from service.config import Config
from service.models import Event, Task
from service.runtime.inline import InlineTasks
from service.runtime.kinds import STORE
from service.runtime.queue import ClaimedTask
from tests.helpers import drain
from tests.integration.test_completion import (
    TEXT_ONLY,
    call_back,
    callback_config,
    create,
    objects,
    wait_until_complete,
)

MakeInline = Callable[..., tuple[Services, Any, dict[str, str]]]


@pytest.fixture
def make_inline(store: Any, blobs: Any) -> Iterator[MakeInline]:
    made: list[Services] = []

    def make(config: Config, *, threads: int = 1) -> tuple[Services, Any, dict[str, str]]:
        services = build_services(config, store=store, blobs=blobs, inline_store_threads=threads)
        made.append(services)
        client = create_app(config, services=services).test_client()
        return services, client, {"Authorization": "Bearer " + services.api_keys.create("acme")}

    yield make
    for services in made:
        inline = services.completion.inline
        if inline is not None:
            inline.close(wait=10)
        services.deepimage.close()
        services.downloads.close()


def store_tasks(services: Services) -> list[Task]:
    with services.store.read() as session:
        return list(session.scalars(sa.select(Task).where(Task.kind == STORE)))


def wait_for_status(client: Any, auth: dict[str, str], generation_id: str, status: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if client.get(f"/v1/generations/{generation_id}", headers=auth).json["status"] == status:
            return
        time.sleep(0.02)
    raise AssertionError(f"{generation_id} never became {status}")


def succeeded_events(services: Services, generation_id: str) -> int:
    with services.store.read() as session:
        return int(
            session.scalar(
                sa.select(sa.func.count())
                .select_from(Event)
                .where(Event.generation_id == generation_id, Event.type == "generation.succeeded")
            )
            or 0
        )


def test_the_web_process_stores_an_accepted_callback_itself_once(
    config: Config, make_inline: MakeInline, simulator: Any
) -> None:
    services, client, auth = make_inline(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    result_url = wait_until_complete(simulator, generation["upstream"]["job"])
    first = call_back(client, generation, result_url)
    assert (first.status_code, first.json) == (200, {"outcome": "accepted"})
    # No worker runs here: the process that took the callback stores the result.
    wait_for_status(client, auth, generation["id"], "succeeded")
    again = call_back(client, generation, result_url)
    assert again.json == {"outcome": "ignored"}
    assert services.completion.inline is not None
    services.completion.inline.close(wait=10)
    [task] = store_tasks(services)
    assert (task.status, task.attempts, task.claim_token) == ("done", 1, None)
    assert succeeded_events(services, generation["id"]) == 1
    assert len(objects(services)) == 1
    # Nothing is left for a worker to do.
    assert services.queue.claim_due_tasks(limit=10, kinds=[STORE]) == []


def test_with_every_inline_thread_busy_the_store_goes_to_the_workers(
    config: Config, make_inline: MakeInline, simulator: Any
) -> None:
    services, client, auth = make_inline(callback_config(config), threads=1)
    inline = services.completion.inline
    assert inline is not None
    assert inline.reserve()  # the one thread is taken
    try:
        generation = create(client, auth, {"input": TEXT_ONLY})
        result_url = wait_until_complete(simulator, generation["upstream"]["job"])
        assert call_back(client, generation, result_url).json == {"outcome": "accepted"}
        [task] = store_tasks(services)
        assert (task.status, task.attempts, task.claim_token) == ("pending", 0, None)
    finally:
        inline.cancel()
    drain(services)
    wait_for_status(client, auth, generation["id"], "succeeded")
    assert succeeded_events(services, generation["id"]) == 1


def test_genrelay_web_inline_stores_sets_the_threads_and_0_leaves_every_store_to_the_workers(
    config: Config,
    simulator: Any,
    gcs_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    made: list[Services] = []

    def served(setting: str | None) -> Services:
        """The services `create_app` builds itself, as under `genrelay serve`."""
        if setting is None:
            monkeypatch.delenv("GENRELAY_WEB_INLINE_STORES", raising=False)
        else:
            monkeypatch.setenv("GENRELAY_WEB_INLINE_STORES", setting)
        made.append(create_app(callback_config(config)).extensions["genrelay"])
        return made[-1]

    try:
        default, off = served(None), served("0")
        assert default.completion.inline is not None and default.completion.inline.threads == 2
        assert off.completion.inline is None
        client = create_app(callback_config(config), services=off).test_client()
        auth = {"Authorization": "Bearer " + off.api_keys.create("acme")}
        generation = create(client, auth, {"input": TEXT_ONLY})
        result_url = wait_until_complete(simulator, generation["upstream"]["job"])
        assert call_back(client, generation, result_url).json == {"outcome": "accepted"}
        # Queued for a worker, not claimed by the process that answered.
        [task] = store_tasks(off)
        assert (task.status, task.attempts, task.claim_token) == ("pending", 0, None)
        drain(off)
        wait_for_status(client, auth, generation["id"], "succeeded")
    finally:
        for services in made:
            if services.completion.inline is not None:
                services.completion.inline.close(wait=10)
            services.deepimage.close()
            services.downloads.close()
            services.store.dispose()


def test_a_refused_or_duplicate_callback_gives_its_inline_thread_back(
    config: Config, make_inline: MakeInline, simulator: Any
) -> None:
    services, client, auth = make_inline(callback_config(config), threads=1)
    inline = services.completion.inline
    assert inline is not None
    generation = create(client, auth, {"input": TEXT_ONLY})
    result_url = wait_until_complete(simulator, generation["upstream"]["job"])
    wrong = call_back(client, generation, result_url, job="not-this-generations-job")
    assert wrong.status_code == 409
    assert inline.reserve()  # the refused callback did not keep it
    inline.cancel()
    assert call_back(client, generation, result_url).json == {"outcome": "accepted"}
    wait_for_status(client, auth, generation["id"], "succeeded")
    inline.close(wait=10)
    assert len(store_tasks(services)) == 1


def test_a_web_process_dying_mid_store_loses_nothing(
    config: Config, make_inline: MakeInline, simulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    services, client, auth = make_inline(callback_config(config, task_lease=1.0))
    inline = services.completion.inline
    assert inline is not None
    # The process dies right after the callback's commit: its attempt never runs.
    monkeypatch.setattr(inline, "start", lambda task: None)
    generation = create(client, auth, {"input": TEXT_ONLY})
    result_url = wait_until_complete(simulator, generation["upstream"]["job"])
    assert call_back(client, generation, result_url).json == {"outcome": "accepted"}
    [task] = store_tasks(services)
    assert (task.status, task.attempts) == ("running", 1)
    # A worker cannot take it while the lease holds...
    assert services.queue.claim_due_tasks(limit=10, kinds=[STORE]) == []
    time.sleep(1.2)
    # ...and takes it once the lease has run out.
    drain(services)
    wait_for_status(client, auth, generation["id"], "succeeded")
    [task] = store_tasks(services)
    assert (task.status, task.attempts) == ("done", 2)
    assert succeeded_events(services, generation["id"]) == 1


class _Queue:
    lease = dt.timedelta(seconds=300)
    short_leases: dict[str, dt.timedelta] = {}

    def lease_for(self, kind: str) -> dt.timedelta:
        return self.lease

    def __init__(self) -> None:
        self.released: list[tuple[str, bool]] = []

    def release(self, task: ClaimedTask, *, ran: bool = False) -> bool:
        self.released.append((task.id, ran))
        return True

    def renew(self, tasks: Any) -> set[str]:
        return {task.id for task in tasks}


class _BlockingRunner:
    def __init__(self) -> None:
        self.queue = _Queue()
        self.started = threading.Event()
        self.go = threading.Event()
        self.ran: list[str] = []

    def execute(self, task: ClaimedTask) -> None:
        self.started.set()
        self.go.wait(10)
        self.ran.append(task.id)


def _task(task_id: str) -> ClaimedTask:
    now = dt.datetime.now(dt.UTC)
    return ClaimedTask(
        id=task_id,
        kind=STORE,
        generation_id="gen_x",
        payload={},
        attempts=1,
        created_at=now,
        claim_token="token",
        lease_expires_at=now + dt.timedelta(seconds=300),
    )


def test_inline_threads_are_bounded_and_exit_hands_back_what_still_runs() -> None:
    runner = _BlockingRunner()
    inline = InlineTasks(runner, threads=1)  # type: ignore[arg-type]
    assert inline.reserve()
    inline.start(_task("task_a"))
    assert runner.started.wait(5)
    assert not inline.reserve()  # busy: the next callback's store goes to the workers
    assert inline.close(wait=0.1) == 1
    assert runner.queue.released == [("task_a", True)]  # it ran: the attempt counts
    assert not inline.reserve()  # closed: nothing new runs inline
    runner.go.set()
    deadline = time.monotonic() + 5
    while not runner.ran and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.ran == ["task_a"]
    assert inline.running() == []
