"""marshmallow's nested error dicts become a flat list naming each field; unexpected errors
become problems too."""

from __future__ import annotations

from typing import NoReturn

import flask
import psycopg
import pytest
import sqlalchemy as sa

from handlers.problems import flatten_messages, register_error_handlers
from service.text import unstorable_values


def test_nested_errors_get_dotted_paths_and_list_indexes() -> None:
    messages = {
        "input": {
            "background": {"generate": {"model_type": ["Must be one of: realistic."]}},
            "enhancements": {1: ["Must be one of: denoise."]},
            "_schema": ["Ask for something."],
        },
        "metadata": {"k": {"value": ["Longer than maximum length 500."]}},
    }
    assert flatten_messages(messages) == [
        {"field": "input.background.generate.model_type", "message": "Must be one of: realistic."},
        {"field": "input.enhancements.1", "message": "Must be one of: denoise."},
        {"field": "input", "message": "Ask for something."},
        {"field": "metadata.k.value", "message": "Longer than maximum length 500."},
    ]


def test_unstorable_values_are_named_under_their_prefix() -> None:
    data = {
        "custom_id": "a\x00b",
        "input": {"quality": float("inf"), "enhancements": ["ok", "\ud800"], "width": 1.5},
        "metadata": {"\x00": "1", "fine": "Zürich"},
    }
    assert unstorable_values(data, "items[3]") == [
        {
            "field": "items[3].custom_id",
            "message": "Contains a NUL character or invalid Unicode (a lone surrogate).",
        },
        {
            "field": "items[3].input.enhancements.1",
            "message": "Contains a NUL character or invalid Unicode (a lone surrogate).",
        },
        {"field": "items[3].input.quality", "message": "Must be a finite number."},
        {
            "field": "items[3].metadata",
            "message": "Contains a NUL character or invalid Unicode (a lone surrogate).",
        },
    ]
    assert unstorable_values({"template": {"a": -float("inf")}}) == [
        {"field": "template.a", "message": "Must be a finite number."}
    ]
    assert [e["field"] for e in unstorable_values("\x00")] == ["(body)"]
    assert unstorable_values({"fine": [1, 2.5, "x", None, True]}) == []


def _failing_app(error: Exception) -> flask.Flask:
    app = flask.Flask(__name__)
    register_error_handlers(app)

    @app.post("/v1/callbacks/deepimage/gen_1/<token>")
    def fail(token: str) -> NoReturn:
        raise error

    return app


def _database_error(orig: Exception) -> sa.exc.OperationalError:
    return sa.exc.OperationalError("UPDATE generations ...", {}, orig)


def test_a_transaction_the_database_aborted_for_a_deadlock_is_a_503_to_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = _database_error(psycopg.errors.DeadlockDetected("deadlock"))
    client = _failing_app(error).test_client()
    response = client.post("/v1/callbacks/deepimage/gen_1/" + "f" * 64)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.content_type == "application/problem+json"
    assert "deadlock" in response.json["detail"]
    assert "UPDATE" not in response.get_data(as_text=True)  # no statement in the body
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # no traceback: expected


def test_a_database_that_cannot_be_reached_is_a_503_to_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    orig = psycopg.OperationalError("connection to server at 10.1.2.3 failed: refused")
    response = (
        _failing_app(_database_error(orig)).test_client().post("/v1/callbacks/deepimage/gen_1/x")
    )
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert "10.1.2.3" not in response.get_data(as_text=True)
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # no traceback per request
    assert "10.1.2.3" not in caplog.text


def test_a_database_not_migrated_yet_is_a_503_on_postgresql_too() -> None:
    # What psycopg's UndefinedTable becomes: a ProgrammingError (SQLite's is operational).
    error = sa.exc.ProgrammingError(
        "SELECT ...", {}, psycopg.errors.UndefinedTable("relation does not exist")
    )
    response = _failing_app(error).test_client().post("/v1/callbacks/deepimage/gen_1/x")
    assert response.status_code == 503


def test_any_other_database_error_is_still_a_500() -> None:
    # A statement that is wrong: a bug, not an outage.
    error = sa.exc.ProgrammingError("SELECT ...", {}, psycopg.errors.SyntaxError("syntax"))
    response = _failing_app(error).test_client().post("/v1/callbacks/deepimage/gen_1/x")
    assert response.status_code == 500
    assert response.json["detail"] == "The server failed unexpectedly."
