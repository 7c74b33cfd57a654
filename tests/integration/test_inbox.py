"""The dev inbox on a real loopback port, fed with requests built by
`service.notifications.signing`.

Decision under test: a request that fails verification is answered 401 *and* listed at
GET /events with ``verified: false``, so a newcomer with the wrong secret sees that
notifications do arrive.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from service.devtools.inbox import MAX_EVENTS, InboxServer, create_inbox_app
from service.devtools.ports import free_port
from service.notifications.signing import (
    CLOUDEVENTS_CONTENT_TYPE,
    SignedRequest,
    cloudevents_body,
    new_secret,
    new_webhook_id,
    sign,
    standard_body,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 5.0
SECRET = new_secret()
GENERATION: dict[str, Any] = {
    "id": "gen_01JABC",
    "status": "succeeded",
    "result": {"uri": "gs://genrelay-dev/dev/2025/01/02/gen_01JABC.png"},
}


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def inbox(out: io.StringIO) -> Iterator[InboxServer]:
    with InboxServer([SECRET], out=out) as server:
        yield server


def _standard(
    secrets: list[str] | None = None,
    event_type: str = "generation.succeeded",
    data: dict[str, Any] | None = None,
) -> SignedRequest:
    now = dt.datetime.now(dt.UTC)
    body = standard_body(event_type, now, GENERATION if data is None else data)
    return sign(new_webhook_id(), now, body, secrets or [SECRET])


def _post(
    url: str, signed: SignedRequest | None = None, **kwargs: Any
) -> tuple[int, dict[str, Any] | None]:
    if signed is not None:
        kwargs.setdefault("data", signed.body)
        kwargs.setdefault("headers", signed.headers)
    with requests.post(url, timeout=TIMEOUT, **kwargs) as response:
        body = response.json() if response.content else None
        return response.status_code, body


def _events(inbox: InboxServer) -> list[dict[str, Any]]:
    with requests.get(f"{inbox.url}/events", timeout=TIMEOUT) as response:
        assert response.status_code == 200
        events: list[dict[str, Any]] = response.json()
        return events


def test_signed_notification_is_printed_and_listed(inbox: InboxServer, out: io.StringIO) -> None:
    signed = _standard()
    status, body = _post(f"{inbox.url}/", signed)
    assert (status, body) == (204, None)
    printed = out.getvalue()
    assert "generation.succeeded" in printed
    assert signed.headers["webhook-id"] in printed
    assert "gen_01JABC" in printed and "status succeeded" in printed
    assert "gs://genrelay-dev/dev/2025/01/02/gen_01JABC.png" in printed
    [event] = _events(inbox)
    assert event["webhook_id"] == signed.headers["webhook-id"]
    assert event["type"] == "generation.succeeded"
    assert event["verified"] is True
    assert event["body"] == json.loads(signed.body)
    assert dt.datetime.fromisoformat(event["received_at"]).tzinfo is not None


def test_any_path_is_accepted(inbox: InboxServer, out: io.StringIO) -> None:
    status, _ = _post(f"{inbox.url}/hooks/genrelay", _standard())
    assert status == 204
    assert "/hooks/genrelay" in out.getvalue()


def test_failed_generation_shows_its_error(inbox: InboxServer, out: io.StringIO) -> None:
    data = {
        "id": "gen_2",
        "status": "failed",
        "error": {"code": "upstream_rejected", "message": "no credits"},
    }
    status, _ = _post(inbox.url, _standard(event_type="generation.failed", data=data))
    assert status == 204
    assert "upstream_rejected: no credits" in out.getvalue()


def test_either_rotated_secret_is_accepted(out: io.StringIO) -> None:
    old, new = new_secret(), new_secret()
    with InboxServer([old, new], out=out) as inbox:
        for secrets in ([old], [new], [new_secret(), new]):
            status, _ = _post(inbox.url, _standard(secrets))
            assert status == 204
        assert [e["verified"] for e in _events(inbox)] == [True, True, True]


def test_wrong_secret_is_rejected_and_listed_unverified(
    inbox: InboxServer, out: io.StringIO
) -> None:
    signed = _standard([new_secret()])
    status, body = _post(inbox.url, signed)
    assert status == 401
    assert body is not None and "signature" in body["error"]
    [warning] = out.getvalue().splitlines()
    assert "rejected" in warning and signed.headers["webhook-id"] in warning
    [event] = _events(inbox)
    assert event["verified"] is False
    assert event["webhook_id"] == signed.headers["webhook-id"]
    assert SECRET not in out.getvalue()


def test_missing_headers_are_rejected(inbox: InboxServer, out: io.StringIO) -> None:
    signed = _standard()
    status, body = _post(inbox.url, data=signed.body, headers={"content-type": "application/json"})
    assert status == 401
    assert body is not None and "Missing required headers" in body["error"]
    assert "(no webhook-id)" in out.getvalue()
    assert _events(inbox)[-1]["verified"] is False


def test_stale_timestamp_is_rejected(inbox: InboxServer) -> None:
    then = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=6)
    signed = sign(new_webhook_id(), then, standard_body("generation.failed", then, {}), [SECRET])
    status, body = _post(inbox.url, signed)
    assert status == 401
    assert body is not None and "too old" in body["error"]


@pytest.mark.parametrize(
    ("body", "header_changes"),
    [
        pytest.param(b"\xff\x00garbage\x1b[2J", {}, id="binary-body"),
        pytest.param(b"not json at all", {}, id="text-body"),
        pytest.param(b"", {}, id="empty-body"),
        pytest.param(b"{}", {"webhook-signature": "garbage"}, id="signature-without-comma"),
        pytest.param(b"{}", {"webhook-signature": "v1,%%%not-base64"}, id="signature-not-b64"),
        pytest.param(b"{}", {"webhook-signature": "v1,a,b v2"}, id="signature-extra-parts"),
        pytest.param(b"{}", {"webhook-timestamp": "soon"}, id="timestamp-text"),
        pytest.param(b"{}", {"webhook-timestamp": "1e400"}, id="timestamp-huge"),
        pytest.param(b"{}", {"webhook-timestamp": "nan"}, id="timestamp-nan"),
    ],
)
def test_garbage_with_valid_looking_headers_is_401_not_500(
    inbox: InboxServer, out: io.StringIO, body: bytes, header_changes: dict[str, str]
) -> None:
    headers = {**_standard().headers, **header_changes}
    status, answer = _post(inbox.url, data=body, headers=headers)
    assert status == 401
    assert answer is not None and "error" in answer
    assert "\x1b" not in out.getvalue()  # nothing from the request reaches the terminal raw
    assert _events(inbox)[-1]["verified"] is False


def test_signed_body_that_is_not_a_json_object_is_400(inbox: InboxServer) -> None:
    now = dt.datetime.now(dt.UTC)
    for body in (b"[1, 2]", "plain text é".encode()):
        status, answer = _post(inbox.url, sign(new_webhook_id(), now, body, [SECRET]))
        assert status == 400
        assert answer == {"error": "body is not a JSON object"}
    assert [e["verified"] for e in _events(inbox)] == [True, True]


def test_cloudevents_body_is_accepted(inbox: InboxServer, out: io.StringIO) -> None:
    webhook_id = new_webhook_id()
    now = dt.datetime.now(dt.UTC)
    body = cloudevents_body(
        "generation.succeeded", webhook_id, now, GENERATION, "/genrelay", GENERATION["id"]
    )
    signed = sign(webhook_id, now, body, [SECRET], content_type=CLOUDEVENTS_CONTENT_TYPE)
    status, _ = _post(inbox.url, signed)
    assert status == 204
    printed = out.getvalue()
    assert "generation.succeeded" in printed
    assert f"cloudevent   id {webhook_id}  source /genrelay" in printed
    assert "gen_01JABC" in printed and GENERATION["result"]["uri"] in printed
    [event] = _events(inbox)
    assert (event["type"], event["webhook_id"], event["verified"]) == (
        "generation.succeeded",
        webhook_id,
        True,
    )


def test_only_the_last_events_are_kept(out: io.StringIO) -> None:
    app = create_inbox_app([SECRET], out=out)
    client = app.test_client()
    sent = []
    for _ in range(MAX_EVENTS + 5):
        signed = _standard()
        sent.append(signed.headers["webhook-id"])
        assert client.post("/", data=signed.body, headers=signed.headers).status_code == 204
    listed = client.get("/events").get_json()
    assert [e["webhook_id"] for e in listed] == sent[-MAX_EVENTS:]


def test_other_methods_and_paths_answer_json(inbox: InboxServer) -> None:
    with requests.get(f"{inbox.url}/", timeout=TIMEOUT) as response:
        assert response.status_code == 405
        assert "POST" in response.headers["Allow"]
        assert "error" in response.json()


def test_app_refuses_missing_or_invalid_secrets() -> None:
    with pytest.raises(ValueError, match="at least one"):
        create_inbox_app([])
    with pytest.raises(ValueError, match="#2") as info:
        create_inbox_app([SECRET, "whsec_abcde"])
    assert "abcde" not in str(info.value)
    with pytest.raises(TypeError):
        create_inbox_app(SECRET)


def test_concurrent_deliveries_print_whole_blocks(inbox: InboxServer, out: io.StringIO) -> None:
    requests_ = [_standard() for _ in range(20)]
    threads = [threading.Thread(target=_post, args=(inbox.url, r)) for r in requests_]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    blocks = [b for b in out.getvalue().split("\n\n") if b.strip()]
    assert len(blocks) == 20
    for block in blocks:
        assert block.lstrip().startswith("[") and "webhook-id" in block


def _thread_names(threads: set[threading.Thread]) -> list[str]:
    return sorted(t.name for t in threads)


def test_stop_leaves_no_threads_running(out: io.StringIO) -> None:
    before = set(threading.enumerate())
    inbox = InboxServer([SECRET], out=out)
    with inbox, requests.Session() as session:
        # A kept-alive connection: its server thread must be ended by stop() too.
        signed = _standard()
        with session.post(inbox.url, data=signed.body, headers=signed.headers, timeout=5) as r:
            assert r.status_code == 204
        with session.get(f"{inbox.url}/events", timeout=5) as r:
            assert r.status_code == 200
        inbox.stop()
        assert _thread_names(set(threading.enumerate()) - before) == []
    inbox.stop()  # idempotent


def test_server_url_and_restart_rules(out: io.StringIO) -> None:
    inbox = InboxServer([SECRET], out=out)
    with pytest.raises(RuntimeError):
        _ = inbox.url
    inbox.stop()  # never started: still fine
    with pytest.raises(RuntimeError):
        inbox.start()
    with InboxServer([SECRET], out=out) as other:
        assert other.url.startswith("http://127.0.0.1:")


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.devtools.inbox", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("secret_from", ["flag", "env"])
def test_cli_serves_until_sigterm(secret_from: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if secret_from == "flag":
        proc = _run_cli(["--port", str(port), "--secret", SECRET])
    else:
        proc = _run_cli(["--port", str(port)], env={"GENRELAY_INBOX_SECRETS": f" {SECRET} ,"})
    try:

        def answers() -> bool:
            try:
                with requests.get(f"{url}/events", timeout=1) as response:
                    return response.status_code == 200
            except requests.ConnectionError:
                return False

        assert _wait_until(answers, timeout=10)
        signed = _standard()
        assert _post(url, signed)[0] == 204
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert signed.headers["webhook-id"] in stdout
    assert f"listening on {url}" in stderr
    secret_body = SECRET.removeprefix("whsec_")
    assert secret_body not in stdout and secret_body not in stderr


def test_cli_without_a_secret_exits_2() -> None:
    proc = _run_cli(["--port", "0"], env={"GENRELAY_INBOX_SECRETS": ""})
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert "--secret" in stderr
