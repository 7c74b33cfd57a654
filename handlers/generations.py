"""/v1/generations: intake, read, list, cancel. Parse -> call the service -> render."""

from __future__ import annotations

from typing import Any

import flask
from flask_smorest import Blueprint

from handlers.auth import require_tenant, services, tenant, tenant_id
from handlers.idempotency import IdempotencyHeaderSchema, answer_past_deadline, render_answer
from handlers.problems import StrictJSONParser, require_json_body
from schemas.generations import (
    GenerationCreateSchema,
    GenerationListArgsSchema,
    GenerationPageSchema,
    GenerationSchema,
    deadline_passed,
)
from schemas.problems import ProblemSchema
from service.generations.service import NewGeneration

blp = Blueprint(
    "generations",
    __name__,
    url_prefix="/v1/generations",
    description="Image generation requests forwarded to Deep-Image.",
)
blp.ARGUMENTS_PARSER = StrictJSONParser()
blp.before_request(require_tenant)
blp.before_request(require_json_body)

__all__ = ["IdempotencyHeaderSchema", "blp"]


@blp.route("", methods=["POST"])
@blp.arguments(IdempotencyHeaderSchema(), location="headers", as_kwargs=True)
@blp.arguments(GenerationCreateSchema(future_deadline=False))
@blp.response(202, GenerationSchema)
@blp.alt_response(422, schema=ProblemSchema, description="Invalid fields, or a reused key")
def create_generation(body: dict[str, Any], idempotency_key: str | None = None) -> Any:
    """Accept a generation and forward it to Deep-Image."""
    caller = tenant()
    new = NewGeneration(**body)
    generations = services().generations
    if deadline_passed(new.deadline):
        # Refused, unless it retries a request its key answered (before the deadline).
        answer = answer_past_deadline(
            idempotency_key, lambda key: generations.retry_answer(caller.id, new, key), "deadline"
        )
    else:
        answer = generations.create(
            caller.id, new, idempotency_key=idempotency_key, settings=caller
        )
    return render_answer(answer, "/v1/generations")


@blp.route("", methods=["GET"])
@blp.arguments(GenerationListArgsSchema, location="query", as_kwargs=True)
@blp.response(200, GenerationPageSchema)
def list_generations(**args: Any) -> Any:
    """This tenant's generations, newest first."""
    page = services().generations.list(tenant_id(), **args)
    return {"data": page.items, "next_cursor": page.next_cursor}


@blp.route("/<string:generation_id>", methods=["GET"])
@blp.response(200, GenerationSchema)
@blp.alt_response(404, schema=ProblemSchema)
def get_generation(generation_id: str) -> Any:
    """One generation."""
    return services().generations.get(tenant_id(), generation_id)


@blp.route("/<string:generation_id>/cancel", methods=["POST"])
@blp.response(200, GenerationSchema)
@blp.alt_response(409, schema=ProblemSchema, description="Already succeeded or failed")
def cancel_generation(generation_id: str) -> Any:
    """Cancel a queued or processing generation."""
    return services().generations.cancel(tenant_id(), generation_id)


@blp.route("/<string:generation_id>/result", methods=["GET"])
@blp.response(302, description="Redirects to a fresh V4 signed URL of the stored image")
@blp.alt_response(404, schema=ProblemSchema)
@blp.alt_response(409, schema=ProblemSchema, description="The generation has no stored result")
@blp.alt_response(410, schema=ProblemSchema, description="The result has been deleted")
@blp.alt_response(501, schema=ProblemSchema, description="The credentials cannot sign URLs")
@blp.alt_response(503, schema=ProblemSchema, description="Signing failed for a moment; try again")
def get_result(generation_id: str) -> Any:
    """Download the result: a redirect to a signed URL, made now."""
    url = services().results.link(tenant_id(), generation_id)
    return flask.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})


@blp.route("/<string:generation_id>/result", methods=["DELETE"])
@blp.response(200, GenerationSchema)
@blp.alt_response(404, schema=ProblemSchema)
@blp.alt_response(409, schema=ProblemSchema, description="The generation has no stored result")
def delete_result(generation_id: str) -> Any:
    """Delete the stored image now (the generation stays, with `result.expired_at`)."""
    tenant = tenant_id()
    services().results.delete(tenant, generation_id)
    return services().generations.get(tenant, generation_id)
