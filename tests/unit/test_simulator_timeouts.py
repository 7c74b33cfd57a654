"""The simulator's timeout fault: `timeout_rate` holds answers back `timeout_seconds`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from service.devtools.simulator import (
    SimulatorServer,
    SimulatorSettings,
    create_simulator_app,
    get_engine,
)
from service.devtools.simulator.cli import build_parser, settings_from_args

KEY = "sim-key"
AUTH = {"x-api-key": KEY}
BODY = {"width": 64, "height": 64, "background": {"generate": {"description": "a test"}}}
HOLD = 0.3

MakeClient = Callable[..., FlaskClient]


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    apps = []

    def make(**knobs: Any) -> FlaskClient:
        app = create_simulator_app(SimulatorSettings(**{"processing_time": 0.0, **knobs}))
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        get_engine(app).shutdown()


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_held_process_call_answers_late_but_creates_its_job(make_client: MakeClient) -> None:
    client = make_client(timeout_rate=1.0, timeout_seconds=HOLD)
    response, took = timed(lambda: client.post("/rest_api/process", json=BODY, headers=AUTH))
    assert took >= HOLD
    assert response.status_code == 200
    job = response.json["job"]
    assert client.get(f"/_sim/jobs/{job}").json["state"] == "complete"
    stats = client.get("/_sim/stats").json
    assert stats["jobs_created"] == 1
    assert stats["injected_timeouts"] == 1


def test_held_result_call_answers_normally_after_the_hold(make_client: MakeClient) -> None:
    client = make_client()
    job = client.post("/rest_api/process", json=BODY, headers=AUTH).json["job"]
    client.post("/_sim/settings", json={"timeout_rate": 1, "timeout_seconds": HOLD})
    response, took = timed(lambda: client.get(f"/rest_api/result/{job}", headers=AUTH))
    assert took >= HOLD
    assert response.status_code == 200
    assert response.json["status"] == "complete"


def test_other_endpoints_are_never_held(make_client: MakeClient) -> None:
    client = make_client(timeout_rate=1.0, timeout_seconds=5.0)
    for call in (
        lambda: client.get("/rest_api/me", headers=AUTH),
        lambda: client.post("/rest_api/process_result", json=BODY, headers=AUTH),
        lambda: client.get("/_sim/stats"),
        lambda: client.get("/_sim/health"),
    ):
        response, took = timed(call)
        assert response.status_code == 200
        assert took < 2.0
    assert client.get("/_sim/stats").json["injected_timeouts"] == 0


def test_injected_errors_are_held_too(make_client: MakeClient) -> None:
    client = make_client(timeout_rate=1.0, timeout_seconds=HOLD, upstream_error_rate=1.0)
    response, took = timed(lambda: client.post("/rest_api/process", json=BODY, headers=AUTH))
    assert took >= HOLD
    assert response.status_code in (500, 502, 503)


def test_rate_zero_draws_nothing_so_seeded_runs_repeat(make_client: MakeClient) -> None:
    def outcomes(**knobs: Any) -> list[bool]:
        client = make_client(failure_rate=0.5, seed=3, **knobs)
        jobs = [
            client.post("/rest_api/process", json=BODY, headers=AUTH).json["job"] for _ in range(12)
        ]
        return [client.get(f"/_sim/jobs/{job}").json["will_fail"] for job in jobs]

    assert outcomes() == outcomes(timeout_rate=0.0)


def test_a_share_of_calls_is_held(make_client: MakeClient) -> None:
    client = make_client(timeout_rate=0.25, timeout_seconds=0.0, seed=11)
    for _ in range(200):
        assert client.post("/rest_api/process", json=BODY, headers=AUTH).status_code == 200
    held = client.get("/_sim/stats").json["injected_timeouts"]
    assert 25 <= held <= 75


@pytest.mark.parametrize(
    "knobs", [{"timeout_rate": 1.5}, {"timeout_rate": -0.1}, {"timeout_seconds": -1}]
)
def test_bad_values_are_refused(knobs: dict[str, Any], make_client: MakeClient) -> None:
    with pytest.raises(ValueError):
        SimulatorSettings(**knobs)
    client = make_client()
    assert client.post("/_sim/settings", json=knobs).status_code == 400


def test_cli_flags() -> None:
    args = build_parser().parse_args(
        ["--port", "0", "--timeout-rate", "0.02", "--timeout-seconds", "2"]
    )
    settings = settings_from_args(args)
    assert (settings.timeout_rate, settings.timeout_seconds) == (0.02, 2.0)
    assert SimulatorSettings().timeout_rate == 0.0
    assert SimulatorSettings().timeout_seconds == 5.0


def test_a_client_with_a_shorter_read_timeout_times_out_over_http() -> None:
    settings = SimulatorSettings(processing_time=0.0, timeout_rate=1.0, timeout_seconds=1.0)
    with SimulatorServer(settings) as server, requests.Session() as http:
        with pytest.raises(requests.ReadTimeout):
            http.post(f"{server.url}/rest_api/process", json=BODY, headers=AUTH, timeout=0.2)
        # The held call went through: its job exists although the client gave up.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            jobs = http.get(f"{server.url}/_sim/jobs", timeout=5).json()["jobs"]
            if jobs:
                break
            time.sleep(0.05)
        assert len(jobs) == 1
