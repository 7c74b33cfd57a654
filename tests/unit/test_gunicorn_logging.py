"""The access log never shows a callback token."""

from __future__ import annotations

from service.server.gunicorn_logging import redact


def test_callback_tokens_are_redacted_from_request_lines() -> None:
    line = "POST /v1/callbacks/deepimage/gen_1/abcdef0123?x=1 HTTP/1.1"
    assert redact(line) == "POST /v1/callbacks/deepimage/gen_1/***?x=1 HTTP/1.1"


def test_other_paths_are_left_alone() -> None:
    assert redact("GET /v1/generations/gen_1 HTTP/1.1") == "GET /v1/generations/gen_1 HTTP/1.1"
