"""Deep-Image's 403 "No more requests are available" (the account's requests are used up until
a date it states) is waited out over HTTP, with the simulator's `no_more_requests` knob: it is
not a refused key, so no generation fails `upstream_auth` because of it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests
import sqlalchemy as sa

from service.bootstrap import Services
from service.config import Config
from service.models import Generation, Task
from service.runtime.worker import Worker
from tests.helpers import drain, seed_examples, set_simulator

TEXT_ONLY = seed_examples()["text_only"]
QUOTA_MESSAGE = "No more requests are available"


def _stats(simulator: Any) -> dict[str, Any]:
    stats: dict[str, Any] = requests.get(f"{simulator.url}/_sim/stats", timeout=5).json()
    return stats


def _task(services: Services, kind: str) -> Task | None:
    with services.store.read() as session:
        return session.scalars(sa.select(Task).where(Task.kind == kind)).one_or_none()


def _step_until(services: Services, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run due tasks one at a time, as a worker would, until `done()`."""
    worker = Worker(services.runner, threads=1)
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        worker.run_once()
        time.sleep(0.02)


def _status(services: Services, generation_id: str) -> str:
    with services.store.read() as session:
        generation = session.get(Generation, generation_id)
        assert generation is not None
        return generation.status


def test_a_generation_submitted_while_the_requests_are_out_is_submitted_once_they_are_back(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(config, fast_retries=True)
    set_simulator(simulator.url, no_more_requests=True)
    body = client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth).json
    # The inline attempt got the 403: a failed attempt, retried on the submit policy.
    assert body["status"] == "queued", body
    assert body.get("error") is None
    task = _task(services, "submit")
    assert task is not None
    assert (task.status, task.attempts) == ("pending", 1)
    assert task.last_error is not None and QUOTA_MESSAGE in task.last_error
    set_simulator(simulator.url, no_more_requests=False)
    drain(services)  # submit, then (polling-only mode) poll and store
    after = client.get(f"/v1/generations/{body['id']}", headers=auth).json
    assert after["status"] == "succeeded", after
    assert after["upstream"]["job"]
    stats = _stats(simulator)
    assert (stats["injected_no_more_requests"], stats["jobs_created"]) == (1, 1)


def test_a_running_generation_keeps_polling_while_the_requests_are_out(
    config: Config, make_client: Any, simulator: Any
) -> None:
    set_simulator(simulator.url, processing_time=1.0)
    services, client, auth = make_client(config)
    body = client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth).json
    assert body["status"] == "processing", body  # the job is created and running
    set_simulator(simulator.url, no_more_requests=True)
    # Polls (polling-only mode) answered the 403, one after the other (or one, and the end).
    _step_until(
        services,
        lambda: (
            _stats(simulator)["injected_no_more_requests"] >= 2
            or _status(services, body["id"]) != "processing"
        ),
    )
    assert _status(services, body["id"]) == "processing"
    poll = _task(services, "poll")
    assert poll is not None
    assert poll.status == "pending"
    assert poll.last_error is not None and QUOTA_MESSAGE in poll.last_error
    set_simulator(simulator.url, no_more_requests=False)
    drain(services)
    after = client.get(f"/v1/generations/{body['id']}", headers=auth).json
    assert after["status"] == "succeeded", after
    assert _stats(simulator)["jobs_created"] == 1


def test_a_found_result_is_confirmed_once_the_requests_are_back(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(config)
    body = client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth).json
    # Polls until the job is complete: its store task is queued, not yet run.
    _step_until(services, lambda: _task(services, "store") is not None)
    set_simulator(simulator.url, no_more_requests=True)
    # The store's confirmation (GET result) gets the 403: a failed attempt, retried.
    _step_until(services, lambda: _stats(simulator)["injected_no_more_requests"] >= 1)
    store = _task(services, "store")
    assert store is not None
    assert (store.status, store.attempts) == ("pending", 1)
    assert store.last_error is not None and QUOTA_MESSAGE in store.last_error
    assert _status(services, body["id"]) == "processing"
    set_simulator(simulator.url, no_more_requests=False)
    drain(services)
    after = client.get(f"/v1/generations/{body['id']}", headers=auth).json
    assert after["status"] == "succeeded", after
