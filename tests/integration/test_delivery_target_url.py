"""A subscription's deliveries go to its current `url`: after `PATCH /v1/subscriptions/{id}`
changes it, the pending retries and the replays of its deliveries go to the new one (checked
at send time like any target), and each delivery's `url` shows where it was last sent."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from service.config import Config
from service.models import Subscription
from service.notifications import ssrf
from tests.helpers import drain
from tests.integration.test_delivery_replay_batch import due_now
from tests.integration.test_notifications import generate, subscribe, types_of

SCHEDULE = (0.0, 3600.0)  # two attempts: at once, then an hour later (brought forward)


def _move(client: Any, auth: dict[str, str], subscription_id: str, url: str) -> None:
    changed = client.patch(f"/v1/subscriptions/{subscription_id}", json={"url": url}, headers=auth)
    assert changed.status_code == 200 and changed.json["url"] == url


def test_a_pending_retry_goes_to_the_url_the_subscription_has_now(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    services, client, auth = make_client(config.replace(webhook_retry_schedule=SCHEDULE))
    old, new = receiver_factory([500]), receiver_factory([204])
    created = subscribe(client, auth, old.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)  # the first attempt, to the old endpoint, fails
    [delivery] = client.get("/v1/deliveries", headers=auth).json["data"]
    assert (delivery["status"], delivery["url"]) == ("pending", old.url)

    _move(client, auth, created["id"], new.url)
    due_now(services, delivery["id"])
    drain(services)

    assert (len(old.requests), len(new.requests)) == (1, 1)
    shown = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert (shown["status"], shown["attempt_count"], shown["url"]) == ("succeeded", 2, new.url)
    assert [a["status_code"] for a in shown["attempts"]] == [500, 204]
    assert new.requests[0]["headers"]["Webhook-Id"] == old.requests[0]["headers"]["Webhook-Id"]


def test_a_replay_goes_to_the_url_the_subscription_has_now(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    services, client, auth = make_client(config.replace(webhook_retry_schedule=(0.0,)))
    old, new = receiver_factory([500]), receiver_factory([204])
    created = subscribe(client, auth, old.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    [dead] = client.get("/v1/deliveries?status=dead", headers=auth).json["data"]

    _move(client, auth, created["id"], new.url)
    assert client.post(f"/v1/deliveries/{dead['id']}/retry", headers=auth).status_code == 202
    drain(services)

    assert (len(old.requests), len(new.requests)) == (1, 1)
    shown = client.get(f"/v1/deliveries/{dead['id']}", headers=auth).json
    assert (shown["status"], shown["url"]) == ("succeeded", new.url)


def test_the_url_a_delivery_is_sent_to_is_checked_at_send_time(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    """The subscription's url as it is when sent, and refused then if it is not allowed (the
    metadata address is refused even where private targets are allowed)."""
    services, client, auth = make_client(config.replace(webhook_retry_schedule=SCHEDULE))
    receiver = receiver_factory([500])
    created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    [delivery] = client.get("/v1/deliveries", headers=auth).json["data"]
    refused = "http://169.254.169.254/hook"
    with services.store.transaction() as session:  # as if it had passed the check at PATCH
        session.execute(
            sa.update(Subscription).where(Subscription.id == created["id"]).values(url=refused)
        )
    due_now(services, delivery["id"])
    drain(services)

    assert len(receiver.requests) == 1
    shown = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert (shown["status"], shown["url"]) == ("failed", refused)
    assert shown["attempts"][-1]["error"].startswith("not allowed")


def test_lifecycle_order_holds_across_a_change_of_url(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    """A later event written before the PATCH (its row has the old url) still waits for an
    earlier one of the same subscription, sent to the new url since."""
    three = (0.0, 3600.0, 3600.0)  # processing has an attempt left after the PATCH
    services, client, auth = make_client(config.replace(webhook_retry_schedule=three))
    old, new = receiver_factory([500]), receiver_factory([500, 204])
    created = subscribe(client, auth, old.url)  # every generation.* event
    generate(client, auth)
    drain(services)  # processing fails once; succeeded waits behind it
    deliveries = {
        d["event_type"]: d for d in client.get("/v1/deliveries", headers=auth).json["data"]
    }
    processing, succeeded = deliveries["generation.processing"], deliveries["generation.succeeded"]
    assert (processing["status"], succeeded["attempt_count"]) == ("pending", 0)

    _move(client, auth, created["id"], new.url)
    due_now(services, processing["id"])
    drain(services)  # processing, to the new url: 500, pending for its last attempt
    due_now(services, succeeded["id"])
    drain(services)  # succeeded must still wait
    assert types_of(new) == ["generation.processing"]
    shown = {d["event_type"]: d for d in client.get("/v1/deliveries", headers=auth).json["data"]}
    assert (shown["generation.processing"]["status"], shown["generation.processing"]["url"]) == (
        "pending",
        new.url,
    )
    assert (
        shown["generation.succeeded"]["attempt_count"],
        shown["generation.succeeded"]["url"],
    ) == (
        0,
        old.url,
    )

    due_now(services, processing["id"])
    drain(services)
    due_now(services, succeeded["id"])
    drain(services)
    assert types_of(new) == [
        "generation.processing",
        "generation.processing",
        "generation.succeeded",
    ]
    assert len(old.requests) == 1


@pytest.mark.parametrize("events", [["generation.succeeded"]])
def test_a_per_request_webhook_keeps_its_url(
    config: Config, make_client: Any, receiver_factory: Any, events: list[str]
) -> None:
    services, client, auth = make_client(config.replace(webhook_retry_schedule=(0.0, 0.05)))
    hook, subscribed = receiver_factory([500, 204]), receiver_factory([204])
    subscribe(client, auth, subscribed.url, events=events)
    generate(client, auth, webhook=hook.url, webhook_events_filter=events)
    drain(services)
    assert len(hook.requests) == 2 and len(subscribed.requests) == 1
    shown = {d["url"]: d["status"] for d in client.get("/v1/deliveries", headers=auth).json["data"]}
    assert shown == {hook.url: "succeeded", subscribed.url: "succeeded"}


class _RecordingLookups:
    """Stands in for the process's lookups: answers 127.0.0.1 for OWNED_HOST and records
    whose lookups they were (`lookups_for`)."""

    def __init__(self) -> None:
        self.owners: list[str | None] = []

    def resolve(self, resolve: Any, host: str, port: int, timeout: float) -> list[str]:
        assert host == OWNED_HOST
        self.owners.append(ssrf._OWNER.get())
        return ["127.0.0.1"]


OWNED_HOST = "hooks.tenant-owned.example"


def test_a_targets_lookups_count_as_its_tenants(
    config: Config, make_client: Any, receiver_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked at the API and at send time, a tenant's webhook and subscription hosts are
    looked up as its own: its hung lookups are bounded apart from other tenants'."""
    lookups = _RecordingLookups()
    monkeypatch.setattr(ssrf, "_LOOKUPS", lookups)
    services, client, auth = make_client(config.replace(webhook_retry_schedule=(0.0,)))
    receiver = receiver_factory([204])
    url = f"http://{OWNED_HOST}:{receiver.port}/"
    created = subscribe(client, auth, url, events=["generation.succeeded"])
    generate(client, auth, webhook=url, webhook_events_filter=["generation.succeeded"])
    drain(services)

    assert len(receiver.requests) == 2  # the subscription's delivery and the webhook's
    with services.store.read() as session:
        subscription = session.get(Subscription, created["id"])
        assert subscription is not None
        tenant_id = subscription.tenant_id
    assert lookups.owners == [tenant_id] * 4  # subscribe, intake, two deliveries
