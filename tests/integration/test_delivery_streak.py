"""A subscription's failing streak follows the order of its attempts in a batch: a success
clears it even when a failure was recorded before it in the same batch, and a failure after a
success starts a new one."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
import sqlalchemy as sa

from service.config import Config
from service.models import Delivery, Subscription, Task
from service.runtime.kinds import DELIVER
from tests.integration.test_notifications import FAST_SCHEDULE, subscribe

LONG_AGO = dt.timedelta(days=5, minutes=1)


@pytest.fixture
def api(config: Config, make_client: Any) -> Any:
    """services, client, auth with a quick retry schedule."""
    return make_client(config.replace(webhook_retry_schedule=FAST_SCHEDULE))


def _streak(services: Any) -> tuple[dt.datetime | None, bool, str | None]:
    with services.store.read() as session:
        row = session.execute(
            sa.select(
                Subscription.failing_since, Subscription.enabled, Subscription.disabled_reason
            )
        ).one()
    return row.failing_since, row.enabled, row.disabled_reason


def _set_streak(services: Any, since: dt.datetime | None) -> None:
    with services.store.transaction() as session:
        session.execute(sa.update(Subscription).values(failing_since=since))


def _pings_in_one_batch(
    services: Any, client: Any, auth: dict[str, str], subscription_id: str, count: int = 2
) -> None:
    """`count` pings to the subscription, claimed and run together (the worker's batch), the
    older first."""
    for _ in range(count):
        response = client.post(f"/v1/subscriptions/{subscription_id}/test", headers=auth)
        assert response.status_code == 202
    with services.store.read() as session:
        order = list(session.scalars(sa.select(Delivery.id).order_by(Delivery.created_at)))
    tasks = services.queue.claim_due_tasks(limit=8, kinds=[DELIVER])
    assert len(tasks) == count
    tasks.sort(key=lambda t: order.index(t.payload["delivery_id"]))
    services.runner.execute_batch(tasks)


class SetAfterOneLook(threading.Event):
    """Told to stop while the batch's first delivery is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > 1


def test_a_stopping_worker_sends_no_more_of_its_batch_and_records_what_it_sent(
    api: Any, receiver_factory: Any
) -> None:
    """A batch of slow targets took minutes, a stopping worker is killed after seconds, and
    nothing it had sent was recorded: all of it went again after the lease."""
    services, client, auth = api
    receiver = receiver_factory()
    created = subscribe(client, auth, receiver.url)
    for _ in range(3):
        assert client.post(f"/v1/subscriptions/{created['id']}/test", headers=auth).status_code
    tasks = services.queue.claim_due_tasks(limit=8, kinds=[DELIVER])
    assert len(tasks) == 3
    services.runner.execute_batch(tasks, stopping=SetAfterOneLook())
    assert len(receiver.requests) == 1
    with services.store.read() as session:
        deliveries = session.execute(sa.select(Delivery.status, Delivery.attempts)).all()
        handed_back = session.execute(
            sa.select(Task.status, Task.attempts, Task.claim_token).where(
                Task.kind == DELIVER, Task.status != "done"
            )
        ).all()
    assert sorted(deliveries) == [("pending", 0), ("pending", 0), ("succeeded", 1)]
    assert handed_back == [("pending", 0, None), ("pending", 0, None)]
    assert len(services.queue.claim_due_tasks(limit=8, kinds=[DELIVER])) == 2  # due at once


def test_a_success_after_a_failure_in_one_batch_clears_the_streak(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    receiver = receiver_factory([400, 204])  # refused, then accepted
    created = subscribe(client, auth, receiver.url)
    _pings_in_one_batch(services, client, auth, created["id"])
    assert len(receiver.requests) == 2
    assert _streak(services) == (None, True, None)


def test_a_healthy_subscription_is_not_disabled_five_days_after_such_a_batch(
    api: Any, receiver_factory: Any
) -> None:
    """The batch's last delivery got through; one failure five days later must not disable the
    subscription for 'every delivery failed for 5 days'."""
    services, client, auth = api
    receiver = receiver_factory([400, 204])
    created = subscribe(client, auth, receiver.url)
    _pings_in_one_batch(services, client, auth, created["id"])
    since, _, _ = _streak(services)
    if since is not None:  # as if five days had passed since
        _set_streak(services, since - LONG_AGO)
    receiver.statuses = [400]
    _pings_in_one_batch(services, client, auth, created["id"], count=1)
    _, enabled, reason = _streak(services)
    assert (enabled, reason) == (True, None)


def test_a_success_after_a_failure_that_met_five_days_in_one_batch_keeps_it_enabled(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    receiver = receiver_factory([400, 204])
    created = subscribe(client, auth, receiver.url)
    _set_streak(services, dt.datetime.now(dt.UTC) - LONG_AGO)
    _pings_in_one_batch(services, client, auth, created["id"])
    assert _streak(services) == (None, True, None)  # its last delivery got through


def test_a_failure_after_a_success_in_one_batch_starts_a_streak(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    receiver = receiver_factory([204, 400])  # accepted, then refused
    created = subscribe(client, auth, receiver.url)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    _pings_in_one_batch(services, client, auth, created["id"])
    since, enabled, reason = _streak(services)
    assert since is not None and since >= before
    assert (enabled, reason) == (True, None)


def test_a_failure_after_a_success_in_one_batch_restarts_an_old_streak(
    api: Any, receiver_factory: Any
) -> None:
    """The streak from before the batch ended with its success: the failure after it starts a
    new one, and the subscription is not disabled for the old one."""
    services, client, auth = api
    receiver = receiver_factory([204, 400])
    created = subscribe(client, auth, receiver.url)
    _set_streak(services, dt.datetime.now(dt.UTC) - LONG_AGO)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    _pings_in_one_batch(services, client, auth, created["id"])
    since, enabled, reason = _streak(services)
    assert (enabled, reason) == (True, None)
    assert since is not None and since >= before
