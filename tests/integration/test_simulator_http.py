"""The simulator on a real loopback port, with a real HTTP receiver for its webhooks."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from service.devtools.ports import free_port
from service.devtools.simulator import SimulatorServer, SimulatorSettings
from service.devtools.simulator.app import get_engine

KEY = "sim-key"
AUTH = {"x-api-key": KEY}
TIMEOUT = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]
TEXT_TO_IMAGE = {
    "width": 640,
    "height": 320,
    "background": {"generate": {"description": "a red bicycle", "model_type": "realistic"}},
}


@dataclass
class Receiver:
    """A tiny webhook receiver recording every request it gets."""

    server: BaseWSGIServer
    answer_status: int = 200
    calls: list[dict[str, Any]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    # Cleared: every request waits for it to be set before it is answered.
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def wait_for(self, count: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.calls) >= count, timeout)
            return list(self.calls)


class QuietHandler(WSGIRequestHandler):
    """Keeps werkzeug from installing its own stderr log handler during the tests."""

    def log(self, type: str, message: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    @Request.application
    def app(request: Request) -> Response:
        rec = holder[0]
        with rec.cond:
            rec.calls.append(
                {
                    "method": request.method,
                    "path": request.full_path,
                    "content_type": request.mimetype,
                    "json": json.loads(request.get_data()),
                }
            )
            rec.cond.notify_all()
        rec.release.wait(TIMEOUT)
        return Response("ok", status=rec.answer_status)

    # Single-threaded HTTP/1.0: each delivery is one connection, nothing lingers after stop.
    server = make_server("127.0.0.1", 0, app, request_handler=QuietHandler)
    holder.append(Receiver(server))
    holder[0].release.set()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield holder[0]
    server.shutdown()
    thread.join(TIMEOUT)
    server.server_close()


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimulatorServer]]:
    servers: list[SimulatorServer] = []

    def start(**knobs: Any) -> SimulatorServer:
        sim = SimulatorServer(SimulatorSettings(**{"processing_time": 0.1, **knobs}))
        sim.start()
        servers.append(sim)
        return sim

    yield start
    for sim in servers:
        sim.stop()


def post(sim: SimulatorServer, endpoint: str, body: Any) -> requests.Response:
    return requests.post(f"{sim.url}/rest_api/{endpoint}", json=body, headers=AUTH, timeout=30)


def poll_until_done(sim: SimulatorServer, job: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = requests.get(
            f"{sim.url}/rest_api/result/{job}", headers=AUTH, timeout=TIMEOUT
        ).json()
        if body.get("status") == "complete" or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def sim_job(sim: SimulatorServer, job: str) -> dict[str, Any]:
    debug: dict[str, Any] = requests.get(f"{sim.url}/_sim/jobs/{job}", timeout=TIMEOUT).json()
    return debug


def stats(sim: SimulatorServer) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(f"{sim.url}/_sim/stats", timeout=TIMEOUT).json()
    return body


def wait_until(check: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_callback_has_documented_shape_and_echoes_the_request(
    start_sim: Callable[..., SimulatorServer], receiver: Receiver
) -> None:
    sim = start_sim()
    body = {**TEXT_TO_IMAGE, "webhooks": {"complete": f"{receiver.url}/hooks/deep?token=t0k"}}
    job = post(sim, "process", body).json()["job"]
    [call] = receiver.wait_for(1)
    assert call["method"] == "POST"
    assert call["path"] == "/hooks/deep?token=t0k"
    assert call["content_type"] == "application/json"
    payload = call["json"]
    assert set(payload) == {"job", "data", "result_url", "results"}
    assert payload["job"] == job
    assert payload["data"] == body
    assert payload["results"] is None
    assert payload["result_url"] == poll_until_done(sim, job)["result_url"]
    with requests.get(payload["result_url"], timeout=TIMEOUT) as image:
        assert image.status_code == 200
        assert Image.open(io.BytesIO(image.content)).size == (640, 320)
    assert wait_until(lambda: len(sim_job(sim, job)["callbacks"]) == 1)
    [attempt] = sim_job(sim, job)["callbacks"]
    assert attempt["status_code"] == 200
    assert attempt["error"] is None


def test_duplicate_callback_rate_sends_twice(
    start_sim: Callable[..., SimulatorServer], receiver: Receiver
) -> None:
    sim = start_sim(duplicate_callback_rate=1.0)
    body = {**TEXT_TO_IMAGE, "webhooks": {"complete": f"{receiver.url}/hook"}}
    job = post(sim, "process", body).json()["job"]
    calls = receiver.wait_for(2)
    assert [c["json"]["job"] for c in calls] == [job, job]
    assert calls[0]["json"] == calls[1]["json"]
    assert wait_until(lambda: stats(sim)["callbacks_sent"] == 2)
    assert stats(sim)["callbacks_duplicated"] == 1


def test_lost_callback_is_never_sent_but_polling_completes(
    start_sim: Callable[..., SimulatorServer], receiver: Receiver
) -> None:
    sim = start_sim(lost_callback_rate=1.0)
    body = {**TEXT_TO_IMAGE, "webhooks": {"complete": f"{receiver.url}/hook"}}
    job = post(sim, "process", body).json()["job"]
    assert poll_until_done(sim, job)["status"] == "complete"
    assert receiver.wait_for(1, timeout=0.3) == []
    assert stats(sim)["callbacks_lost"] == 1
    assert sim_job(sim, job)["callbacks"][0]["lost"] is True


def test_a_callback_still_in_flight_when_the_simulator_stops_logs_nothing_afterwards(
    start_sim: Callable[..., SimulatorServer],
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Stopping waits a while for callbacks in flight, then gives up on them. One that ends
    # after that must not log: whoever collected the simulator's logs may be gone (pytest
    # closes a test's output at its end).
    receiver.release.clear()  # the receiver holds the callback...
    receiver.answer_status = 503  # ...then refuses it, which the simulator logs as a warning
    sim = start_sim()
    body = {**TEXT_TO_IMAGE, "webhooks": {"complete": f"{receiver.url}/hook"}}
    post(sim, "process", body)
    receiver.wait_for(1)
    get_engine(sim.app).shutdown(timeout=0.1)  # gives up on the held callback
    with caplog.at_level(logging.DEBUG, logger="genrelay.simulator"):
        receiver.release.set()
        assert wait_until(
            lambda: not any(t.name.startswith("sim-callback") for t in threading.enumerate())
        )
    assert [r.getMessage() for r in caplog.records] == []


def test_callback_failures_are_recorded_not_retried(
    start_sim: Callable[..., SimulatorServer], receiver: Receiver
) -> None:
    receiver.answer_status = 503
    sim = start_sim()
    body = {**TEXT_TO_IMAGE, "webhooks": {"complete": f"{receiver.url}/hook"}}
    job = post(sim, "process", body).json()["job"]
    receiver.wait_for(1)
    assert wait_until(lambda: stats(sim)["callbacks_failed"] == 1)
    time.sleep(0.2)
    assert len(receiver.calls) == 1
    assert [c["status_code"] for c in sim_job(sim, job)["callbacks"]] == [503]


def test_callback_to_a_closed_port_records_the_error(
    start_sim: Callable[..., SimulatorServer],
) -> None:
    closed_port = free_port()  # nobody listens there, and no outgoing connection takes it
    sim = start_sim(callback_timeout=1.0)
    body = {**TEXT_TO_IMAGE, "webhooks": {"complete": f"http://127.0.0.1:{closed_port}/hook"}}
    job = post(sim, "process", body).json()["job"]
    assert wait_until(lambda: bool(sim_job(sim, job)["callbacks"]))
    [attempt] = sim_job(sim, job)["callbacks"]
    assert attempt["status_code"] is None
    assert attempt["error"] == "ConnectionError"


def test_failed_jobs_fire_no_callback_unless_asked(
    start_sim: Callable[..., SimulatorServer], receiver: Receiver
) -> None:
    sim = start_sim(failure_rate=1.0)
    body = {**TEXT_TO_IMAGE, "webhooks": {"complete": f"{receiver.url}/hook"}}
    post(sim, "process", body)
    assert receiver.wait_for(1, timeout=0.4) == []
    requests.post(f"{sim.url}/_sim/settings", json={"send_failure_callbacks": True}, timeout=5)
    job = post(sim, "process", body).json()["job"]
    [call] = receiver.wait_for(1)
    assert call["json"]["job"] == job
    assert call["json"]["status"] == "failed"
    assert call["json"]["result_url"] is None


def test_process_result_returns_result_url_within_the_window(
    start_sim: Callable[..., SimulatorServer],
) -> None:
    sim = start_sim(processing_time=0.3)
    started = time.monotonic()
    response = post(sim, "process_result", TEXT_TO_IMAGE)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["status"] == "complete"
    assert response.json()["result_url"].startswith(f"{sim.url}/images/")
    assert 0.25 <= elapsed < 2.0


def test_process_result_returns_pending_job_when_the_window_ends(
    start_sim: Callable[..., SimulatorServer],
) -> None:
    sim = start_sim(processing_time=0.6, process_result_wait=0.1)
    response = post(sim, "process_result", TEXT_TO_IMAGE)
    assert response.status_code == 200
    assert response.json()["status"] in ("received", "in_progress")
    assert poll_until_done(sim, response.json()["job"])["status"] == "complete"


@pytest.mark.parametrize(
    "parameters_filename",
    [None, "parameters.json"],
    ids=["parameters-as-field", "parameters-as-file"],
)
def test_multipart_upload_over_http(
    start_sim: Callable[..., SimulatorServer], parameters_filename: str | None
) -> None:
    sim = start_sim(processing_time=0.0)
    source = io.BytesIO()
    Image.new("RGB", (64, 32), "navy").save(source, "PNG")
    parameters = json.dumps({"width": 128, "output_format": "webp"})
    files: list[tuple[str, tuple[str | None, bytes, str]]] = [
        ("parameters", (parameters_filename, parameters.encode(), "application/json")),
        ("fileName", ("in.png", source.getvalue(), "application/octet-stream")),
    ]
    with requests.post(
        f"{sim.url}/rest_api/process_result", headers=AUTH, files=files, timeout=TIMEOUT
    ) as response:
        assert response.status_code == 200, response.text
        result_url = response.json()["result_url"]
    with requests.get(result_url, timeout=TIMEOUT) as image:
        assert image.headers["Content-Type"] == "image/webp"
        assert Image.open(io.BytesIO(image.content)).size == (128, 64)


def test_concurrency_limit_holds_under_parallel_calls(
    start_sim: Callable[..., SimulatorServer],
) -> None:
    sim = start_sim(processing_time=2.0, concurrency_limit=5)
    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = sorted(
            pool.map(lambda _: post(sim, "process", TEXT_TO_IMAGE).status_code, range(10))
        )
    assert statuses == [200] * 5 + [429] * 5
    assert stats(sim)["responses_429"] == 5


def test_no_more_requests_answers_the_documented_403_until_it_is_turned_off(
    start_sim: Callable[..., SimulatorServer],
) -> None:
    sim = start_sim()
    job = post(sim, "process", TEXT_TO_IMAGE).json()["job"]
    knobs = requests.post(f"{sim.url}/_sim/settings", json={"no_more_requests": True}, timeout=5)
    assert knobs.json()["no_more_requests"] is True
    answers = [
        post(sim, "process", TEXT_TO_IMAGE),
        post(sim, "process_result", TEXT_TO_IMAGE),
        requests.get(f"{sim.url}/rest_api/result/{job}", headers=AUTH, timeout=TIMEOUT),
    ]
    prefix = "No more requests are available. Next requests available "
    for answer in answers:
        assert answer.status_code == 403
        assert set(answer.json()) == {"message"}
        message = answer.json()["message"]
        assert message.startswith(prefix)
        # The stated date: the first of next month, UTC (the format is the simulator's own).
        available_at = dt.datetime.fromisoformat(message.removeprefix(prefix))
        assert available_at > dt.datetime.now(dt.UTC)
        assert (available_at.day, available_at.hour, available_at.utcoffset()) == (
            1,
            0,
            dt.timedelta(0),
        )
    # Keys are checked first: a missing or unknown key answers as it always does.
    no_key = requests.post(f"{sim.url}/rest_api/process", json=TEXT_TO_IMAGE, timeout=TIMEOUT)
    assert (no_key.status_code, no_key.json()["message"]) == (
        403,
        "No x-api-key header is provided",
    )
    wrong = requests.get(
        f"{sim.url}/rest_api/result/{job}", headers={"x-api-key": "wrong"}, timeout=TIMEOUT
    )
    assert wrong.status_code == 404
    counters = stats(sim)
    assert (counters["injected_no_more_requests"], counters["jobs_created"]) == (3, 1)
    requests.post(f"{sim.url}/_sim/settings", json={"no_more_requests": False}, timeout=5)
    assert poll_until_done(sim, job)["status"] == "complete"
    assert post(sim, "process", TEXT_TO_IMAGE).status_code == 200


def _thread_names(threads: Iterable[threading.Thread]) -> list[str]:
    return sorted(t.name for t in threads)


def test_stop_leaves_no_threads_running(receiver: Receiver) -> None:
    before = set(threading.enumerate())
    sim = SimulatorServer(SimulatorSettings(processing_time=0.05, callback_delay=0.05))
    with sim, requests.Session() as session:
        # A kept-alive connection: its server thread must be ended by stop() too.
        body = {**TEXT_TO_IMAGE, "webhooks": {"complete": f"{receiver.url}/hook"}}
        job = session.post(f"{sim.url}/rest_api/process", json=body, headers=AUTH, timeout=5)
        receiver.wait_for(1)
        session.get(f"{sim.url}/rest_api/result/{job.json()['job']}", headers=AUTH, timeout=5)
        # A job still pending at stop: its scheduled completion must not keep a thread.
        session.post(
            f"{sim.url}/rest_api/process",
            json={**TEXT_TO_IMAGE, "webhooks": {"complete": f"{receiver.url}/late"}},
            headers=AUTH,
            timeout=5,
        )
        sim.stop()
        leftover = set(threading.enumerate()) - before
        assert _thread_names(leftover) == []
    sim.stop()  # idempotent


def test_server_url_and_restart_rules() -> None:
    sim = SimulatorServer(SimulatorSettings(), port=0)
    with pytest.raises(RuntimeError):
        _ = sim.url
    with sim:
        assert sim.url.startswith("http://127.0.0.1:")
        with requests.get(f"{sim.url}/rest_api/me", headers=AUTH, timeout=TIMEOUT) as me:
            assert me.status_code == 200
    with pytest.raises(RuntimeError):
        sim.start()


def test_cli_serves_until_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.devtools.simulator.cli",
            "--port",
            str(port),
            "--api-key",
            "k1",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                with requests.get(f"{url}/_sim/health", timeout=1) as health:
                    return health.status_code == 200
            except requests.ConnectionError:
                return False

        assert wait_until(answers, timeout=10)
        with requests.get(f"{url}/rest_api/me", headers={"x-api-key": "k1"}, timeout=5) as me:
            assert me.status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert f"listening on {url}" in stderr
    assert "k1" not in stderr
