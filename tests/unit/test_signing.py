"""Signing of outgoing notifications, checked with the receivers' own verifiers."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import standardwebhooks
import svix.webhooks
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, from_structured_event
from cloudevents.core.v1.event import CloudEvent

from service.notifications.signing import (
    CLOUDEVENTS_CONTENT_TYPE,
    SECRET_PREFIX,
    SignedRequest,
    cloudevents_body,
    new_secret,
    new_webhook_id,
    sign,
    standard_body,
)

GENERATION: dict[str, Any] = {
    "id": "gen_01HZX",
    "status": "succeeded",
    "result": {"uri": "gs://bucket/t/2025/01/02/gen_01HZX.png", "size": 1234},
    "metadata": {"order": "1234", "note": "café ☕"},
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _verify_standardwebhooks(secret: str, body: bytes, headers: dict[str, str]) -> None:
    standardwebhooks.Webhook(secret).verify(body, headers)


def _verify_svix(secret: str, body: bytes, headers: dict[str, str]) -> None:
    svix.webhooks.Webhook(secret).verify(body, headers)


VERIFIERS: list[Callable[[str, bytes, dict[str, str]], None]] = [
    _verify_standardwebhooks,
    _verify_svix,
]
# svix re-exports the standardwebhooks exception: one class for both verifiers.
VERIFICATION_ERRORS = svix.webhooks.WebhookVerificationError


def _signed(secrets: list[str], timestamp: dt.datetime | None = None) -> SignedRequest:
    moment = timestamp or _now()
    body = standard_body("generation.succeeded", moment, GENERATION)
    return sign(new_webhook_id(), moment, body, secrets)


@pytest.mark.parametrize("verify", VERIFIERS, ids=["standardwebhooks", "svix"])
def test_signature_verifies_with_the_receivers_libraries(
    verify: Callable[[str, bytes, dict[str, str]], None],
) -> None:
    secret = new_secret()
    signed = _signed([secret])
    verify(secret, signed.body, signed.headers)


def test_headers_are_the_standard_webhooks_set() -> None:
    moment = dt.datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    signed = sign("msg_abc", moment, b"{}", [new_secret()])
    assert set(signed.headers) == {
        "content-type",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
    assert signed.headers["content-type"] == "application/json"
    assert signed.headers["webhook-id"] == "msg_abc"
    assert signed.headers["webhook-timestamp"] == str(int(moment.timestamp()))
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", signed.headers["webhook-signature"])


@pytest.mark.parametrize("verify", VERIFIERS, ids=["standardwebhooks", "svix"])
def test_two_secrets_during_rotation_each_verify_alone(
    verify: Callable[[str, bytes, dict[str, str]], None],
) -> None:
    old, new = new_secret(), new_secret()
    signed = _signed([old, new])
    signatures = signed.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    verify(old, signed.body, signed.headers)
    verify(new, signed.body, signed.headers)
    # Each signature on its own is the one for its secret.
    for secret, signature in zip([old, new], signatures, strict=True):
        verify(secret, signed.body, {**signed.headers, "webhook-signature": signature})


@pytest.mark.parametrize("verify", VERIFIERS, ids=["standardwebhooks", "svix"])
def test_another_secret_does_not_verify(
    verify: Callable[[str, bytes, dict[str, str]], None],
) -> None:
    signed = _signed([new_secret()])
    with pytest.raises(VERIFICATION_ERRORS):
        verify(new_secret(), signed.body, signed.headers)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda body, headers: (body + b" ", headers), id="body"),
        pytest.param(
            lambda body, headers: (body.replace(b"succeeded", b"failed"), headers), id="body-text"
        ),
        pytest.param(
            lambda body, headers: (
                body,
                {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 1)},
            ),
            id="timestamp",
        ),
        pytest.param(
            lambda body, headers: (body, {**headers, "webhook-id": headers["webhook-id"] + "x"}),
            id="webhook-id",
        ),
    ],
)
@pytest.mark.parametrize("verify", VERIFIERS, ids=["standardwebhooks", "svix"])
def test_tampered_request_fails_verification(
    verify: Callable[[str, bytes, dict[str, str]], None],
    tamper: Callable[[bytes, dict[str, str]], tuple[bytes, dict[str, str]]],
) -> None:
    secret = new_secret()
    signed = _signed([secret])
    body, headers = tamper(signed.body, dict(signed.headers))
    with pytest.raises(VERIFICATION_ERRORS):
        verify(secret, body, headers)


def test_old_timestamp_is_refused_by_the_receivers_tolerance() -> None:
    secret = new_secret()
    signed = _signed([secret], timestamp=_now() - dt.timedelta(minutes=10))
    with pytest.raises(standardwebhooks.WebhookVerificationError, match="too old"):
        standardwebhooks.Webhook(secret).verify(signed.body, signed.headers)


def test_body_bytes_are_returned_unchanged() -> None:
    # Deliberately not what json.dumps would produce: sign must never re-serialise.
    body = '{ "b" : 1,   "a": "é" }'.encode()
    secret = new_secret()
    signed = sign("msg_x", _now(), body, [secret], content_type=CLOUDEVENTS_CONTENT_TYPE)
    assert signed.body is body
    assert signed.headers["content-type"] == CLOUDEVENTS_CONTENT_TYPE
    standardwebhooks.Webhook(secret).verify(body, signed.headers)


def test_non_utc_timestamp_signs_the_same_instant() -> None:
    secret = new_secret()
    utc = _now().replace(microsecond=0)
    paris = utc.astimezone(dt.timezone(dt.timedelta(hours=2)))
    a = sign("msg_x", utc, b"{}", [secret])
    b = sign("msg_x", paris, b"{}", [secret])
    assert a.headers == b.headers
    standardwebhooks.Webhook(secret).verify(b.body, b.headers)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"secrets": []}, "at least one"),
        ({"timestamp": dt.datetime(2025, 1, 1)}, "timezone-aware"),
        ({"webhook_id": ""}, "webhook_id"),
        ({"body": b"\xff\xfe"}, "UTF-8"),
        ({"secrets": ["whsec_"]}, "#1"),
        ({"secrets": [new_secret(), "whsec_abcde"]}, "#2"),
    ],
)
def test_sign_refuses_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "webhook_id": "msg_x",
        "timestamp": _now(),
        "body": b"{}",
        "secrets": [new_secret()],
        **kwargs,
    }
    with pytest.raises(ValueError, match=message) as info:
        sign(**arguments)
    for secret in arguments["secrets"]:
        if len(secret) > len(SECRET_PREFIX):
            assert secret not in str(info.value)


def test_sign_refuses_one_string_as_the_secrets() -> None:
    with pytest.raises(TypeError):
        sign("msg_x", _now(), b"{}", new_secret())


def test_new_secret_has_the_standard_format_and_round_trips() -> None:
    secret = new_secret()
    assert secret.startswith(SECRET_PREFIX)
    assert len(base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)) == 32
    assert new_secret() != secret
    # The library accepts it, with or without the prefix, and both forms agree.
    moment = _now()
    with_prefix = standardwebhooks.Webhook(secret).sign("msg_x", moment, "{}")
    without = standardwebhooks.Webhook(secret[len(SECRET_PREFIX) :]).sign("msg_x", moment, "{}")
    assert with_prefix == without
    signed = sign("msg_x", moment, b"{}", [secret])
    standardwebhooks.Webhook(secret).verify(b"{}", signed.headers)


def test_new_webhook_id_is_url_safe_and_unique() -> None:
    ids = {new_webhook_id() for _ in range(1000)}
    assert len(ids) == 1000
    for webhook_id in ids:
        assert re.fullmatch(r"msg_[A-Za-z0-9_-]{26,}", webhook_id)


def test_standard_body_has_exactly_type_timestamp_data() -> None:
    moment = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    body = standard_body("generation.succeeded", moment, GENERATION)
    assert isinstance(body, bytes)
    payload = json.loads(body.decode("utf-8"))
    assert payload == {
        "type": "generation.succeeded",
        "timestamp": "2025-01-02T02:04:05Z",
        "data": GENERATION,
    }
    assert list(payload) == ["type", "timestamp", "data"]
    assert b", " not in body and b": " not in body  # compact
    assert "café ☕".encode() in body  # UTF-8, not \\u escapes


def test_standard_body_keeps_sub_second_precision_in_utc() -> None:
    moment = dt.datetime(2025, 1, 2, 3, 4, 5, 120000, tzinfo=dt.UTC)
    payload = json.loads(standard_body("generation.failed", moment, {}))
    assert payload["timestamp"] == "2025-01-02T03:04:05.120000Z"
    assert dt.datetime.fromisoformat(payload["timestamp"]) == moment


def test_standard_body_refuses_naive_time_and_non_json_values() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        standard_body("generation.failed", dt.datetime(2025, 1, 1), {})
    with pytest.raises(ValueError):
        standard_body("generation.failed", _now(), {"x": float("nan")})


@pytest.mark.parametrize("parse", [from_structured_event, from_http_event])
@pytest.mark.parametrize("source", ["https://genrelay.example/v1", "/genrelay"])
def test_cloudevents_body_parses_back_with_the_sdk(
    parse: Callable[[HTTPMessage], Any], source: str
) -> None:
    webhook_id = new_webhook_id()
    moment = dt.datetime(2025, 1, 2, 3, 4, 5, 600000, tzinfo=dt.UTC)
    body = cloudevents_body(
        "generation.succeeded", webhook_id, moment, GENERATION, source, GENERATION["id"]
    )
    signed = sign(webhook_id, moment, body, [new_secret()], content_type=CLOUDEVENTS_CONTENT_TYPE)
    event = parse(HTTPMessage(headers=signed.headers, body=signed.body))
    assert isinstance(event, CloudEvent)
    assert event.get_specversion() == "1.0"
    assert event.get_id() == webhook_id
    assert event.get_type() == "generation.succeeded"
    assert event.get_source() == source
    assert event.get_subject() == GENERATION["id"]
    assert event.get_time() == moment
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data() == GENERATION


def test_cloudevents_body_is_the_sdks_own_bytes_in_structured_mode() -> None:
    from cloudevents.core.bindings.http import to_structured_event

    moment = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    body = cloudevents_body("generation.failed", "msg_1", moment, {"id": "g"}, "/genrelay", "g")
    expected = to_structured_event(
        CloudEvent(
            {
                "id": "msg_1",
                "source": "/genrelay",
                "type": "generation.failed",
                "time": moment,
                "datacontenttype": "application/json",
                "subject": "g",
            },
            {"id": "g"},
        )
    ).body
    assert body == expected
    envelope = json.loads(body)
    assert envelope["time"] == "2025-01-02T03:04:05Z"
    assert envelope["specversion"] == "1.0"


def test_cloudevents_body_without_subject_omits_it() -> None:
    body = cloudevents_body("generation.failed", "msg_1", _now(), {}, "/genrelay", None)
    assert "subject" not in json.loads(body)
    assert from_structured_event(HTTPMessage(headers={}, body=body)).get_subject() is None


@pytest.mark.parametrize(
    ("webhook_id", "source", "timestamp"),
    [
        ("", "/genrelay", dt.datetime(2025, 1, 1, tzinfo=dt.UTC)),
        ("msg_1", "", dt.datetime(2025, 1, 1, tzinfo=dt.UTC)),
        ("msg_1", "/genrelay", dt.datetime(2025, 1, 1)),
    ],
)
def test_cloudevents_body_refuses_invalid_attributes(
    webhook_id: str, source: str, timestamp: dt.datetime
) -> None:
    with pytest.raises(ValueError):
        cloudevents_body("generation.failed", webhook_id, timestamp, {}, source, None)
