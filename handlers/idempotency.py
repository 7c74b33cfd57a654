"""The `Idempotency-Key` header and how an intake's answer is rendered.

The protocol itself lives in the service layer (service/generations/idempotency.py): a
handler passes the key in and renders the `Answer` it gets back, nothing more.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import flask
from marshmallow import EXCLUDE, Schema, fields, validate

from schemas.generations import DEADLINE_PASSED
from service.errors import InvalidRequest
from service.generations.idempotency import Answer

T = TypeVar("T")


class IdempotencyHeaderSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    idempotency_key = fields.String(
        data_key="Idempotency-Key",
        validate=[
            validate.Length(min=1, max=255),
            validate.Regexp(r"^[\x21-\x7e]+$", error="Printable ASCII without spaces."),
        ],
        metadata={"description": "Retries with the same key and body get the first answer."},
    )


def render_answer(answer: Answer[Any], collection: str) -> Any:
    """The response to an intake: a replay verbatim (`Idempotent-Replayed: true`), the body the
    service rendered and kept for the key, or the resource for the route's schema to dump.

    Each has `Location: {collection}/{id}`, a replay too (the id from its kept body)."""
    if answer.resource is not None:
        resource_id = answer.resource.id
    else:
        resource_id = (answer.body or {}).get("id")
    headers = {"Location": f"{collection}/{resource_id}"} if resource_id else {}
    if answer.replayed:
        return flask.Response(
            json.dumps(answer.body),
            status=answer.status,
            mimetype="application/json",
            headers={**headers, "Idempotent-Replayed": "true"},
        )
    if answer.body is not None:
        response = flask.jsonify(answer.body)
        response.status_code = answer.status
        response.headers.update(headers)
        return response
    return answer.resource, answer.status, headers


def answer_past_deadline(
    idempotency_key: str | None, retry_answer: Callable[[str], Answer[T] | None], field: str
) -> Answer[T]:
    """An intake whose `deadline` has already passed: a retry of a request its key has a
    record of gets that request's answer (`retry_answer(key)`), as if the deadline were still
    ahead; anything else is refused, naming `field`."""
    answer = retry_answer(idempotency_key) if idempotency_key is not None else None
    if answer is None:
        raise InvalidRequest(
            f"{field}: {DEADLINE_PASSED}", errors=[{"field": field, "message": DEADLINE_PASSED}]
        )
    return answer
