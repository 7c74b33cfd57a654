"""Results where the tenant wants them: its `output` bucket and prefix, `result.url` in
notifications, GET/DELETE /v1/generations/{id}/result, and retention (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.parse
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from service.adapters.blobstore import GcsBlobStore, TransientBlobError, crc32c_base64
from service.models import Delivery, Task
from service.tenants import Tenants
from tests.gcp_helpers import (  # noqa: F401
    GcpStack,
    gcp,
    gcp_config,
    public_key_of,
    signer_info,
    verify_v4_signature,
)
from tests.helpers import Receiver, drain

TEXT = {"width": 64, "height": 48, "background": {"generate": {"description": "a lighthouse"}}}


def create(stack: GcpStack, **extra: Any) -> dict[str, Any]:
    answer = stack.client.post("/v1/generations", json={"input": TEXT, **extra}, headers=stack.auth)
    assert answer.status_code == 202, answer.json
    return answer.json  # type: ignore[no-any-return]


def show(stack: GcpStack, generation_id: str) -> dict[str, Any]:
    answer = stack.client.get(f"/v1/generations/{generation_id}", headers=stack.auth)
    assert answer.status_code == 200
    return answer.json  # type: ignore[no-any-return]


def download(url: str) -> bytes:
    with requests.get(url, timeout=5) as answer:
        assert answer.status_code == 200, url
        return answer.content


def test_results_go_to_the_tenants_output_and_links_serve_them(gcp: GcpStack) -> None:  # noqa: F811
    out = gcp.bucket()
    Tenants(gcp.services.store).set("acme", output=f"gs://{out}/renders/")
    receiver = Receiver()
    try:
        made = create(gcp, webhook=receiver.url, webhook_events_filter=["generation.succeeded"])
        drain(gcp.services)
    finally:
        receiver.stop()
    shown = show(gcp, made["id"])
    assert shown["status"] == "succeeded", shown
    uri = shown["result"]["uri"]
    created = dt.datetime.fromisoformat(shown["created_at"])
    assert uri.startswith(f"gs://{out}/renders/ten_")
    assert uri.endswith(f"/{created:%Y/%m/%d}/{made['id']}.png")
    name = uri.removeprefix(f"gs://{out}/")
    stored = gcp.blobs.for_bucket(out).stat(name)
    assert stored is not None and stored.crc32c == shown["result"]["crc32c"]

    # The resource's link: signed by the key, and it serves the stored bytes.
    data = download(shown["result"]["url"])
    assert crc32c_base64(data) == stored.crc32c
    verify_v4_signature(shown["result"]["url"], public_key_of(gcp.signer_info))

    # The notification carries a link too, signed once for every attempt of the delivery,
    # valid for two whole retry schedules; the delivery's stored bytes are what was sent.
    (request,) = receiver.requests
    body = json.loads(request["body"])
    assert body["type"] == "generation.succeeded"
    link = body["data"]["result"]["url"]
    assert download(link) == data
    verify_v4_signature(link, public_key_of(gcp.signer_info))
    expires = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["X-Goog-Expires"][0]
    assert int(expires) == int(gcp.services.config.notification_url_ttl)
    assert int(expires) > sum(gcp.services.config.webhook_retry_schedule)
    with gcp.services.store.read() as session:
        (delivery,) = session.scalars(sa.select(Delivery)).all()
    assert delivery.body.encode() == request["body"]

    # GET .../result redirects to a fresh signed URL of the same object.
    redirect = gcp.client.get(f"/v1/generations/{made['id']}/result", headers=gcp.auth)
    assert redirect.status_code == 302
    assert redirect.headers["Location"].startswith(f"{gcp.gcs.url}/{out}/renders/")
    assert download(redirect.headers["Location"]) == data


def test_result_link_answers_for_missing_unfinished_and_unsignable(
    gcp: GcpStack,  # noqa: F811
    make_client: Any,
    config: Any,
) -> None:
    assert gcp.client.get("/v1/generations/gen_nope/result", headers=gcp.auth).status_code == 404
    unfinished = create(gcp)  # nothing stores its result until a worker runs
    answer = gcp.client.get(f"/v1/generations/{unfinished['id']}/result", headers=gcp.auth)
    assert show(gcp, unfinished["id"])["status"] in ("queued", "processing")
    assert answer.status_code == 409
    assert answer.content_type == "application/problem+json"

    services, client, auth = make_client(config)  # anonymous emulator client: cannot sign
    answer = client.post("/v1/generations", json={"input": TEXT}, headers=auth)
    drain(services)
    unsignable = client.get(f"/v1/generations/{answer.json['id']}/result", headers=auth)
    assert unsignable.status_code == 501
    assert "gs://" in unsignable.json["detail"]


def test_delete_removes_the_object_at_once_and_the_generation_stays(gcp: GcpStack) -> None:  # noqa: F811
    made = create(gcp)
    drain(gcp.services)
    shown = show(gcp, made["id"])
    name = shown["result"]["uri"].removeprefix(f"gs://{gcp.blobs.bucket}/")
    assert gcp.blobs.stat(name) is not None

    events = f"/v1/events?generation_id={made['id']}&type=generation.succeeded"
    [linked] = gcp.client.get(events, headers=gcp.auth).json["data"]
    assert "url" in linked["data"]["result"]

    deleted = gcp.client.delete(f"/v1/generations/{made['id']}/result", headers=gcp.auth)
    assert deleted.status_code == 200
    assert gcp.blobs.stat(name) is None
    # The feed keeps the event, without its link to the object now gone.
    [unlinked] = gcp.client.get(events, headers=gcp.auth).json["data"]
    assert "url" not in unlinked["data"]["result"]
    assert unlinked["data"]["result"]["uri"] == linked["data"]["result"]["uri"]
    alone = gcp.client.get(f"/v1/events/{linked['id']}", headers=gcp.auth).json
    assert alone == unlinked
    # Its other events (no result: queued, processing) are shown on the same page as they
    # are; with them, the whole feed answered 500.
    for page in (f"/v1/events?generation_id={made['id']}", "/v1/events"):
        feed = gcp.client.get(page, headers=gcp.auth)
        assert feed.status_code == 200, feed.json
        shown_events = {e["type"]: e for e in feed.json["data"]}
        assert shown_events["generation.succeeded"] == unlinked
        assert shown_events["generation.processing"]["data"]["result"] is None
    after = show(gcp, made["id"])
    assert after["status"] == "succeeded"
    assert "url" not in after["result"]
    assert dt.datetime.fromisoformat(after["result"]["expired_at"]) <= dt.datetime.now(dt.UTC)
    assert after["result"]["uri"] == shown["result"]["uri"]
    gone = gcp.client.get(f"/v1/generations/{made['id']}/result", headers=gcp.auth)
    assert gone.status_code == 410
    again = gcp.client.delete(f"/v1/generations/{made['id']}/result", headers=gcp.auth)
    assert again.status_code == 200
    assert again.json["result"]["expired_at"] == after["result"]["expired_at"]


def test_retention_deletes_the_object_when_it_runs_out(gcp: GcpStack) -> None:  # noqa: F811
    Tenants(gcp.services.store).set("acme", retention=3600)
    kept = create(gcp)
    short = create(gcp, retention=1)
    assert kept["retention"] == 3600 and short["retention"] == 1
    drain(gcp.services)
    names = {}
    for made in (kept, short):
        shown = show(gcp, made["id"])
        assert shown["status"] == "succeeded"
        names[made["id"]] = shown["result"]["uri"].removeprefix(f"gs://{gcp.blobs.bucket}/")
    with gcp.services.store.read() as session:
        due = {
            t.generation_id: t.run_at
            for t in session.scalars(sa.select(Task).where(Task.kind == "expire_result"))
        }
    assert set(due) == {kept["id"], short["id"]}
    assert due[kept["id"]] - due[short["id"]] > dt.timedelta(minutes=59)

    time.sleep(1.2)
    drain(gcp.services)
    assert gcp.blobs.stat(names[short["id"]]) is None
    assert "expired_at" in show(gcp, short["id"])["result"]
    assert gcp.blobs.stat(names[kept["id"]]) is not None
    assert "expired_at" not in show(gcp, kept["id"])["result"]


def run_due(stack: GcpStack, kind: str) -> str | None:
    """Make the one pending task of `kind` due, claim it and run it once; its new status."""
    with stack.services.store.transaction() as session:
        session.execute(
            sa.update(Task)
            .where(Task.kind == kind, Task.status == "pending")
            .values(run_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    [task] = stack.services.queue.claim_due_tasks(kinds=[kind])
    status = stack.services.runner.execute(task)
    return None if status is None else status.value


def test_retention_marks_the_result_expired_before_deleting_its_object(gcp: GcpStack) -> None:  # noqa: F811
    made = create(gcp, retention=60)
    drain(gcp.services)
    name = show(gcp, made["id"])["result"]["uri"].removeprefix(f"gs://{gcp.blobs.bucket}/")
    # First run: the mark alone. From then on no answer links to the object...
    assert run_due(gcp, "expire_result") == "pending"
    shown = show(gcp, made["id"])["result"]
    assert "expired_at" in shown and "url" not in shown
    assert gcp.blobs.stat(name) is not None
    assert (
        gcp.client.get(f"/v1/generations/{made['id']}/result", headers=gcp.auth).status_code == 410
    )
    # ...and the next run deletes it.
    assert run_due(gcp, "expire_result") == "done"
    assert gcp.blobs.stat(name) is None
    assert show(gcp, made["id"])["result"]["expired_at"] == shown["expired_at"]


def test_a_delete_that_fails_is_finished_by_the_worker(
    gcp: GcpStack,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = create(gcp)
    drain(gcp.services)
    name = show(gcp, made["id"])["result"]["uri"].removeprefix(f"gs://{gcp.blobs.bucket}/")

    def unavailable(self: GcsBlobStore, name: str) -> bool:
        raise TransientBlobError("GCS answered 503")

    with monkeypatch.context() as patched:
        patched.setattr(GcsBlobStore, "delete", unavailable)
        deleted = gcp.client.delete(f"/v1/generations/{made['id']}/result", headers=gcp.auth)
    assert deleted.status_code == 200 and "expired_at" in deleted.json["result"]
    assert gcp.blobs.stat(name) is not None  # still there: the worker deletes it
    with gcp.services.store.transaction() as session:
        [due] = session.scalars(
            sa.select(Task.run_at).where(
                Task.kind == "expire_result", Task.generation_id == made["id"]
            )
        ).all()
        assert due > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)  # a minute ahead
    assert run_due(gcp, "expire_result") == "done"
    assert gcp.blobs.stat(name) is None


def test_retention_must_be_whole_positive_seconds(gcp: GcpStack) -> None:  # noqa: F811
    for value in (0, -5, 1.5, "30d", 10**10):
        answer = gcp.client.post(
            "/v1/generations", json={"input": TEXT, "retention": value}, headers=gcp.auth
        )
        assert answer.status_code == 422, value
        assert [e["field"] for e in answer.json["errors"]] == ["retention"]
