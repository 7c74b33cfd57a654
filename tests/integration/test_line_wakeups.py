"""The `line` task sleeps 5 s when it finds nothing to do; a generation that starts to wait
wakes it (on SQLite and PostgreSQL, with the simulator over HTTP)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from service.config import Config
from service.database import Store
from service.generations.line import (
    LINE_TASK_ID,
    PAUSE_FIRST,
    TICK_BUSY,
    TICK_IDLE,
    ensure_line_task,
)
from service.models import Task, UpstreamAccount, utcnow
from tests.helpers import seed_examples, set_simulator

BODY = {"input": seed_examples()["text_only"]}


def line_sleeps_idle(store: Store) -> None:
    """The state after a pass of the line that found no one waiting."""
    with store.transaction() as session:
        task = session.get(Task, LINE_TASK_ID)
        assert task is not None
        task.run_at = utcnow() + dt.timedelta(seconds=TICK_IDLE)


def line_runs_at(store: Store) -> dt.datetime:
    with store.read() as session:
        task = session.get(Task, LINE_TASK_ID)
        assert task is not None
        return task.run_at


@pytest.fixture
def limited(config: Config, make_client: Any) -> Any:
    services, client, auth = make_client(dataclasses.replace(config, upstream_concurrency=1))
    ensure_line_task(services.queue)
    return services, client, auth


def test_a_generation_that_has_to_wait_at_intake_wakes_the_line(limited: Any) -> None:
    services, client, auth = limited
    first = client.post("/v1/generations", json=BODY, headers=auth)
    assert first.json["status"] == "processing"
    line_sleeps_idle(services.store)
    before = utcnow()
    waiting = client.post("/v1/generations", json=BODY, headers=auth)
    assert waiting.json["status"] == "queued"
    assert line_runs_at(services.store) <= before + dt.timedelta(seconds=TICK_BUSY + 0.5)


def test_a_generation_admitted_at_intake_leaves_the_line_asleep(limited: Any) -> None:
    services, client, auth = limited
    line_sleeps_idle(services.store)
    asleep_until = line_runs_at(services.store)
    assert client.post("/v1/generations", json=BODY, headers=auth).json["status"] == "processing"
    assert line_runs_at(services.store) == asleep_until


def test_a_429_wakes_the_line_when_its_pause_ends(limited: Any, simulator: Any) -> None:
    services, client, auth = limited
    set_simulator(simulator.url, rate_limit_rate=1.0)
    line_sleeps_idle(services.store)
    refused = client.post("/v1/generations", json=BODY, headers=auth)
    assert refused.json["status"] == "queued"
    with services.store.read() as session:
        account = session.get(UpstreamAccount, "deepimage")
        assert account is not None and account.paused_until is not None
        paused_until = account.paused_until
    assert paused_until <= utcnow() + dt.timedelta(seconds=PAUSE_FIRST)
    assert line_runs_at(services.store) == paused_until
