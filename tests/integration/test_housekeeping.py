"""Housekeeping on real SQLite and PostgreSQL: what is deleted, what is kept, and the task."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

from service.auth import ApiKeys
from service.bootstrap import Services
from service.database import Store
from service.ids import new_id
from service.models import Generation, IdempotencyKey, Task, Trigger, TriggerEvent, utcnow
from service.runtime import housekeeping
from service.runtime.housekeeping import (
    INTERVAL,
    RETRY_AFTER,
    TASK_ID,
    HousekeepingHandler,
    ensure_scheduled,
)
from service.runtime.kinds import HOUSEKEEPING
from service.runtime.queue import TaskQueue, TaskStatus, new_task_row
from tests.helpers import seed_examples

TEXT_ONLY = seed_examples()["text_only"]
DAY = dt.timedelta(days=1)


def post(client: Any, auth: dict[str, str], key: str) -> str:
    headers = {**auth, "Idempotency-Key": key}
    response = client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=headers)
    assert response.status_code == 202, response.json
    return str(response.json["id"])


def add_task(store: Store, status: TaskStatus, finished_ago: dt.timedelta) -> str:
    """A task of `status` that ran and finished `finished_ago` (run_at a minute before)."""
    now = utcnow()
    row = new_task_row("job", {}, None, now - finished_ago - dt.timedelta(minutes=1))
    row.status = status
    row.finished_at = now - finished_ago
    with store.transaction() as session:
        session.add(row)
    return row.id


def task_ids(store: Store) -> set[str]:
    with store.read() as session:
        return set(session.scalars(sa.select(Task.id).where(Task.kind == "job")))


def keys(store: Store) -> set[str]:
    with store.read() as session:
        return set(session.scalars(sa.select(IdempotencyKey.key)))


def test_a_sweep_deletes_expired_keys_and_old_finished_tasks_and_keeps_the_rest(
    services: Services, client: Any, auth: dict[str, str]
) -> None:
    store = services.store
    for key in ("old-1", "old-2", "old-3", "fresh"):
        post(client, auth, key)
    with store.transaction() as session:
        session.execute(
            sa.update(IdempotencyKey)
            .where(IdempotencyKey.key.like("old-%"))
            .values(expires_at=utcnow() - dt.timedelta(seconds=1))
        )
    doomed = {
        add_task(store, TaskStatus.DONE, 8 * DAY),
        add_task(store, TaskStatus.DONE, 9 * DAY),
        add_task(store, TaskStatus.DEAD, 31 * DAY),
    }
    kept = {
        add_task(store, TaskStatus.DONE, 6 * DAY),
        add_task(store, TaskStatus.DEAD, 8 * DAY),  # dead tasks are kept 30 days
        add_task(store, TaskStatus.PENDING, 40 * DAY),  # never finished: not ours to delete
    }
    handler = HousekeepingHandler(store, batch=2)  # several batches per kind
    assert handler.sweep() is True
    assert keys(store) == {"fresh"}
    assert task_ids(store) == kept
    assert not doomed & task_ids(store)
    with store.read() as session:  # the generations themselves are the tenant's: kept
        assert session.scalar(sa.select(sa.func.count()).select_from(Generation)) == 4
    # An expired key can be used again after the sweep, as before it.
    post(client, auth, "old-1")
    assert handler.sweep() is True  # nothing left: a no-op


def test_a_sweep_deletes_old_trigger_events_that_made_no_generation(
    store: Store, api_key: str
) -> None:
    tenant = ApiKeys(store).tenant_for(api_key)
    assert tenant is not None
    now = utcnow()
    with store.transaction() as session:
        trigger = Trigger(
            id=new_id("trg_"), tenant_id=tenant.id, source="pubsub", template={}, meta={},
            push_accounts=[],
        )  # fmt: skip
        session.add(trigger)
        session.flush()
        ages = {
            "old rejected": ("rejected", 31 * DAY),
            "old skipped": ("skipped", 45 * DAY),
            "old accepted": ("accepted", 400 * DAY),  # its generation's record: kept
            "fresh rejected": ("rejected", 29 * DAY),
            "fresh skipped": ("skipped", 1 * DAY),
        }
        for event_id, (status, age) in ages.items():
            session.add(
                TriggerEvent(
                    id=new_id("tev_"), trigger_id=trigger.id, tenant_id=tenant.id,
                    event_id=event_id, kind="message", status=status, created_at=now - age,
                )
            )  # fmt: skip
    assert HousekeepingHandler(store, batch=1).sweep() is True
    with store.read() as session:
        left = set(session.scalars(sa.select(TriggerEvent.event_id)))
    assert left == {"old accepted", "fresh rejected", "fresh skipped"}


def test_a_sweep_stops_at_its_time_budget_and_continues_soon(store: Store) -> None:
    for _ in range(3):
        add_task(store, TaskStatus.DONE, 8 * DAY)
    handler = HousekeepingHandler(store, batch=1, budget=0.0)
    assert handler.sweep() is False
    assert len(task_ids(store)) == 2  # one batch, then the budget was spent
    queue = TaskQueue(store)
    ensure_scheduled(queue)
    [task] = queue.claim_due_tasks(kinds=[HOUSEKEEPING])
    assert handler.run(task).delay == housekeeping.CONTINUE_AFTER


def test_the_housekeeping_task_exists_once_reruns_every_interval_and_is_revived(
    services: Services,
) -> None:
    queue = services.queue
    ensure_scheduled(queue)
    ensure_scheduled(queue)  # a second worker starting: still one task
    before = utcnow()
    [task] = queue.claim_due_tasks(kinds=[HOUSEKEEPING])
    assert task.id == TASK_ID
    assert services.runner.execute(task) is TaskStatus.PENDING
    with services.store.read() as session:
        row = session.get(Task, TASK_ID)
        assert row is not None
        assert (row.status, row.attempts) == (TaskStatus.PENDING, 0)
        assert row.run_at >= before + dt.timedelta(seconds=INTERVAL)
        assert session.scalar(sa.select(sa.func.count()).where(Task.kind == HOUSEKEEPING)) == 1
    with services.store.transaction() as session:
        session.execute(sa.update(Task).where(Task.id == TASK_ID).values(status=TaskStatus.DEAD))
    ensure_scheduled(queue)
    [revived] = queue.claim_due_tasks(kinds=[HOUSEKEEPING])
    assert revived.id == TASK_ID


def test_a_failed_sweep_is_tried_again_later_instead_of_failing_the_task(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = HousekeepingHandler(store)

    def broken(now: dt.datetime | None = None) -> bool:
        raise sa.exc.OperationalError("DELETE", {}, Exception("database went away"))

    monkeypatch.setattr(handler, "sweep", broken)
    queue = TaskQueue(store)
    ensure_scheduled(queue)
    [task] = queue.claim_due_tasks(kinds=[HOUSEKEEPING])
    assert handler.run(task).delay == RETRY_AFTER
