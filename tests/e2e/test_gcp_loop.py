"""The GCP loop end to end, every component its own process: fake-gcs-server, the simulator
downloading its inputs (`--fetch-inputs`), `genrelay serve` and `genrelay worker`.

An object uploaded to the tenant's input bucket is announced by an Eventarc CloudEvent and,
separately, a Pub/Sub GCS notification, each with a Google-style ID token the test mints and
whose certificates it serves; the same event pushed twice makes one generation; Deep-Image
(the simulator) downloads the signed gs:// input; the result lands under the tenant's output
prefix; the notification's `result.url` downloads the same bytes; a retention runs out and the
object is deleted."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from service.adapters.blobstore import crc32c_base64
from service.devtools.ports import free_port
from tests.conftest import emulator_blob_store, new_postgres_database
from tests.e2e.processes import GENRELAY, Stack, wait_for
from tests.gcp_helpers import OidcIssuer, new_key, png_bytes, service_account_info
from tests.helpers import Receiver

pytestmark = pytest.mark.e2e

PUSHER = "eventarc-trigger@acme-prod.iam.gserviceaccount.com"


def run(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [GENRELAY, *args], env=env, capture_output=True, timeout=60, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def loop(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sqlite_template: Path,
    gcs_server: Any,
) -> Iterator[dict[str, Any]]:
    """One stack per database, shared by this module's tests: each makes its own trigger and
    objects and checks only those. A database of its own (the per-test `database_url` fixture
    empties the session's PostgreSQL database meanwhile)."""
    with contextlib.ExitStack() as later:
        tmp_path = tmp_path_factory.mktemp(f"gcp-loop-{request.param}")
        if request.param == "sqlite":
            shutil.copy(sqlite_template, tmp_path / "genrelay.db")
            database_url = f"sqlite:///{tmp_path / 'genrelay.db'}"
        else:
            database_url = later.enter_context(new_postgres_database())
        gcs_bucket = f"genrelay-test-{uuid.uuid4().hex[:12]}"
        gcs_server.create_bucket(gcs_bucket)
        issuer = OidcIssuer()
        later.callback(issuer.stop)
        yield later.enter_context(
            running_loop(tmp_path, database_url, gcs_server, gcs_bucket, issuer)
        )


@contextlib.contextmanager
def running_loop(
    tmp_path: Path, database_url: str, gcs_server: Any, gcs_bucket: str, issuer: OidcIssuer
) -> Iterator[dict[str, Any]]:
    sim_port, web_port = free_port(), free_port()
    key_file = tmp_path / "signer.json"
    key_file.write_text(json.dumps(service_account_info()))
    inputs, outputs = f"in-{uuid.uuid4().hex[:10]}", f"out-{uuid.uuid4().hex[:10]}"
    gcs_server.create_bucket(inputs)
    gcs_server.create_bucket(outputs)
    env = {
        **os.environ,
        "GENRELAY_DATABASE_URL": database_url,
        "GENRELAY_DEEPIMAGE_URL": f"http://127.0.0.1:{sim_port}",
        "GENRELAY_DEEPIMAGE_API_KEY": "sim-key",
        "GENRELAY_PUBLIC_URL": f"http://127.0.0.1:{web_port}",
        "GENRELAY_CALLBACK_SECRET": "e2e-callback-secret-0123456789",
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
        "GENRELAY_GCS_BUCKET": gcs_bucket,
        "STORAGE_EMULATOR_HOST": gcs_server.url,
        # A service-account key signs the input and result URLs (the emulator ignores them).
        "GOOGLE_APPLICATION_CREDENTIALS": str(key_file),
        "GENRELAY_OIDC_CERTS_URL": issuer.certs_url,
        "GENRELAY_WEB_PROCESSES": "1",
        "PORT": str(web_port),
    }
    stack = Stack(tmp_path, env)
    receiver = Receiver()
    try:
        run(env, "migrate")
        api_key = run(env, "keys", "create", "acme").strip()
        run(env, "tenants", "set", "acme", "--allow-input-bucket", inputs,
            "--output", f"gs://{outputs}/renders")  # fmt: skip
        stack.start("simulator", "simulator", "--port", str(sim_port), "--processing-time",
                    "0.3", "--fetch-inputs")  # fmt: skip
        stack.start("serve", "serve")
        stack.start("worker", "worker", "--threads", "2", "--poll-interval", "0.1")
        base, sim = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{sim_port}"
        wait_for(lambda: stack.alive() and requests.get(f"{sim}/_sim/health", timeout=1).ok,
                 20, "the simulator")  # fmt: skip
        wait_for(lambda: stack.alive() and requests.get(f"{base}/readyz", timeout=1).ok,
                 30, "genrelay serve")  # fmt: skip
        yield {
            "base": base,
            "sim": sim,
            "auth": {"Authorization": f"Bearer {api_key}"},
            "blobs": emulator_blob_store(gcs_server.url, gcs_bucket),
            "inputs": inputs,
            "outputs": outputs,
            "receiver": receiver,
            "stack": stack,
            "issuer": issuer,
        }
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop_all()
        receiver.stop()


def finished(loop: dict[str, Any], generation_id: str, timeout: float = 30) -> dict[str, Any]:
    shown: dict[str, Any] = {}

    def done() -> bool:
        answer = requests.get(
            f"{loop['base']}/v1/generations/{generation_id}", headers=loop["auth"], timeout=5
        )
        shown.update(answer.json())
        return shown["status"] in ("succeeded", "failed", "canceled")

    wait_for(done, timeout, f"generation {generation_id}")
    return shown


def test_objects_become_generations_whose_results_land_in_the_tenants_output(
    loop: dict[str, Any],
) -> None:
    base, auth, receiver, issuer = loop["base"], loop["auth"], loop["receiver"], loop["issuer"]
    created = requests.post(
        f"{base}/v1/triggers",
        json={"source": "gcs", "bucket": loop["inputs"], "name_prefix": "incoming/",
              "input": {"width": 96, "height": 64}, "push_accounts": [PUSHER],
              "webhook": receiver.url},
        headers=auth,
        timeout=10,
    )  # fmt: skip
    assert created.status_code == 201, created.text
    trigger = created.json()
    assert trigger["push_url"] == f"{base}/v1/triggers/{trigger['id']}/push"
    token = issuer.token(trigger["audience"], PUSHER)
    photo, second = png_bytes(12, 9), png_bytes(7, 7, (10, 200, 10))
    inputs = loop["blobs"].for_bucket(loop["inputs"])
    for name, data in (("incoming/photo.png", photo), ("incoming/second.png", second)):
        inputs.write_new(name, io.BytesIO(data), content_type="image/png", metadata={},
                         size=len(data))  # fmt: skip

    # Eventarc: a CloudEvent in binary content mode; pushed twice, one generation.
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": "8456093487459374",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{loop['inputs']}",
        "ce-type": "google.cloud.storage.object.v1.finalized",
        "ce-subject": "objects/incoming/photo.png",
        "ce-time": "2026-12-05T10:00:00Z",
    }
    body = json.dumps({"bucket": loop["inputs"], "name": "incoming/photo.png", "size": "77"})
    pushes = [
        requests.post(trigger["push_url"], data=body, headers=headers, timeout=10) for _ in range(2)
    ]
    assert [p.status_code for p in pushes] == [200, 200], [p.text for p in pushes]
    assert [p.json()["duplicate"] for p in pushes] == [False, True]
    from_event = pushes[0].json()["event"]["generation_id"]

    # Pub/Sub: a GCS notification in a push envelope.
    envelope = {
        "message": {
            "data": base64.b64encode(b'{"kind": "storage#object"}').decode(),
            "attributes": {"eventType": "OBJECT_FINALIZE", "bucketId": loop["inputs"],
                           "objectId": "incoming/second.png"},
            "messageId": "13579",
            "publishTime": "2026-12-05T10:00:01Z",
        },
        "subscription": "projects/acme-prod/subscriptions/genrelay",
    }  # fmt: skip
    message = requests.post(
        trigger["push_url"], json=envelope, headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )  # fmt: skip
    assert message.status_code == 200 and message.json()["event"]["status"] == "accepted"
    from_message = message.json()["event"]["generation_id"]

    # Refused over the real server: a forged token, an account not on the list.
    forged = issuer.token(trigger["audience"], PUSHER, key=new_key())
    stranger = issuer.token(trigger["audience"], "stranger@else.iam.gserviceaccount.com")
    assert (
        requests.post(
            trigger["push_url"],
            data=body,
            timeout=10,
            headers={**headers, "Authorization": f"Bearer {forged}", "ce-id": "x1"},
        ).status_code
        == 401
    )
    for bad, status in ((forged, 401), (stranger, 403)):
        refused = requests.post(
            trigger["push_url"],
            data=body,
            headers={**headers, "Authorization": f"Bearer {bad}", "ce-id": f"bad-{status}"},
            timeout=10,
        )
        assert refused.status_code == status, refused.text

    for generation_id, source in ((from_event, photo), (from_message, second)):
        shown = finished(loop, generation_id)
        assert shown["status"] == "succeeded", shown
        # Deep-Image downloaded the object through its signed URL.
        job = requests.get(f"{loop['sim']}/_sim/jobs/{shown['upstream']['job']}", timeout=5)
        (fetched,) = job.json()["fetched_inputs"]
        assert fetched["sha256"] == hashlib.sha256(source).hexdigest()
        assert job.json()["request"]["url"].startswith("http://")
        assert shown["input"]["url"].startswith(f"gs://{loop['inputs']}/incoming/")
        # The result is in the tenant's output, and every link to it serves its bytes.
        assert shown["result"]["uri"].startswith(f"gs://{loop['outputs']}/renders/ten_")
        name = shown["result"]["uri"].removeprefix(f"gs://{loop['outputs']}/")
        stored = loop["blobs"].for_bucket(loop["outputs"]).stat(name)
        assert stored is not None and stored.crc32c == shown["result"]["crc32c"]
        with requests.get(shown["result"]["url"], timeout=5) as download:
            assert crc32c_base64(download.content) == stored.crc32c

    mine = {from_event, from_message}

    def succeeded_notifications() -> list[dict[str, Any]]:
        payloads = [json.loads(r["body"]) for r in list(receiver.requests)]
        return [
            p for p in payloads if p["type"] == "generation.succeeded" and p["data"]["id"] in mine
        ]

    wait_for(lambda: len(succeeded_notifications()) >= 2, 20, "notifications")
    notified = succeeded_notifications()
    assert sorted(p["data"]["id"] for p in notified) == sorted(mine)  # one each
    for payload in notified:
        with requests.get(payload["data"]["result"]["url"], timeout=5) as download:
            assert crc32c_base64(download.content) == payload["data"]["result"]["crc32c"]
    events = requests.get(f"{base}/v1/triggers/{trigger['id']}/events", headers=auth, timeout=5)
    assert sorted(e["event_id"] for e in events.json()["data"]) == ["13579", "8456093487459374"]


def test_a_generation_from_a_pubsub_message_is_deleted_when_its_retention_runs_out(
    loop: dict[str, Any],
) -> None:
    base, auth, issuer = loop["base"], loop["auth"], loop["issuer"]
    trigger = requests.post(
        f"{base}/v1/triggers",
        json={"source": "pubsub", "input": {"width": 64, "height": 64},
              "push_accounts": [PUSHER]},
        headers=auth,
        timeout=10,
    ).json()  # fmt: skip
    data = png_bytes()
    loop["blobs"].for_bucket(loop["inputs"]).write_new(
        "keep-briefly.png", io.BytesIO(data), content_type="image/png", metadata={},
        size=len(data),
    )  # fmt: skip
    request = {"input": {"url": f"gs://{loop['inputs']}/keep-briefly.png"}, "retention": 2}
    pushed = requests.post(
        trigger["push_url"],
        json={"message": {"data": base64.b64encode(json.dumps(request).encode()).decode(),
                          "messageId": "r-1"}, "subscription": "projects/p/subscriptions/s"},
        headers={"Authorization": f"Bearer {issuer.token(trigger['audience'], PUSHER)}"},
        timeout=10,
    )  # fmt: skip
    assert pushed.json()["event"]["status"] == "accepted", pushed.text
    shown = finished(loop, pushed.json()["event"]["generation_id"])
    assert shown["status"] == "succeeded" and shown["retention"] == 2
    name = shown["result"]["uri"].removeprefix(f"gs://{loop['outputs']}/")
    outputs = loop["blobs"].for_bucket(loop["outputs"])
    assert outputs.stat(name) is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and outputs.stat(name) is not None:
        time.sleep(0.2)
    assert outputs.stat(name) is None
    # The task records the deletion in the transaction that ends it, just after the delete.
    while True:
        after = requests.get(f"{base}/v1/generations/{shown['id']}", headers=auth, timeout=5)
        if "expired_at" in after.json()["result"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "expired_at" in after.json()["result"] and "url" not in after.json()["result"]
