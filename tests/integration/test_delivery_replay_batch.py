"""A replay (POST /v1/deliveries/{id}/retry) due in the same worker batch as its delivery's own
scheduled attempt: one POST for the delivery in that batch, and never a delivery left pending
with nothing to send it (nor later events to its target held behind it for ever).

Each test goes through the worker's own path: the deliver tasks claimed together
(`claim_due_tasks` for the kind), then `runner.execute_batch`.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import sqlalchemy as sa

from service.config import Config
from service.models import Task
from service.runtime.kinds import DELIVER
from tests.helpers import drain
from tests.integration.test_delivery_streak import SetAfterOneLook
from tests.integration.test_notifications import generate, subscribe, types_of

# Two attempts: at once, then an hour later (brought forward by the tests).
SCHEDULE = (0.0, 3600.0)


def _make(config: Config, make_client: Any) -> tuple[Any, Any, dict[str, str]]:
    return make_client(config.replace(webhook_retry_schedule=SCHEDULE))  # type: ignore[no-any-return]


def _deliver_tasks(services: Any, delivery_id: str, *statuses: str) -> list[Task]:
    with services.store.read() as session:
        return list(
            session.scalars(
                sa.select(Task).where(
                    Task.kind == DELIVER,
                    Task.status.in_(statuses),
                    Task.payload["delivery_id"].as_string() == delivery_id,
                )
            )
        )


def due_now(services: Any, delivery_id: str, *, attempts: int | None = None) -> None:
    """The delivery's scheduled attempt is due now (`attempts`: as if claimed that often)."""
    with services.store.transaction() as session:
        for task in session.scalars(
            sa.select(Task).where(
                Task.kind == DELIVER,
                Task.status == "pending",
                Task.payload["delivery_id"].as_string() == delivery_id,
            )
        ):
            task.run_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            if attempts is not None:
                task.attempts = attempts


def _batch(services: Any, *, replay_first: bool) -> list[Any]:
    """Claim the due deliveries together (the worker's batch), in the given order: the
    scheduled attempt and the replay."""
    tasks = services.queue.claim_due_tasks(limit=8, kinds=[DELIVER])
    assert sorted(bool(t.payload.get("replay")) for t in tasks) == [False, True]
    tasks.sort(key=lambda t: bool(t.payload.get("replay")) != replay_first)
    return tasks  # type: ignore[no-any-return]


def _pending_after_first_attempt(
    services: Any, client: Any, auth: dict[str, str], receiver: Any, events: list[str]
) -> dict[str, Any]:
    subscribe(client, auth, receiver.url, events=events)
    generate(client, auth)
    drain(services)  # the first attempt fails; the second is an hour out
    [delivery] = [
        d for d in client.get("/v1/deliveries", headers=auth).json["data"] if d["attempt_count"]
    ]
    assert (delivery["status"], delivery["attempt_count"]) == ("pending", 1)
    return delivery  # type: ignore[no-any-return]


@pytest.mark.parametrize("replay_first", [False, True], ids=["scheduled-first", "replay-first"])
def test_a_replay_beside_the_last_scheduled_attempt_sends_once_and_leaves_nothing_stuck(
    config: Config, make_client: Any, receiver_factory: Any, replay_first: bool
) -> None:
    services, client, auth = _make(config, make_client)
    receiver = receiver_factory([500])  # the endpoint is down
    delivery = _pending_after_first_attempt(
        services, client, auth, receiver, ["generation.processing"]
    )
    due_now(services, delivery["id"])  # its last scheduled attempt is due...
    assert client.post(f"/v1/deliveries/{delivery['id']}/retry", headers=auth).status_code == 202
    tasks = _batch(services, replay_first=replay_first)  # ...and claimed with the replay
    services.runner.execute_batch(tasks)

    assert len(receiver.requests) == 2, "one POST for the delivery in the batch"
    shown = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert (shown["status"], shown["attempt_count"]) == ("pending", 2)
    # One schedule: the scheduled attempt still comes, and the delivery says when.
    [scheduled] = _deliver_tasks(services, delivery["id"], "pending", "running")
    assert not scheduled.payload.get("replay")
    next_at = dt.datetime.fromisoformat(shown["next_attempt_at"])
    assert abs((next_at - scheduled.run_at).total_seconds()) < 2
    assert next_at > dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)

    drain(services)  # the scheduled attempt, the last of the schedule: 500
    shown = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert (shown["status"], shown["attempt_count"]) == ("dead", 3)
    assert shown["next_attempt_at"] is None
    assert _deliver_tasks(services, delivery["id"], "pending", "running") == []
    assert len(receiver.requests) == 3


@pytest.mark.parametrize("replay_first", [False, True], ids=["scheduled-first", "replay-first"])
def test_a_delivery_that_gets_through_in_such_a_batch_is_succeeded_and_sent_once(
    config: Config, make_client: Any, receiver_factory: Any, replay_first: bool
) -> None:
    services, client, auth = _make(config, make_client)
    receiver = receiver_factory([500, 204, 500])  # the first attempt fails, the next gets through
    delivery = _pending_after_first_attempt(
        services, client, auth, receiver, ["generation.processing"]
    )
    due_now(services, delivery["id"])
    assert client.post(f"/v1/deliveries/{delivery['id']}/retry", headers=auth).status_code == 202
    services.runner.execute_batch(_batch(services, replay_first=replay_first))
    drain(services)  # the scheduled task, deferred, finds the delivery delivered

    shown = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert shown["status"] == "succeeded"
    assert [a["status_code"] for a in shown["attempts"]] == [500, 204]
    assert len(receiver.requests) == 2
    assert _deliver_tasks(services, delivery["id"], "pending", "running") == []


def test_later_events_to_the_target_still_go_out(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    services, client, auth = _make(config, make_client)
    receiver = receiver_factory([500])
    subscribe(client, auth, receiver.url)  # every generation.* event
    generate(client, auth)
    drain(services)  # processing fails once; succeeded waits behind it (lifecycle order)
    deliveries = {
        d["event_type"]: d for d in client.get("/v1/deliveries", headers=auth).json["data"]
    }
    processing = deliveries["generation.processing"]
    assert (processing["status"], processing["attempt_count"]) == ("pending", 1)
    assert deliveries["generation.succeeded"]["attempt_count"] == 0

    due_now(services, processing["id"])
    assert client.post(f"/v1/deliveries/{processing['id']}/retry", headers=auth).status_code == 202
    services.runner.execute_batch(_batch(services, replay_first=False))
    receiver.statuses = [204]  # the endpoint is back
    drain(services)  # the scheduled attempt of `processing` gets through
    # The held-back delivery waited for `processing`'s next attempt (an hour, in this schedule):
    # bring it forward.
    due_now(services, deliveries["generation.succeeded"]["id"])
    drain(services)

    assert types_of(receiver)[-2:] == ["generation.processing", "generation.succeeded"]
    shown = {
        d["event_type"]: d["status"]
        for d in client.get("/v1/deliveries", headers=auth).json["data"]
    }
    assert shown == {"generation.processing": "succeeded", "generation.succeeded": "succeeded"}
    assert json.loads(receiver.requests[-1]["body"])["type"] == "generation.succeeded"


@pytest.mark.parametrize("replay_first", [False, True], ids=["scheduled-first", "replay-first"])
def test_a_failed_replay_recorded_with_its_given_up_scheduled_task_leaves_the_delivery_dead(
    config: Config, make_client: Any, receiver_factory: Any, replay_first: bool
) -> None:
    """The scheduled task, claimed again after its holders died, is given up unrun in the batch
    (its dead record is written in the same transaction as the replay's): the replay, which
    failed, must not set the delivery back to pending."""
    services, client, auth = _make(config, make_client)
    receiver = receiver_factory([500])
    delivery = _pending_after_first_attempt(
        services, client, auth, receiver, ["generation.processing"]
    )
    due_now(services, delivery["id"], attempts=len(SCHEDULE))  # claimed once more: given up
    assert client.post(f"/v1/deliveries/{delivery['id']}/retry", headers=auth).status_code == 202
    services.runner.execute_batch(_batch(services, replay_first=replay_first))

    shown = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert (shown["status"], shown["attempt_count"]) == ("dead", 2)
    assert shown["next_attempt_at"] is None
    assert _deliver_tasks(services, delivery["id"], "pending", "running") == []
    assert len(receiver.requests) == 2


def _two_replays_of_a_dead_delivery(
    config: Config, make_client: Any, receiver_factory: Any
) -> tuple[Any, Any, dict[str, str], Any, dict[str, Any], list[Any]]:
    """A delivery dead after one failed attempt, replayed twice, both replays claimed in one
    batch: services, client, auth, the receiver (which accepts the next POST), the delivery
    and the batch."""
    services, client, auth = make_client(config.replace(webhook_retry_schedule=(0.0,)))
    receiver = receiver_factory([500, 204])
    subscribe(client, auth, receiver.url, events=["generation.processing"])
    generate(client, auth)
    drain(services)
    [dead] = client.get("/v1/deliveries?status=dead", headers=auth).json["data"]
    for _ in range(2):
        assert client.post(f"/v1/deliveries/{dead['id']}/retry", headers=auth).status_code == 202
    tasks = services.queue.claim_due_tasks(limit=8, kinds=[DELIVER])
    assert [bool(t.payload.get("replay")) for t in tasks] == [True, True]
    return services, client, auth, receiver, dead, tasks


def test_two_replays_in_one_batch_send_once(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    services, client, auth, receiver, dead, tasks = _two_replays_of_a_dead_delivery(
        config, make_client, receiver_factory
    )
    services.runner.execute_batch(tasks)
    drain(services)

    shown = client.get(f"/v1/deliveries/{dead['id']}", headers=auth).json
    assert (shown["status"], shown["attempt_count"]) == ("succeeded", 2)
    assert len(receiver.requests) == 2
    assert _deliver_tasks(services, dead["id"], "pending", "running") == []


def test_two_replays_in_a_stopping_workers_batch_send_once(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    """Told to stop after sending the first replay, the worker handed the second back
    (due at once) instead of ending it with the first: the delivery went out again."""
    services, _client, _auth, receiver, dead, tasks = _two_replays_of_a_dead_delivery(
        config, make_client, receiver_factory
    )
    assert len(tasks) == 2
    services.runner.execute_batch(tasks, stopping=SetAfterOneLook())
    drain(services)
    assert len(receiver.requests) == 2  # the dead attempt, and one replay
    assert _deliver_tasks(services, dead["id"], "pending", "running") == []
