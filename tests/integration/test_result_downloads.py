"""The result download is guarded like a webhook: allowed hosts only, checked at every hop.

A result URL comes from Deep-Image's answer or from an unsigned callback; either could point
the worker at an internal address. These tests play the callback through the Flask test
client (with confirmation off, the callback's URL is what gets downloaded) and serve results
from a small server on loopback.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from service.config import Config
from service.generations import store
from service.models import Generation, Task
from service.runtime.kinds import STORE
from tests.conftest import SIMULATOR_KEY
from tests.helpers import LoopbackServer, drain, set_simulator
from tests.integration.test_completion import (
    TEXT_ONLY,
    call_back,
    callback_config,
    create,
    objects,
    tasks_of,
    wait_until_complete,
)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 4), "red").save(out, "PNG")
    return out.getvalue()


class ResultHost(LoopbackServer):
    """Serves `/image.png`, the same image a byte every 0.2 s at `/trickle.png`, an
    internal-looking text at `/internal`, and redirects: `/to?url=U` answers 302 to U.
    Records the paths it was asked for."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        from werkzeug.wrappers import Request, Response

        self.paths: list[str] = []

        def trickle() -> Iterator[bytes]:
            for byte in _png():
                time.sleep(0.2)
                yield bytes([byte])

        @Request.application  # type: ignore[misc]
        def app(request: Request) -> Response:
            self.paths.append(request.path)
            if request.path == "/image.png":
                return Response(_png(), mimetype="image/png")
            if request.path == "/trickle.png":
                return Response(trickle(), mimetype="image/png")
            if request.path == "/to":
                return Response(b"", status=302, headers={"Location": request.args["url"]})
            return Response(b"db_password=hunter2 internal admin console", mimetype="text/plain")

        self.serve(app, "", address=address)


@pytest.fixture
def result_host() -> Iterator[ResultHost]:
    host = ResultHost()
    yield host
    host.stop()


def _generation(services: Any, generation_id: str) -> Generation:
    with services.store.read() as session:
        generation = session.get(Generation, generation_id)
    assert generation is not None
    return generation


def _store_task(services: Any) -> Task:
    [task] = tasks_of(services, STORE)
    return task


def test_a_callback_whose_result_url_is_off_the_allowed_hosts_is_refused(
    config: Config, make_client: Any
) -> None:
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    # `localhost` is not 127.0.0.1 (the simulator's host, allowed by default) by name.
    response = call_back(client, generation, "http://localhost:5432/")
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    assert [e["field"] for e in response.json["errors"]] == ["result_url"]
    assert "allowed hosts" in response.json["errors"][0]["message"]
    assert _generation(services, generation["id"]).source_url is None
    assert tasks_of(services, STORE) == []


def test_outside_dev_mode_a_callback_result_url_must_be_https(
    config: Config, make_client: Any, simulator: Any
) -> None:
    _services, client, auth = make_client(
        callback_config(config, result_hosts=("127.0.0.1",), allow_private_webhooks=False)
    )
    generation = create(client, auth, {"input": TEXT_ONLY})
    response = call_back(client, generation, f"{simulator.url}/images/x.png")
    assert response.status_code == 422
    assert response.json["errors"] == [{"field": "result_url", "message": "the URL must use https"}]


def test_a_result_url_off_the_list_fails_at_once_as_result_unavailable(
    config: Config, make_client: Any
) -> None:
    # Polling-only mode: Deep-Image's own answer names the simulator (127.0.0.1), which the
    # list does not allow. Refused at the first attempt, not retried for hours.
    services, client, auth = make_client(config.replace(result_hosts=("deep-image.ai",)))
    generation = create(client, auth, {"input": TEXT_ONLY})
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["error"]["code"]) == ("failed", "result_unavailable")
    assert "allowed hosts" in done["error"]["message"]
    assert _store_task(services).attempts == 1
    assert objects(services) == {}


def test_a_redirect_to_a_host_off_the_list_is_not_followed(
    config: Config, make_client: Any, simulator: Any, result_host: ResultHost
) -> None:
    services, client, auth = make_client(callback_config(config, confirm_results=False))
    generation = create(client, auth, {"input": TEXT_ONLY})
    wait_until_complete(simulator, generation["upstream"]["job"])
    internal = f"http://localhost:{result_host.port}/internal"
    response = call_back(client, generation, f"{result_host.url}/to?url={internal}")
    assert response.status_code == 200
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["error"]["code"]) == ("failed", "result_unavailable")
    assert result_host.paths == ["/to"]  # the internal address was never asked
    assert _store_task(services).attempts == 1


def test_a_redirect_on_an_allowed_host_is_checked_and_followed(
    config: Config, make_client: Any, simulator: Any, result_host: ResultHost
) -> None:
    services, client, auth = make_client(callback_config(config, confirm_results=False))
    generation = create(client, auth, {"input": TEXT_ONLY})
    wait_until_complete(simulator, generation["upstream"]["job"])
    call_back(client, generation, f"{result_host.url}/to?url=/image.png")
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert done["status"] == "succeeded", done["error"]
    assert (done["result"]["width"], done["result"]["height"]) == (8, 4)
    assert result_host.paths == ["/to", "/image.png"]


def test_the_tenant_never_sees_the_bytes_of_a_non_image_answer(
    config: Config, make_client: Any, simulator: Any, result_host: ResultHost
) -> None:
    services, client, auth = make_client(callback_config(config, confirm_results=False))
    generation = create(client, auth, {"input": TEXT_ONLY})
    wait_until_complete(simulator, generation["upstream"]["job"])
    call_back(client, generation, f"{result_host.url}/internal")
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert done["error"] == {
        "code": "result_not_image",
        "message": "the result is not a PNG, JPEG or WEBP image",
    }


StoreOnce = Callable[[str], tuple[Any, str, float]]


@pytest.fixture
def store_once(
    config: Config, make_client: Any, simulator: Any, monkeypatch: pytest.MonkeyPatch
) -> StoreOnce:
    """With a download deadline of 1 s: one store attempt of a generation whose callback
    names `url`; the services, the generation's id and how long the attempt took."""
    monkeypatch.setattr(store, "DOWNLOAD_DEADLINE", 1.0)

    def attempt(url: str) -> tuple[Any, str, float]:
        services, client, auth = make_client(callback_config(config, confirm_results=False))
        generation = create(client, auth, {"input": TEXT_ONLY})
        wait_until_complete(simulator, generation["upstream"]["job"])
        call_back(client, generation, url)
        [claimed] = services.queue.claim_due_tasks(kinds=[STORE])
        started = time.monotonic()
        services.runner.execute(claimed)
        return services, generation["id"], time.monotonic() - started

    return attempt


def test_a_download_that_trickles_is_cut_at_the_deadline_and_retried(
    store_once: StoreOnce, result_host: ResultHost
) -> None:
    # Each byte comes well within the read timeout; the whole image would take 20 s or more.
    services, generation_id, took = store_once(f"{result_host.url}/trickle.png")
    assert took < 5
    task = _store_task(services)
    assert (task.status, task.attempts) == ("pending", 1)  # retried later, like a cut download
    assert task.last_error == "downloading the result took more than 1 s"
    assert result_host.paths == ["/trickle.png"]
    assert _generation(services, generation_id).status == "processing"
    assert objects(services) == {}


class CloseDelimitedHost:
    """Answers one GET in HTTP/1.0 with no Content-Length (the body ends when the connection
    closes): the image's first 20 bytes at once, then a byte every 0.2 s."""

    def __init__(self, body: bytes) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/image.png"
        threading.Thread(target=self._serve, args=(body,), daemon=True).start()

    def _serve(self, body: bytes) -> None:
        connection, _ = self._socket.accept()
        with connection, self._socket:
            connection.recv(65536)
            try:
                connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n")
                connection.sendall(body[:20])
                for byte in body[20:]:
                    time.sleep(0.2)
                    connection.sendall(bytes([byte]))
            except OSError:
                pass  # cut by the deadline


def test_a_download_cut_at_the_deadline_is_never_stored_as_the_result(
    store_once: StoreOnce,
) -> None:
    # Cut, a body read until the connection closes looks whole: it must not be recorded.
    services, generation_id, _took = store_once(CloseDelimitedHost(_png()).url)
    task = _store_task(services)
    assert (task.status, task.last_error) == (
        "pending",
        "downloading the result took more than 1 s",
    )
    assert _generation(services, generation_id).status == "processing"
    assert objects(services) == {}  # what was written, short, was deleted


def test_a_whole_copy_whose_upload_ends_after_the_deadline_is_recorded(
    store_once: StoreOnce, result_host: ResultHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.adapters.blobstore import GcsBlobStore

    write_new = GcsBlobStore.write_new

    def slow_to_finish(self: GcsBlobStore, *args: Any, **kwargs: Any) -> Any:
        stored = write_new(self, *args, **kwargs)  # the whole image read and written...
        time.sleep(1.6)  # ...and GCS slow to say so: the deadline passes, nothing was cut
        return stored

    monkeypatch.setattr(GcsBlobStore, "write_new", slow_to_finish)
    services, generation_id, _took = store_once(f"{result_host.url}/image.png")
    assert _generation(services, generation_id).status == "succeeded"
    assert len(objects(services)) == 1


def test_the_download_ignores_proxy_settings_of_the_environment(
    config: Config, make_client: Any, simulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The result host is 127.0.0.2; Deep-Image and GCS (127.0.0.1) may use the environment's
    # proxy settings, and are exempted from the dead proxy by NO_PROXY.
    services, client, auth = make_client(
        callback_config(config, confirm_results=False, result_hosts=("127.0.0.2",))
    )
    generation = create(client, auth, {"input": TEXT_ONLY})
    wait_until_complete(simulator, generation["upstream"]["job"])
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("no_proxy", raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nobody listens: a proxied GET fails
    host = ResultHost("127.0.0.2")
    try:
        call_back(client, generation, f"{host.url}/image.png")
        drain(services)
    finally:
        host.stop()
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert done["status"] == "succeeded", done["error"]
    assert host.paths == ["/image.png"]


@pytest.mark.parametrize("confirm", [True, False])
def test_a_callback_cannot_bind_a_queued_generation_to_a_job_unless_trusted(
    config: Config, make_client: Any, simulator: Any, confirm: bool
) -> None:
    services, client, auth = make_client(callback_config(config, confirm_results=confirm))
    set_simulator(simulator.url, upstream_error_rate=1.0)
    generation = create(client, auth, {"input": TEXT_ONLY})
    assert (generation["status"], generation["upstream"]["job"]) == ("queued", None)
    set_simulator(simulator.url, upstream_error_rate=0.0)
    # Any job of our Deep-Image account (another generation's, another tenant's...).
    job = requests.post(
        f"{simulator.url}/rest_api/process",
        json=TEXT_ONLY,
        headers={"x-api-key": SIMULATOR_KEY},
        timeout=5,
    ).json()["job"]
    overtaking = {**generation, "upstream": {"job": job}}
    response = call_back(client, overtaking, wait_until_complete(simulator, job))
    stored = _generation(services, generation["id"])
    if confirm:
        # Refused: the submit path records the generation's own job.
        assert response.status_code == 409
        assert response.headers["Retry-After"] == "5"
        assert (stored.status, stored.upstream_job, stored.source_url) == ("queued", None, None)
    else:
        # Confirmation off trusts callbacks as they come (documented in README).
        assert (response.status_code, response.json) == (200, {"outcome": "accepted"})
        assert stored.upstream_job == job


def test_with_confirmation_only_the_url_deep_image_confirms_is_stored(
    config: Config, make_client: Any, simulator: Any, result_host: ResultHost
) -> None:
    # The callback names one URL, Deep-Image another: the one Deep-Image confirms is stored.
    services, client, auth = make_client(callback_config(config))
    generation = create(client, auth, {"input": TEXT_ONLY})
    confirmed = wait_until_complete(simulator, generation["upstream"]["job"])
    assert call_back(client, generation, f"{result_host.url}/internal").status_code == 200
    drain(services)
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert done["status"] == "succeeded", done["error"]
    [data] = objects(services).values()
    assert data == requests.get(confirmed, timeout=5).content
    assert Image.open(io.BytesIO(data)).size == (2048, 1024)
