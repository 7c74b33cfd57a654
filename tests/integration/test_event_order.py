"""A generation's events, and the deliveries that go out in their order, follow the order in
which its status changes committed, even when a change read the clock before the one it
followed had committed (it waited for that one's row lock)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from service.config import Config
from service.domain import GenerationStatus
from service.generations.lifecycle import change_status
from service.models import Generation
from tests.helpers import drain
from tests.integration.test_notifications import generate, subscribe, types_of


def test_an_end_stamped_before_the_move_to_processing_is_still_sent_after_it(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    services, client, auth = make_client(config.replace(webhook_retry_schedule=(0.0,)))
    receiver = receiver_factory([204])
    subscribe(client, auth, receiver.url)  # every generation.* event
    generation = generate(client, auth)
    assert generation["status"] == "processing"
    with services.store.transaction() as session:
        stored = session.get(Generation, generation["id"])
        assert stored is not None and stored.submitted_at is not None
        submitted = stored.submitted_at
    # A cancel that read the clock 5 ms before the move to processing committed.
    with services.store.transaction() as session:
        moved = change_status(
            session,
            generation["id"],
            GenerationStatus.CANCELED,
            now=submitted - dt.timedelta(milliseconds=5),
        )
    assert moved
    drain(services)

    assert types_of(receiver) == ["generation.processing", "generation.canceled"]
    events = client.get(f"/v1/events?generation_id={generation['id']}", headers=auth).json
    assert [e["type"] for e in events["data"]] == ["generation.canceled", "generation.processing"]
    canceled, processing = (dt.datetime.fromisoformat(e["created_at"]) for e in events["data"])
    assert canceled > processing == submitted
    shown = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert shown["status"] == "canceled"
    assert dt.datetime.fromisoformat(shown["completed_at"]) == canceled


def test_an_end_stamped_after_the_move_to_processing_keeps_its_time(
    config: Config, make_client: Any
) -> None:
    services, client, auth = make_client(config)
    generation = generate(client, auth)
    with services.store.transaction() as session:
        stored = session.get(Generation, generation["id"])
        assert stored is not None and stored.submitted_at is not None
        later = stored.submitted_at + dt.timedelta(seconds=3)
        assert change_status(session, generation["id"], GenerationStatus.CANCELED, now=later)
    shown = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert dt.datetime.fromisoformat(shown["completed_at"]) == later
