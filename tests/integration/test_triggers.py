"""Triggers: management, and pushes from Eventarc (CloudEvents) and Pub/Sub authenticated by
Google-signed ID tokens minted by the test, with certificates served on loopback (SQLite and
PostgreSQL)."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import pytest
import sqlalchemy as sa

from service.config import Config
from service.models import Generation
from service.tenants import Tenants
from tests.gcp_helpers import (  # noqa: F401
    GcpStack,
    OidcIssuer,
    gcp,
    issuer,
    new_key,
    png_bytes,
    signer_info,
)

PUSHER = "eventarc-trigger@acme-prod.iam.gserviceaccount.com"
TEMPLATE = {"width": 64, "height": 64, "enhancements": ["denoise"]}


@pytest.fixture
def gcp_config(config: Config, issuer: OidcIssuer) -> Config:  # noqa: F811
    return config.replace(oidc_certs_url=issuer.certs_url)


def make_trigger(stack: GcpStack, **fields: Any) -> dict[str, Any]:
    body = {"source": "gcs", "input": TEMPLATE, "push_accounts": [PUSHER], **fields}
    answer = stack.client.post("/v1/triggers", json=body, headers=stack.auth)
    assert answer.status_code == 201, answer.json
    return answer.json  # type: ignore[no-any-return]


def cloudevent(
    stack: GcpStack, trigger: dict[str, Any], token: str | None, bucket: str, name: Any, **kw: Any
) -> Any:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": kw.get("event_id", "evt-1"),
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "ce-type": kw.get("type", "google.cloud.storage.object.v1.finalized"),
        "ce-subject": f"objects/{name}",
        "ce-time": "2026-12-05T10:00:00Z",
        "Content-Type": "application/json",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = {"bucket": bucket, "name": name, "contentType": "image/png", "size": "77"}
    return stack.client.post(trigger["links"]["push"], data=json.dumps(data), headers=headers)


def pubsub(stack: GcpStack, trigger: dict[str, Any], token: str, message: dict[str, Any]) -> Any:
    envelope = {"message": message, "subscription": "projects/acme-prod/subscriptions/renders"}
    return stack.client.post(
        trigger["links"]["push"], json=envelope, headers={"Authorization": f"Bearer {token}"}
    )


def gcs_trigger(gcp: GcpStack, issuer: OidcIssuer) -> tuple[str, dict[str, Any], str]:  # noqa: F811
    """A bucket the tenant may read, a `gcs` trigger on it, and a token that may push to it."""
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger = make_trigger(gcp, bucket=bucket)
    return bucket, trigger, issuer.token(trigger["audience"], PUSHER)


def generations(stack: GcpStack) -> list[Generation]:
    with stack.services.store.read() as session:
        return list(session.scalars(sa.select(Generation).order_by(Generation.created_at)))


def events(stack: GcpStack, trigger: dict[str, Any]) -> list[dict[str, Any]]:
    answer = stack.client.get(trigger["links"]["events"], headers=stack.auth)
    assert answer.status_code == 200
    return answer.json["data"]  # type: ignore[no-any-return]


def test_triggers_are_created_listed_changed_and_deleted(gcp: GcpStack) -> None:  # noqa: F811
    refused = gcp.client.post(
        "/v1/triggers",
        json={"source": "gcs", "bucket": "not-ours", "push_accounts": [PUSHER]},
        headers=gcp.auth,
    )
    assert refused.status_code == 422
    assert [e["field"] for e in refused.json["errors"]] == ["bucket"]
    no_bucket = gcp.client.post(
        "/v1/triggers", json={"source": "gcs", "push_accounts": [PUSHER]}, headers=gcp.auth
    )
    assert [e["field"] for e in no_bucket.json["errors"]] == ["bucket"]

    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    bad_template = gcp.client.post(
        "/v1/triggers",
        json={"source": "gcs", "bucket": bucket, "input": {"width": "huge"},
              "push_accounts": [PUSHER]},
        headers=gcp.auth,
    )  # fmt: skip
    assert bad_template.status_code == 422
    assert [e["field"] for e in bad_template.json["errors"]] == ["input.width"]

    too_much = gcp.client.post(
        "/v1/triggers",
        json={"source": "gcs", "bucket": bucket, "push_accounts": [PUSHER],
              "metadata": {f"k{i}": "v" for i in range(49)}},
        headers=gcp.auth,
    )  # fmt: skip
    assert [e["field"] for e in too_much.json["errors"]] == ["metadata"]
    assert too_much.json["errors"][0]["message"] == "At most 48 keys of your own."

    made = make_trigger(gcp, bucket=bucket, name_prefix="in/", name_suffix=".png")
    assert made["push_url"] == f"http://localhost/v1/triggers/{made['id']}/push"
    assert made["audience"] == made["push_url"]
    assert made["push_accounts"] == [PUSHER]
    assert gcp.client.get(f"/v1/triggers/{made['id']}", headers=gcp.auth).json == made
    listed = gcp.client.get("/v1/triggers", headers=gcp.auth).json
    assert [t["id"] for t in listed["data"]] == [made["id"]]
    changed = gcp.client.patch(
        f"/v1/triggers/{made['id']}", json={"enabled": False}, headers=gcp.auth
    )
    assert changed.status_code == 200 and changed.json["enabled"] is False
    other = {"Authorization": "Bearer " + gcp.services.api_keys.create("beta")}
    assert gcp.client.get(f"/v1/triggers/{made['id']}", headers=other).status_code == 404
    assert gcp.client.delete(f"/v1/triggers/{made['id']}", headers=gcp.auth).status_code == 204
    assert gcp.client.get(f"/v1/triggers/{made['id']}", headers=gcp.auth).status_code == 404


def test_an_eventarc_event_makes_one_generation_however_often_it_arrives(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger = make_trigger(gcp, bucket=bucket, name_prefix="in/", metadata={"team": "catalog"})
    gcp.upload(bucket, "in/shoe.png", png_bytes())
    token = issuer.token(trigger["audience"], PUSHER)

    first = cloudevent(gcp, trigger, token, bucket, "in/shoe.png")
    assert first.status_code == 200, first.json
    assert first.json["duplicate"] is False
    assert first.json["event"]["status"] == "accepted"
    again = cloudevent(gcp, trigger, token, bucket, "in/shoe.png")
    assert again.status_code == 200
    assert again.json["duplicate"] is True
    assert again.json["event"] == first.json["event"]

    (generation,) = generations(gcp)
    assert generation.id == first.json["event"]["generation_id"]
    assert generation.input == {**TEMPLATE, "url": f"gs://{bucket}/in/shoe.png"}
    assert generation.meta == {
        "team": "catalog",
        "trigger": trigger["id"],
        "object": f"gs://{bucket}/in/shoe.png",
    }
    (event,) = events(gcp, trigger)
    assert event["event_id"] == "evt-1" and event["kind"] == "cloudevent"
    assert event["subject"] == f"gs://{bucket}/in/shoe.png"


def test_pubsub_gcs_notifications_and_plain_messages_make_generations(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger = make_trigger(gcp, source="pubsub", input={"width": 32, "height": 32})
    token = issuer.token(trigger["audience"], PUSHER)
    notification = pubsub(
        gcp,
        trigger,
        token,
        {
            "data": base64.b64encode(b'{"kind": "storage#object"}').decode(),
            "attributes": {"eventType": "OBJECT_FINALIZE", "bucketId": bucket,
                           "objectId": "a.png", "payloadFormat": "JSON_API_V1"},
            "messageId": "1001",
            "publishTime": "2026-12-05T10:00:00Z",
        },
    )  # fmt: skip
    assert notification.json["event"]["status"] == "accepted", notification.json
    request = {
        "input": {"background": {"generate": {"description": "a red shoe"}}},
        "metadata": {"sku": "42"},
        "priority": 5,
    }
    message = pubsub(
        gcp,
        trigger,
        token,
        {"data": base64.b64encode(json.dumps(request).encode()).decode(), "messageId": "1002"},
    )
    assert message.json["event"]["status"] == "accepted", message.json
    assert pubsub(gcp, trigger, token, {"data": "", "messageId": "1002"}).json["duplicate"]

    by_id = {g.id: g for g in generations(gcp)}
    assert len(by_id) == 2
    from_object = by_id[notification.json["event"]["generation_id"]]
    assert from_object.input == {"width": 32, "height": 32, "url": f"gs://{bucket}/a.png"}
    from_message = by_id[message.json["event"]["generation_id"]]
    assert from_message.input == {
        "width": 32,
        "height": 32,
        "background": {"generate": {"description": "a red shoe"}},
    }
    assert from_message.meta == {"sku": "42", "trigger": trigger["id"]}
    assert from_message.priority == 5


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("missing", 401),
        ("an API key", 401),
        ("not a JWT", 401),
        ("forged", 401),
        ("expired", 401),
        ("wrong audience", 401),
        ("wrong issuer", 401),
        ("unverified email", 401),
        ("not on the list", 403),
    ],
)
def test_pushes_without_a_good_token_from_a_listed_account_are_refused(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
    case: str,
    status: int,
) -> None:
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger = make_trigger(gcp, bucket=bucket)
    audience = trigger["audience"]
    token = {
        "missing": None,
        "an API key": gcp.auth["Authorization"].split(" ", 1)[1],
        "not a JWT": "a.b.c",
        "forged": issuer.token(audience, PUSHER, key=new_key()),
        "expired": issuer.token(audience, PUSHER, expires_in=-600),
        "wrong audience": issuer.token("https://elsewhere.example/push", PUSHER),
        "wrong issuer": issuer.token(audience, PUSHER, issuer="https://evil.example"),
        "unverified email": issuer.token(audience, PUSHER, email_verified=False),
        "not on the list": issuer.token(audience, "someone@else.iam.gserviceaccount.com"),
    }[case]
    answer = cloudevent(gcp, trigger, token, bucket, "a.png")
    assert answer.status_code == status, answer.json
    assert answer.content_type == "application/problem+json"
    assert generations(gcp) == []
    assert events(gcp, trigger) == []


def test_unreachable_certificates_answer_503_so_the_push_is_redelivered(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket, trigger, token = gcs_trigger(gcp, issuer)
    issuer.stop()
    answer = cloudevent(gcp, trigger, token, bucket, "a.png")
    assert answer.status_code == 503
    assert generations(gcp) == []


def test_events_that_can_never_become_generations_are_acknowledged_and_recorded(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger = make_trigger(gcp, bucket=bucket, name_suffix=".png")
    pubsub_trigger = make_trigger(gcp, source="pubsub", bucket=None)
    token = issuer.token(trigger["audience"], PUSHER)
    pubsub_token = issuer.token(pubsub_trigger["audience"], PUSHER)
    push = trigger["links"]["push"]
    authorization = {"Authorization": f"Bearer {token}"}

    answers = [
        gcp.client.post(push, data=b"\x00not json", headers=authorization),
        gcp.client.post(push, json={"hello": "world"}, headers=authorization),
        cloudevent(gcp, trigger, token, bucket, "a.png", event_id="e2",
                   type="google.cloud.storage.object.v1.deleted"),
        cloudevent(gcp, trigger, token, bucket, "notes.txt", event_id="e3"),
        pubsub(gcp, pubsub_trigger, pubsub_token, {"data": "%%%", "messageId": "m1"}),
        pubsub(gcp, pubsub_trigger, pubsub_token, {
            "data": base64.b64encode(b'{"input": {"width": "huge"}}').decode(),
            "messageId": "m2"}),
        pubsub(gcp, pubsub_trigger, pubsub_token, {
            "attributes": {"eventType": "OBJECT_FINALIZE", "bucketId": "not-allowed-bucket",
                           "objectId": "x.png"},
            "messageId": "m3"}),
    ]  # fmt: skip
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert [a.json["event"]["status"] for a in answers] == [
        "rejected", "rejected", "rejected", "skipped", "rejected", "rejected", "rejected"
    ]  # fmt: skip
    reasons = [a.json["event"]["reason"] for a in answers]
    assert "not JSON" in reasons[0]
    assert "google.cloud.storage.object.v1.deleted" in reasons[2]
    assert "filters" in reasons[3]
    assert "base64" in reasons[4]
    assert "input.width" in reasons[5]
    assert "input.url" in reasons[6] and "not-allowed-bucket" in reasons[6]
    assert generations(gcp) == []

    # Redelivered, each is acknowledged again and recorded once.
    again = gcp.client.post(push, data=b"\x00not json", headers=authorization)
    assert again.status_code == 200 and again.json["duplicate"] is True
    recorded = events(gcp, trigger)
    assert len(recorded) == 4
    rejected = gcp.client.get(
        trigger["links"]["events"] + "?status=skipped", headers=gcp.auth
    ).json["data"]
    assert [e["subject"] for e in rejected] == [f"gs://{bucket}/notes.txt"]

    gcp.client.patch(trigger["links"]["self"], json={"enabled": False}, headers=gcp.auth)
    disabled = cloudevent(gcp, trigger, token, bucket, "b.png", event_id="e9")
    assert disabled.json["event"]["status"] == "rejected"
    assert "disabled" in disabled.json["event"]["reason"]


def test_a_cloudevent_whose_object_name_is_not_a_string_is_rejected(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    """Before, such a name was turned into its Python repr: `gs://bucket/{'a': 1}`."""
    bucket, trigger, token = gcs_trigger(gcp, issuer)
    for i, name in enumerate([{"a": 1}, 42, ["x.png"]]):
        answer = cloudevent(gcp, trigger, token, bucket, name, event_id=f"odd-{i}")
        assert answer.status_code == 200
        assert answer.json["event"]["status"] == "rejected"
        assert "not a GCS object" in answer.json["event"]["reason"]
    assert generations(gcp) == []


def test_the_same_event_pushed_at_once_from_many_threads_makes_one_generation(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    import threading

    bucket, trigger, token = gcs_trigger(gcp, issuer)
    app = gcp.client.application
    answers: list[Any] = []
    start = threading.Barrier(6)

    def push() -> None:
        client = app.test_client()
        stack = GcpStack(gcp.services, client, gcp.auth, gcp.blobs, gcp.signer_info, gcp.gcs)
        start.wait()
        answers.append(cloudevent(stack, trigger, token, bucket, "same.png", event_id="once"))

    threads = [threading.Thread(target=push) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * 6, [a.json for a in answers]
    assert sorted(a.json["duplicate"] for a in answers) == [False] + [True] * 5
    assert len({a.json["event"]["generation_id"] for a in answers}) == 1
    assert len(generations(gcp)) == 1
    assert len(events(gcp, trigger)) == 1


def test_the_openapi_document_describes_triggers_gs_inputs_output_and_retention(
    gcp: GcpStack,  # noqa: F811
) -> None:
    document = gcp.client.get("/openapi.json").json
    paths = document["paths"]
    for path in ("/v1/triggers", "/v1/triggers/{trigger_id}", "/v1/triggers/{trigger_id}/events"):
        assert path in paths
    push = paths["/v1/triggers/{trigger_id}/push"]["post"]
    assert push["security"] == [{"googleIdToken": []}]
    assert {"200", "401", "403", "503"} <= set(push["responses"])
    assert "googleIdToken" in document["components"]["securitySchemes"]
    result = paths["/v1/generations/{generation_id}/result"]
    assert "302" in result["get"]["responses"] and "delete" in result
    schemas = document["components"]["schemas"]
    assert "retention" in schemas["GenerationCreate"]["properties"]
    assert "expired_at" in schemas["Result"]["properties"]
    assert "push_url" in schemas["Trigger"]["properties"]
    replace = schemas["DeepImageBackground"]["properties"]["replace"]["description"]
    assert "gs://bucket/object" in replace


def resolve_with(policy: Any, resolver: Any) -> None:
    """Swap the request policy's DNS resolver (the policy is frozen; the stack is the test's)."""
    object.__setattr__(policy, "resolver", resolver)


def dns_down(host: str, port: int) -> list[str]:
    raise OSError("no DNS answer within 5 s")


def hooked_trigger(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> tuple[str, dict[str, Any], str]:
    """A gcs trigger with a webhook whose host resolves (publicly) for now, and its token."""
    resolve_with(gcp.services.triggers.policy, lambda host, port: ["93.184.216.34"])
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger = make_trigger(gcp, bucket=bucket, webhook="https://hooks.acme.example/genrelay")
    return bucket, trigger, issuer.token(trigger["audience"], PUSHER)


def test_a_webhook_host_that_does_not_resolve_for_now_answers_503_and_records_nothing(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    policy = gcp.services.triggers.policy
    bucket, trigger, token = hooked_trigger(gcp, issuer)
    resolve_with(policy, dns_down)
    first = cloudevent(gcp, trigger, token, bucket, "shoe.png", event_id="evt-dns")
    assert first.status_code == 503, first.json
    assert first.content_type == "application/problem+json"
    assert first.headers["Retry-After"]
    assert "webhook" in first.json["detail"]
    assert events(gcp, trigger) == [] and generations(gcp) == []

    # DNS is back: the redelivery makes the generation.
    resolve_with(policy, lambda host, port: ["93.184.216.34"])
    again = cloudevent(gcp, trigger, token, bucket, "shoe.png", event_id="evt-dns")
    assert again.status_code == 200, again.json
    assert again.json["duplicate"] is False and again.json["event"]["status"] == "accepted"
    (generation,) = generations(gcp)
    assert generation.webhook == "https://hooks.acme.example/genrelay"

    # A host that resolves to the metadata service never will be allowed: rejected, 200.
    resolve_with(policy, lambda host, port: ["169.254.169.254"])
    pubsub_trigger = make_trigger(gcp, source="pubsub", bucket=None)
    pubsub_token = issuer.token(pubsub_trigger["audience"], PUSHER)
    private = {
        "input": {"background": {"generate": {"description": "a red shoe"}}},
        "webhook": "https://internal.acme.example/hook",
    }
    data = base64.b64encode(json.dumps(private).encode()).decode()
    refused = pubsub(gcp, pubsub_trigger, pubsub_token, {"data": data, "messageId": "m-10"})
    assert refused.status_code == 200 and refused.json["event"]["status"] == "rejected"
    assert "webhook" in refused.json["event"]["reason"]


def test_a_cloudevent_without_ce_id_is_rejected_once_and_makes_nothing(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket, trigger, token = gcs_trigger(gcp, issuer)
    headers = {
        "Authorization": f"Bearer {token}",
        "ce-specversion": "1.0",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "ce-type": "google.cloud.storage.object.v1.finalized",
        "Content-Type": "application/json",
    }
    data = json.dumps({"bucket": bucket, "name": "shoe.png"})
    # The cloudevents SDK would give each delivery a random id: each would make a generation.
    answers = [gcp.client.post(trigger["links"]["push"], data=data, headers=headers)
               for _ in range(2)]  # fmt: skip
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json["duplicate"] for a in answers] == [False, True]
    assert answers[0].json["event"]["status"] == "rejected"
    assert "ce-id" in answers[0].json["event"]["reason"]
    assert generations(gcp) == []
    assert len(events(gcp, trigger)) == 1


def test_deeply_nested_json_is_acknowledged_and_rejected_not_a_500(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger = make_trigger(gcp, bucket=bucket)
    pubsub_trigger = make_trigger(gcp, source="pubsub", bucket=None)
    token = issuer.token(trigger["audience"], PUSHER)
    pubsub_token = issuer.token(pubsub_trigger["audience"], PUSHER)
    deep = b"[" * 50_000
    ce_headers = {
        "Authorization": f"Bearer {token}",
        "ce-specversion": "1.0",
        "ce-id": "evt-deep",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "ce-type": "google.cloud.storage.object.v1.finalized",
        "Content-Type": "application/json",
    }
    answers = [
        # the envelope, the message's data, the CloudEvent's data
        gcp.client.post(pubsub_trigger["links"]["push"], data=deep,
                        headers={"Authorization": f"Bearer {pubsub_token}"}),
        pubsub(gcp, pubsub_trigger, pubsub_token,
               {"messageId": "m-deep", "data": base64.b64encode(b'{"a":' * 30_000).decode()}),
        gcp.client.post(trigger["links"]["push"], data=deep, headers=ce_headers),
    ]  # fmt: skip
    assert [a.status_code for a in answers] == [200, 200, 200], [a.json for a in answers]
    assert [a.json["event"]["status"] for a in answers] == ["rejected"] * 3
    assert [a.json["event"]["kind"] for a in answers] == ["malformed", "message", "cloudevent"]
    assert generations(gcp) == []


def test_a_template_naming_a_storage_or_bucket_the_tenant_may_not_use_is_refused(
    gcp: GcpStack,  # noqa: F811
) -> None:
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket], storages=["acme_drive"])
    refused = gcp.client.post(
        "/v1/triggers",
        json={"source": "gcs", "bucket": bucket, "push_accounts": [PUSHER],
              "input": {**TEMPLATE, "target": "storage://ops_s3/out/",
                        "background": {"replace": "gs://someone-elses/backdrop.png"}}},
        headers=gcp.auth,
    )  # fmt: skip
    assert refused.status_code == 422, refused.json
    assert refused.content_type == "application/problem+json"
    assert {e["field"] for e in refused.json["errors"]} == {
        "input.target",
        "input.background.replace",
    }
    pubsub_refused = gcp.client.post(
        "/v1/triggers",
        json={"source": "pubsub", "push_accounts": [PUSHER],
              "input": {"background": {"replace": "storage://ops_s3/backdrop.png"}}},
        headers=gcp.auth,
    )  # fmt: skip
    assert pubsub_refused.status_code == 422, pubsub_refused.json
    assert [e["field"] for e in pubsub_refused.json["errors"]] == ["input.background.replace"]

    made = make_trigger(gcp, bucket=bucket, input={**TEMPLATE, "target": "storage://acme_drive/o/"})
    patched = gcp.client.patch(
        made["links"]["self"],
        json={"input": {**TEMPLATE, "target": "storage://ops_s3/out/"}},
        headers=gcp.auth,
    )
    assert patched.status_code == 422, patched.json
    assert [e["field"] for e in patched.json["errors"]] == ["input.target"]
    kept = gcp.client.get(made["links"]["self"], headers=gcp.auth).json
    assert kept["input"]["target"] == "storage://acme_drive/o/"


def test_a_template_that_cannot_be_stored_or_ever_be_sent_is_refused(
    gcp: GcpStack,  # noqa: F811
) -> None:
    """Infinity (`1e999`) has no JSON spelling: a 500 on PostgreSQL, `Infinity` in every later
    answer on SQLite. Nesting past 64 levels was stored, and deeper still a 500. `webhooks`
    in a pubsub template made every push fail."""

    def refused(method: str, url: str, body: str) -> list[str]:
        headers = {**gcp.auth, "Content-Type": "application/json"}
        answer = gcp.client.open(url, method=method, data=body, headers=headers)
        assert answer.status_code == 422, answer.text
        assert answer.content_type == "application/problem+json"
        return [e["field"] for e in answer.json["errors"]]

    pubsub = f'"source": "pubsub", "push_accounts": ["{PUSHER}"]'
    infinite = '{"background": {"generate": {"strength": 1e999}}}'
    deep = '{"a": ' * 100 + "1" + "}" * 100
    assert refused("POST", "/v1/triggers", f'{{{pubsub}, "input": {infinite}}}') == [
        "input.background.generate.strength"
    ]
    [field] = refused("POST", "/v1/triggers", f'{{{pubsub}, "input": {{"extra": {deep}}}}}')
    assert field.startswith("input.extra.a.a.")
    assert refused("POST", "/v1/triggers", f'{{{pubsub}, "input": {{"webhooks": {{}}}}}}') == [
        "input.webhooks"
    ]
    made = make_trigger(gcp, source="pubsub", input={"width": 64})
    assert refused("PATCH", made["links"]["self"], f'{{"input": {infinite}}}') == [
        "input.background.generate.strength"
    ]
    kept = gcp.client.get(made["links"]["self"], headers=gcp.auth)
    assert kept.json["input"] == {"width": 64}
    listed = gcp.client.get("/v1/triggers", headers=gcp.auth)
    assert [t["id"] for t in listed.json["data"]] == [made["id"]]


def test_a_push_is_authenticated_before_its_body_is_read(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    import flask

    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger = make_trigger(gcp, bucket=bucket)
    verifier = gcp.services.triggers.verifier
    real = verifier.verify
    unread: list[int] = []

    def spy(authorization: Any, audience: str) -> Any:
        # Nothing of the body has been taken from the stream when the token is checked.
        unread.append(len(flask.request.stream.read()))
        return real(authorization, audience)

    verifier.verify = spy  # type: ignore[method-assign]
    body = b'{"message": {"messageId": "1"}}' + b" " * 1_000_000
    anonymous = gcp.client.post(
        trigger["links"]["push"], data=body, headers={"Content-Type": "application/json"}
    )
    assert anonymous.status_code == 401
    assert unread == [len(body)]


def test_a_content_coded_push_is_a_415_once_authenticated_and_records_nothing(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    """Eventarc and Pub/Sub send no Content-Encoding; a sender that does gets a 415, not an
    event recorded as "the body is not JSON"."""
    _bucket, trigger, token = gcs_trigger(gcp, issuer)
    body = gzip.compress(json.dumps({"message": {"messageId": "1", "data": ""}}).encode())
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    anonymous = gcp.client.post(trigger["links"]["push"], data=body, headers=headers)
    assert anonymous.status_code == 401
    answer = gcp.client.post(
        trigger["links"]["push"], data=body, headers={**headers, "Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 415, answer.json
    assert answer.content_type == "application/problem+json"
    assert "Content-Encoding" in answer.json["detail"]
    assert answer.headers["Accept-Encoding"] == "identity"
    assert events(gcp, trigger) == []


def message(request: dict[str, Any], message_id: str) -> dict[str, Any]:
    """A Pub/Sub message whose data is `request` (a `POST /v1/generations` body)."""
    data = base64.b64encode(json.dumps(request).encode()).decode()
    return {"data": data, "messageId": message_id}


def test_a_redelivered_event_is_a_duplicate_even_while_the_webhook_does_not_resolve(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket, trigger, token = hooked_trigger(gcp, issuer)
    first = cloudevent(gcp, trigger, token, bucket, "shoe.png", event_id="evt-once")
    assert first.json["event"]["status"] == "accepted"
    resolve_with(gcp.services.triggers.policy, dns_down)
    again = cloudevent(gcp, trigger, token, bucket, "shoe.png", event_id="evt-once")
    assert again.status_code == 200, again.json
    assert again.json["duplicate"] is True and again.json["event"] == first.json["event"]
    assert len(generations(gcp)) == 1


@pytest.mark.parametrize(
    ("host", "dns"),
    [
        ("gone.acme.example", "nxdomain"),  # the DNS answers that the name does not exist
        (".".join(["a" * 63] * 5) + ".com", "unused"),  # 323 characters: no DNS name
        ("999.1.1.1", "unused"),  # neither an address nor a name
    ],
)
def test_a_webhook_host_that_cannot_resolve_is_rejected_once_not_redelivered_for_ever(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
    host: str,
    dns: str,
) -> None:
    import socket

    def resolver(name: str, port: int) -> list[str]:
        if dns == "nxdomain":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        raise AssertionError(f"{name} is refused before any lookup")

    resolve_with(gcp.services.triggers.policy, resolver)
    trigger = make_trigger(gcp, source="pubsub", bucket=None)
    token = issuer.token(trigger["audience"], PUSHER)
    request = {
        "input": {"background": {"generate": {"description": "a red shoe"}}},
        "webhook": f"https://{host}/hook",
    }
    answers = [pubsub(gcp, trigger, token, message(request, "m-poison")) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200], answers[0].json
    assert [a.json["duplicate"] for a in answers] == [False, True]
    (event,) = events(gcp, trigger)
    assert event["status"] == "rejected" and "webhook" in event["reason"]
    assert generations(gcp) == []


def test_event_ids_longer_than_a_column_that_share_their_beginning_are_different_events(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket, trigger, token = gcs_trigger(gcp, issuer)
    long_id = "x" * 200
    first = cloudevent(gcp, trigger, token, bucket, "a.png", event_id=long_id + "-1")
    second = cloudevent(gcp, trigger, token, bucket, "b.png", event_id=long_id + "-2")
    again = cloudevent(gcp, trigger, token, bucket, "b.png", event_id=long_id + "-2")
    assert [a.json["duplicate"] for a in (first, second, again)] == [False, False, True]
    assert [a.json["event"]["status"] for a in (first, second)] == ["accepted", "accepted"]
    assert second.json["event"]["subject"] == f"gs://{bucket}/b.png"
    assert again.json["event"] == second.json["event"]
    assert len(generations(gcp)) == 2
    # Recorded under a hash of the id, which fits the column; a short id stays as sent.
    assert all(e["event_id"].startswith("sha256:") for e in events(gcp, trigger))


def test_a_trigger_can_be_disabled_whatever_has_changed_since_it_was_made(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket, hooked, _token = hooked_trigger(gcp, issuer)
    trigger = make_trigger(gcp, bucket=bucket)
    # The operator takes the bucket away; the webhook's DNS stops answering.
    Tenants(gcp.services.store).set("acme", input_buckets=[])
    resolve_with(gcp.services.triggers.policy, dns_down)
    for made in (trigger, hooked):
        stop = {"enabled": False, "description": "paused while the bucket moves"}
        stopped = gcp.client.patch(made["links"]["self"], json=stop, headers=gcp.auth)
        assert stopped.status_code == 200, stopped.json
        assert stopped.json["enabled"] is False
    # Anything else is still checked: the trigger could never make a generation now.
    restart = gcp.client.patch(trigger["links"]["self"], json={"enabled": True}, headers=gcp.auth)
    assert restart.status_code == 422
    assert [e["field"] for e in restart.json["errors"]] == ["bucket"]


def test_a_message_keeps_the_triggers_id_and_a_gcs_trigger_takes_only_objects(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    bucket, trigger, token = gcs_trigger(gcp, issuer)
    spoofed = {"input": {"url": f"gs://{bucket}/elsewhere/x.png"}, "metadata": {"trigger": "x"}}
    refused = pubsub(gcp, trigger, token, message(spoofed, "m-1"))
    assert refused.status_code == 200
    assert refused.json["event"]["status"] == "rejected"
    assert "objects" in refused.json["event"]["reason"]
    assert generations(gcp) == []

    pubsub_trigger = make_trigger(gcp, source="pubsub", bucket=None, metadata={"team": "a"})
    pubsub_token = issuer.token(pubsub_trigger["audience"], PUSHER)
    request = {
        "input": {"background": {"generate": {"description": "a red shoe"}}},
        "metadata": {"trigger": "trg_someone_else", "sku": "123"},
    }
    made = pubsub(gcp, pubsub_trigger, pubsub_token, message(request, "m-2"))
    assert made.json["event"]["status"] == "accepted", made.json
    (generation,) = generations(gcp)
    assert generation.meta == {"team": "a", "sku": "123", "trigger": pubsub_trigger["id"]}
