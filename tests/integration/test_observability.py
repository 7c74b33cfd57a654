"""Metrics, structured logs with request context, and the per-key rate limit."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import flask
import pytest
import sqlalchemy as sa

from service.config import Config
from service.logs import setup_logging
from service.models import Tenant
from tests.helpers import drain, seed_examples

TEXT_ONLY = seed_examples()["text_only"]


def test_metrics_show_http_latency_by_route_and_database_gauges(
    client: Any, auth: dict[str, str], services: Any
) -> None:
    generation = client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth).json
    drain(services)
    client.get(f"/v1/generations/{generation['id']}", headers=auth)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.get_data(as_text=True)
    assert (
        'genrelay_http_request_duration_seconds_count{method="GET",'
        'route="/v1/generations/<string:generation_id>",status="200"}' in text
    )
    assert 'genrelay_generations{status="succeeded"} 1.0' in text
    assert 'genrelay_upstream_request_duration_seconds_count{operation="process",outcome="ok"}' in (
        text
    )
    assert 'genrelay_gcs_upload_duration_seconds_count{outcome="stored"}' in text
    assert 'genrelay_tasks_total{kind="store",outcome="done"}' in text


def _http_series(text: str) -> set[str]:
    return {
        line.split(" ", 1)[0]
        for line in text.splitlines()
        if line.startswith("genrelay_http_request_duration_seconds_count")
    }


def test_anonymous_requests_cannot_add_metric_series_without_bound(client: Any) -> None:
    client.open("/healthz", method="FOO0")
    before = _http_series(client.get("/metrics").get_data(as_text=True))
    for n in range(1, 6):
        client.open(f"/no/such/path/{n}", method=f"FOO{n}")
        client.open("/healthz", method=f"BAR{n}")
        client.open(f"/v1/generations/gen_{n}", method="GET")  # 401: the route's template
    after = _http_series(client.get("/metrics").get_data(as_text=True))
    added = after - before
    assert all("FOO" not in series and "BAR" not in series for series in after)
    assert all("/no/such/path" not in series for series in after)
    assert len(added) <= 4, sorted(added)
    assert (
        'genrelay_http_request_duration_seconds_count{method="other",route="unmatched",'
        'status="405"}' in after
    )


def test_a_request_refused_for_its_url_keeps_its_request_id_and_its_metric(
    client: Any,
) -> None:
    given = {"X-Request-Id": "req-123"}
    refused = client.get("/v1/generations/gen_%00", headers=given)  # NUL: never reaches a view
    assert refused.status_code == 422
    assert refused.headers["X-Request-Id"] == "req-123"
    text = client.get("/metrics").get_data(as_text=True)
    assert 'route="/v1/generations/<string:generation_id>",status="422"}' in text


def test_the_statuses_the_api_uses_are_labelled_as_themselves() -> None:
    from handlers.observability import metric_labels

    for status in (408, 501, 503):
        assert metric_labels("GET", "/x", status)[2] == str(status)
    assert metric_labels("GET", "/x", 418)[2] == "4xx"


def test_the_metrics_say_the_database_is_up(client: Any) -> None:
    from service.metrics import DatabaseCollector

    DatabaseCollector._cache.clear()  # gauges read now, from this test's database
    assert "genrelay_database_up 1.0" in client.get("/metrics").get_data(as_text=True)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The service's JSON log lines, captured."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    setup_logging("INFO")
    [handler] = root.handlers
    handler.stream_of = lambda: stream  # type: ignore[attr-defined]
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)


def test_worker_logs_are_json_and_carry_the_task_context(
    client: Any, auth: dict[str, str], services: Any, json_logs: io.StringIO
) -> None:
    generation = client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth).json
    logging.getLogger("genrelay.test").info("outside any request or task")
    drain(services)
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    assert lines and all({"severity", "message", "logger"} <= line.keys() for line in lines)
    [stored] = [line for line in lines if line["message"].startswith("stored gs://")]
    assert stored["generation_id"] == generation["id"]
    assert stored["task_kind"] == "store"
    assert stored["severity"] == "INFO"
    [outside] = [line for line in lines if line["message"] == "outside any request or task"]
    assert "generation_id" not in outside and "request_id" not in outside


def test_a_log_inside_a_request_carries_its_context(
    config: Config, make_client: Any, json_logs: io.StringIO
) -> None:
    import flask

    _services, client, _auth = make_client(config.replace(gcp_project="my-project"))
    app = client.application

    @app.route("/log-something/<generation_id>")
    def _log(generation_id: str) -> str:
        logging.getLogger("genrelay.test").warning("hello from %s", generation_id)
        return flask.g.request_id  # type: ignore[no-any-return]

    response = client.get(
        "/log-something/gen_1",
        headers={"X-Cloud-Trace-Context": "105445aa7843bc8bf206b12000100000/1;o=1"},
    )
    [line] = [json.loads(x) for x in json_logs.getvalue().splitlines() if "hello from" in x]
    assert line["severity"] == "WARNING"
    assert line["logging.googleapis.com/trace"] == (
        "projects/my-project/traces/105445aa7843bc8bf206b12000100000"
    )
    assert line["request_id"] == response.get_data(as_text=True)
    assert line["generation_id"] == "gen_1"


def test_too_many_requests_for_a_key_get_429_with_retry_after(
    config: Config, make_client: Any
) -> None:
    services, client, auth = make_client(config.replace(rate_limit=0.5, rate_limit_burst=2))
    answers = [client.get("/v1/generations", headers=auth) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    limited = answers[-1]
    assert limited.mimetype == "application/problem+json"
    assert limited.headers["Retry-After"] == "2"
    other = {"Authorization": "Bearer " + services.api_keys.create("globex")}
    assert client.get("/v1/generations", headers=other).status_code == 200


def test_metrics_need_the_token_when_one_is_configured(config: Config, make_client: Any) -> None:
    _services, client, _auth = make_client(config.replace(metrics_token="scrape-secret"))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    allowed = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert allowed.status_code == 200
    assert b"genrelay_http_request_duration_seconds" in allowed.data


def test_metrics_show_the_line_with_a_bounded_tenant_label(
    config: Config, make_client: Any, simulator: Any
) -> None:
    from service.metrics import WAITING_TENANT_LABELS, DatabaseCollector
    from tests.helpers import set_simulator

    set_simulator(simulator.url, processing_time=60.0)
    services, client, _auth = make_client(config.replace(upstream_concurrency=1))
    for n in range(WAITING_TENANT_LABELS + 3):
        auth = {"Authorization": "Bearer " + services.api_keys.create(f"tenant-{n:02d}")}
        for _ in range(1 + n % 2):
            client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth)
    DatabaseCollector._cache.clear()  # gauges are cached for a few seconds per process
    text = client.get("/metrics").get_data(as_text=True)
    assert "genrelay_upstream_in_flight 1.0" in text
    assert 'genrelay_upstream_concurrency_limit{source="configured"} 1.0' in text
    label = "genrelay_generations_waiting{"
    waiting = [line for line in text.splitlines() if line.startswith(label)]
    assert len(waiting) == WAITING_TENANT_LABELS + 1  # ten names and `other`
    total = sum(float(line.rsplit(" ", 1)[1]) for line in waiting)
    assert total == sum(1 + n % 2 for n in range(WAITING_TENANT_LABELS + 3)) - 1


def test_a_tenant_named_other_is_not_summed_with_the_rest_under_one_label(
    config: Config, make_client: Any, simulator: Any
) -> None:
    """Two samples labelled `other` made the exposition invalid: Prometheus refuses a scrape
    with a repeated series, every metric of it."""
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import WAITING_TENANT_LABELS, DatabaseCollector
    from tests.helpers import set_simulator

    set_simulator(simulator.url, processing_time=60.0)
    services, client, _auth = make_client(config.replace(upstream_concurrency=1))
    for name in ["other", *(f"tenant-{n:02d}" for n in range(WAITING_TENANT_LABELS))]:
        auth = {"Authorization": "Bearer " + services.api_keys.create(name)}
        # `other` first: its first generation takes the one slot, three wait, and it ranks
        # first among the shown; the last of the ten others is summed as `other`.
        for _ in range(4 if name == "other" else 2):
            client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth)
    DatabaseCollector._cache.clear()
    text = client.get("/metrics").get_data(as_text=True)
    (family,) = [f for f in text_string_to_metric_families(text)
                 if f.name == "genrelay_generations_waiting"]  # fmt: skip
    labels = [sample.labels["tenant"] for sample in family.samples]
    assert len(labels) == len(set(labels)) == WAITING_TENANT_LABELS + 1
    with services.store.read() as session:
        tenant_id = session.scalar(sa.select(Tenant.id).where(Tenant.name == "other"))
    waiting = {sample.labels["tenant"]: sample.value for sample in family.samples}
    assert waiting[tenant_id] == 3  # shown by its id
    assert waiting["other"] == 2  # the one tenant not shown


@pytest.mark.parametrize("token", [None, "scrape-secret"])
def test_the_worker_metrics_listen_on_loopback_or_want_the_token(token: str | None) -> None:
    import requests

    from service.metrics import serve_worker_metrics

    server = serve_worker_metrics(0, token)
    try:
        host, port = server.server_address[:2]
        url = f"http://127.0.0.1:{port}/metrics"
        if token is None:
            assert host == "127.0.0.1"  # nothing outside the machine reaches it
            assert "genrelay_tasks_total" in requests.get(url, timeout=5).text
        else:
            assert host == "0.0.0.0"  # noqa: S104 - what is checked
            assert requests.get(url, timeout=5).status_code == 401
            wrong = requests.get(url, headers={"Authorization": "Bearer x"}, timeout=5)
            assert wrong.status_code == 401
            right = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
            assert right.status_code == 200
            assert "genrelay_tasks_total" in right.text
    finally:
        server.shutdown()
        server.server_close()


def test_invalid_keys_are_limited_per_address_before_the_database(
    client: Any, auth: dict[str, str], services: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.ratelimit import BAD_KEY_BURST

    lookups = []
    original = services.api_keys.tenant_for

    def counted(key: str) -> Any:
        lookups.append(key)
        return original(key)

    monkeypatch.setattr(services.api_keys, "tenant_for", counted)
    assert client.get("/v1/generations", headers=auth).status_code == 200  # a valid key
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    # Cloud Run appends the caller's address: the last entry counts, not a forged first one.
    shared = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
    for n in range(BAD_KEY_BURST):
        bad = {"Authorization": f"Bearer gr_not_a_key_{n}", **attacker}
        assert client.get("/v1/generations", headers=bad).status_code == 401
    assert len(lookups) == 1 + BAD_KEY_BURST
    refused = client.get(
        "/v1/generations", headers={"Authorization": "Bearer gr_not_a_key_x", **shared}
    )
    assert refused.status_code == 429
    assert refused.mimetype == "application/problem+json"
    assert int(refused.headers["Retry-After"]) >= 1
    assert len(lookups) == 1 + BAD_KEY_BURST  # refused without a lookup
    # A key valid a moment ago still works from that address (and is still looked up)...
    assert client.get("/v1/generations", headers={**auth, **attacker}).status_code == 200
    assert len(lookups) == 2 + BAD_KEY_BURST
    # ...and other addresses are not affected.
    other = {"Authorization": "Bearer gr_not_a_key_y", "X-Forwarded-For": "192.0.2.9"}
    assert client.get("/v1/generations", headers=other).status_code == 401


@pytest.mark.parametrize(
    ("forwarded", "proxies", "seen"),
    [
        (None, 1, "192.0.2.1"),
        ("203.0.113.7", 1, "203.0.113.7"),
        ("1.2.3.4, 203.0.113.7", 1, "203.0.113.7"),
        ("1.2.3.4, 203.0.113.7", 2, "1.2.3.4"),
        ("203.0.113.7", 2, "192.0.2.1"),  # fewer entries than proxies: not through them
        ("203.0.113.7", 0, "192.0.2.1"),  # reached directly: the header is the client's
        ("a" * 60_000, 1, "192.0.2.1"),  # not an address: not a key of the limiter's table
        ("1.2.3.4, 2001:DB8::1", 1, "2001:db8::1"),
    ],
)
def test_the_client_address_is_the_entry_the_trusted_proxies_added(
    forwarded: str | None, proxies: int, seen: str
) -> None:
    from handlers.auth import client_address

    app = flask.Flask("test")
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    with app.test_request_context(headers=headers, environ_base={"REMOTE_ADDR": "192.0.2.1"}):
        assert client_address(flask.request, proxies) == seen


def test_a_client_reaching_the_service_directly_cannot_choose_its_address(
    config: Any, make_client: Any
) -> None:
    """With the header trusted, a new X-Forwarded-For each time escaped the limit on invalid
    keys: unlimited guesses, each a database lookup."""
    from service.ratelimit import BAD_KEY_BURST

    _services, client, _auth = make_client(config.replace(trusted_proxies=0))
    answers = [
        client.get(
            "/v1/generations",
            headers={"Authorization": f"Bearer gr_not_a_key_{n}", "X-Forwarded-For": f"10.0.0.{n}"},
        ).status_code
        for n in range(BAD_KEY_BURST + 2)
    ]
    assert answers == [401] * BAD_KEY_BURST + [429, 429]


@pytest.fixture
def debug_logs() -> Iterator[io.StringIO]:
    """The JSON log lines at GENRELAY_LOG_LEVEL=DEBUG, captured."""
    root, own = logging.getLogger(), logging.getLogger("genrelay")
    saved = (root.handlers[:], root.level, own.level)
    stream = io.StringIO()
    setup_logging("DEBUG")
    [handler] = root.handlers
    handler.stream_of = lambda: stream  # type: ignore[attr-defined]
    yield stream
    root.handlers[:], level, own_level = saved
    root.setLevel(level)
    own.setLevel(own_level)


def test_debug_logs_genrelay_but_not_the_request_lines_of_libraries(
    debug_logs: io.StringIO,
) -> None:
    # At DEBUG, urllib3 logs every request line with its query: a webhook's own token.
    logging.getLogger("urllib3.connectionpool").debug(
        '%s://%s:%s "%s %s %s" %s %s',
        "https",
        "hooks.example.com",
        443,
        "POST",
        "/hook?token=SECRET",
        "HTTP/1.1",
        204,
        0,
    )
    logging.getLogger("genrelay.worker").debug("task started (attempt %d)", 1)
    logging.getLogger("urllib3.connectionpool").warning("Retrying after a reset")
    lines = [json.loads(line) for line in debug_logs.getvalue().splitlines()]
    assert [(line["logger"], line["severity"]) for line in lines] == [
        ("genrelay.worker", "DEBUG"),
        ("urllib3.connectionpool", "WARNING"),
    ]
    assert "SECRET" not in debug_logs.getvalue()


def test_query_strings_of_urls_are_left_out_of_log_lines(json_logs: io.StringIO) -> None:
    log = logging.getLogger("genrelay.test")
    log.warning("delivery to https://hooks.example.com/in?token=SECRET failed")
    try:
        raise RuntimeError("404 for url: http://127.0.0.1:9/r.png?X-Goog-Signature=SIG&x=1")
    except RuntimeError:
        log.exception("download failed")
    text = json_logs.getvalue()
    assert "SECRET" not in text and "SIG" not in text
    warning, error = (json.loads(line) for line in text.splitlines())
    assert warning["message"] == "delivery to https://hooks.example.com/in?*** failed"
    assert "404 for url: http://127.0.0.1:9/r.png?***" in error["exc_info"]


def test_urls_are_redacted_before_json_escapes_them(json_logs: io.StringIO) -> None:
    log = logging.getLogger("genrelay.test")
    log.warning("GET https://shop.example/café.jpg?sig=SECRET1#top failed")
    log.warning("GET https://x.example/a.jpg?a=\\b&token=SECRET2 failed")
    log.warning("fetch gs://bucket/o,https://h.example/p?X-Goog-Signature=SECRET3 failed")
    text = json_logs.getvalue()
    assert "SECRET" not in text
    first, second, third = (json.loads(line)["message"] for line in text.splitlines())
    assert first == "GET https://shop.example/café.jpg?***#top failed"
    assert second == "GET https://x.example/a.jpg?*** failed"
    assert third == "fetch gs://bucket/o,https://h.example/p?*** failed"


def test_redaction_takes_linear_time_whatever_the_text() -> None:
    import time

    from service.logs import redact

    for crafted in ("http://" * 16_000, "a" * 112_000 + "://", "https://x/" + "?" * 100_000):
        started = time.process_time()
        redact(crafted)
        assert time.process_time() - started < 0.05, crafted[:20]


@pytest.fixture
def gunicorn_logger() -> Iterator[Any]:
    """genrelay's gunicorn logger, set up as `genrelay serve` sets it up."""
    import shutil

    from gunicorn.config import Config as GunicornConfig

    from service.server.gunicorn_logging import RedactingLogger

    # Importing the settings points prometheus-client at a multiprocess directory of their
    # own (as gunicorn's processes need): for this test only, not for the tests after it.
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    import service.server.gunicorn_conf as gunicorn_conf

    made = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    cfg = GunicornConfig()
    for name in ("accesslog", "errorlog", "loglevel"):
        cfg.set(name, getattr(gunicorn_conf, name))
    logger = RedactingLogger(cfg)
    yield logger
    for log in (logger.error_log, logger.access_log):
        log.handlers.clear()
    if before is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def test_gunicorn_logs_are_json_lines_on_stderr(
    gunicorn_logger: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import datetime
    from types import SimpleNamespace

    gunicorn_logger.info("Starting gunicorn %s", "27.0.1")
    gunicorn_logger.error("Worker (pid:%s) exited with code %s", 42, 3)
    # The app answered with its own request id: the client's was not a plain token.
    response = SimpleNamespace(
        status="503 Service Unavailable", sent=12, headers=[("X-Request-Id", "req-1")]
    )
    request = SimpleNamespace(headers=[])
    environ = {
        "REQUEST_METHOD": "GET",
        "RAW_URI": "/readyz?verbose=1",
        "PATH_INFO": "/readyz",
        "QUERY_STRING": "verbose=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "203.0.113.9",
        "HTTP_X_REQUEST_ID": "not an id https://evil.example/x?sig=SECRET",
    }
    gunicorn_logger.access(response, request, environ, datetime.timedelta(milliseconds=5))
    out, err = capsys.readouterr()
    assert out == ""
    started, exited, access = (json.loads(line) for line in err.splitlines())
    assert started["severity"] == "INFO" and started["logger"] == "gunicorn.error"
    assert started["message"] == "Starting gunicorn 27.0.1"
    assert exited["severity"] == "ERROR"
    assert {"time", "pid"} <= started.keys()
    assert access["logger"] == "gunicorn.access"
    assert access["severity"] == "WARNING"  # a 5xx
    assert access["message"] == "GET /readyz?*** HTTP/1.1"  # a query may hold a credential
    assert access["request_id"] == "req-1"
    assert "SECRET" not in err and "evil" not in err
    assert access["httpRequest"]["requestUrl"] == "/readyz"
    assert access["httpRequest"]["status"] == 503
    assert access["httpRequest"]["latency"] == "0.005000s"
    assert {"time", "pid"} <= access.keys()
