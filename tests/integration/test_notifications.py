"""Events, subscriptions and signed, retried deliveries on real databases and loopback HTTP."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import sqlalchemy as sa
import standardwebhooks
import svix.webhooks
from cloudevents.core.bindings.http import HTTPMessage, from_structured_event

from service.config import Config
from service.models import Delivery, Subscription
from tests.helpers import LoopbackServer, Receiver, Statements, drain, seed_examples

TEXT_ONLY = seed_examples()["text_only"]
FAST_SCHEDULE = (0.0, 0.05, 0.05)  # three attempts, quickly


@pytest.fixture
def api(config: Config, make_client: Any) -> Any:
    """services, client, auth with a quick retry schedule."""
    return make_client(config.replace(webhook_retry_schedule=FAST_SCHEDULE))


def subscribe(client: Any, auth: dict[str, str], url: str, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/subscriptions", json={"url": url, **fields}, headers=auth)
    assert response.status_code == 201, response.json
    return response.json  # type: ignore[no-any-return]


def generate(client: Any, auth: dict[str, str], **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/generations", json={"input": TEXT_ONLY, **fields}, headers=auth)
    assert response.status_code == 202, response.json
    return response.json  # type: ignore[no-any-return]


def verify_both(secret: str, request: dict[str, Any]) -> dict[str, Any]:
    """Check a received request with the official Standard Webhooks library and with svix."""
    headers = {k.lower(): v for k, v in request["headers"].items()}
    payload = standardwebhooks.Webhook(secret).verify(request["body"], headers)
    svix.webhooks.Webhook(secret).verify(request["body"], headers)
    return payload  # type: ignore[no-any-return]


def types_of(receiver: Receiver) -> list[str]:
    return [json.loads(r["body"])["type"] for r in receiver.requests]


def test_each_state_change_is_an_event_in_lifecycle_order(api: Any) -> None:
    services, client, auth = api
    generation = generate(client, auth)
    drain(services)
    events = client.get(f"/v1/events?generation_id={generation['id']}", headers=auth).json
    assert [e["type"] for e in reversed(events["data"])] == [
        "generation.processing",
        "generation.succeeded",
    ]
    newest = events["data"][0]
    assert newest["data"]["status"] == "succeeded"
    assert newest["data"]["result"]["uri"].startswith("gs://")
    assert client.get(f"/v1/events/{newest['id']}", headers=auth).json == newest
    only = client.get("/v1/events?type=generation.processing", headers=auth).json["data"]
    assert [e["type"] for e in only] == ["generation.processing"]


def test_the_per_request_webhook_gets_the_filtered_events_signed_with_the_default_secret(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    receiver = receiver_factory()
    generate(client, auth, webhook=receiver.url, webhook_events_filter=["generation.succeeded"])
    drain(services)
    secret = client.get("/v1/webhooks/default/secret", headers=auth).json["secret"]
    assert secret.startswith("whsec_")
    [request] = receiver.requests
    payload = verify_both(secret, request)
    assert payload["type"] == "generation.succeeded"
    assert payload["data"]["status"] == "succeeded"
    assert request["headers"]["Content-Type"] == "application/json"


def test_a_subscription_gets_every_event_in_order_signed_with_its_own_secret(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    receiver = receiver_factory()
    created = subscribe(client, auth, receiver.url, description="orders")
    assert created["secret"].startswith("whsec_")
    assert "secret" not in client.get(f"/v1/subscriptions/{created['id']}", headers=auth).json
    generate(client, auth)
    drain(services)
    assert types_of(receiver) == ["generation.processing", "generation.succeeded"]
    for request in receiver.requests:
        verify_both(created["secret"], request)
    ids = {r["headers"]["Webhook-Id"] for r in receiver.requests}
    assert len(ids) == 2


def test_a_status_change_reads_the_subscriptions_only_while_its_tenant_has_an_enabled_one(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    read = "SELECT subscriptions.id"  # the fan-out's read of the tenant's subscriptions

    def intake() -> tuple[str, Statements]:
        with Statements(services.store.engine) as statements:
            generation = generate(client, auth)
        assert generation["status"] == "processing"  # one status change, inline
        return generation["id"], statements

    generate(client, auth)  # makes the account's row: the next intakes' statements alike
    _, statements = intake()
    assert statements.matching(read) == []
    [change] = statements.matching("UPDATE generations SET status")
    assert "FROM subscriptions" in change  # whether there is one: asked in the change itself
    receiver = receiver_factory()
    created = subscribe(client, auth, receiver.url)
    subscribed, statements = intake()
    assert len(statements.matching(read)) == 1
    disabled = {"enabled": False}
    changed = client.patch(f"/v1/subscriptions/{created['id']}", json=disabled, headers=auth)
    assert changed.status_code == 200 and changed.json["enabled"] is False
    _, statements = intake()
    assert statements.matching(read) == []
    drain(services)
    # Only the generation made while the subscription was enabled had its events queued to it.
    with services.store.read() as session:
        queued = session.scalars(
            sa.select(Delivery.body).where(Delivery.subscription_id == created["id"])
        ).all()
    assert {json.loads(body)["data"]["id"] for body in queued} == {subscribed}


def test_cloudevents_subscriptions_get_structured_cloudevents(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    receiver = receiver_factory()
    created = subscribe(
        client, auth, receiver.url, format="cloudevents", events=["generation.succeeded"]
    )
    generation = generate(client, auth)
    drain(services)
    [request] = receiver.requests
    assert request["headers"]["Content-Type"] == "application/cloudevents+json"
    verify_both(created["secret"], request)
    event = from_structured_event(HTTPMessage(headers=request["headers"], body=request["body"]))
    assert event.get_id() == request["headers"]["Webhook-Id"]
    assert event.get_type() == "generation.succeeded"
    assert event.get_subject() == generation["id"]
    assert event.get_data()["status"] == "succeeded"


def test_a_failing_receiver_gets_one_successful_delivery_with_the_same_webhook_id(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    receiver = receiver_factory([500, 503, 200])
    created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    assert [r["headers"]["Webhook-Id"] for r in receiver.requests] == [
        receiver.requests[0]["headers"]["Webhook-Id"]
    ] * 3
    [delivery] = client.get(f"/v1/deliveries?subscription={created['id']}", headers=auth).json[
        "data"
    ]
    assert (delivery["status"], delivery["attempt_count"]) == ("succeeded", 3)
    detail = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert [a["status_code"] for a in detail["attempts"]] == [500, 503, 200]
    assert detail["attempts"][0]["response_excerpt"] == "receiver says hi"


def test_a_410_disables_the_subscription(api: Any, receiver_factory: Any) -> None:
    services, client, auth = api
    receiver = receiver_factory([410])
    created = subscribe(client, auth, receiver.url)
    generate(client, auth)
    drain(services)
    shown = client.get(f"/v1/subscriptions/{created['id']}", headers=auth).json
    assert shown["enabled"] is False
    assert "410" in shown["disabled_reason"]
    assert len(receiver.requests) == 1  # the later event is not sent to a disabled target
    deliveries = client.get(f"/v1/deliveries?subscription={created['id']}", headers=auth).json
    # The later event either finds the subscription disabled (no delivery) or fails unsent.
    assert {d["status"] for d in deliveries["data"]} == {"failed"}


def test_redirects_are_not_followed_and_other_4xx_are_final(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    redirecting = receiver_factory([302])
    refusing = receiver_factory([400])
    a = subscribe(client, auth, redirecting.url, events=["generation.succeeded"])
    b = subscribe(client, auth, refusing.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    assert [r["path"] for r in redirecting.requests] == ["/hook"] * len(FAST_SCHEDULE)
    [dead] = client.get(f"/v1/deliveries?subscription={a['id']}", headers=auth).json["data"]
    assert (dead["status"], dead["attempt_count"]) == ("dead", len(FAST_SCHEDULE))
    [failed] = client.get(f"/v1/deliveries?subscription={b['id']}", headers=auth).json["data"]
    assert (failed["status"], failed["attempt_count"]) == ("failed", 1)


def test_a_dead_delivery_can_be_replayed_with_the_same_webhook_id(
    api: Any, receiver_factory: Any
) -> None:
    services, client, auth = api
    receiver = receiver_factory([500, 500, 500, 200])
    created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    [dead] = client.get("/v1/deliveries?status=dead", headers=auth).json["data"]
    replay = client.post(f"/v1/deliveries/{dead['id']}/retry", headers=auth)
    assert replay.status_code == 202
    drain(services)
    after = client.get(f"/v1/deliveries/{dead['id']}", headers=auth).json
    assert (after["status"], after["attempt_count"]) == ("succeeded", 4)
    assert {r["headers"]["Webhook-Id"] for r in receiver.requests} == {after["webhook_id"]}
    verify_both(created["secret"], receiver.requests[-1])


def test_a_delivery_of_a_disabled_or_deleted_subscription_is_not_retried(
    api: Any, receiver_factory: Any
) -> None:
    """Nothing would be sent: a delivery that had succeeded was recorded `failed`."""
    services, client, auth = api
    receiver = receiver_factory()
    created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    [delivered] = client.get("/v1/deliveries", headers=auth).json["data"]
    assert delivered["status"] == "succeeded"
    retry = f"/v1/deliveries/{delivered['id']}/retry"
    link = f"/v1/subscriptions/{created['id']}"
    for change, state in (
        (lambda: client.patch(link, json={"enabled": False}, headers=auth), "disabled"),
        (lambda: client.delete(link, headers=auth), "deleted"),
    ):
        assert change().status_code in (200, 204)
        refused = client.post(retry, headers=auth)
        assert refused.status_code == 409, refused.json
        assert refused.content_type == "application/problem+json"
        assert state in refused.json["detail"]
    drain(services)
    after = client.get(f"/v1/deliveries/{delivered['id']}", headers=auth).json
    assert (after["status"], after["attempt_count"]) == ("succeeded", 1)
    assert len(receiver.requests) == 1


def test_every_secret_replaced_within_its_overlap_keeps_signing(
    api: Any, receiver_factory: Any
) -> None:
    """A second rotation within 24 hours dropped the secret before the first: a client that
    sent the rotation again, having lost the first answer, saw the secret its receivers held
    stop signing at once."""
    services, client, auth = api
    receiver = receiver_factory()
    created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    rotate = f"/v1/subscriptions/{created['id']}/rotate-secret"
    first = client.post(rotate, headers=auth).json
    second = client.post(rotate, headers=auth).json
    generate(client, auth)
    drain(services)
    [request] = receiver.requests
    assert len(request["headers"]["Webhook-Signature"].split()) == 3
    for secret in (created["secret"], first["secret"], second["secret"]):
        verify_both(secret, request)
    with services.store.transaction() as session:  # the original's overlap ends
        subscription = session.get(Subscription, created["id"])
        assert subscription is not None
        [earlier] = subscription.earlier_secrets or []
        ended = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        subscription.earlier_secrets = [{**earlier, "until": ended.isoformat()}]
    generate(client, auth)
    drain(services)
    assert len(receiver.requests[-1]["headers"]["Webhook-Signature"].split()) == 2
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify_both(created["secret"], receiver.requests[-1])
    verify_both(first["secret"], receiver.requests[-1])
    third = client.post(rotate, headers=auth).json  # the ended one is not kept
    with services.store.read() as session:
        subscription = session.get(Subscription, created["id"])
        assert subscription is not None
        assert [e["secret"] for e in subscription.earlier_secrets or []] == [first["secret"]]
        assert (subscription.previous_secret, subscription.secret) == (
            second["secret"],
            third["secret"],
        )


def test_during_rotation_both_secrets_sign(api: Any, receiver_factory: Any) -> None:
    services, client, auth = api
    receiver = receiver_factory()
    created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    rotated = client.post(f"/v1/subscriptions/{created['id']}/rotate-secret", headers=auth).json
    assert rotated["secret"] != created["secret"]
    generate(client, auth)
    drain(services)
    [request] = receiver.requests
    assert len(request["headers"]["Webhook-Signature"].split()) == 2
    verify_both(created["secret"], request)
    verify_both(rotated["secret"], request)
    with services.store.transaction() as session:  # the overlap ends
        session.execute(
            sa.update(Subscription).values(
                previous_secret_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
    generate(client, auth)
    drain(services)
    assert len(receiver.requests[-1]["headers"]["Webhook-Signature"].split()) == 1
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify_both(created["secret"], receiver.requests[-1])


def test_the_test_endpoint_sends_a_ping(api: Any, receiver_factory: Any) -> None:
    services, client, auth = api
    receiver = receiver_factory()
    created = subscribe(client, auth, receiver.url)
    response = client.post(f"/v1/subscriptions/{created['id']}/test", headers=auth)
    assert response.status_code == 202
    drain(services)
    [request] = receiver.requests
    assert verify_both(created["secret"], request)["type"] == "ping"


def test_subscriptions_can_be_listed_changed_and_deleted(api: Any, receiver_factory: Any) -> None:
    _services, client, auth = api
    receiver = receiver_factory()
    created = subscribe(client, auth, receiver.url)
    listed = client.get("/v1/subscriptions", headers=auth).json["data"]
    assert [s["id"] for s in listed] == [created["id"]]
    changed = client.patch(
        f"/v1/subscriptions/{created['id']}",
        json={"events": ["generation.failed"], "enabled": False},
        headers=auth,
    )
    assert (changed.json["events"], changed.json["enabled"]) == (["generation.failed"], False)
    empty = client.patch(f"/v1/subscriptions/{created['id']}", json={}, headers=auth)
    assert empty.status_code == 422
    assert client.delete(f"/v1/subscriptions/{created['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/subscriptions/{created['id']}", headers=auth).status_code == 404


@pytest.mark.parametrize(
    ("failing_for", "disabled"),
    [(dt.timedelta(days=5, minutes=1), True), (dt.timedelta(days=5, minutes=-1), False)],
    ids=["five-days", "not-quite"],
)
def test_a_subscription_failing_for_five_days_is_disabled(
    api: Any, receiver_factory: Any, failing_for: dt.timedelta, disabled: bool
) -> None:
    services, client, auth = api
    receiver = receiver_factory([400])
    created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    with services.store.transaction() as session:
        session.execute(
            sa.update(Subscription).values(failing_since=dt.datetime.now(dt.UTC) - failing_for)
        )
    generate(client, auth)
    drain(services)
    assert len(receiver.requests) == 1  # the failure that counts
    shown = client.get(f"/v1/subscriptions/{created['id']}", headers=auth).json
    if disabled:
        assert shown["enabled"] is False
        assert shown["disabled_reason"] == "every delivery failed for 5 days (last: HTTP 400)"
    else:
        assert (shown["enabled"], shown["disabled_reason"]) == (True, None)


@pytest.mark.parametrize("enabled", [1, 0, 1.0, "true"])
def test_enabled_takes_json_booleans_only(client: Any, auth: dict[str, str], enabled: Any) -> None:
    made = subscribe(client, auth, "http://127.0.0.1:9/hook")
    for response in (
        client.post(
            "/v1/subscriptions",
            json={"url": "http://127.0.0.1:9/hook", "enabled": enabled},
            headers=auth,
        ),
        client.patch(f"/v1/subscriptions/{made['id']}", json={"enabled": enabled}, headers=auth),
    ):
        assert response.status_code == 422
        assert [e["field"] for e in response.json["errors"]] == ["enabled"]
    assert client.get(f"/v1/subscriptions/{made['id']}", headers=auth).json["enabled"] is True


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://169.254.169.254/latest",
        "http://public.example.com/hook",
    ],
)
def test_private_and_plain_http_targets_are_refused_unless_allowed(
    config: Config, make_client: Any, url: str
) -> None:
    _services, client, auth = make_client(config.replace(allow_private_webhooks=False))
    refused = client.post("/v1/subscriptions", json={"url": url}, headers=auth)
    assert refused.status_code == 422
    assert [e["field"] for e in refused.json["errors"]] == ["url"]
    webhook = client.post(
        "/v1/generations", json={"input": TEXT_ONLY, "webhook": url}, headers=auth
    )
    assert webhook.status_code == 422
    assert [e["field"] for e in webhook.json["errors"]] == ["webhook"]


def test_tenants_see_only_their_own_notifications(api: Any, receiver_factory: Any) -> None:
    services, client, auth = api
    receiver = receiver_factory()
    created = subscribe(client, auth, receiver.url)
    generate(client, auth)
    drain(services)
    other = {"Authorization": "Bearer " + services.api_keys.create("globex")}
    delivery = client.get("/v1/deliveries", headers=auth).json["data"][0]
    event = client.get("/v1/events", headers=auth).json["data"][0]
    assert client.get("/v1/subscriptions", headers=other).json["data"] == []
    assert client.get("/v1/events", headers=other).json["data"] == []
    assert client.get("/v1/deliveries", headers=other).json["data"] == []
    for path in (
        f"/v1/subscriptions/{created['id']}",
        f"/v1/events/{event['id']}",
        f"/v1/deliveries/{delivery['id']}",
    ):
        assert client.get(path, headers=other).status_code == 404
    assert client.post(f"/v1/deliveries/{delivery['id']}/retry", headers=other).status_code == 404
    assert (
        client.get("/v1/webhooks/default/secret", headers=other).json["secret"]
        != (client.get("/v1/webhooks/default/secret", headers=auth).json["secret"])
    )


def test_status_changes_take_no_lock_on_the_tenant_row(
    api: Any, receiver_factory: Any, database_url: str
) -> None:
    """A lock there made concurrent status changes of one tenant deadlock (found by the soak)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("row locks are a PostgreSQL matter; SQLite locks the whole database")
    import threading

    _services, client, auth = api
    receiver = receiver_factory()
    generation = generate(client, auth, webhook=receiver.url)
    engine = sa.create_engine(database_url)
    done = threading.Event()
    with engine.connect() as blocker:
        # As another transaction updating the row (FK checks on tenant_id take KEY SHARE, which
        # does not conflict with this; the FOR UPDATE the deadlock came from does).
        blocker.execute(sa.text("SELECT id FROM tenants FOR NO KEY UPDATE"))

        def cancel() -> None:
            client.post(f"/v1/generations/{generation['id']}/cancel", headers=auth)
            done.set()

        thread = threading.Thread(target=cancel)
        thread.start()
        finished = done.wait(timeout=10)
        blocker.rollback()
        thread.join(timeout=10)
    engine.dispose()
    assert finished, "the status change waited for the tenant row's lock"
    event = client.get(f"/v1/events?generation_id={generation['id']}", headers=auth).json
    assert event["data"][0]["type"] == "generation.canceled"


def _ping(services: Any, client: Any, auth: dict[str, str], receiver: Any) -> str:
    """A subscription and its ping delivery, its task aged past a day (the age limit tasks
    once had: 24 h, while a delivery's default schedule spans 27.6 h)."""
    from service.models import Delivery, Task
    from service.runtime.kinds import DELIVER

    created = subscribe(client, auth, receiver.url)
    assert client.post(f"/v1/subscriptions/{created['id']}/test", headers=auth).status_code == 202
    with services.store.transaction() as session:
        for task in session.scalars(sa.select(Task).where(Task.kind == DELIVER)):
            task.created_at -= dt.timedelta(hours=25)
        return str(session.scalar(sa.select(Delivery.id)))


def _crashing_sends(services: Any, monkeypatch: pytest.MonkeyPatch, crashes: int) -> None:
    """The deliverer fails inside genrelay on its first `crashes` sends."""
    from service.runtime.kinds import DELIVER

    handler = services.runner.handlers[DELIVER]
    real_send = handler._send
    calls: list[int] = []

    def send(*args: Any) -> Any:
        calls.append(1)
        if len(calls) <= crashes:
            raise RuntimeError("a bug in genrelay")
        return real_send(*args)

    monkeypatch.setattr(handler, "_send", send)


def test_a_delivery_has_one_schedule_and_a_failure_inside_genrelay_takes_one_turn_of_it(
    api: Any, receiver_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.models import Delivery, Task
    from service.runtime.worker import Worker

    services, client, auth = api
    receiver = receiver_factory([500, 200])
    delivery_id = _ping(services, client, auth, receiver)
    _crashing_sends(services, monkeypatch, crashes=1)
    Worker(services.runner, threads=1).run_once()  # the first attempt fails in here
    with services.store.read() as session:
        delivery = session.get(Delivery, delivery_id)
        task = session.scalar(
            sa.select(Task).where(Task.payload["delivery_id"].as_string() == delivery_id)
        )
        assert delivery is not None
        # One schedule: the delivery shows when its task runs next.
        assert (delivery.status, delivery.next_attempt_at) == ("pending", task.run_at)
        assert delivery.last_error == "error inside genrelay (RuntimeError)"
    drain(services)  # 500, then 200: the third and last attempt of FAST_SCHEDULE
    shown = client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json
    assert (shown["status"], shown["attempt_count"]) == ("succeeded", 2)
    assert [a["status_code"] for a in shown["attempts"]] == [500, 200]
    assert len(receiver.requests) == 2


def test_a_delivery_whose_last_attempt_fails_inside_genrelay_is_dead_with_its_reason(
    api: Any, receiver_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    services, client, auth = api
    receiver = receiver_factory([500])
    delivery_id = _ping(services, client, auth, receiver)
    _crashing_sends(services, monkeypatch, crashes=len(FAST_SCHEDULE))
    drain(services)
    shown = client.get(f"/v1/deliveries/{delivery_id}", headers=auth).json
    assert (shown["status"], shown["attempt_count"]) == ("dead", 0)
    assert shown["last_error"] == "error inside genrelay (RuntimeError)"
    assert shown["next_attempt_at"] is None
    assert receiver.requests == []


# -- a batch of deliveries: its outcomes recorded together ------------------------------------


def _pings(services: Any, client: Any, auth: dict[str, str], receivers: list[Any]) -> list[str]:
    """A subscription to each receiver and its ping delivery; their ids, in order."""
    from service.models import Delivery

    for receiver in receivers:
        created = subscribe(client, auth, receiver.url)
        response = client.post(f"/v1/subscriptions/{created['id']}/test", headers=auth)
        assert response.status_code == 202
    with services.store.read() as session:
        by_url = {d.url: d.id for d in session.scalars(sa.select(Delivery))}
    return [by_url[receiver.url] for receiver in receivers]


def _claim_batch(services: Any, delivery_ids: list[str]) -> list[Any]:
    """Claim the deliveries' tasks together, in the order of `delivery_ids`."""
    from service.runtime.kinds import DELIVER

    tasks = services.queue.claim_due_tasks(limit=8, kinds=[DELIVER])
    by_delivery = {task.payload["delivery_id"]: task for task in tasks}
    assert set(by_delivery) == set(delivery_ids)
    return [by_delivery[delivery_id] for delivery_id in delivery_ids]


def _counted(outcome: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("genrelay_delivery_attempts_total", labels) or 0.0


def test_a_batch_records_each_attempt_and_what_it_made_of_its_delivery_in_one_transaction(
    api: Any, receiver_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.models import Delivery, DeliveryAttempt, Task
    from service.runtime.queue import TaskStatus

    services, client, auth = api
    receivers = [receiver_factory([s]) for s in (204, 500, 404, 500)]
    ok, retried, refused, last = _pings(services, client, auth, receivers)
    with services.store.transaction() as session:  # `last` is on its last attempt
        session.execute(
            sa.update(Task)
            .where(Task.payload["delivery_id"].as_string() == last)
            .values(attempts=len(FAST_SCHEDULE) - 1)
        )
    tasks = _claim_batch(services, [ok, retried, refused, last])
    store = services.store
    transactions = []
    real_transaction = store.transaction

    def transaction() -> Any:
        transactions.append(1)
        return real_transaction()

    monkeypatch.setattr(store, "transaction", transaction)
    with Statements(store.engine) as statements:
        statuses = services.runner.execute_batch(tasks)

    assert statuses == [TaskStatus.DONE, TaskStatus.PENDING, TaskStatus.DONE, TaskStatus.DEAD]
    assert len(transactions) == 1
    # Four attempt rows, one INSERT; the two tasks that ended Done, one UPDATE (the retried
    # and the dead one each have their own).
    assert statements.count("INSERT INTO delivery_attempts") == 1
    assert statements.count("UPDATE tasks SET") == 3
    with store.read() as session:
        deliveries = {d.id: d for d in session.scalars(sa.select(Delivery))}
        attempts = {a.delivery_id: a for a in session.scalars(sa.select(DeliveryAttempt))}
        rows = {t.payload["delivery_id"]: t for t in session.scalars(sa.select(Task))}
    shown = {
        i: (d.status, d.attempts, d.last_status_code, d.last_error) for i, d in deliveries.items()
    }
    assert shown == {
        ok: ("succeeded", 1, 204, None),
        retried: ("pending", 1, 500, "HTTP 500"),
        refused: ("failed", 1, 404, "HTTP 404"),
        last: ("dead", 1, 500, "HTTP 500"),
    }
    assert {i: a.status_code for i, a in attempts.items()} == {
        ok: 204,
        retried: 500,
        refused: 404,
        last: 500,
    }
    # One schedule: the retried delivery shows when its task runs next.
    assert deliveries[retried].next_attempt_at == rows[retried].run_at
    assert rows[retried].run_at > dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    assert [deliveries[i].next_attempt_at for i in (ok, refused, last)] == [None, None, None]
    assert {i: (t.status, t.claim_token) for i, t in rows.items()} == {
        ok: ("done", None),
        retried: ("pending", None),
        refused: ("done", None),
        last: ("dead", None),
    }


def test_a_task_whose_lease_was_lost_in_a_batch_is_left_to_its_new_holder(
    api: Any, receiver_factory: Any
) -> None:
    """As for a task run alone: what its attempt did is recorded (the POST was sent), but its
    task row is not touched; the others of the batch finish as usual."""
    from service.models import Delivery, DeliveryAttempt, Task

    services, client, auth = api
    receivers = [receiver_factory([204]) for _ in range(3)]
    first, lost, third = _pings(services, client, auth, receivers)
    tasks = _claim_batch(services, [first, lost, third])
    with services.store.transaction() as session:  # claimed by another worker meanwhile
        session.execute(
            sa.update(Task).where(Task.id == tasks[1].id).values(claim_token="another-holder")
        )
    assert services.runner.execute_batch(tasks) == ["done", None, "done"]
    with services.store.read() as session:
        rows = {t.id: t for t in session.scalars(sa.select(Task))}
        deliveries = {d.id: d.status for d in session.scalars(sa.select(Delivery))}
        attempts = sorted(session.scalars(sa.select(DeliveryAttempt.delivery_id)))
    assert (rows[tasks[1].id].status, rows[tasks[1].id].claim_token) == (
        "running",
        "another-holder",
    )
    assert rows[tasks[1].id].finished_at is None
    assert [(rows[t.id].status, rows[t.id].claim_token) for t in (tasks[0], tasks[2])] == [
        ("done", None),
        ("done", None),
    ]
    assert deliveries == {first: "succeeded", lost: "succeeded", third: "succeeded"}
    assert attempts == sorted([first, lost, third])


def test_outcomes_are_counted_once_when_a_batch_is_recorded_again_one_by_one(
    api: Any, receiver_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.models import Delivery, DeliveryAttempt
    from service.runtime.queue import TaskStatus

    services, client, auth = api
    receivers = [receiver_factory([s]) for s in (204, 500, 404)]
    ok, retried, refused = _pings(services, client, auth, receivers)
    tasks = _claim_batch(services, [ok, retried, refused])
    # The batch's transaction fails once, after every delivery's record was written in it.
    real_finish = services.queue.finish_all_in
    failures = [RuntimeError("the database went away")]

    def finish_all_in(session: Any, finishing: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_finish(session, finishing)

    monkeypatch.setattr(services.queue, "finish_all_in", finish_all_in)
    before = {outcome: _counted(outcome) for outcome in ("succeeded", "retry", "failed")}
    statuses = services.runner.execute_batch(tasks)

    assert failures == []  # it did fail, and the outcomes were recorded one by one
    assert statuses == [TaskStatus.DONE, TaskStatus.PENDING, TaskStatus.DONE]
    after = {outcome: _counted(outcome) for outcome in ("succeeded", "retry", "failed")}
    assert {outcome: after[outcome] - before[outcome] for outcome in after} == {
        "succeeded": 1,
        "retry": 1,
        "failed": 1,
    }
    with services.store.read() as session:
        statuses_shown = {d.id: d.status for d in session.scalars(sa.select(Delivery))}
        attempts = sorted(session.scalars(sa.select(DeliveryAttempt.delivery_id)))
    assert statuses_shown == {ok: "succeeded", retried: "pending", refused: "failed"}
    assert attempts == sorted([ok, retried, refused])  # each once: the first try rolled back
    assert [len(r.requests) for r in receivers] == [1, 1, 1]  # and nothing sent twice


# -- what a receiver answers, what DNS does, replays and cursors: never a stuck delivery ------


class BodyReceiver(LoopbackServer):
    """A receiver on loopback that answers every POST with `status` and the bytes `body`."""

    def __init__(self, status: int, body: bytes) -> None:
        from werkzeug.wrappers import Request, Response

        self.requests: list[str] = []

        @Request.application  # type: ignore[misc]
        def app(request: Request) -> Response:
            self.requests.append(request.headers.get("Webhook-Id", ""))
            return Response(body, status=status)

        self.serve(app, "/hook")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, ("succeeded", 1)), (503, ("dead", len(FAST_SCHEDULE)))],
)
def test_an_answer_whose_body_holds_nul_bytes_is_recorded_once_per_attempt(
    config: Config, make_client: Any, status: int, outcome: tuple[str, int]
) -> None:
    """PostgreSQL text refuses NUL: stored as it came, the excerpt made the outcome's
    transaction fail, and the attempt was sent again after each lease, then buried unlogged."""
    services, client, auth = make_client(
        config.replace(webhook_retry_schedule=FAST_SCHEDULE, task_lease=1.0)
    )
    # "OK" in UTF-16, then a lone surrogate's UTF-8 form (not UTF-8: replaced on decoding).
    receiver = BodyReceiver(status, "OK".encode("utf-16-le") + b"\xed\xa0\x80")
    try:
        created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
        generate(client, auth)
        drain(services)
        [delivery] = client.get(f"/v1/deliveries?subscription={created['id']}", headers=auth).json[
            "data"
        ]
        assert (delivery["status"], delivery["attempt_count"]) == outcome
        assert len(receiver.requests) == outcome[1]
        detail = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
        assert {a["status_code"] for a in detail["attempts"]} == {status}
        excerpt = detail["attempts"][0]["response_excerpt"]
        assert "\x00" not in excerpt
        assert excerpt.startswith("O\ufffdK\ufffd")
    finally:
        receiver.stop()


def test_a_host_that_fails_to_resolve_once_is_retried_on_the_schedule(
    api: Any, receiver_factory: Any
) -> None:
    """A DNS failure at send time may pass (a resolver restart, SERVFAIL): it is an attempt
    that failed like a connection error, not a refusal of the target."""
    from service.notifications.ssrf import URLPolicy, pinned_session
    from service.runtime.kinds import DELIVER

    services, client, auth = api
    receiver = receiver_factory()
    lookups: list[str] = []

    def flaky(host: str, port: int) -> list[str]:
        lookups.append(host)
        if len(lookups) == 1:
            raise OSError("Temporary failure in name resolution")
        return ["127.0.0.1"]

    handler = services.runner.handlers[DELIVER]
    handler.http = pinned_session(URLPolicy(allow_private=True, resolver=flaky))
    url = receiver.url.replace("127.0.0.1", "localhost")
    created = subscribe(client, auth, url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    [delivery] = client.get(f"/v1/deliveries?subscription={created['id']}", headers=auth).json[
        "data"
    ]
    assert (delivery["status"], delivery["attempt_count"]) == ("succeeded", 2)
    detail = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    first, second = detail["attempts"]
    assert first["status_code"] is None
    assert "does not resolve" in first["error"]
    assert second["status_code"] == 204
    assert lookups == ["localhost", "localhost"]
    assert len(receiver.requests) == 1


def test_a_failed_retry_of_a_pending_delivery_leaves_it_on_its_schedule(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    """`retry` is one more attempt now: when it fails too, the attempts the delivery had left
    still come, as scheduled (a dead delivery's failed retry leaves it dead)."""
    from service.models import Task
    from service.runtime.kinds import DELIVER

    services, client, auth = make_client(
        config.replace(webhook_retry_schedule=(0.0, 3600.0, 3600.0))
    )
    receiver = receiver_factory([500, 500, 204])
    created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    [delivery] = client.get(f"/v1/deliveries?subscription={created['id']}", headers=auth).json[
        "data"
    ]
    assert (delivery["status"], delivery["attempt_count"]) == ("pending", 1)
    scheduled = delivery["next_attempt_at"]

    assert client.post(f"/v1/deliveries/{delivery['id']}/retry", headers=auth).status_code == 202
    drain(services)
    after = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert (after["status"], after["attempt_count"]) == ("pending", 2)
    assert after["next_attempt_at"] == scheduled
    assert after["last_error"] == "HTTP 500"

    # The scheduled attempt comes when due, as if there had been no retry.
    with services.store.transaction() as session:
        session.execute(
            sa.update(Task)
            .where(Task.kind == DELIVER, Task.status == "pending")
            .values(run_at=dt.datetime.now(dt.UTC))
        )
    drain(services)
    done = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert (done["status"], done["attempt_count"]) == ("succeeded", 3)
    assert [a["status_code"] for a in done["attempts"]] == [500, 500, 204]


def test_a_failed_retry_does_not_undo_a_scheduled_attempt_that_got_through(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    from service.models import Task
    from service.runtime.kinds import DELIVER

    services, client, auth = make_client(
        config.replace(webhook_retry_schedule=(0.0, 3600.0, 3600.0))
    )
    receiver = receiver_factory([500, 204, 500])  # first attempt, scheduled one, the retry
    created = subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    [delivery] = client.get(f"/v1/deliveries?subscription={created['id']}", headers=auth).json[
        "data"
    ]
    assert client.post(f"/v1/deliveries/{delivery['id']}/retry", headers=auth).status_code == 202

    def due(replay: bool) -> None:
        """Only the retry's task due now, or only the scheduled one."""
        now = dt.datetime.now(dt.UTC)
        with services.store.transaction() as session:
            for task in session.scalars(
                sa.select(Task).where(Task.kind == DELIVER, Task.status == "pending")
            ):
                is_replay = bool(task.payload.get("replay"))
                task.run_at = now if is_replay == replay else now + dt.timedelta(hours=1)

    due(replay=False)
    drain(services)  # the scheduled attempt: 204
    due(replay=True)
    drain(services)  # the retry, sent after: 500
    after = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
    assert [a["status_code"] for a in after["attempts"]] == [500, 204, 500]
    assert after["status"] == "succeeded"


def test_a_failed_retry_of_a_dead_delivery_leaves_it_dead(api: Any, receiver_factory: Any) -> None:
    services, client, auth = api
    receiver = receiver_factory([500])
    subscribe(client, auth, receiver.url, events=["generation.succeeded"])
    generate(client, auth)
    drain(services)
    [dead] = client.get("/v1/deliveries?status=dead", headers=auth).json["data"]
    assert client.post(f"/v1/deliveries/{dead['id']}/retry", headers=auth).status_code == 202
    drain(services)
    after = client.get(f"/v1/deliveries/{dead['id']}", headers=auth).json
    assert (after["status"], after["attempt_count"]) == ("dead", len(FAST_SCHEDULE) + 1)
    assert after["next_attempt_at"] is None


def _cursor(raw: Any) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")


def test_a_crafted_cursor_is_a_422_naming_cursor(api: Any) -> None:
    _services, client, auth = api
    crafted = [
        ["0001-01-01T00:00:00+01:00", "evt_x"],  # before year 1 in UTC
        ["9999-12-31T23:59:59-01:00", "evt_x"],  # after year 9999 in UTC
        ["2026-01-01T00:00:00+00:00", "evt_\u0000"],  # PostgreSQL text has no NUL
        ["2026-01-01T00:00:00+00:00", "evt_\ud800"],  # a lone surrogate: not encodable
        ["2026-01-01T00:00:00", "evt_x"],  # no time zone
        ["2026-01-01T00:00:00+00:00", 7],
        {"a": 1},
    ]
    for path in ("/v1/events", "/v1/deliveries", "/v1/subscriptions"):
        for raw in crafted:
            response = client.get(path, query_string={"cursor": _cursor(raw)}, headers=auth)
            assert response.status_code == 422, (path, raw, response.status_code)
            assert response.headers["Content-Type"].startswith("application/problem+json")
            assert [e["field"] for e in response.json["errors"]] == ["cursor"], (path, raw)
    # A cursor of ours, with an offset other than UTC, still pages.
    listed = client.get(
        "/v1/events",
        query_string={"cursor": _cursor(["2026-01-01T05:00:00+05:00", "evt_x"])},
        headers=auth,
    )
    assert listed.status_code == 200
