"""Inline image data is stored once: not copied into every event, delivery body and list item."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from service.bootstrap import Services
from service.config import Config
from service.models import Delivery, Event, Generation, IdempotencyKey
from service.notifications.service import MAX_SUBSCRIPTIONS
from tests.helpers import Receiver, drain


def noise_png(side: int) -> bytes:
    """A PNG of random pixels (incompressible: side * side * 3 bytes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


# About 2 MiB of PNG, inline as Deep-Image takes it.
INLINE = "data:image/png;base64," + base64.b64encode(noise_png(836)).decode()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made = [Receiver() for _ in range(3)]
    yield made
    for receiver in made:
        receiver.stop()


def stored_bytes(services: Services) -> int:
    """What the rows that copy a generation take: its input, events, deliveries, replay."""
    with services.store.read() as session:
        total = 0
        for generation in session.scalars(sa.select(Generation)):
            total += len(json.dumps(generation.input))
        for event in session.scalars(sa.select(Event)):
            total += len(json.dumps(event.data))
        for body in session.scalars(sa.select(Delivery.body)):
            total += len(body)
        for reply in session.scalars(sa.select(IdempotencyKey.response_body)):
            total += len(json.dumps(reply))
    return total


def test_a_2_mib_inline_image_with_3_subscriptions_is_not_stored_again_per_event(
    config: Config, make_client: Any, receivers: list[Receiver]
) -> None:
    services, client, auth = make_client(config)
    for receiver in receivers:
        created = client.post("/v1/subscriptions", json={"url": receiver.url}, headers=auth)
        assert created.status_code == 201
    body = {"input": {"url": INLINE, "width": 2048}}
    response = client.post(
        "/v1/generations", json=body, headers={**auth, "Idempotency-Key": "inline-1"}
    )
    assert response.status_code == 202, response.json
    generation_id = response.json["id"]
    drain(services)
    shown = client.get(f"/v1/generations/{generation_id}", headers=auth).json
    assert shown["status"] == "succeeded", shown["error"]
    # Once in the generation, once in the replayable first response; events (2) and their
    # deliveries (3 x 2) carry a reference. Before: 2 + 2 + 6 copies, about 28 MB.
    assert stored_bytes(services) < 2.2 * len(INLINE)
    reference = {
        "omitted": "inline image data",
        "bytes": len(INLINE),
        "sha256": hashlib.sha256(INLINE.encode()).hexdigest(),
    }
    for receiver in receivers:
        assert len(receiver.requests) == 2
        for request in receiver.requests:
            assert json.loads(request["body"])["data"]["input"]["url"] == reference
    listed = client.get("/v1/generations", headers=auth).json["data"]
    assert listed[0]["input"]["url"] == reference
    # The generation itself still shows (and forwarded) the request as sent.
    shown = client.get(f"/v1/generations/{generation_id}", headers=auth).json
    assert shown["input"] == body["input"]


def test_a_tenant_has_a_bounded_number_of_subscriptions(client: Any, auth: dict[str, str]) -> None:
    url = "http://127.0.0.1:9/hook"
    for _ in range(MAX_SUBSCRIPTIONS):
        assert client.post("/v1/subscriptions", json={"url": url}, headers=auth).status_code == 201
    refused = client.post("/v1/subscriptions", json={"url": url}, headers=auth)
    assert refused.status_code == 422
    assert refused.content_type == "application/problem+json"
    assert [e["field"] for e in refused.json["errors"]] == ["url"]
