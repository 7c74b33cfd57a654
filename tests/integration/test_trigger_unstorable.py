"""A push carrying strings the database cannot store (NUL, lone surrogates) in what would be
stored — its event id, its object's name, the generation request in a message's data — is
acknowledged (200) and recorded as `rejected` naming the field, not a 500 that Pub/Sub would
redeliver for days. Nothing stored or answered holds the raw character. SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
import sqlalchemy as sa

from service.models import Generation
from service.tenants import Tenants
from tests.gcp_helpers import GcpStack, OidcIssuer, gcp, issuer, signer_info  # noqa: F401
from tests.integration.test_triggers import PUSHER, gcp_config, make_trigger  # noqa: F401

URL = "https://example.com/a.png"
NUL = "\x00"
SURROGATE = "\ud800"
RAW = re.compile("[\x00\ud800-\udfff]")


def pubsub_trigger(gcp: GcpStack, issuer: OidcIssuer) -> tuple[dict[str, Any], str]:  # noqa: F811
    """A `pubsub` trigger, and a token that may push to it."""
    trigger = make_trigger(gcp, source="pubsub", bucket=None)
    return trigger, issuer.token(trigger["audience"], PUSHER)


def b64(request: dict[str, Any]) -> str:
    # json.dumps writes both as \u0000 and \ud800: valid JSON, decoded to such strings.
    return base64.b64encode(json.dumps(request).encode()).decode()


def push(stack: GcpStack, trigger: dict[str, Any], token: str, message: dict[str, Any]) -> Any:
    envelope = {"message": message, "subscription": "projects/acme-prod/subscriptions/renders"}
    return stack.client.post(
        trigger["links"]["push"],
        data=json.dumps(envelope),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )


def raw_strings(value: Any) -> list[str]:
    """The strings (and keys) in `value` holding a raw NUL or lone surrogate."""
    if isinstance(value, str):
        return [value] if RAW.search(value) else []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in raw_strings(k) + raw_strings(v)]
    if isinstance(value, list):
        return [s for item in value for s in raw_strings(item)]
    return []


def recorded(stack: GcpStack, trigger: dict[str, Any]) -> list[dict[str, Any]]:
    answer = stack.client.get(trigger["links"]["events"], headers=stack.auth)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.json["data"]  # type: ignore[no-any-return]


def generations(stack: GcpStack) -> list[Generation]:
    with stack.services.store.read() as session:
        return list(session.scalars(sa.select(Generation)))


def notification(
    message_id: str, bucket: str, name: str, event_type: str = "OBJECT_FINALIZE"
) -> dict[str, Any]:
    attributes = {"eventType": event_type, "bucketId": bucket, "objectId": name}
    return {"messageId": message_id, "attributes": attributes}


# case: (message, field named in the reason, event id recorded: None for a stand-in, subject
# recorded: None for none)
MESSAGES: dict[str, Any] = {
    "message-id": (
        lambda b, s: {"messageId": f"m{s}id", "data": b64({"input": {"url": URL}})},
        "messageId",
        None,
        None,
    ),
    "data-metadata": (
        lambda b, s: {"messageId": "m2", "data": b64({"input": {"url": URL},
                                                      "metadata": {"k": f"a{s}b"}})},
        "metadata.k",
        "m2",
        None,
    ),
    "data-metadata-key": (
        lambda b, s: {"messageId": "m3", "data": b64({"input": {"url": URL},
                                                      "metadata": {f"k{s}": "1"}})},
        "metadata",
        "m3",
        None,
    ),
    "data-input-url": (
        lambda b, s: {"messageId": "m4", "data": b64({"input": {"url": f"{URL}{s}"}})},
        "input.url",
        "m4",
        None,
    ),
    "data-prompt": (
        lambda b, s: {"messageId": "m5", "data": b64(
            {"input": {"background": {"generate": {"description": f"x{s}"}}}})},
        "input.background.generate.description",
        "m5",
        None,
    ),
    "gcs-notification-object": (
        lambda b, s: notification("m6", b, f"in/a{s}.png"),
        "objectId",
        "m6",
        None,
    ),
    "gcs-notification-other-event": (
        lambda b, s: notification("m7", b, f"in/a{s}.png", event_type="OBJECT_DELETE"),
        "objectId",
        "m7",
        None,
    ),
    "gcs-notification-event-type": (
        lambda b, s: notification("m8", b, "in/a.png", event_type=f"X{s}"),
        "eventType",
        "m8",
        "gs://{bucket}/in/a.png",
    ),
}  # fmt: skip


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize("case", list(MESSAGES))
def test_a_pubsub_push_with_unstorable_strings_is_acknowledged_and_rejected(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
    case: str,
    bad: str,
) -> None:
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger, token = pubsub_trigger(gcp, issuer)
    make, field, event_id, subject = MESSAGES[case]
    message = make(bucket, bad)

    answer = push(gcp, trigger, token, message)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    event = answer.json["event"]
    assert answer.json["duplicate"] is False
    assert event["status"] == "rejected"
    assert field in event["reason"], event["reason"]
    if event_id is None:
        assert event["event_id"].startswith("sha256:")
    else:
        assert event["event_id"] == event_id
    assert event["subject"] == (subject and subject.format(bucket=bucket))
    assert raw_strings(answer.json) == []

    # Redelivered, it is acknowledged again and recorded once.
    again = push(gcp, trigger, token, message)
    assert again.status_code == 200, again.get_data(as_text=True)
    assert again.json["duplicate"] is True
    assert again.json["event"] == event
    listed = recorded(gcp, trigger)
    assert [e["id"] for e in listed] == [event["id"]]
    assert raw_strings(listed) == []
    assert generations(gcp) == []


def test_distinct_messages_with_unstorable_ids_are_recorded_apart(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    trigger, token = pubsub_trigger(gcp, issuer)
    data = b64({"input": {"url": URL}})
    answers = [
        push(gcp, trigger, token, {"messageId": f"m{bad}", "data": data})
        for bad in (NUL, SURROGATE, "\udfff")
    ]
    assert [a.status_code for a in answers] == [200] * 3
    assert [a.json["duplicate"] for a in answers] == [False] * 3
    assert len({a.json["event"]["event_id"] for a in answers}) == 3
    assert len(recorded(gcp, trigger)) == 3


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize("where", ["ce-id", "name", "bucket", "ce-type"])
def test_a_cloudevent_with_unstorable_strings_is_acknowledged_and_rejected(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
    where: str,
    bad: str,
) -> None:
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    trigger = make_trigger(gcp, source="gcs", bucket=bucket)
    token = issuer.token(trigger["audience"], PUSHER)
    data = {"bucket": bucket, "name": "in/a.png"}
    headers = {
        "Authorization": f"Bearer {token}",
        "ce-specversion": "1.0",
        "ce-id": "evt-1",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "ce-type": "google.cloud.storage.object.v1.finalized",
        "ce-subject": "objects/in/a.png",
        "Content-Type": "application/json",
    }
    if where == "name":
        data["name"] = f"in/a{bad}.png"
    elif where == "bucket":
        data["bucket"] = f"{bucket}{bad}"
    else:
        headers[where] += bad

    def send() -> Any:
        return gcp.client.post(trigger["links"]["push"], data=json.dumps(data), headers=headers)

    answer = send()
    assert answer.status_code == 200, answer.get_data(as_text=True)
    event = answer.json["event"]
    assert event["status"] == "rejected"
    field = {"ce-id": "ce-id", "name": "data.name", "bucket": "data.bucket", "ce-type": "type"}
    assert field[where] in event["reason"], event["reason"]
    # Only a subject that cannot be stored is dropped.
    assert event["subject"] == {
        "ce-id": f"gs://{bucket}/in/a.png",
        "ce-type": "objects/in/a.png",
    }.get(where)
    if where == "ce-id":
        assert event["event_id"].startswith("sha256:")
    else:
        assert event["event_id"] == "evt-1"
    assert raw_strings(answer.json) == []
    again = send()
    assert again.status_code == 200 and again.json["duplicate"] is True
    listed = recorded(gcp, trigger)
    assert [e["id"] for e in listed] == [event["id"]]
    assert raw_strings(listed) == []
    assert generations(gcp) == []


def test_ordinary_unicode_in_a_push_still_makes_a_generation(
    gcp: GcpStack,  # noqa: F811
    issuer: OidcIssuer,  # noqa: F811
) -> None:
    trigger, token = pubsub_trigger(gcp, issuer)
    request = {
        "input": {"background": {"generate": {"description": "Zürich 東京 🎨"}}},
        "metadata": {"order": "🎨"},
    }
    answer = push(gcp, trigger, token, {"messageId": "m-🎨", "data": b64(request)})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.json["event"]["status"] == "accepted", answer.json
    assert answer.json["event"]["event_id"] == "m-🎨"
    (generation,) = generations(gcp)
    assert generation.meta["order"] == "🎨"
