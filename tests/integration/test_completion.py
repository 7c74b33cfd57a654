"""The completion path on real databases, the simulator over HTTP and fake-gcs-server:
callback -> store -> succeeded, polling, failures, and cancel winning.

Here the test plays Deep-Image's callback through the Flask test client; the e2e tests let
the simulator call a real gunicorn.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import socket
import threading
import time
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from PIL import Image

from service.adapters.blobstore import crc32c_base64
from service.adapters.deepimage import PermanentUpstreamError, UpstreamJob
from service.app import create_app
from service.bootstrap import Services, build_services
from service.config import Config
from service.devtools.fakes import FakeBlobStore
from service.devtools.gcs_emulator import FakeGcsServer
from service.domain import ErrorCode
from service.generations.callback_urls import callback_url
from service.generations.line import IN_FLIGHT
from service.models import Generation, Task, utcnow
from service.runtime.kinds import POLL, STORE
from service.runtime.queue import RetryPolicy
from service.runtime.worker import Worker
from tests.conftest import SIMULATOR_KEY, emulator_blob_store
from tests.helpers import deadlocked_on_the_account, drain, seed_examples, set_simulator

SECRET = "completion-test-secret-0123456789"
TEXT_ONLY = seed_examples()["text_only"]
PUBLIC = "http://127.0.0.1:9"  # where the simulator's own callbacks go: nobody listens
# A result URL on an allowed host (Deep-Image's result store) that no test downloads.
ELSEWHERE = "https://neuroapi-store.s3.eu-central-1.amazonaws.com/2024-03-07/a.jpg"


def callback_config(config: Config, **changes: Any) -> Config:
    """Callback mode: a public URL and a secret; polling only as a late fallback."""
    return config.replace(
        public_url=PUBLIC, callback_secret=SECRET, **{"reconcile_after": 3600.0, **changes}
    )


def create(client: Any, auth: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/generations", json=body, headers=auth)
    assert response.status_code == 202, response.json
    return response.json  # type: ignore[no-any-return]


def wait_until_complete(simulator: Any, job: str) -> str:
    """Deep-Image's result URL of `job`, once the simulator has finished it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        result = requests.get(
            f"{simulator.url}/rest_api/result/{job}",
            headers={"x-api-key": SIMULATOR_KEY},
            timeout=5,
        ).json()
        if result.get("status") == "complete":
            return str(result["result_url"])
        time.sleep(0.05)
    raise AssertionError(f"job {job} did not complete")


def call_back(client: Any, generation: dict[str, Any], source: str | None, **overrides: Any) -> Any:
    """POST what Deep-Image posts, to the URL genrelay gave it."""
    url = callback_url("http://localhost", SECRET, generation["id"]).removeprefix(
        "http://localhost"
    )
    payload = {
        "job": generation["upstream"]["job"],
        "data": generation["input"],
        "result_url": source,
        "results": None,
        **overrides,
    }
    return client.post(url, json=payload)


def app_on(config: Config, store: Any, blobs: Any) -> tuple[Services, Any, dict[str, str]]:
    """Services on `blobs`, a test client of their app and an API key's header; the caller
    closes the services' clients."""
    services = build_services(config, store=store, blobs=blobs)
    client = create_app(config, services=services).test_client()
    return services, client, {"Authorization": "Bearer " + services.api_keys.create("acme")}


def objects(services: Services) -> dict[str, bytes]:
    """Every object in the test bucket, by name."""
    client = services.blobs._client  # type: ignore[attr-defined]
    bucket = client.bucket(services.blobs.bucket)
    return {blob.name: blob.download_as_bytes() for blob in client.list_blobs(bucket)}


def tasks_of(services: Services, kind: str) -> list[Task]:
    with services.store.read() as session:
        return list(session.scalars(sa.select(Task).where(Task.kind == kind)))


@pytest.mark.parametrize(
    ("name", "size", "content_type"),
    [("text_only", (2048, 1024), "image/png"), ("generative_upscale", (3000, 3000), "image/jpeg")],
)
def test_polling_only_mode_stores_the_result_and_records_what_was_stored(
    client: Any,
    auth: dict[str, str],
    services: Services,
    gcs_bucket: str,
    name: str,
    size: tuple[int, int],
    content_type: str,
) -> None:
    generation = create(client, auth, {"input": seed_examples()[name]})
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    [(object_name, data)] = objects(services).items()
    created = generation["created_at"]
    assert object_name == (
        f"{_tenant(services, generation['id'])}/"
        f"{created[:4]}/{created[5:7]}/{created[8:10]}/{generation['id']}."
        f"{'png' if content_type == 'image/png' else 'jpg'}"
    )
    assert result["uri"] == f"gs://{gcs_bucket}/{object_name}"
    assert result["content_type"] == content_type
    assert result["size"] == len(data)
    assert result["crc32c"] == crc32c_base64(data)
    assert (result["width"], result["height"]) == size
    assert Image.open(io.BytesIO(data)).size == size
    assert "url" not in result  # anonymous emulator credentials cannot sign
    assert done["completed_at"] is not None


def _tenant(services: Services, generation_id: str) -> str:
    with services.store.read() as session:
        generation = session.get(Generation, generation_id)
    assert generation is not None
    return generation.tenant_id


def test_a_callback_is_stored_once_and_duplicates_are_no_ops(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    result_url = wait_until_complete(simulator, generation["upstream"]["job"])
    first = call_back(client, generation, result_url)
    again = call_back(client, generation, result_url)
    assert (first.status_code, first.json) == (200, {"outcome": "accepted"})
    assert (again.status_code, again.json) == (200, {"outcome": "duplicate"})
    assert len(tasks_of(services, STORE)) == 1
    drain(services)
    assert client.get(f"/v1/generations/{generation['id']}", headers=auth).json["status"] == (
        "succeeded"
    )
    late = call_back(client, generation, result_url)
    assert (late.status_code, late.json) == (200, {"outcome": "ignored"})
    assert len(objects(services)) == 1


def test_a_callback_retires_the_fallback_poll_so_no_worker_claims_it(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(callback_config(config, reconcile_after=0.0))
    generation = create(client, auth, {"input": TEXT_ONLY})
    (poll,) = tasks_of(services, POLL)
    assert (poll.status, poll.attempts) == ("pending", 0)  # due now: a worker could claim it
    result_url = wait_until_complete(simulator, generation["upstream"]["job"])
    assert call_back(client, generation, result_url).status_code == 200
    (poll,) = tasks_of(services, POLL)
    assert (poll.status, poll.attempts) == ("done", 0)
    assert poll.last_error == "the result was found before it ran"
    claimed = services.queue.claim_due_tasks(limit=10)
    assert [task.kind for task in claimed] == [STORE]


@pytest.mark.parametrize("token_of", ["nobody", "another generation"])
def test_a_forged_callback_is_401_and_changes_nothing(
    config: Config, make_client: Any, token_of: str
) -> None:
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    other = create(client, auth, {"input": TEXT_ONLY})
    token = "0" * 64
    if token_of == "another generation":  # a real token, but not this generation's
        token = callback_url("", SECRET, other["id"]).rsplit("/", 1)[1]
    payload = {
        "job": generation["upstream"]["job"],
        "result_url": ELSEWHERE,
        "data": {},
        "results": None,
    }
    response = client.post(f"/v1/callbacks/deepimage/{generation['id']}/{token}", json=payload)
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    assert tasks_of(services, STORE) == []
    with services.store.read() as session:
        stored = session.get(Generation, generation["id"])
    assert stored is not None
    assert (stored.status, stored.source_url) == ("processing", None)


def test_a_forged_callback_with_garbage_body_is_still_401(config: Config, make_client: Any) -> None:
    _services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    response = client.post(
        f"/v1/callbacks/deepimage/{generation['id']}/{'0' * 64}",
        data="{not json",
        content_type="text/plain",
    )
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("generation_id", "token"), [("gen_x", "%C3%A9"), ("gen_x", "%FF"), ("gen_%C3%A9", "0" * 64)]
)
def test_a_callback_with_a_non_ascii_token_or_id_is_401(
    config: Config, make_client: Any, generation_id: str, token: str
) -> None:
    _services, client, _auth = make_client(callback_config(config))
    response = client.post(f"/v1/callbacks/deepimage/{generation_id}/{token}", json={"job": "j"})
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_callback_is_read_as_json_whatever_its_content_type(
    config: Config, make_client: Any, content_type: str | None
) -> None:
    # Deep-Image documents none: a 415 would lose the callback until the fallback poll.
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    url = callback_url("", SECRET, generation["id"])
    body = json.dumps({"job": generation["upstream"]["job"], "result_url": ELSEWHERE})
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = client.post(url, data=body.encode(), headers=headers)
    assert (response.status_code, response.json) == (200, {"outcome": "accepted"})
    assert len(tasks_of(services, STORE)) == 1
    # Still refused when it is not JSON at all.
    garbage = client.post(url, data=b"job=1", headers=headers)
    assert garbage.status_code == 400
    assert garbage.mimetype == "application/problem+json"


def test_a_content_coded_callback_is_a_415_once_its_token_is_checked(
    config: Config, make_client: Any
) -> None:
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    url = callback_url("", SECRET, generation["id"])
    body = json.dumps({"job": generation["upstream"]["job"], "result_url": ELSEWHERE})
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = client.post(url, data=gzip.compress(body.encode()), headers=headers)
    assert response.status_code == 415, response.json
    assert response.mimetype == "application/problem+json"
    assert "Content-Encoding" in response.json["detail"]
    assert tasks_of(services, STORE) == []
    forged = client.post(f"/v1/callbacks/deepimage/{generation['id']}/{'0' * 64}", headers=headers)
    assert forged.status_code == 401


def test_a_callback_for_an_unknown_generation_is_404(config: Config, make_client: Any) -> None:
    _services, client, _auth = make_client(callback_config(config))
    ghost = {"id": "gen_does_not_exist", "upstream": {"job": "j"}, "input": {}}
    assert call_back(client, ghost, ELSEWHERE).status_code == 404


@pytest.mark.parametrize(
    ("overrides", "status", "field"),
    [
        ({"job": "not-the-job"}, 409, None),
        ({"result_url": "not a url"}, 422, "result_url"),
        ({"job": None}, 422, "job"),
    ],
)
def test_a_callback_with_the_wrong_job_or_a_bad_body_is_refused(
    config: Config,
    make_client: Any,
    overrides: dict[str, Any],
    status: int,
    field: str | None,
) -> None:
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    response = call_back(client, generation, ELSEWHERE, **overrides)
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    if field:
        assert [e["field"] for e in response.json["errors"]] == [field]
    assert tasks_of(services, STORE) == []


def test_a_canceled_generation_ignores_its_callback_and_writes_nothing(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    client.post(f"/v1/generations/{generation['id']}/cancel", headers=auth)
    result_url = wait_until_complete(simulator, generation["upstream"]["job"])
    response = call_back(client, generation, result_url)
    assert (response.status_code, response.json) == (200, {"outcome": "ignored"})
    drain(services)
    assert objects(services) == {}
    assert client.get(f"/v1/generations/{generation['id']}", headers=auth).json["status"] == (
        "canceled"
    )


def test_a_generation_canceled_while_its_result_waits_is_never_stored(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    call_back(client, generation, wait_until_complete(simulator, generation["upstream"]["job"]))
    client.post(f"/v1/generations/{generation['id']}/cancel", headers=auth)
    drain(services)  # the store task finds the generation canceled
    assert objects(services) == {}


def test_a_lost_callback_is_reconciled_by_polling(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(callback_config(config, reconcile_after=0.2))
    set_simulator(simulator.url, lost_callback_rate=1.0)
    generation = create(client, auth, {"input": TEXT_ONLY})
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert done["status"] == "succeeded"
    assert len(objects(services)) == 1


def test_a_polled_result_without_a_status_but_with_its_url_is_stored(
    config: Config, make_client: Any, simulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `status` is optional in Deep-Image's OpenAPI description of a ProcessResult: an answer
    # with only `job` and `result_url` is a finished job (polled, and confirmed by the store).
    services, client, auth = make_client(callback_config(config, reconcile_after=0.2))
    set_simulator(simulator.url, lost_callback_rate=1.0)
    generation = create(client, auth, {"input": TEXT_ONLY})
    job = generation["upstream"]["job"]
    url = wait_until_complete(simulator, job)
    status_less = UpstreamJob(job=job, status=None, result_url=url)
    monkeypatch.setattr(services.deepimage, "result", lambda asked: status_less)
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert done["status"] == "succeeded", done["error"]
    assert len(objects(services)) == 1


def test_an_upstream_job_failure_fails_the_generation(
    client: Any, auth: dict[str, str], services: Services, simulator: Any
) -> None:
    set_simulator(simulator.url, failure_rate=1.0)
    generation = create(client, auth, {"input": TEXT_ONLY})
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert done["status"] == "failed"
    assert done["error"]["code"] == "upstream_job_failed"
    assert "technical issues" in done["error"]["message"]
    assert objects(services) == {}


def wait_until_failed(simulator: Any, job: str) -> None:
    """Once the simulator has failed `job`."""
    deadline = time.monotonic() + 10
    url = f"{simulator.url}/rest_api/result/{job}"
    while (
        requests.get(url, headers={"x-api-key": SIMULATOR_KEY}, timeout=5).json().get("status")
        != "failed"
    ):
        assert time.monotonic() < deadline, "the simulator's job did not fail"
        time.sleep(0.05)


def test_a_callback_without_a_result_for_a_canceled_job_hands_its_slot_on_now(
    config: Config, make_client: Any, simulator: Any
) -> None:
    """A canceled generation keeps its slot while its job runs; a result's callback hands it
    on at once, and one without a result kept it until the fallback poll, an hour here."""
    services, client, auth = make_client(callback_config(config))
    set_simulator(simulator.url, failure_rate=1.0)
    generation = create(client, auth, {"input": TEXT_ONLY})
    canceled = client.post(f"/v1/generations/{generation['id']}/cancel", headers=auth)
    assert canceled.json["status"] == "canceled"
    assert in_flight(services) == [generation["id"]]
    wait_until_failed(simulator, generation["upstream"]["job"])
    answer = call_back(client, generation, None, status="failed", message="technical issues")
    assert (answer.status_code, answer.json) == (200, {"outcome": "ignored"})
    drain(services)
    assert in_flight(services) == []
    shown = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert shown["status"] == "canceled"


def test_a_callback_without_a_result_makes_the_jobs_poll_run_now(
    config: Config, make_client: Any, simulator: Any
) -> None:
    """Deep-Image documents only the callback of a complete job; one for a failed job (the
    simulator's `send_failure_callbacks` shape) was a 422, and the generation learnt its
    end from the fallback poll, an hour later here."""
    services, client, auth = make_client(callback_config(config))
    set_simulator(simulator.url, failure_rate=1.0)
    generation = create(client, auth, {"input": TEXT_ONLY})
    wait_until_failed(simulator, generation["upstream"]["job"])
    wrong_job = call_back(client, generation, None, job="another-job")
    assert wrong_job.status_code == 409
    with services.store.transaction() as session:  # as if it overtook the submit's commit
        session.execute(
            sa.update(Generation).where(Generation.id == generation["id"]).values(upstream_job=None)
        )
    early = call_back(client, generation, None)
    assert (early.status_code, early.headers.get("Retry-After")) == (409, "5")
    with services.store.transaction() as session:
        session.execute(
            sa.update(Generation)
            .where(Generation.id == generation["id"])
            .values(upstream_job=generation["upstream"]["job"])
        )
    failed = {"result_url": None, "status": "failed", "message": "technical issues"}
    answer = call_back(client, generation, None, **failed)
    assert (answer.status_code, answer.json) == (200, {"outcome": "accepted"})
    (poll,) = tasks_of(services, POLL)
    assert poll.run_at <= utcnow()
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["error"]["code"]) == ("failed", "upstream_job_failed")
    late = call_back(client, generation, None, **failed)
    assert (late.status_code, late.json) == (200, {"outcome": "ignored"})


def test_a_generation_without_a_result_in_time_fails_with_upstream_timeout(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(config.replace(generation_timeout=0.5))
    set_simulator(simulator.url, processing_time=30.0)
    generation = create(client, auth, {"input": TEXT_ONLY})
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["error"]["code"]) == ("failed", "upstream_timeout")


@pytest.mark.parametrize(
    ("result_url", "changes", "code"),
    [
        ("{sim}/_sim/stats", {}, "result_not_image"),  # JSON where an image should be
        ("{sim}/no/such/image.png", {}, "result_unavailable"),
        (None, {"max_result_bytes": 1000}, "result_too_large"),
    ],
)
def test_a_result_that_is_not_a_storable_image_fails_with_a_clear_code(
    config: Config,
    make_client: Any,
    simulator: Any,
    result_url: str | None,
    changes: dict[str, Any],
    code: str,
) -> None:
    # Without confirmation the callback's URL is what gets downloaded.
    services, client, auth = make_client(callback_config(config, confirm_results=False, **changes))
    generation = create(client, auth, {"input": TEXT_ONLY})
    real = wait_until_complete(simulator, generation["upstream"]["job"])
    call_back(client, generation, result_url.format(sim=simulator.url) if result_url else real)
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["error"]["code"]) == ("failed", code)
    assert objects(services) == {}


def _png(padding: int = 0) -> bytes:
    """A small PNG, followed by `padding` zero bytes (still sniffed as a PNG)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 4), "red").save(out, "PNG")
    return out.getvalue() + bytes(padding)


class RawResultHost:
    """Answers every GET on loopback with `head` (status line and headers, as given) and then
    `pieces` of the body, each sent on its own: for framings a WSGI server would not send.
    Counts the requests; what the client does not read is lost when it hangs up."""

    def __init__(self, head: bytes, pieces: list[bytes]) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/image.png"
        self.requests = 0
        self._head, self._pieces = head, pieces
        self._socket.settimeout(0.05)  # to see `stop` soon
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                asked = b""
                while b"\r\n\r\n" not in asked:
                    got = connection.recv(65536)
                    if not got:
                        break
                    asked += got
                self.requests += 1
                try:
                    connection.sendall(self._head)
                    for piece in self._pieces:
                        connection.sendall(piece)
                        time.sleep(0.001)  # one read each, not one coalesced segment
                except OSError:
                    pass  # the client hung up: it read enough

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._socket.close()


def _chunked(body: bytes, size: int) -> list[bytes]:
    """`body` in HTTP/1.1 chunks of `size` bytes, and the last (empty) chunk."""
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]


def _pieces(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


# What a result host sends, by framing: none of them declares the size the client will read
# (so the store's check of Content-Length cannot refuse it): only counting the bytes as they
# stream can. 4,000 image bytes, over the limit of 1,000 set below, in pieces of 200.
_OVER = _png(4000 - len(_png()))
_GZIPPED = gzip.compress(_png(100_000))  # ~200 bytes on the wire, 100 kB once decoded
UNDECLARED = {
    "chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n",
        _chunked(_OVER, 200),
    ),
    "until_close": (
        b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n",
        _pieces(_OVER, 200),
    ),
    # Chunked framing wins over a Content-Length beside it (RFC 9112, 6.3): 4,000 bytes are
    # read, whatever the 500 declared. The store took 500 as the size and kept 500 of them.
    "chunked_with_a_length": (
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 500\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        _chunked(_OVER, 200),
    ),
    "gzip": (
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_GZIPPED),
        [_GZIPPED],
    ),
}


def _stored_from(
    host: RawResultHost, config: Config, make_client: Any, simulator: Any
) -> tuple[Services, dict[str, Any]]:
    """A generation whose callback names `host`'s result (a limit of 1000 bytes, no
    confirmation), once its store has run; the services and the generation as shown. `host`
    is stopped."""
    try:
        services, client, auth = make_client(
            callback_config(config, confirm_results=False, max_result_bytes=1000)
        )
        generation = create(client, auth, {"input": TEXT_ONLY})
        wait_until_complete(simulator, generation["upstream"]["job"])
        assert call_back(client, generation, host.url).status_code == 200
        drain(services)
    finally:
        host.stop()
    return services, client.get(f"/v1/generations/{generation['id']}", headers=auth).json


@pytest.mark.parametrize("framing", sorted(UNDECLARED))
def test_a_result_over_the_limit_without_a_declared_size_fails_as_it_streams(
    config: Config, make_client: Any, simulator: Any, framing: str
) -> None:
    assert len(_GZIPPED) < 1000 < len(_OVER)
    head, pieces = UNDECLARED[framing]
    host = RawResultHost(head, pieces)
    services, done = _stored_from(host, config, make_client, simulator)
    assert done["status"] == "failed", done
    assert done["error"] == {
        "code": "result_too_large",
        "message": "the result is larger than the limit of 1000 bytes",
    }
    assert host.requests == 1  # refused at once, not retried
    [task] = tasks_of(services, STORE)
    assert (task.status, task.attempts) == ("done", 1)  # its outcome: the generation failed
    assert objects(services) == {}


def test_bytes_sent_past_a_declared_length_are_never_read(
    config: Config, make_client: Any, simulator: Any
) -> None:
    # A host that declares 500 bytes and sends 4,000 (over the limit of 1,000): the HTTP
    # client reads the 500 the message has and no more, so the limit is never reached; what
    # is stored is those 500 bytes.
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 500\r\n"
        b"Connection: close\r\n\r\n"
    )
    host = RawResultHost(head, _pieces(_OVER, 200))
    services, done = _stored_from(host, config, make_client, simulator)
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["size"] == 500
    [data] = objects(services).values()
    assert data == _OVER[:500]
    assert host.requests == 1


def test_an_existing_object_with_the_same_bytes_counts_as_stored(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    generation = create(client, auth, {"input": TEXT_ONLY})
    drain(services)
    first = client.get(f"/v1/generations/{generation['id']}", headers=auth).json["result"]
    # As if the worker died after writing the object but before recording it: run again.
    with services.store.transaction() as session:
        session.execute(
            sa.update(Generation).values(status="processing", result=None, completed_at=None)
        )
        services.queue.enqueue(session, STORE, generation_id=generation["id"])
    drain(services)
    again = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert again["status"] == "succeeded"
    assert again["result"] == first
    assert len(objects(services)) == 1


def test_an_existing_object_with_other_bytes_is_a_storage_conflict(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    generation = create(client, auth, {"input": TEXT_ONLY})
    drain(services)
    [name] = objects(services)
    services.blobs._client.bucket(services.blobs.bucket).blob(name).upload_from_string(  # type: ignore[attr-defined]
        b"\x89PNG\r\n\x1a\nsomething else"
    )
    with services.store.transaction() as session:
        session.execute(
            sa.update(Generation).values(status="processing", result=None, completed_at=None)
        )
        services.queue.enqueue(session, STORE, generation_id=generation["id"])
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["error"]["code"]) == ("failed", "storage_conflict")


def test_gcs_unreachable_for_a_while_is_retried_until_stored(config: Config, store: Any) -> None:
    bucket = "flaky-bucket"
    server = FakeGcsServer(backend="memory").start()
    port = server.port
    server.create_bucket(bucket)
    blobs = emulator_blob_store(server.url, bucket, retry_timeout=0)
    config = config.replace(gcs_bucket=bucket)
    services, client, auth = app_on(config, store, blobs)
    try:
        server.stop()
        generation = create(client, auth, {"input": TEXT_ONLY})
        deadline = time.monotonic() + 10
        while not any(t.last_error for t in tasks_of(services, STORE)):
            assert time.monotonic() < deadline, "the store task never tried"
            Worker(services.runner).run_once()
            time.sleep(0.05)
        [task] = tasks_of(services, STORE)
        assert task.status == "pending"
        assert "GCS" in (task.last_error or "")
        server = FakeGcsServer(backend="memory", port=port).start()  # back, same address
        server.create_bucket(bucket)
        with services.store.transaction() as session:  # skip the backoff wait
            session.execute(sa.update(Task).where(Task.kind == STORE).values(run_at=utcnow()))
        drain(services, seconds=20)
        done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
        assert done["status"] == "succeeded"
    finally:
        server.stop()
        services.deepimage.close()
        services.downloads.close()


def test_a_result_is_shown_with_a_signed_url_where_the_credentials_can_sign(
    config: Config, store: Any
) -> None:
    services, client, auth = app_on(config, store, FakeBlobStore(config.gcs_bucket, can_sign=True))
    generation = create(client, auth, {"input": TEXT_ONLY})
    drain(services)
    shown = client.get(f"/v1/generations/{generation['id']}", headers=auth).json["result"]
    assert shown["url"].startswith("https://")
    listed = client.get("/v1/generations", headers=auth).json["data"][0]["result"]
    assert listed["url"].startswith("https://")
    services.deepimage.close()
    services.downloads.close()


class SlowSigner(FakeBlobStore):
    """Signs as IAM's signBlob does on Cloud Run: one slow request per URL. Counts how many
    signings ran at once."""

    def __init__(self, bucket: str) -> None:
        super().__init__(bucket, can_sign=True)
        self.running = self.most = 0
        self.count = threading.Lock()

    def signed_url(self, name: str, expires_in: dt.timedelta) -> str | None:
        with self.count:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.count:
            self.running -= 1
        return super().signed_url(name, expires_in)


def test_a_listed_page_signs_its_result_links_several_at_once(config: Config, store: Any) -> None:
    blobs = SlowSigner(config.gcs_bucket)
    services, client, auth = app_on(config, store, blobs)
    made = [create(client, auth, {"input": TEXT_ONLY})["id"] for _ in range(6)]
    drain(services)
    blobs.most = 0
    listed = client.get("/v1/generations", headers=auth).json["data"]
    assert sorted(item["id"] for item in listed) == sorted(made)
    for item in listed:  # each its own link, in its place
        assert item["status"] == "succeeded"
        uri = item["result"]["uri"].removeprefix(f"gs://{config.gcs_bucket}/")
        assert item["result"]["url"].startswith(f"https://fake.invalid/{config.gcs_bucket}/{uri}?")
    assert blobs.most > 1
    services.deepimage.close()
    services.downloads.close()


def test_links_signed_without_a_request_are_signed_in_the_request_thread(
    config: Config, store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local signature (a key) takes about a millisecond: no thread is worth it.
    import service.generations.service as generation_service

    services, client, auth = app_on(config, store, FakeBlobStore(config.gcs_bucket, can_sign=True))
    made = [create(client, auth, {"input": TEXT_ONLY})["id"] for _ in range(3)]
    drain(services)

    def no_threads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a thread pool for links that take no request")

    monkeypatch.setattr(generation_service, "ThreadPoolExecutor", no_threads)
    listed = client.get("/v1/generations", headers=auth)
    assert listed.status_code == 200
    assert sorted(item["id"] for item in listed.json["data"]) == sorted(made)
    assert all(item["result"]["url"].startswith("https://") for item in listed.json["data"])
    services.deepimage.close()
    services.downloads.close()


def test_a_callback_that_overtakes_the_submit_records_the_job_itself_when_trusted(
    config: Config, make_client: Any, simulator: Any
) -> None:
    # Only without confirmation (see test_result_downloads.py for the refusal with it).
    services, client, auth = make_client(callback_config(config, confirm_results=False))
    set_simulator(simulator.url, upstream_error_rate=1.0)
    generation = create(client, auth, {"input": TEXT_ONLY})
    assert (generation["status"], generation["upstream"]["job"]) == ("queued", None)
    set_simulator(simulator.url, upstream_error_rate=0.0)
    # The job Deep-Image made for it, whose callback beat genrelay's own commit of the job id.
    job = requests.post(
        f"{simulator.url}/rest_api/process",
        json=TEXT_ONLY,
        headers={"x-api-key": SIMULATOR_KEY},
        timeout=5,
    ).json()["job"]
    overtaking = {**generation, "upstream": {"job": job}}
    response = call_back(client, overtaking, wait_until_complete(simulator, job))
    assert (response.status_code, response.json) == (200, {"outcome": "accepted"})
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["upstream"]["job"]) == ("succeeded", job)
    assert len(objects(services)) == 1


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_callback_whose_transaction_is_aborted_by_a_deadlock_runs_it_again(
    config: Config, make_client: Any, simulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The soak found it: a callback frees its job's slot, so the line's admission runs before
    # its commit and takes the account's row lock last, after the generation's row. A
    # transaction holding the account's lock that then writes that generation closes a cycle,
    # and PostgreSQL aborts the one that waited first: here the callback's.
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    result_url = wait_until_complete(simulator, generation["upstream"]["job"])
    answer = deadlocked_on_the_account(
        services, generation["id"], lambda: call_back(client, generation, result_url)
    )
    assert (answer.status_code, answer.json) == (200, {"outcome": "accepted"})
    assert "a transaction aborted by a conflict (40P01)" in caplog.text
    (store_task,) = tasks_of(services, STORE)
    assert store_task.generation_id == generation["id"]
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert done["status"] == "succeeded"


def wait_until_over(simulator: Any, job: str) -> None:
    """Until the simulator has finished `job`, whichever way."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answer = requests.get(
            f"{simulator.url}/rest_api/result/{job}",
            headers={"x-api-key": SIMULATOR_KEY},
            timeout=5,
        )
        if answer.json().get("status") in ("complete", "failed"):
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job} did not end")


def submitted_long_ago(services: Services, generation_id: str, seconds: float) -> None:
    """As if the generation's job had been created `seconds` ago."""
    with services.store.transaction() as session:
        session.execute(
            sa.update(Generation)
            .where(Generation.id == generation_id)
            .values(submitted_at=utcnow() - dt.timedelta(seconds=seconds))
        )


def in_flight(services: Services) -> list[str]:
    with services.store.read() as session:
        return list(session.scalars(sa.select(Generation.id).where(IN_FLIGHT)))


@pytest.mark.parametrize("finding", ["complete", "failed", "timed out"])
def test_a_generation_canceled_while_its_poll_asks_hands_its_slot_on(
    config: Config, make_client: Any, simulator: Any, finding: str
) -> None:
    # The poll reads the generation `processing` and asks Deep-Image; the tenant cancels before
    # the poll's outcome is written. The job is over (or given up on), and this poll was the
    # last: the canceled job's slot must go on, or the account loses it for good.
    services, client, auth = make_client(config.replace(upstream_concurrency=1))  # polling only
    set_simulator(
        simulator.url,
        failure_rate=1.0 if finding == "failed" else 0.0,
        processing_time=60.0 if finding == "timed out" else 0.2,
    )
    generation = create(client, auth, {"input": TEXT_ONLY})
    job = generation["upstream"]["job"]
    if finding == "timed out":
        submitted_long_ago(services, generation["id"], config.generation_timeout + 60)
    else:
        wait_until_over(simulator, job)
    asked = services.deepimage.result

    def cancel_then_answer(asked_job: str) -> Any:
        services.deepimage.result = asked  # type: ignore[method-assign]
        canceled = client.post(f"/v1/generations/{generation['id']}/cancel", headers=auth)
        assert canceled.status_code == 200
        return asked(asked_job)

    services.deepimage.result = cancel_then_answer  # type: ignore[method-assign]
    drain(services)
    shown = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (shown["status"], shown["upstream"]["job"]) == ("canceled", job)
    assert services.deepimage.result is asked  # the poll asked, and the cancel came then
    assert in_flight(services) == []
    assert objects(services) == {}


def test_a_job_that_ended_before_the_timeout_is_stored_when_the_poll_comes_after_it(
    config: Config, make_client: Any, simulator: Any
) -> None:
    # Polls back off up to a minute apart: the one after a job's end may come after the
    # generation's timeout. The job is done, so its result is stored, not thrown away.
    services, client, auth = make_client(config)  # polling only
    generation = create(client, auth, {"input": TEXT_ONLY})
    wait_until_complete(simulator, generation["upstream"]["job"])
    submitted_long_ago(services, generation["id"], config.generation_timeout + 60)
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["error"]) == ("succeeded", None)
    assert len(objects(services)) == 1


def test_a_timed_out_poll_does_not_fail_a_generation_whose_callback_came_while_it_asked(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(callback_config(config))
    set_simulator(simulator.url, processing_time=60.0)
    generation = create(client, auth, {"input": TEXT_ONLY})
    submitted_long_ago(services, generation["id"], config.generation_timeout + 60)
    asked = services.deepimage.result

    def called_back_meanwhile(job: str) -> Any:
        answer = asked(job)  # still processing, as Deep-Image saw it a moment ago
        assert call_back(client, generation, ELSEWHERE).json == {"outcome": "accepted"}
        return answer

    services.deepimage.result = called_back_meanwhile  # type: ignore[method-assign]
    with services.store.transaction() as session:  # the fallback poll, due now
        session.execute(sa.update(Task).where(Task.kind == POLL).values(run_at=utcnow()))
    (poll,) = services.queue.claim_due_tasks(kinds=[POLL])
    services.runner.execute(poll)
    shown = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (shown["status"], shown["error"]) == ("processing", None)
    assert [task.status for task in tasks_of(services, STORE)] == ["pending"]


def test_a_generation_canceled_while_its_result_is_copied_leaves_no_object(
    config: Config, make_client: Any
) -> None:
    services, client, auth = make_client(config)  # polling only
    generation = create(client, auth, {"input": TEXT_ONLY})
    write_new = services.blobs.write_new

    def cancel_then_write(*args: Any, **kwargs: Any) -> Any:
        services.blobs.write_new = write_new  # type: ignore[method-assign]
        canceled = client.post(f"/v1/generations/{generation['id']}/cancel", headers=auth)
        assert canceled.status_code == 200
        return write_new(*args, **kwargs)

    services.blobs.write_new = cancel_then_write  # type: ignore[method-assign]
    drain(services)
    assert services.blobs.write_new is write_new  # the copy started before the cancel
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["result"]) == ("canceled", None)
    assert objects(services) == {}  # written, then deleted by the worker


def test_a_poll_given_up_does_not_show_the_internal_error_to_the_tenant(
    config: Config, store: Any, blobs: Any
) -> None:
    internal = 'connection to server at "10.8.0.3", port 5432 failed'
    services = build_services(
        config, store=store, blobs=blobs,
        policies={POLL: RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02)},
    )  # fmt: skip
    client = create_app(config, services=services).test_client()
    auth = {"Authorization": "Bearer " + services.api_keys.create("acme")}
    try:
        generation = create(client, auth, {"input": TEXT_ONLY})

        def crash(job: str) -> Any:
            raise RuntimeError(internal)

        services.deepimage.result = crash  # type: ignore[method-assign]
        drain(services)
        done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
        (poll,) = tasks_of(services, POLL)
    finally:
        services.deepimage.close()
        services.downloads.close()
    assert done["status"] == "failed"
    assert done["error"] == {
        "code": "upstream_unavailable",
        "message": "Deep-Image could not be polled after 2 attempts",
    }
    assert internal in (poll.last_error or "")  # kept for the operator


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_callback_that_finds_its_generation_canceled_meanwhile_hands_the_slot_on(
    config: Config, make_client: Any, simulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The callback reads the generation `processing`; a cancel commits before it records the
    # result. The job is over: its slot goes on now, not when the fallback poll comes.
    import service.generations.completion as completion

    services, client, auth = make_client(callback_config(config, upstream_concurrency=1))
    generation = create(client, auth, {"input": TEXT_ONLY})
    result_url = wait_until_complete(simulator, generation["upstream"]["job"])
    record = completion.record_source

    def cancel_then_record(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(completion, "record_source", record)
        cancel = threading.Thread(  # its own connection: the callback's transaction is open
            target=lambda: client.post(f"/v1/generations/{generation['id']}/cancel", headers=auth)
        )
        cancel.start()
        cancel.join(timeout=10)
        return record(*args, **kwargs)

    monkeypatch.setattr(completion, "record_source", cancel_then_record)
    answer = call_back(client, generation, result_url)
    assert (answer.status_code, answer.json) == (200, {"outcome": "ignored"})
    assert completion.record_source is record
    shown = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert shown["status"] == "canceled"
    assert in_flight(services) == []


def test_a_poll_refused_while_the_callback_is_accepted_does_not_fail_the_generation(
    config: Config, make_client: Any, simulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback poll asks Deep-Image, the callback is accepted meanwhile, then the poll's
    answer is a permanent error (a 404): the result is stored, not failed for it."""
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    result_url = wait_until_complete(simulator, generation["upstream"]["job"])
    asked = services.deepimage.result

    def called_back_meanwhile(job: str) -> Any:
        monkeypatch.setattr(services.deepimage, "result", asked)  # one poll only
        assert call_back(client, generation, result_url).json["outcome"] == "accepted"
        raise PermanentUpstreamError(
            "Job not found", error_code=ErrorCode.UPSTREAM_NOT_FOUND, http_status=404
        )

    monkeypatch.setattr(services.deepimage, "result", called_back_meanwhile)
    with services.store.transaction() as session:  # the fallback poll, due now
        session.execute(sa.update(Task).where(Task.kind == POLL).values(run_at=utcnow()))
    [poll] = services.queue.claim_due_tasks(kinds=[POLL])
    services.runner.execute(poll)
    drain(services)

    shown = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (shown["status"], shown["error"]) == ("succeeded", None)
    assert len(list(objects(services))) == 1


def test_polls_are_a_second_apart_at_least_even_after_a_first_wait_of_zero(
    config: Config, make_client: Any, simulator: Any
) -> None:
    """GENRELAY_RECONCILE_AFTER=0: a first wait of 0, doubled to 0 for ever, polled a job of
    a few seconds about a hundred times."""
    set_simulator(simulator.url, processing_time=30)
    services, client, auth = make_client(config.replace(reconcile_after=0.0))
    create(client, auth, {"input": TEXT_ONLY})
    [poll] = services.queue.claim_due_tasks(kinds=[POLL])
    assert poll.payload == {"delay": 0.0}
    services.runner.execute(poll)  # the job is still running: asked again later
    (waiting,) = tasks_of(services, POLL)
    assert (waiting.status, waiting.payload) == ("pending", {"delay": 1.0})
    assert waiting.run_at >= utcnow() + dt.timedelta(seconds=0.5)
