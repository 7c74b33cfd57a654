"""The access log never shows a callback token, nor the query of a request target."""

from __future__ import annotations

import datetime
import socket
from typing import Any

import pytest
from gunicorn.config import Config as GunicornConfig
from gunicorn.http.parser import RequestParser
from gunicorn.http.wsgi import create

from service.server.gunicorn_logging import RedactingLogger, redact

KEY = "gr_W1VqNo4aIS2un8gSCIIM-ALpQHDtJ1ASL7ItGl_2AYE"


def test_callback_tokens_are_redacted_from_request_lines() -> None:
    line = "POST /v1/callbacks/deepimage/gen_1/abcdef0123 HTTP/1.1"
    assert redact(line) == "POST /v1/callbacks/deepimage/gen_1/*** HTTP/1.1"


def test_other_paths_are_left_alone() -> None:
    assert redact("GET /v1/generations/gen_1 HTTP/1.1") == "GET /v1/generations/gen_1 HTTP/1.1"


@pytest.mark.parametrize(
    ("line", "redacted"),
    [
        (f"GET /v1/generations?api_key={KEY} HTTP/1.1", "GET /v1/generations?*** HTTP/1.1"),
        (
            f"POST /v1/triggers/trg_1/push?token={KEY}&x=1 HTTP/1.1",
            "POST /v1/triggers/trg_1/push?*** HTTP/1.1",
        ),
        (
            "POST /v1/callbacks/deepimage/gen_1/abcdef0123?x=1 HTTP/1.1",
            "POST /v1/callbacks/deepimage/gen_1/***?*** HTTP/1.1",
        ),
        # gunicorn's line for a request the app failed on
        (f"Error handling request GET /v1/keys?k={KEY}", "Error handling request GET /v1/keys?***"),
    ],
)
def test_the_query_of_a_request_target_is_redacted_and_its_path_kept(
    line: str, redacted: str
) -> None:
    assert redact(line) == redacted


def _access_atoms(head: bytes, status: str) -> dict[str, Any]:
    """The access log's atoms for a request as gunicorn's parser reads it, answered `status`."""
    cfg = GunicornConfig()
    client = ("203.0.113.9", 5000)
    request = next(RequestParser(cfg, iter([head]), client))
    left, right = socket.socketpair()
    with left, right:
        response, environ = create(request, left, client, ("127.0.0.1", 8080), cfg)
    response.status = status
    return RedactingLogger(cfg).atoms(
        response, request, environ, datetime.timedelta(milliseconds=5)
    )


def test_no_access_log_atom_holds_the_query_of_the_request_target() -> None:
    """Whatever a configured access_log_format shows, the request's query is not in it."""
    atoms = _access_atoms(
        f"GET /v1/generations?api_key={KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "401 UNAUTHORIZED",
    )
    assert not [name for name, value in atoms.items() if KEY in str(value)]
    assert atoms["r"] == "GET /v1/generations?*** HTTP/1.1"
    assert atoms["q"] == atoms["{query_string}e"] == "***"
    assert atoms["{raw_uri}e"] == "/v1/generations?***"
    assert (atoms["m"], atoms["U"], atoms["s"]) == ("GET", "/v1/generations", "401")


def test_a_request_without_a_query_keeps_its_atoms() -> None:
    atoms = _access_atoms(b"GET /v1/generations HTTP/1.1\r\nHost: x\r\n\r\n", "200 OK")
    assert atoms["r"] == "GET /v1/generations HTTP/1.1"
    assert atoms["q"] == ""
