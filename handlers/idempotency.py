"""The `Idempotency-Key` header and how an intake's answer is rendered.

The protocol itself lives in the service layer (service/generations/idempotency.py): a
handler passes the key in and renders the `Answer` it gets back, nothing more.
"""

from __future__ import annotations

import json
from typing import Any

import flask
from marshmallow import EXCLUDE, Schema, fields, validate

from service.generations.idempotency import Answer


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


def render_answer(answer: Answer[Any], location: str) -> Any:
    """The response to an intake: a replay verbatim (`Idempotent-Replayed: true`), the body the
    service rendered and kept for the key, or the resource for the route's schema to dump."""
    if answer.replayed:
        return flask.Response(
            json.dumps(answer.body),
            status=answer.status,
            mimetype="application/json",
            headers={"Idempotent-Replayed": "true"},
        )
    headers = {"Location": location}
    if answer.body is not None:
        response = flask.jsonify(answer.body)
        response.status_code = answer.status
        response.headers.update(headers)
        return response
    return answer.resource, answer.status, headers
