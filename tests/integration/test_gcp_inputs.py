"""storage:// and gs:// in `input`: the tenant's allow-lists at intake, and gs:// inputs handed
to Deep-Image as V4 signed URLs that the simulator really downloads (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from service.devtools.simulator import SimulatorServer
from service.models import Base, Generation
from service.tenants import Tenants
from tests.gcp_helpers import (  # noqa: F401
    GcpStack,
    cannot_sign_for_good,
    gcp,
    gcp_config,
    png_bytes,
    public_key_of,
    signer_info,
    verify_v4_signature,
)
from tests.helpers import drain, set_simulator

TEXT = {"width": 64, "height": 64, "background": {"generate": {"description": "a lighthouse"}}}


def post(stack: GcpStack, request: dict[str, Any], **extra: Any) -> Any:
    body = {"input": request, **extra}
    return stack.client.post("/v1/generations", json=body, headers=stack.auth)


def fields_of(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.json
    assert response.content_type == "application/problem+json"
    return {e["field"]: e["message"] for e in response.json["errors"]}


def sim_job(simulator: SimulatorServer, job: str) -> dict[str, Any]:
    answer = requests.get(f"{simulator.url}/_sim/jobs/{job}", timeout=5)
    answer.raise_for_status()
    return answer.json()  # type: ignore[no-any-return]


def test_storage_names_not_on_the_tenants_list_are_refused_in_url_and_target(
    gcp: GcpStack,  # noqa: F811
) -> None:
    refused = post(gcp, {"url": "storage://ops_s3/in/a.png", "target": "storage://ops_s3/out/"})
    problems = fields_of(refused)
    assert set(problems) == {"input.url", "input.target"}
    assert "'ops_s3'" in problems["input.url"]

    Tenants(gcp.services.store).set("acme", storages=["acme_drive"])
    still = post(gcp, {"url": "storage://ops_s3/in/a.png"})
    assert set(fields_of(still)) == {"input.url"}
    target_only = post(gcp, {**TEXT, "target": "storage://ops_s3/out/"})
    assert set(fields_of(target_only)) == {"input.target"}


def test_storage_names_not_on_the_tenants_list_are_refused_in_background_replace(
    gcp: GcpStack,  # noqa: F811
) -> None:
    # The schema takes storage:// in background.replace as in url: the list applies there too.
    backdrop = {"remove": "auto", "replace": "storage://ops_s3/secret/backdrop.png"}
    refused = post(gcp, {"url": "https://example.com/a.png", "background": backdrop})
    problems = fields_of(refused)
    assert set(problems) == {"input.background.replace"}
    assert "'ops_s3'" in problems["input.background.replace"]

    Tenants(gcp.services.store).set("acme", storages=["acme_drive"])
    allowed = {"remove": "auto", "replace": "storage://acme_drive/backdrop.png"}
    accepted = post(gcp, {"url": "https://example.com/a.png", "background": allowed})
    assert accepted.status_code == 202, accepted.json


def test_an_allowed_storage_is_forwarded_as_it_is(
    gcp: GcpStack,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    Tenants(gcp.services.store).set("acme", storages=["acme_drive"])
    accepted = post(
        gcp, {"url": "storage://acme_drive/in/a.png", "target": "storage://acme_drive/o/"}
    )
    assert accepted.status_code == 202, accepted.json
    drain(gcp.services)
    shown = gcp.client.get(f"/v1/generations/{accepted.json['id']}", headers=gcp.auth).json
    job = sim_job(simulator, shown["upstream"]["job"])
    assert job["request"]["url"] == "storage://acme_drive/in/a.png"
    assert job["request"]["target"] == "storage://acme_drive/o/"


def test_gs_inputs_in_buckets_not_on_the_list_are_refused_naming_each_field(
    gcp: GcpStack,  # noqa: F811
) -> None:
    Tenants(gcp.services.store).set("acme", input_buckets=["allowed-bucket"])
    body = {
        "url": "gs://other-bucket/a.png",
        "background": {
            "replace": "gs://other-bucket/backdrop.png",
            "generate": {
                "description": "a face",
                "adapter_type": "face",
                "ip_image2": "gs://other-bucket/face.png",
                "context_images": ["gs://allowed-bucket/ok.png", "gs://third-bucket/b.png"],
            },
        },
        "caption": {"url": "gs://other-bucket/logo.png"},
    }
    problems = fields_of(post(gcp, body))
    assert set(problems) == {
        "input.url",
        "input.background.replace",
        "input.background.generate.ip_image2",
        "input.background.generate.context_images.1",
        "input.caption.url",
    }
    assert "'third-bucket'" in problems["input.background.generate.context_images.1"]


@pytest.mark.parametrize("value", ["gs://", "gs://bucket", "gs://bucket/", "gs://Bad_Bucket/a.png"])
def test_malformed_gs_references_are_refused_by_the_schema(
    gcp: GcpStack,  # noqa: F811
    value: str,
) -> None:
    assert "input.url" in fields_of(post(gcp, {"url": value}))


def test_a_gs_input_reaches_deep_image_as_a_signed_url_that_serves_the_object(
    gcp: GcpStack,  # noqa: F811
    simulator: SimulatorServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    set_simulator(simulator.url, fetch_inputs=True)
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    photo, backdrop = png_bytes(10, 7), png_bytes(5, 5, (0, 90, 200))
    url = gcp.upload(bucket, "shots/photo 1.png", photo)
    replace = gcp.upload(bucket, "backdrops/sea.png", backdrop)

    accepted = post(gcp, {"url": url, "background": {"replace": replace}})
    assert accepted.status_code == 202, accepted.json
    drain(gcp.services)
    shown = gcp.client.get(f"/v1/generations/{accepted.json['id']}", headers=gcp.auth).json
    assert shown["status"] == "succeeded", shown
    # What genrelay keeps is the gs:// form.
    assert shown["input"]["url"] == url
    assert shown["input"]["background"]["replace"] == replace

    job = sim_job(simulator, shown["upstream"]["job"])
    sent = job["request"]["url"]
    assert sent.startswith(f"{gcp.gcs.url}/{bucket}/shots/photo%201.png?")
    assert "X-Goog-Expires=900" in sent  # GENRELAY_INPUT_URL_TTL's default
    # fake-gcs-server ignores signatures: check this one against the key's public half, and
    # that the URL resolves to the object's bytes (the simulator downloaded it).
    verify_v4_signature(sent, public_key_of(gcp.signer_info))
    fetched = {f["field"]: f for f in job["fetched_inputs"]}
    assert fetched["url"]["sha256"] == hashlib.sha256(photo).hexdigest()
    assert fetched["background.replace"]["sha256"] == hashlib.sha256(backdrop).hexdigest()
    assert fetched["url"]["path"] == f"/{bucket}/shots/photo%201.png"

    # The inputs' signed URLs are nowhere in genrelay's database or logs (the result's own
    # signed link is in the succeeded event, by design: it names the output bucket).
    signed_inputs = (f"{bucket}/shots/photo%201.png?", f"{bucket}/backdrops/sea.png?")
    with gcp.services.store.read() as session:
        for table in Base.metadata.sorted_tables:
            for row in session.execute(sa.select(table)):
                shown_row = repr(tuple(row))
                assert not [s for s in signed_inputs if s in shown_row], table.name
    # genrelay's own loggers (the simulator's fetches run in this process and urllib3 logs
    # their URLs: that is the upstream's side, not genrelay's).
    ours = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("genrelay") and not r.name.startswith("genrelay.simulator")
    ]
    assert ours
    assert not [line for line in ours if "X-Goog-Signature" in line or bucket + "/" in line]


def test_an_object_that_is_not_there_fails_the_generation_as_deep_image_would(
    gcp: GcpStack,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    set_simulator(simulator.url, fetch_inputs=True)
    bucket = gcp.bucket()
    Tenants(gcp.services.store).set("acme", input_buckets=[bucket])
    accepted = post(gcp, {"url": f"gs://{bucket}/missing.png"})
    assert accepted.status_code == 202
    drain(gcp.services)
    shown = gcp.client.get(f"/v1/generations/{accepted.json['id']}", headers=gcp.auth).json
    assert shown["status"] == "failed"
    assert shown["error"] == {"code": "upstream_rejected", "message": "Unidentified image"}


def test_without_credentials_that_can_sign_a_gs_input_fails_with_input_unavailable(
    make_client: Any, config: Any
) -> None:
    services, client, auth = make_client(config)  # the anonymous emulator client cannot sign
    Tenants(services.store).set("acme", input_buckets=["some-bucket"])
    body = {"input": {"url": "gs://some-bucket/a.png"}}
    accepted = client.post("/v1/generations", json=body, headers=auth)
    assert accepted.status_code == 202
    drain(services)
    shown = client.get(f"/v1/generations/{accepted.json['id']}", headers=auth).json
    assert shown["status"] == "failed"
    assert shown["error"]["code"] == "input_unavailable"
    assert "GENRELAY_GCS_SIGNING_ACCOUNT" in shown["error"]["message"]


@pytest.mark.parametrize("signer", ["refused by IAM", "cannot refresh"])
def test_a_gs_input_whose_signing_is_refused_fails_without_googles_text(
    make_client: Any,
    config: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    signer: str,
) -> None:
    services, client, auth = make_client(config)
    Tenants(services.store).set("acme", input_buckets=["some-bucket"])
    cannot_sign_for_good(monkeypatch, services.blobs, signer)
    accepted = client.post(
        "/v1/generations", json={"input": {"url": "gs://some-bucket/a.png"}}, headers=auth
    )
    assert accepted.status_code == 202
    with caplog.at_level(logging.ERROR, logger="genrelay"):
        drain(services)
    shown = client.get(f"/v1/generations/{accepted.json['id']}", headers=auth).json
    assert shown["status"] == "failed"
    assert shown["error"]["code"] == "input_unavailable"
    message = shown["error"]["message"]
    assert message.startswith("input.url names gs://some-bucket/…, but signing its URL was refused")
    for internal in ("IAM", "Error", "signBlob", "PERMISSION_DENIED", "refresh"):
        assert internal not in message
    # The operator's log has Google's answer.
    logged = [r.getMessage() for r in caplog.records if r.name == "genrelay.inputs"]
    assert len(logged) == 1 and ("PERMISSION_DENIED" in logged[0] or "refresh" in logged[0])


def test_a_batch_item_is_held_to_the_same_storage_and_bucket_lists(
    gcp: GcpStack,  # noqa: F811
) -> None:
    items = [
        {"input": TEXT},
        {"input": {"url": "storage://ops_s3/in/a.png"}},
        {"input": {"url": "gs://someone-elses-bucket/a.png"}},
    ]
    refused = gcp.client.post("/v1/batches", json={"items": items}, headers=gcp.auth)
    assert refused.status_code == 422, refused.json
    assert set(fields_of(refused)) == {"items[1].input.url", "items[2].input.url"}
    with gcp.services.store.read() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Generation)) == 0
