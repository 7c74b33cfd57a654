"""Deep-Image's completion webhook. No API key: the URL carries a per-generation token."""

from __future__ import annotations

from typing import Any

import flask
from flask_smorest import Blueprint

from handlers.auth import services
from handlers.problems import StrictJSONParser
from schemas.callbacks import CallbackAckSchema, DeepImageCallbackSchema
from schemas.problems import ProblemSchema
from service.errors import require_identity_coding
from service.generations.completion import Callback

blp = Blueprint(
    "callbacks",
    __name__,
    url_prefix="/v1/callbacks",
    description="Completion callbacks from Deep-Image.",
)
# Deep-Image documents no Content-Type for its callback: the body is read as JSON whatever
# it says (a 415 would lose the callback until the fallback poll).
blp.ARGUMENTS_PARSER = StrictJSONParser(any_content_type=True)


@blp.before_request
def _authenticate() -> None:
    """The token is checked before anything reads the body (or its coding is refused)."""
    view_args = flask.request.view_args or {}
    services().completion.authenticate(
        view_args.get("generation_id", ""), view_args.get("token", "")
    )
    # Deep-Image documents no coding either; one genrelay cannot read is said to be that.
    require_identity_coding(flask.request.headers.get("Content-Encoding"))


@blp.route("/deepimage/<string:generation_id>/<string:token>", methods=["POST"])
@blp.doc(security=[])
@blp.arguments(DeepImageCallbackSchema)
@blp.response(200, CallbackAckSchema)
@blp.alt_response(400, schema=ProblemSchema, description="The body is not JSON")
@blp.alt_response(401, schema=ProblemSchema, description="Wrong token; nothing changes")
@blp.alt_response(
    409,
    schema=ProblemSchema,
    description="Not this generation's upstream job, or its job is not recorded yet (retry)",
)
def deepimage_callback(payload: dict[str, Any], generation_id: str, token: str) -> Any:
    """Record where the result is; storing it happens in the background."""
    callback = Callback(job=payload["job"], result_url=payload["result_url"])
    outcome = services().completion.accept(generation_id, callback)
    return {"outcome": outcome.value}
