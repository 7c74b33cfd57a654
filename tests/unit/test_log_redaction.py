"""No secret in any log line: callback tokens are redacted from every line, and database
errors do not carry the statement's bound values."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from gunicorn.config import Config as GunicornConfig
from gunicorn.http.errors import NoMoreData, ParseException
from gunicorn.http.parser import RequestParser
from gunicorn.workers.base import Worker

from service.database import create_db_engine
from service.logs import setup_logging
from service.server.gunicorn_logging import RedactingLogger

TOKEN = "f" * 64
PATH = f"/v1/callbacks/deepimage/gen_1/{TOKEN}"
KEY = "gr_W1VqNo4aIS2un8gSCIIM-ALpQHDtJ1ASL7ItGl_2AYE"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """What setup_logging's handler writes (to this buffer, as stderr)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    setup_logging("INFO")
    out = io.StringIO()
    [handler] = root.handlers
    handler.stream_of = lambda: out  # type: ignore[attr-defined]
    yield out
    root.handlers[:], root.level = saved


def test_a_callback_path_in_a_message_or_a_traceback_is_redacted(json_logs: io.StringIO) -> None:
    log = logging.getLogger("genrelay.test")
    try:
        raise RuntimeError(f"failed on {PATH}")
    except RuntimeError:
        log.exception("unhandled error on POST %s", PATH)
    line = json_logs.getvalue()
    assert TOKEN not in line
    entry = json.loads(line)
    assert entry["message"] == "unhandled error on POST /v1/callbacks/deepimage/gen_1/***"
    assert "failed on /v1/callbacks/deepimage/gen_1/***" in entry["exc_info"]


def test_gunicorn_error_lines_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = GunicornConfig()
    cfg.set("errorlog", "-")
    cfg.set("accesslog", "-")
    logger = RedactingLogger(cfg)
    try:
        raise ValueError(PATH)
    except ValueError:
        logger.exception("Error handling request %s", PATH)
    err = capsys.readouterr().err
    assert "Error handling request /v1/callbacks/deepimage/gen_1/***" in err
    assert TOKEN not in err


@pytest.fixture
def gunicorn_worker() -> Iterator[Worker]:
    """A gunicorn worker with genrelay's logger, both logs on the console, at DEBUG."""
    cfg = GunicornConfig()
    for name, value in (("errorlog", "-"), ("accesslog", "-"), ("loglevel", "debug")):
        cfg.set(name, value)
    logger = RedactingLogger(cfg)
    worker = Worker(0, os.getpid(), [], None, 30, cfg, logger)
    yield worker
    worker.tmp.close()
    for log in (logger.error_log, logger.access_log):
        log.handlers.clear()


def _parse_error(worker: Worker, head: bytes) -> ParseException | NoMoreData:
    """What gunicorn's parser raises for `head`."""
    with pytest.raises((ParseException, NoMoreData)) as failed:
        next(RequestParser(worker.cfg, iter([head]), ("203.0.113.9", 5000)))
    return failed.value


@pytest.mark.parametrize(
    ("head", "logged"),
    [
        # a header line without its colon
        (b"Authorization Bearer KEY", "Invalid HTTP Header: 'Authorization ***'"),
        (b"X-Metrics-Token KEY", "Invalid HTTP Header: 'X-Metrics-Token ***'"),
        (b"Auth(KEY): y", "Invalid HTTP header name: '***'"),
        (b"Expect: KEY", "Unable to comply with expectation: '***'"),
        (b"Transfer-Encoding: KEY", "Unsupported transfer coding: '***'"),
        # names are kept
        (b"Content-Length: 1\r\nContent-Length: 2", "Invalid HTTP Header: 'CONTENT-LENGTH'"),
    ],
)
def test_a_malformed_header_is_logged_without_its_value(
    gunicorn_worker: Worker, capsys: pytest.CaptureFixture[str], head: bytes, logged: str
) -> None:
    """gunicorn's warning for a request it cannot parse quotes the offending header line
    whole: an API key or the metrics token, sent without the colon."""
    request = b"POST /v1/generations HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n"
    error = _parse_error(gunicorn_worker, request.replace(b"KEY", KEY.encode()))
    left, right = socket.socketpair()
    with left, right:
        gunicorn_worker.handle_error(None, left, ("203.0.113.9", 5000), error)
    err = capsys.readouterr().err
    assert KEY not in err
    entry = json.loads(err.splitlines()[0])  # an access line may follow
    assert entry["severity"] == "WARNING"
    assert entry["message"] == f"Invalid request from ip=203.0.113.9: {logged}"


@pytest.mark.parametrize(
    ("line", "logged"),
    [
        (
            b"GET /v1/generations?api_key=KEY\x01 HTTP/1.1",
            "Invalid HTTP request line: 'GET /v1/generations?*** HTTP/1.1'",
        ),
        # a header line where the request line should be
        (b"Bearer KEY", "Invalid HTTP request line: 'Bearer ***'"),
        (b"GET /v1/generations HTTP/1.1 KEY", "Invalid HTTP Version: 'HTTP/1.1 ***'"),
    ],
)
def test_a_malformed_request_line_is_logged_without_its_query(
    gunicorn_worker: Worker, capsys: pytest.CaptureFixture[str], line: bytes, logged: str
) -> None:
    error = _parse_error(gunicorn_worker, line.replace(b"KEY", KEY.encode()) + b"\r\n\r\n")
    left, right = socket.socketpair()
    with left, right:
        gunicorn_worker.handle_error(None, left, ("203.0.113.9", 5000), error)
    err = capsys.readouterr().err
    assert KEY not in err
    assert json.loads(err)["message"] == f"Invalid request from ip=203.0.113.9: {logged}"


def test_a_head_cut_short_is_logged_without_its_headers(
    gunicorn_worker: Worker, capsys: pytest.CaptureFixture[str]
) -> None:
    error = _parse_error(
        gunicorn_worker, f"GET / HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n".encode()
    )
    assert isinstance(error, NoMoreData)
    # as gunicorn's gthread worker logs a client that went away mid-head
    gunicorn_worker.log.debug("Ignored premature client disconnection. %s", error)
    err = capsys.readouterr().err
    assert KEY not in err
    assert json.loads(err)["message"] == (
        "Ignored premature client disconnection. No more data after: b'***'"
    )


def test_a_database_error_does_not_log_the_bound_values(database_url: str) -> None:
    # On each database (SQLite and PostgreSQL: their engines are configured apart).
    engine = create_db_engine(database_url)
    try:
        with pytest.raises(sa.exc.DBAPIError) as failed, engine.begin() as connection:
            connection.execute(
                sa.text("INSERT INTO no_such_table (secret) VALUES (:secret)"),
                {"secret": "whsec_c2VjcmV0"},
            )
    finally:
        engine.dispose()
    assert "no_such_table" in str(failed.value)  # the statement failed, not the connection
    assert "whsec_" not in str(failed.value)
    assert "c2VjcmV0" not in str(failed.value)
    assert "[SQL parameters hidden due to hide_parameters=True]" in str(failed.value)


def test_records_go_to_stderr_as_it_is_when_they_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A test harness swaps sys.stderr for each test and closes what it captured into; a
    # background thread (the simulator's callbacks) logging after that must not write there.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    setup_logging()
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    errors: list[BaseException | None] = []
    monkeypatch.setattr(logging, "raiseExceptions", True)
    monkeypatch.setattr(
        logging.Handler, "handleError", lambda self, record: errors.append(record.exc_info)
    )
    logging.getLogger("genrelay.test").warning("after the swap")
    assert errors == []
    assert json.loads(second.getvalue())["message"] == "after the swap"


@pytest.mark.parametrize(
    "quoted",
    [
        # as a JSON encoder that escapes slashes writes it
        "https:\\/\\/gw.example.com\\/v1\\/callbacks\\/deepimage\\/gen_1\\/" + TOKEN,
        # percent-encoded inside another URL's query
        "https%3A%2F%2Fgw.example.com%2Fv1%2Fcallbacks%2Fdeepimage%2Fgen_1%2F" + TOKEN + "&x=1",
        "%2fv1%2fcallbacks%2fdeepimage%2fgen_1%2f" + TOKEN,
        # a request target with the token, or the id, partly percent-encoded: the server
        # decodes it before routing, so it is the token all the same
        "/v1/callbacks/deepimage/gen_1/%" + TOKEN[:1].encode().hex() + TOKEN[1:],
        "/v1/callbacks/deepimage/gen%5F1/"
        + TOKEN[:5]
        + "%"
        + TOKEN[5:6].encode().hex()
        + TOKEN[6:],
    ],
)
def test_a_callback_url_quoted_in_another_form_loses_its_token(quoted: str) -> None:
    """An upstream message may quote our webhook URL as it was sent inside JSON, or encoded
    in a URL: the token is still found."""
    from service.logs import redact

    redacted = redact(f"Deep-Image could not call {quoted} (timeout)")
    assert TOKEN[6:] not in redacted and "***" in redacted and "gen" in redacted


@pytest.mark.parametrize(
    ("quoted", "redacted"),
    [
        (
            "https:\\/\\/h.example\\/o.png?X-Goog-Signature=SECRET",
            "https:\\/\\/h.example\\/o.png?***",
        ),
        (
            "u=https%3A%2F%2Fh.example%2Fo.png%3FX-Goog-Signature%3DSECRET&x=1",
            "u=https%3A%2F%2Fh.example%2Fo.png%3F***",
        ),
        (
            "u=HTTPS%3a%2f%2fh.example%2fo.png%3fsig%3dSECRET",
            "u=HTTPS%3a%2f%2fh.example%2fo.png%3f***",
        ),
    ],
)
def test_a_url_quoted_in_another_form_loses_its_query(quoted: str, redacted: str) -> None:
    """A URL quoted JSON-escaped or percent-encoded (in an upstream message) loses its query
    as one written plainly does."""
    from service.logs import redact

    assert redact(f"could not fetch {quoted} (403)") == f"could not fetch {redacted} (403)"
