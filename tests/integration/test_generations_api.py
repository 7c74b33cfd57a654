"""/v1/generations against a real database (SQLite and PostgreSQL) and the simulator over HTTP."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import threading
import time
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from service.bootstrap import Services
from service.config import Config
from service.domain import EVENT_TYPES, GENERATION_EVENT_TYPES
from service.generations.callback_urls import callback_url
from service.models import Generation, IdempotencyKey, Task
from service.tenants import Tenants
from tests.helpers import (
    Statements,
    drain,
    forget_answers,
    kept_answers,
    seed_examples,
    set_simulator,
)

TEXT_ONLY = seed_examples()["text_only"]
PROBLEM = "application/problem+json"


def create(client: Any, auth: dict[str, str], body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/generations", json=body, headers={**auth, **headers})


def upstream_request(simulator: Any, job: str) -> dict[str, Any]:
    """What the simulator received for `job`."""
    response = requests.get(f"{simulator.url}/_sim/jobs/{job}", timeout=5)
    response.raise_for_status()
    return response.json()["request"]  # type: ignore[no-any-return]


def generation_count(services: Services) -> int:
    with services.store.read() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Generation)) or 0


@pytest.mark.parametrize("name", sorted(seed_examples()))
def test_each_seed_example_is_forwarded_unchanged_and_becomes_processing(
    client: Any, auth: dict[str, str], simulator: Any, name: str
) -> None:
    example = seed_examples()[name]
    response = create(client, auth, {"input": example, "metadata": {"order": "A-1"}})
    assert response.status_code == 202, response.json
    body = response.json
    assert body["status"] == "processing"
    assert body["input"] == example
    assert body["metadata"] == {"order": "A-1"}
    assert body["error"] is None
    assert response.headers["Location"] == f"/v1/generations/{body['id']}"
    # Polling-only mode (no GENRELAY_PUBLIC_URL): the input goes upstream exactly as given.
    assert upstream_request(simulator, body["upstream"]["job"]) == example
    assert client.get(body["links"]["self"], headers=auth).json == body


def test_the_callback_url_is_added_when_a_public_url_is_configured(
    config: Config, make_client: Any, simulator: Any
) -> None:
    secret = "s" * 32
    config = config.replace(public_url="https://relay.example.com", callback_secret=secret)
    _services, client, auth = make_client(config)
    body = create(client, auth, {"input": TEXT_ONLY}).json
    sent = upstream_request(simulator, body["upstream"]["job"])
    assert sent == {
        **TEXT_ONLY,
        "webhooks": {"complete": callback_url("https://relay.example.com", secret, body["id"])},
    }


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"input"}),
        (
            {
                "input": {
                    "width": 100,
                    "height": 100,
                    "background": {"generate": {"description": "x", "model_type": "dalle"}},
                }
            },
            {"input.background.generate.model_type"},
        ),
        (
            {
                "input": {
                    "width": 0,
                    "height": 100,
                    "background": {"generate": {"description": "x"}},
                }
            },
            {"input.width"},
        ),
        (
            {
                "input": {
                    "url": "https://example.com/a.png",
                    "background": {
                        "generate": {
                            "controlnet_conditioning_scale": 1.5,
                            "adapter_type": "control",
                        }
                    },
                }
            },
            {"input.background.generate.controlnet_conditioning_scale"},
        ),
        (
            {
                "input": {
                    "url": "https://example.com/a.png",
                    "webhooks": {"complete": "https://x.io"},
                }
            },
            {"input.webhooks"},
        ),
        ({"input": {**TEXT_ONLY, "surprise": 1}}, {"input.surprise"}),
        ({"input": TEXT_ONLY, "extra": True}, {"extra"}),
        ({"input": TEXT_ONLY, "webhook": "not a url"}, {"webhook"}),
        (
            {"input": TEXT_ONLY, "webhook_events_filter": ["generation.exploded"]},
            {"webhook_events_filter.0"},
        ),
        # A single generation never sends `batch.completed`: its webhook would get nothing.
        (
            {"input": TEXT_ONLY, "webhook_events_filter": ["batch.completed"]},
            {"webhook_events_filter.0"},
        ),
        (
            {
                "input": TEXT_ONLY,
                "webhook_events_filter": ["generation.succeeded", "batch.completed"],
            },
            {"webhook_events_filter.1"},
        ),
        ({"input": TEXT_ONLY, "metadata": {"k": "v" * 501}}, {"metadata.k.value"}),
        ({"input": TEXT_ONLY, "metadata": {str(i): "v" for i in range(51)}}, {"metadata"}),
        (
            {
                "input": {
                    "width": 10**400,
                    "height": 1,
                    "background": {"generate": {"description": "x"}},
                }
            },
            {"input.width"},
        ),
        ({"input": "a string"}, {"input"}),
        ({"input": None}, {"input"}),
        ({"input": TEXT_ONLY, "deadline": "2001-01-01T00:00:00Z"}, {"deadline"}),
        # In UTC, times outside the calendar (the year 10000, the year 0).
        ({"input": TEXT_ONLY, "deadline": "9999-12-31T23:59:59-01:00"}, {"deadline"}),
        ({"input": TEXT_ONLY, "deadline": "0001-01-01T00:00:00+01:00"}, {"deadline"}),
    ],
)
def test_invalid_fields_get_a_problem_naming_each_field_and_store_nothing(
    client: Any, auth: dict[str, str], services: Services, body: dict[str, Any], fields: set[str]
) -> None:
    response = create(client, auth, body)
    assert response.status_code == 422
    assert response.mimetype == PROBLEM
    problem = response.json
    assert problem["status"] == 422
    assert problem["type"].endswith("/invalid-request")
    assert {e["field"] for e in problem["errors"]} == fields
    assert all(field in problem["detail"] for field in fields)
    assert generation_count(services) == 0


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        ("{not json", "application/json", 400),
        ('{"input": NaN}', "application/json", 400),
        ('{"input": {"width": Infinity}}', "application/json", 400),
        ("[" * 100_000 + "]" * 100_000, "application/json", 400),
        ("\xff\xfe", "application/json", 400),
        ("[]", "application/json", 422),
        ('"input"', "application/json", 422),
        ("null", "application/json", 422),
        ("", "application/json", 400),
        ('{"input": {}}', "text/plain", 415),
        ("input=1", "application/x-www-form-urlencoded", 415),
        ('{"input": {"width": 1e999, "height": 1}}', "application/json", 422),
        ('{"input": {"width": 1.5, "height": 1}}', "application/json", 422),
        ('{"input": {"width": true, "height": 1}}', "application/json", 422),
    ],
)
def test_malformed_requests_get_a_problem_never_a_500(
    client: Any,
    auth: dict[str, str],
    services: Services,
    data: str,
    content_type: str,
    status: int,
) -> None:
    response = client.post("/v1/generations", data=data, content_type=content_type, headers=auth)
    assert response.status_code == status
    assert response.mimetype == PROBLEM
    assert response.json["status"] == status
    assert response.json["detail"]
    assert generation_count(services) == 0


@pytest.mark.parametrize("path", ["/v1/generations", "/v1/subscriptions", "/v1/triggers"])
@pytest.mark.parametrize("coding", ["gzip", "br", "identity, gzip"])
def test_a_content_coded_body_is_a_415_naming_content_encoding(
    client: Any, auth: dict[str, str], services: Services, path: str, coding: str
) -> None:
    """A gzip body was "400 Invalid JSON body." and `br` over plain JSON was taken (202), the
    coding ignored: genrelay decodes no content coding, so it says so (RFC 9110 §15.5.16)."""
    body = json.dumps({"input": TEXT_ONLY}).encode()
    data = gzip.compress(body) if "gzip" in coding else body
    headers = {**auth, "Content-Type": "application/json", "Content-Encoding": coding}
    response = client.post(path, data=data, headers=headers)
    assert response.status_code == 415, response.json
    assert response.mimetype == PROBLEM
    assert "Content-Encoding" in response.json["detail"]
    assert "identity" in response.json["detail"]
    assert response.headers["Accept-Encoding"] == "identity"
    assert generation_count(services) == 0


@pytest.mark.parametrize("coding", ["identity", "IDENTITY", ""])
def test_an_identity_content_encoding_is_a_plain_body(
    client: Any, auth: dict[str, str], coding: str
) -> None:
    headers = {**auth, "Content-Encoding": coding}
    assert create(client, auth, {"input": TEXT_ONLY}, **headers).status_code == 202


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": {**TEXT_ONLY, "width": "N"}}, "input.width"),
        ({"input": {**TEXT_ONLY, "width": "-N"}}, "input.width"),
        ({"input": TEXT_ONLY, "priority": "N"}, "priority"),
        ({"input": TEXT_ONLY, "retention": "-N"}, "retention"),
    ],
    ids=["input", "input-negative", "priority", "retention-negative"],
)
@pytest.mark.parametrize("digits", [17, 4301, 100_000])
def test_an_integer_of_any_length_beyond_2_53_is_a_422_naming_its_field(
    client: Any,
    auth: dict[str, str],
    services: Services,
    body: dict[str, Any],
    field: str,
    digits: int,
) -> None:
    """Past Python's 4300-digit limit for int(), the body was "400 Invalid JSON body.",
    naming nothing (a 400-digit integer was the 422 the README promises)."""
    number = "9" + "0" * (digits - 1)
    data = json.dumps(body).replace('"-N"', "-" + number).replace('"N"', number)
    response = client.post(
        "/v1/generations", data=data, content_type="application/json", headers=auth
    )
    assert response.status_code == 422, response.json
    assert response.mimetype == PROBLEM
    assert [e["field"] for e in response.json["errors"]] == [field]
    assert generation_count(services) == 0


def test_a_body_over_the_limit_is_refused_with_413(
    config: Config, make_client: Any, simulator: Any
) -> None:
    config = config.replace(max_request_bytes=1024)
    _services, client, auth = make_client(config)
    body = {"input": {**TEXT_ONLY, "background": {"generate": {"description": "x" * 2000}}}}
    response = create(client, auth, body)
    assert response.status_code == 413
    assert response.mimetype == PROBLEM


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer gr_not-a-key"},
        {"Authorization": "Basic dXNlcjpwdw=="},
        {"Authorization": "Bearer "},
    ],
)
def test_requests_without_a_valid_api_key_are_401(client: Any, headers: dict[str, str]) -> None:
    for response in (
        client.get("/v1/generations", headers=headers),
        client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=headers),
        client.get("/v1/generations/gen_x", headers=headers),
    ):
        assert response.status_code == 401
        assert response.mimetype == PROBLEM
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_tenant_cannot_see_or_cancel_another_tenants_generation(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    theirs = create(client, auth, {"input": TEXT_ONLY}).json["id"]
    other = {"Authorization": "Bearer " + services.api_keys.create("globex")}
    assert client.get(f"/v1/generations/{theirs}", headers=other).status_code == 404
    assert client.post(f"/v1/generations/{theirs}/cancel", headers=other).status_code == 404
    assert client.get("/v1/generations", headers=other).json["data"] == []
    assert client.get(f"/v1/generations/{theirs}", headers=auth).status_code == 200


def _second_intake(client: Any, auth: dict[str, str], services: Services) -> tuple[Any, Any]:
    """An intake after a first one (which makes the account's row): its answer and the
    statements it ran."""
    create(client, auth, {"input": TEXT_ONLY})
    with Statements(services.store.engine) as statements:
        response = create(client, auth, {"input": TEXT_ONLY})
    return response, statements


def test_the_key_lookup_reads_the_tenants_settings_and_intake_reads_them_no_more(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    response, statements = _second_intake(client, auth, services)
    assert response.status_code == 202
    # The tenant's settings are read once, with the key.
    [lookup] = statements.matching("tenants.allowed_input_buckets")
    assert "JOIN api_keys" in lookup
    assert "webhook_secret" not in lookup  # carried with the request: no secret in it
    assert statements.matching("FROM api_keys") == []  # no lookup of the key on its own


def test_the_inline_submit_and_the_answer_never_read_the_generation_back(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    response, statements = _second_intake(client, auth, services)
    assert response.json["status"] == "processing"  # submitted inline
    assert response.json["upstream"]["job"]
    # The submit is handed the generation; the answer shows the row its status change returned.
    assert statements.matching("FROM generations WHERE generations.id =") == []
    assert client.get(f"/v1/generations/{response.json['id']}", headers=auth).json == response.json


def test_the_submit_task_goes_on_as_the_jobs_poll_in_its_own_row(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    response, statements = _second_intake(client, auth, services)
    assert response.json["status"] == "processing"
    assert len(statements.matching("INSERT INTO tasks")) == 1  # the submit's; the poll reuses it
    with services.store.read() as session:
        [task] = session.scalars(
            sa.select(Task).where(Task.generation_id == response.json["id"])
        ).all()
        generation = session.get(Generation, response.json["id"])
    assert generation is not None and generation.submitted_at is not None
    delay = services.config.reconcile_after
    assert (task.kind, task.status, task.attempts, task.payload) == (
        "poll",
        "pending",
        0,
        {"delay": delay},
    )
    assert task.created_at >= generation.submitted_at
    assert task.run_at == task.created_at + dt.timedelta(seconds=delay)


def test_an_answer_with_a_key_shows_the_submitted_generation_without_reading_it(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    create(client, auth, {"input": TEXT_ONLY})  # statements of the first request left out
    with Statements(services.store.engine) as statements:
        response = create(client, auth, {"input": TEXT_ONLY}, **{"Idempotency-Key": "k-1"})
    assert response.json["status"] == "processing"
    assert statements.matching("FROM generations WHERE generations.id =") == []
    shown = client.get(f"/v1/generations/{response.json['id']}", headers=auth).json
    replayed = create(client, auth, {"input": TEXT_ONLY}, **{"Idempotency-Key": "k-1"})
    assert shown == response.json == replayed.json


def test_a_generation_with_a_deadline_ahead_is_submitted_at_once(
    client: Any, auth: dict[str, str]
) -> None:
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    deadline = ahead.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()  # any offset
    response = create(client, auth, {"input": TEXT_ONLY, "deadline": deadline})
    assert response.status_code == 202
    assert response.json["status"] == "processing"
    assert dt.datetime.fromisoformat(response.json["deadline"]) == ahead


def test_a_deadline_with_a_lowercase_t_and_z_is_taken_as_rfc_3339_allows(
    client: Any, auth: dict[str, str]
) -> None:
    # RFC 3339 §5.6: "T" and "Z" may be written in lower case.
    response = create(client, auth, {"input": TEXT_ONLY, "deadline": "2099-01-01t00:00:00z"})
    assert response.status_code == 202, response.json
    assert dt.datetime.fromisoformat(response.json["deadline"]) == dt.datetime(
        2099, 1, 1, tzinfo=dt.UTC
    )
    listed = client.get("/v1/generations?created_after=2000-01-01t00:00:00z", headers=auth)
    assert listed.status_code == 200, listed.json
    assert [g["id"] for g in listed.json["data"]] == [response.json["id"]]


def test_a_tenants_new_settings_apply_from_its_next_request(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    before = create(client, auth, {"input": TEXT_ONLY}).json["id"]
    Tenants(services.store).set("acme", retention=3600)
    after = create(client, auth, {"input": TEXT_ONLY}).json["id"]
    with services.store.read() as session:
        assert session.get(Generation, before).retention_seconds is None  # type: ignore[union-attr]
        assert session.get(Generation, after).retention_seconds == 3600  # type: ignore[union-attr]


def test_a_retry_gets_its_first_answer_when_the_webhook_no_longer_resolves(
    client: Any, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.notifications import ssrf

    class Lookups:
        """The webhook's host resolves to loopback, until `down`."""

        down = False

        def resolve(self, resolve: Any, host: str, port: int, timeout: float) -> list[str]:
            if self.down:
                raise OSError("no DNS answer within 2 s")
            return ["127.0.0.1"]

    lookups = Lookups()
    monkeypatch.setattr(ssrf, "_LOOKUPS", lookups)
    body = {"input": TEXT_ONLY, "webhook": "http://hooks.acme.example:9/genrelay"}
    first = create(client, auth, body, **{"Idempotency-Key": "order-77"})
    assert first.status_code == 202, first.json
    lookups.down = True
    again = create(client, auth, body, **{"Idempotency-Key": "order-77"})
    assert again.status_code == 202, again.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json["id"] == first.json["id"]
    # A new request is checked as it comes.
    assert create(client, auth, body, **{"Idempotency-Key": "order-78"}).status_code != 202


def test_the_same_idempotency_key_and_body_replays_the_first_response(
    client: Any, auth: dict[str, str], services: Services, simulator: Any
) -> None:
    first = create(client, auth, {"input": TEXT_ONLY}, **{"Idempotency-Key": "order-42"})
    again = create(client, auth, {"input": TEXT_ONLY}, **{"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 202
    assert again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Location"] == f"/v1/generations/{first.json['id']}"
    assert generation_count(services) == 1
    stats = requests.get(f"{simulator.url}/_sim/stats", timeout=5).json()
    assert stats["jobs_created"] == 1


def test_the_same_idempotency_key_with_another_body_is_422(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    create(client, auth, {"input": TEXT_ONLY}, **{"Idempotency-Key": "k1"})
    other = create(
        client, auth, {"input": TEXT_ONLY, "metadata": {"a": "b"}}, **{"Idempotency-Key": "k1"}
    )
    assert other.status_code == 422
    assert other.mimetype == PROBLEM
    assert other.json["type"].endswith("/idempotency-key-reused")
    assert generation_count(services) == 1


def _age_idempotency_keys(services: Services, by: dt.timedelta) -> None:
    """As if `by` had passed since every Idempotency-Key was used: their times moved back."""
    with services.store.transaction() as session:
        for record in session.scalars(sa.select(IdempotencyKey)):
            record.created_at -= by
            record.expires_at -= by


def test_idempotency_keys_are_per_tenant_and_expire_after_24_hours(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    other = {"Authorization": "Bearer " + services.api_keys.create("globex")}
    key = {"Idempotency-Key": "shared"}
    first = create(client, auth, {"input": TEXT_ONLY}, **key)
    a = first.json["id"]
    b = create(client, other, {"input": TEXT_ONLY}, **key).json["id"]
    assert a != b
    with services.store.read() as session:
        records = list(session.scalars(sa.select(IdempotencyKey)))
    assert len(records) == 2
    assert [r.expires_at - r.created_at for r in records] == [dt.timedelta(hours=24)] * 2
    # Just inside 24 hours: still the first answer, verbatim.
    _age_idempotency_keys(services, dt.timedelta(hours=24) - dt.timedelta(minutes=1))
    inside = create(client, auth, {"input": TEXT_ONLY}, **key)
    assert inside.status_code == 202
    assert inside.headers["Idempotent-Replayed"] == "true"
    assert inside.json == first.json
    assert generation_count(services) == 2
    # Just past 24 hours: the key is free again, for the same body as for another.
    _age_idempotency_keys(services, dt.timedelta(minutes=2))
    c = create(client, auth, {"input": TEXT_ONLY}, **key)
    assert c.status_code == 202
    assert "Idempotent-Replayed" not in c.headers
    assert c.json["id"] not in (a, b)
    d = create(client, other, {"input": TEXT_ONLY, "metadata": {"new": "body"}}, **key)
    assert d.status_code == 202
    assert d.json["id"] not in (a, b, c.json["id"])
    assert generation_count(services) == 4


def test_a_retry_after_the_deadline_passed_still_gets_the_first_answer(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    body = {"input": TEXT_ONLY, "deadline": deadline.isoformat()}
    key = {"Idempotency-Key": "order-8"}
    first = create(client, auth, body, **key)
    assert first.status_code == 202
    time.sleep(max(0.0, (deadline - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    again = create(client, auth, body, **key)
    assert again.status_code == 202, again.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert again.json == first.json
    # The same body without the key, or with a new one, is a new request: too late now.
    for headers in ({}, {"Idempotency-Key": "order-9"}):
        refused = create(client, auth, body, **headers)
        assert refused.status_code == 422
        assert refused.mimetype == PROBLEM
        assert [e["field"] for e in refused.json["errors"]] == ["deadline"]
    other = create(client, auth, {**body, "priority": 5}, **key)
    assert other.json["type"].endswith("/idempotency-key-reused")
    assert generation_count(services) == 1


def test_a_retry_before_the_first_answer_shows_the_generation_now_and_keeps_nothing(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    # The first request's answer is the one to keep: a retry that comes while it is still
    # at work (or after it died) shows the generation as it is, every time, and keeps none.
    key = {"Idempotency-Key": "order-7"}
    first = create(client, auth, {"input": TEXT_ONLY}, **key)
    forget_answers(services)
    retry = create(client, auth, {"input": TEXT_ONLY}, **key)
    assert retry.status_code == 202
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.json == client.get(f"/v1/generations/{first.json['id']}", headers=auth).json
    assert kept_answers(services) == [None]
    client.post(f"/v1/generations/{first.json['id']}/cancel", headers=auth)
    again = create(client, auth, {"input": TEXT_ONLY}, **key)
    assert again.json["status"] == "canceled"
    assert kept_answers(services) == [None]
    assert generation_count(services) == 1


def test_an_intake_waits_for_its_key_before_it_takes_the_accounts_lock(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    # A batch claims its key first and takes the account's lock last (Line.admit). An intake
    # sent with the same key at that moment must wait for the key without holding the
    # account's lock, or each waits for the other: a deadlock, in which every other tenant's
    # intake waits too.
    if services.store.dialect == "sqlite":
        pytest.skip("row locks are a PostgreSQL matter; SQLite locks the whole database")
    first = create(client, auth, {"input": TEXT_ONLY}).json["id"]  # the account's row is made
    with services.store.read() as session:
        tenant_id = session.get(Generation, first).tenant_id  # type: ignore[union-attr]
    now = dt.datetime.now(dt.UTC)
    answers: list[Any] = []
    with services.store.engine.connect() as batch:
        batch.execute(  # what BatchService.create's transaction writes first
            sa.insert(IdempotencyKey).values(
                tenant_id=tenant_id, key="both", request_hash="x", batch_id="bat_other",
                created_at=now, expires_at=now + dt.timedelta(hours=24),
            )
        )  # fmt: skip
        intake = threading.Thread(
            target=lambda: answers.append(
                create(client, auth, {"input": TEXT_ONLY}, **{"Idempotency-Key": "both"})
            )
        )
        intake.start()
        _wait_for_a_lock_wait(services)
        # The batch goes on to the account's lock, which the intake must not hold.
        batch.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
        locked = batch.execute(
            sa.text("SELECT id FROM upstream_accounts WHERE id = 'deepimage' FOR UPDATE")
        )
        assert locked.scalar_one() == "deepimage"
        batch.commit()
    intake.join(timeout=30)
    assert not intake.is_alive()
    # The key made a batch: the intake is refused, and leaves no generation behind.
    assert answers[0].status_code == 422, answers[0].json
    assert answers[0].json["type"].endswith("/idempotency-key-reused")
    assert generation_count(services) == 1


def _wait_for_a_lock_wait(services: Services) -> None:
    """Until a session of this database waits to write a key another transaction holds (10 s
    at most)."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        " AND query LIKE 'INSERT INTO idempotency_keys%'"
    )
    deadline = time.monotonic() + 10
    with services.store.engine.connect() as watch:
        while watch.execute(query).scalar_one() == 0:
            assert time.monotonic() < deadline, "the intake never waited for the key"
            time.sleep(0.02)
            watch.rollback()


def test_a_bad_idempotency_key_is_named(client: Any, auth: dict[str, str]) -> None:
    response = create(client, auth, {"input": TEXT_ONLY}, **{"Idempotency-Key": "x" * 256})
    assert response.status_code == 422
    assert [e["field"] for e in response.json["errors"]] == ["Idempotency-Key"]


def test_listing_is_newest_first_with_cursor_pages_and_filters(
    client: Any, auth: dict[str, str]
) -> None:
    ids = [create(client, auth, {"input": TEXT_ONLY}).json["id"] for _ in range(5)]
    canceled = client.post(f"/v1/generations/{ids[0]}/cancel", headers=auth).json
    seen: list[str] = []
    url = "/v1/generations?limit=2"
    while True:
        page = client.get(url, headers=auth).json
        assert len(page["data"]) <= 2
        seen.extend(item["id"] for item in page["data"])
        if page["next_cursor"] is None:
            break
        url = f"/v1/generations?limit=2&cursor={page['next_cursor']}"
    assert seen == list(reversed(ids))
    only = client.get("/v1/generations?status=canceled", headers=auth).json["data"]
    assert [g["id"] for g in only] == [ids[0]]
    after = client.get(
        "/v1/generations", headers=auth, query_string={"created_after": canceled["created_at"]}
    ).json["data"]
    assert [g["id"] for g in after] == list(reversed(ids[1:]))


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("cursor=garbage!", "cursor"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("status=done", "status"),
        ("created_after=yesterday", "created_after"),
        ("created_after=2026-01-01T00:00:00", "created_after"),
        ("created_after=0001-01-01T00:00:00%2B01:00", "created_after"),  # the year 0 in UTC
        ("created_after=9999-12-31T23:59:59-01:00", "created_after"),  # the year 10000
        ("colour=red", "colour"),
    ],
)
def test_bad_list_queries_are_named(
    client: Any, auth: dict[str, str], query: str, field: str
) -> None:
    response = client.get(f"/v1/generations?{query}", headers=auth)
    assert response.status_code == 422
    assert response.mimetype == PROBLEM
    assert field in [e["field"] for e in response.json["errors"]]


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/v1/generations?batch=bat_a&batch=bat_b", "batch"),
        ("/v1/generations?status=canceled&status=queued", "status"),
        ("/v1/generations?limit=5&limit=50", "limit"),
        ("/v1/generations?cursor=a&cursor=b", "cursor"),
        (
            "/v1/generations?created_after=2026-01-01T00:00:00Z&created_after=2027-01-01T00:00:00Z",
            "created_after",
        ),
        ("/v1/generations?status=queued&status=queued", "status"),  # even the same value
        ("/v1/batches?limit=1&limit=2", "limit"),
        ("/v1/batches/bat_x/generations?status=queued&status=failed", "status"),
        ("/v1/events?type=generation.failed&type=generation.succeeded", "type"),
        ("/v1/deliveries?status=dead&status=pending", "status"),
        ("/v1/subscriptions?cursor=a&cursor=b", "cursor"),
        ("/v1/triggers?limit=1&limit=2", "limit"),
    ],
)
def test_a_query_parameter_given_twice_is_refused_naming_it(
    client: Any, auth: dict[str, str], url: str, field: str
) -> None:
    """Only the first value was used, silently: `?status=canceled&status=queued` listed the
    canceled generations alone, as if the second filter were not there."""
    response = client.get(url, headers=auth)
    assert response.status_code == 422, response.json
    assert response.mimetype == PROBLEM
    assert response.json["errors"] == [{"field": field, "message": f"Give `{field}` once."}]


def test_a_repeated_metadata_filter_keeps_its_own_message(
    client: Any, auth: dict[str, str]
) -> None:
    response = client.get("/v1/generations?metadata[a]=1&metadata[a]=2&limit=5", headers=auth)
    assert response.status_code == 422
    assert response.json["errors"] == [
        {"field": "metadata[a]", "message": "Give each metadata key once."}
    ]


def test_cancel_is_idempotent_and_a_finished_generation_cannot_be_canceled(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    gen = create(client, auth, {"input": TEXT_ONLY}).json
    assert gen["status"] == "processing"
    first = client.post(f"/v1/generations/{gen['id']}/cancel", headers=auth)
    again = client.post(f"/v1/generations/{gen['id']}/cancel", headers=auth)
    assert first.status_code == again.status_code == 200
    assert again.json["status"] == "canceled"
    assert again.json["completed_at"] is not None
    failed = create(client, auth, {"input": {**TEXT_ONLY, "preset": "no_such_preset"}}).json
    assert failed["status"] == "failed"
    refused = client.post(f"/v1/generations/{failed['id']}/cancel", headers=auth)
    assert refused.status_code == 409
    assert refused.mimetype == PROBLEM
    assert client.post("/v1/generations/gen_nope/cancel", headers=auth).status_code == 404


def test_an_upstream_400_fails_the_generation_with_the_upstream_message(
    client: Any, auth: dict[str, str]
) -> None:
    response = create(client, auth, {"input": {**TEXT_ONLY, "preset": "no_such_preset"}})
    assert response.status_code == 202
    body = response.json
    assert body["status"] == "failed"
    assert body["error"]["code"] == "upstream_rejected"
    assert "no_such_preset" in body["error"]["message"]


def test_a_wrong_deepimage_api_key_fails_the_generation_as_upstream_auth(
    config: Config, make_client: Any
) -> None:
    config = config.replace(deepimage_api_key="wrong-key")
    _services, client, auth = make_client(config)
    body = create(client, auth, {"input": TEXT_ONLY}).json
    assert body["status"] == "failed"
    assert body["error"] == {"code": "upstream_auth", "message": "No user found for provided token"}


def test_a_429_is_not_a_failed_attempt_the_generation_waits_in_the_line_again(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(config, fast_retries=True)
    set_simulator(simulator.url, rate_limit_rate=1.0)
    body = create(client, auth, {"input": TEXT_ONLY}).json
    assert body["status"] == "queued"
    with services.store.read() as session:
        task = session.scalars(sa.select(Task)).one()
        generation = session.get(Generation, body["id"])
        assert generation is not None
        assert generation.admitted_at is None  # its slot was handed back
    assert task.status == "done"  # no retry budget spent: the line admits it again
    shown = client.get(f"/v1/generations/{body['id']}", headers=auth).json
    assert (shown["status"], shown["queue_position"]) == ("queued", 1)
    set_simulator(simulator.url, rate_limit_rate=0.0)
    drain(services)
    after = client.get(f"/v1/generations/{body['id']}", headers=auth).json
    assert after["status"] == "succeeded"
    assert after["queue_position"] is None


def test_transient_upstream_errors_leave_the_generation_queued_for_the_worker(
    config: Config, make_client: Any, simulator: Any
) -> None:
    knob = "upstream_error_rate"
    services, client, auth = make_client(config, fast_retries=True)
    set_simulator(simulator.url, **{knob: 1.0})
    body = create(client, auth, {"input": TEXT_ONLY}).json
    assert body["status"] == "queued"
    with services.store.read() as session:
        task = session.scalars(sa.select(Task)).one()
    assert (task.status, task.attempts) == ("pending", 1)
    assert task.last_error
    set_simulator(simulator.url, **{knob: 0.0})
    drain(services)  # submit, then (polling-only mode) poll and store
    after = client.get(f"/v1/generations/{body['id']}", headers=auth).json
    assert after["status"] == "succeeded"
    assert after["upstream"]["job"]


def test_a_generation_fails_as_upstream_unavailable_when_retries_run_out(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(config, fast_retries=True)
    set_simulator(simulator.url, upstream_error_rate=1.0)
    gen_id = create(client, auth, {"input": TEXT_ONLY}).json["id"]
    drain(services)
    after = client.get(f"/v1/generations/{gen_id}", headers=auth).json
    assert after["status"] == "failed"
    assert after["error"]["code"] == "upstream_unavailable"
    assert "3 attempts" in after["error"]["message"]
    with services.store.read() as session:
        assert session.scalars(sa.select(Task.status).where(Task.kind == "submit")).one() == "dead"


def test_a_generation_canceled_before_the_worker_runs_is_never_submitted(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(config, fast_retries=True)
    set_simulator(simulator.url, upstream_error_rate=1.0)
    gen_id = create(client, auth, {"input": TEXT_ONLY}).json["id"]
    assert (
        client.post(f"/v1/generations/{gen_id}/cancel", headers=auth).json["status"] == "canceled"
    )
    set_simulator(simulator.url, upstream_error_rate=0.0)
    drain(services)
    assert client.get(f"/v1/generations/{gen_id}", headers=auth).json["status"] == "canceled"
    stats = requests.get(f"{simulator.url}/_sim/stats", timeout=5).json()
    assert stats["jobs_created"] == 0


def test_a_generation_canceled_while_its_submit_is_in_flight_keeps_its_job_until_it_ends(
    client: Any, auth: dict[str, str], services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    process = services.deepimage.process
    canceled: list[str] = []

    def cancel_during_the_post(payload: dict[str, Any]) -> Any:
        job = process(payload)  # the job exists upstream; the caller cancels before it is kept
        with services.store.read() as session:
            [(generation_id, tenant_id)] = session.execute(
                sa.select(Generation.id, Generation.tenant_id).where(Generation.status == "queued")
            ).all()
        services.generations.cancel(tenant_id, generation_id)
        canceled.append(generation_id)
        return job

    monkeypatch.setattr(services.deepimage, "process", cancel_during_the_post)
    response = create(client, auth, {"input": TEXT_ONLY})
    assert response.status_code == 202
    assert canceled == [response.json["id"]]
    # Deep-Image has no cancel: the job is recorded on the canceled generation, and its task
    # goes on as the poll that learns when the job ends (and its slot is free again).
    assert response.json["status"] == "canceled"
    assert response.json["upstream"]["job"] is not None
    with services.store.read() as session:
        tasks = session.scalars(sa.select(Task).where(Task.generation_id == canceled[0])).all()
    assert [(task.kind, task.status) for task in tasks] == [("poll", "pending")]


def test_the_openapi_document_describes_the_api_from_the_same_schemas(client: Any) -> None:
    spec = client.get("/openapi.json").json
    assert {
        "/v1/generations",
        "/v1/generations/{generation_id}",
        "/v1/generations/{generation_id}/cancel",
    } <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    generate = schemas["DeepImageGenerate"]["properties"]
    assert set(generate["model_type"]["enum"]) >= {"realistic", "fantasy", "premium"}
    # A generation's webhook gets its own events; a batch's gets `batch.completed` too.
    body = spec["paths"]["/v1/generations"]["post"]["requestBody"]["content"]
    generation = _resolved(spec, body["application/json"]["schema"])
    batch = schemas["BatchCreate"]
    for properties, expected in [
        (generation["properties"], list(GENERATION_EVENT_TYPES)),
        (batch["properties"], list(EVENT_TYPES)),
    ]:
        events_filter = properties["webhook_events_filter"]
        assert events_filter["items"]["enum"] == expected
        assert events_filter["maxItems"] == len(expected)
    assert json.dumps(spec)  # serialisable as served


def _resolved(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A `$ref` of the document, followed."""
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_the_openapi_document_states_every_status_and_limit_the_api_answers_with(
    client: Any,
) -> None:
    """What a client generated from it must be ready for, read off the routes' answers."""
    spec = client.get("/openapi.json").json
    paths = spec["paths"]
    for path, method in [
        ("/v1/subscriptions/{subscription_id}", "patch"),
        ("/v1/subscriptions/{subscription_id}", "delete"),
        ("/v1/subscriptions/{subscription_id}/rotate-secret", "post"),
        ("/v1/subscriptions/{subscription_id}/test", "post"),
        ("/v1/deliveries/{delivery_id}/retry", "post"),
    ]:
        assert "404" in paths[path][method]["responses"], (path, method)
    callback = paths["/v1/callbacks/deepimage/{generation_id}/{token}"]["post"]
    assert {"400", "401"} <= set(callback["responses"])
    metrics = paths["/metrics"]["get"]
    assert metrics["security"] == [{"metricsToken": []}, {}]  # only when one is set
    assert "METRICS_TOKEN" in spec["components"]["securitySchemes"]["metricsToken"]["description"]
    assert "401" in metrics["responses"]
    schemas = spec["components"]["schemas"]
    for name in ("TriggerCreate", "TriggerUpdate"):
        metadata = schemas[name]["properties"]["metadata"]
        assert metadata["type"] == "object"
        assert metadata["maxProperties"] == 48 and "maxLength" not in metadata


def test_the_first_submit_keeps_its_lease_while_deep_image_is_slow_to_answer(
    config: Config, make_client: Any, simulator: Any
) -> None:
    from tests.helpers import set_simulator

    services, client, auth = make_client(config.replace(task_lease=3.0, deepimage_timeout=(2, 20)))
    set_simulator(simulator.url, latency=5.0)  # Deep-Image answers a submit in 5 s
    try:
        answers: list[Any] = []
        thread = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth)
            )
        )
        thread.start()
        time.sleep(4.0)  # the request still waits for Deep-Image, past its task's 3 s lease
        taken = services.queue.claim_due_tasks(kinds=["submit"])
        thread.join(30)
    finally:
        set_simulator(simulator.url, latency=0.0)
    assert taken == []  # no worker takes the submit (and sends it a second time)
    assert answers[0].json["status"] == "processing"


def test_the_webhook_is_looked_up_before_a_pooled_connection_is_taken(
    services: Services, api_key: str
) -> None:
    """A trigger's push comes without a connection held: its webhook's lookup (up to 2 s)
    must not hold one of the pool's, or slow name servers empty the pool."""
    from service.generations.service import NewGeneration
    from service.notifications.ssrf import URLPolicy

    if services.store.dialect == "sqlite":
        pytest.skip("SQLite's connections are not pooled and checked out like PostgreSQL's")
    tenant = services.api_keys.tenant_for(api_key)
    assert tenant is not None
    checked_out: list[int] = []

    def resolver(host: str, port: int) -> list[str]:
        checked_out.append(services.store.engine.pool.checkedout())  # type: ignore[attr-defined]
        return ["93.184.216.34"]

    generations = services.generations
    generations.policy = URLPolicy(resolver=resolver)
    new = NewGeneration(input=TEXT_ONLY, webhook="https://hooks.example.com/genrelay")
    answer = generations.create(tenant.id, new).resource
    assert answer is not None and answer.status in ("queued", "processing")
    assert checked_out == [0]


@pytest.mark.parametrize("path", ["/v1/generations", "/v1/subscriptions", "/v1/triggers"])
@pytest.mark.parametrize("body", ["[]", '"x"', "7", "null"])
def test_a_body_that_is_not_a_json_object_is_a_422_saying_so(
    client: Any, auth: dict[str, str], path: str, body: str
) -> None:
    """It was a 422 whose detail said "Invalid input type.", naming nothing."""
    headers = {**auth, "Content-Type": "application/json"}
    response = client.post(path, data=body, headers=headers)
    assert response.status_code == 422, response.text
    assert response.content_type == "application/problem+json"
    assert response.json["detail"] == "The body must be a JSON object."
