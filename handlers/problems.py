"""Every error leaves the API as `application/problem+json` (RFC 9457), built here."""

from __future__ import annotations

import json
import logging
from typing import Any, NoReturn

import flask
from apispec import BasePlugin
from flask_smorest import Api
from gunicorn.http import errors as gunicorn_errors
from webargs import core
from webargs.flaskparser import FlaskParser, abort, is_json_request
from werkzeug.exceptions import HTTPException

from schemas.problems import ProblemSchema
from service.database import aborted_by_conflict, database_unavailable
from service.errors import (
    PROBLEM_BASE,
    ClientTooSlow,
    InvalidRequest,
    ServiceError,
    Unavailable,
    require_identity_coding,
)

# What no database column can hold (NUL, lone surrogates) is refused where requests are parsed,
# once for every field, rather than as a 500 from the database with the value in the log. The
# check is service/text.py's, shared with the service layer.
from service.text import UNSTORABLE_MESSAGE, has_unstorable, unstorable_fields

log = logging.getLogger("genrelay.http")

PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    slug: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> flask.Response:
    """A problem-details response."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (slug or str(status)),
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if errors:
        body["errors"] = errors
    response = flask.Response(
        json.dumps(body), status=status, mimetype=PROBLEM_MEDIA_TYPE, headers=headers
    )
    return response


def flatten_messages(messages: Any, path: str = "") -> list[dict[str, Any]]:
    """Turn marshmallow's nested error dict into `[{field: "a.b.0.c", message}]`."""
    if isinstance(messages, dict):
        out: list[dict[str, Any]] = []
        for key, value in messages.items():
            name = path if key == "_schema" else f"{path}.{key}" if path else str(key)
            out.extend(flatten_messages(value, name))
        return out
    if isinstance(messages, list | tuple):
        out = []
        for item in messages:
            out.extend(flatten_messages(item, path))
        return out
    return [{"field": path or "(body)", "message": str(messages)}]


def _field_errors(messages: Any) -> list[dict[str, Any]]:
    """webargs keys errors by location (json, query, headers); fields are named without it."""
    if not isinstance(messages, dict):
        return flatten_messages(messages)
    out: list[dict[str, Any]] = []
    for errors in messages.values():
        out.extend(flatten_messages(errors))
    return out


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def refuse_unstorable_url() -> None:
    """before_request hook: path ids and query parameters the database could not store."""
    request = flask.request
    fields = [
        name
        for name, value in (request.view_args or {}).items()
        if isinstance(value, str) and has_unstorable(value)
    ]
    for name, value in request.args.items(multi=True):
        if has_unstorable(name) or has_unstorable(value):
            fields.append(name if not has_unstorable(name) else "(query)")
    if fields:
        errors = [{"field": name, "message": UNSTORABLE_MESSAGE} for name in sorted(set(fields))]
        raise InvalidRequest(
            "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors
        )


# Every integer of 17 digits or more is beyond 2**53 (16 digits), and JSON allows no leading
# zeros. Past 4300 digits int() refuses the text outright (ValueError, "Invalid JSON body."),
# so such integers are read as a stand-in beyond the bound instead: every field's own range
# check then names it, as it does any integer too large.
_EXACT_DIGITS = 16
_BEYOND_JSON_INTEGER = 2**53 + 1


def parse_json_int(text: str) -> int:
    """`parse_int` for json.loads: the integer, or ±(2**53 + 1) for one of 17+ digits."""
    if len(text) <= _EXACT_DIGITS:  # nearly every integer: the one test it runs for all
        return int(text)
    negative = text.startswith("-")
    if len(text) - negative <= _EXACT_DIGITS:
        return int(text)
    return -_BEYOND_JSON_INTEGER if negative else _BEYOND_JSON_INTEGER


class StrictJSONParser(FlaskParser):
    """webargs' parser, refusing NaN/Infinity and turning over-deep nesting into a 400.

    Each schema's `Meta.unknown` decides about unknown fields in every location (webargs
    would otherwise drop unknown query parameters, hiding typos such as `?statuss=failed`).
    A query parameter given twice is refused (webargs would use its first value).
    """

    DEFAULT_UNKNOWN_BY_LOCATION: dict[str, str | None] = {}

    def __init__(self, *, any_content_type: bool = False, **kwargs: Any) -> None:
        """`any_content_type`: read the body as JSON whatever its Content-Type says (for a
        sender that documents none)."""
        super().__init__(**kwargs)
        self.any_content_type = any_content_type

    def load_querystring(self, req: flask.Request, schema: Any) -> Any:
        """The query, refusing a field given more than once: webargs would take its first value
        and drop the rest silently (`?status=canceled&status=queued` listed the canceled ones
        alone). A field that takes a list may repeat; parameters that are not fields are the
        schema's to judge (`metadata[key]=value` says "Give each metadata key once.")."""
        query = super().load_querystring(req, schema)
        fields = {field.data_key or name for name, field in schema.fields.items()}
        repeated = [
            name
            for name, values in req.args.lists()
            if len(values) > 1 and name in fields and name not in query.multiple_keys
        ]
        if repeated:
            abort(422, messages={"query": {name: [f"Give `{name}` once."] for name in repeated}})
        return query

    def _raw_load_json(self, req: flask.Request) -> Any:
        if not self.any_content_type and not is_json_request(req):
            return core.missing
        data = req.get_data(cache=True)
        try:
            parsed = json.loads(data, parse_constant=_reject_constant, parse_int=parse_json_int)
        except RecursionError:
            abort(400, messages={"json": ["JSON body is nested too deeply."]})
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
            abort(400, exc=exc, messages={"json": ["Invalid JSON body."]})
        if not isinstance(parsed, dict):  # every JSON body of the API is an object
            abort(422, messages={"json": ["The body must be a JSON object."]})
        bad = unstorable_fields(parsed)
        if bad:
            abort(422, messages={"json": {field: [UNSTORABLE_MESSAGE] for field in bad}})
        return parsed


def _as_problem(response: Any) -> None:
    """Move an error response documented as application/json to application/problem+json."""
    content = response.get("content") if isinstance(response, dict) else None
    if content and "application/json" in content:
        content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")


class ProblemMediaTypePlugin(BasePlugin):
    """Document error responses with the media type they are sent with."""

    def response_helper(self, response: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # flask-smorest registers only error responses as components (DEFAULT_ERROR, 4xx/5xx).
        _as_problem(response)
        return response

    def operation_helper(self, path: Any = None, operations: Any = None, **kwargs: Any) -> None:
        for operation in (operations or {}).values():
            for status, response in (operation.get("responses") or {}).items():
                if str(status) == "default" or int(status) >= 400:
                    _as_problem(response)


class SchemaExtrasPlugin(BasePlugin):
    """Publish a marshmallow schema's `Meta.openapi`: keywords apispec cannot infer."""

    def schema_helper(self, name: str, definition: dict[str, Any], **kwargs: Any) -> Any:
        return getattr(getattr(kwargs.get("schema"), "Meta", None), "openapi", None)


def _deep_object_parameter(converter: Any, field: Any, **_: Any) -> dict[str, Any]:
    """A query field with `metadata={"style": "deepObject"}` is sent as `name[key]=value`."""
    if field.metadata.get("style") == "deepObject":
        return {"style": "deepObject", "explode": True}
    return {}


class ProblemApi(Api):
    """flask-smorest's Api rendering its HTTP errors as problem details."""

    ERROR_SCHEMA = ProblemSchema

    def _init_spec(self, *, extra_plugins: Any = None, **options: Any) -> None:
        plugins = [*(extra_plugins or ()), ProblemMediaTypePlugin(), SchemaExtrasPlugin()]
        super()._init_spec(extra_plugins=plugins, **options)
        self.ma_plugin.converter.add_parameter_attribute_function(_deep_object_parameter)

    def handle_http_exception(self, error: HTTPException) -> flask.Response:
        if isinstance(error.__context__, ClientTooSlow):
            # werkzeug reports a failed body read as ClientDisconnected (400): this one is ours.
            return too_slow_response()
        status = error.code or 500
        data = getattr(error, "data", None) or {}
        errors = _field_errors(data["messages"]) if "messages" in data else None
        if errors and all(e["field"] == "(body)" for e in errors):
            # Not about a field (e.g. unparseable JSON): say it in `detail` alone.
            data = {"message": " ".join(e["message"] for e in errors)}
            errors = None
        detail: str | None
        if errors:
            shown = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            detail = shown + more
        else:
            detail = data.get("message") or error.description
        # Keep headers werkzeug attached (Allow on 405, WWW-Authenticate...), drop its type.
        headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
        headers.update(data.get("headers") or {})
        return problem_response(
            status,
            error.name,
            detail,
            slug="invalid-request" if status == 422 else None,
            errors=errors,
            headers=headers,
        )


def register_error_handlers(app: flask.Flask) -> None:
    """Service errors and last-resort crashes become problems too."""

    @app.errorhandler(ServiceError)
    def _service_error(error: ServiceError) -> flask.Response:
        headers = dict(error.headers)
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return problem_response(
            error.status,
            error.title,
            error.detail,
            slug=error.slug,
            errors=error.errors,
            headers=headers,
        )

    @app.errorhandler(ClientTooSlow)
    def _too_slow(error: ClientTooSlow) -> flask.Response:
        return too_slow_response()

    # HTTPExceptions go to ProblemApi.handle_http_exception (Flask picks the closest class).
    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> flask.Response:
        if aborted_by_conflict(error):
            # Left after Store.retrying's attempts, or on a path without them: the aborted
            # transaction rolled back whole, and the client may send the request again.
            log.warning(
                "%s %s: the database aborted its transaction to break a deadlock",
                flask.request.method,
                flask.request.path,
            )
            return _service_error(
                Unavailable(
                    "the database aborted this request's transaction to break a deadlock with "
                    "other requests; retry it",
                    headers={"Retry-After": "1"},
                )
            )
        if database_unavailable(error):
            # One line, not a traceback per request while the database is down; what the
            # driver said may name hosts, and stays out of the answer.
            log.warning(
                "%s %s: the database is unavailable: %s",
                flask.request.method,
                flask.request.path,
                type(error.__cause__ or error).__name__,
            )
            return _service_error(
                Unavailable("the database is unavailable; retry", headers={"Retry-After": "5"})
            )
        if isinstance(error, BODY_FRAMING_ERRORS):
            # gunicorn decodes a chunked body as the app reads it: a malformed one (a bad
            # chunk size, a missing CRLF, too many trailers) or one cut short is the client's.
            log.info(
                "%s %s: the request body is malformed: %s",
                flask.request.method,
                flask.request.path,
                type(error).__name__,
            )
            return problem_response(
                400,
                "Bad Request",
                "the request body is malformed (its chunked framing), or was cut short",
                headers={"Connection": "close"},
            )
        log.exception("unhandled error on %s %s", flask.request.method, flask.request.path)
        return problem_response(500, "Internal Server Error", "The server failed unexpectedly.")


# What gunicorn raises from a request body it cannot decode (or that ends too soon).
BODY_FRAMING_ERRORS: tuple[type[Exception], ...] = (
    gunicorn_errors.ParseException,
    gunicorn_errors.NoMoreData,
)


def too_slow_response() -> flask.Response:
    """408 for a body that did not arrive in time (service/server/gunicorn_worker.py)."""
    log.info("%s %s: the client sent its body too slowly", flask.request.method, flask.request.path)
    return problem_response(
        408,
        "Request Timeout",
        "the request body did not arrive in time",
        headers={"Connection": "close"},
    )


def require_json_body() -> flask.Response | None:
    """Blueprint before_request hook (after authentication): a body must be JSON, sent
    without a content coding, else 415."""
    request = flask.request
    if request.method not in ("POST", "PUT", "PATCH"):
        return None
    has_body = (
        bool(request.content_length)
        or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    )
    if has_body and not is_json_request(request):
        return problem_response(
            415,
            "Unsupported Media Type",
            f"send the body as application/json, not {request.mimetype or 'no content type'}",
        )
    if has_body:
        require_identity_coding(request.headers.get("Content-Encoding"))
    return None
