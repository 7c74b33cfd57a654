"""Schemathesis over /openapi.json: no 5xx, and no response that breaks the documented API.

The schema is loaded from the running app (the same marshmallow schemas validate requests), on
SQLite only. Every check schemathesis registers is enabled (`case.validate_response` without
`checks`), through its examples, coverage and fuzzing phases; the coverage phase sends each path
the methods it does not declare, which is where a 405 without `Allow` would fail
(`unsupported_method`). The stateful checks (use_after_free, ensure_resource_availability) and
object_level_authorization need the stateful phase or several identities, so they stay inert.

One exception, narrow:

- `positive_data_acceptance` (a schema-valid request must not be refused) is not applied where
  the API rejects by rules a JSON schema cannot state: opaque pagination cursors, Deep-Image's
  cross-field rules, webhook-target rules and the tenant's allow-lists (see
  `_BEYOND_THE_SCHEMA`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import settings

from service.config import Config

# The fuzz run needs one database, not the SQLite + PostgreSQL pair conftest gives.
# Hypothesis warns when the global `random` state changes while it draws a case. The app
# under test runs background threads (task and HTTP libraries with retry jitter) that may
# touch it meanwhile: harmless to what is checked here, and only a matter of replay.
_RANDOM_IN_STRATEGY = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
pytestmark = [
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
    _RANDOM_IN_STRATEGY,
]

PROBLEM = "application/problem+json"
CALLBACKS = "^/v1/callbacks/"

FUZZ_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)

# Operations whose 422s come from rules beyond any JSON schema, so a schema-valid request may
# rightly be refused (positive_data_acceptance does not apply). Findings there that a schema *can*
# state are pinned by the `test_regression_spec_gap_*` tests below.
_BEYOND_THE_SCHEMA = {
    # url or background.generate required; prompt needs remove=generative; image_url xor
    # nsfw_image_url; percent sizes above 0 %; *_parameters need their enhancement... And
    # integers refuse 85.0 on purpose (the input is forwarded unchanged, down to int-vs-float),
    # which JSON Schema cannot express: to it 85.0 *is* an integer.
    "POST /v1/generations": "Deep-Image's cross-field rules",
    # Each item's input is merged over the template, then held to the same rules.
    "POST /v1/batches": "Deep-Image's cross-field rules, after the template merge",
    # http(s) with a host, https only unless private targets are allowed, SSRF checks.
    "POST /v1/subscriptions": "webhook-target rules",
    "PATCH /v1/subscriptions/{subscription_id}": "webhook-target rules",
    "POST /v1/triggers": "the tenant's bucket allow-list, the template's Deep-Image rules",
    "PATCH /v1/triggers/{trigger_id}": "the tenant's bucket allow-list, the template's rules",
}


@pytest.fixture
def config(config: Config) -> Config:
    """The per-key rate limit off: the fuzzer sends hundreds of calls with one key at once."""
    return dataclasses.replace(config, rate_limit=0)


@pytest.fixture(autouse=True)
def _schemathesis_nodeid_compat(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy loader reads `node._nodeid`, which pytest 9.2 replaced by `_id`.

    Without it every `from_fixture` test fails with "'Function' object has no attribute
    '_nodeid'". schemathesis only uses it to label per-operation reports.
    """
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.fixture
def api_schema(app: Any) -> Any:
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


def _beyond_the_schema(case: Any) -> bool:
    if case.operation.label in _BEYOND_THE_SCHEMA:
        return True
    # A cursor is valid only if this API issued it; a generated one is refused with 422.
    return "cursor" in (case.query or {})


def _headers_negated_but_replaced(case: Any, headers: dict[str, str] | None) -> bool:
    """A negative case whose bad headers were (or included) a missing API key: the test sends
    a valid one with every call, which undoes that part, so what is left may be valid."""
    from schemathesis.core.parameters import ParameterLocation
    from schemathesis.generation import GenerationMode

    components = getattr(getattr(case, "meta", None), "components", None) or {}
    header = components.get(ParameterLocation.HEADER)
    return bool(headers) and header is not None and header.mode == GenerationMode.NEGATIVE


def _validate(case: Any, response: Any, headers: dict[str, str] | None) -> None:
    excluded = []
    if _beyond_the_schema(case):
        excluded.append(schemathesis.checks.positive_data_acceptance)
    if _headers_negated_but_replaced(case, headers):
        excluded.append(schemathesis.checks.negative_data_rejection)
    case.validate_response(
        response,
        headers=headers,
        excluded_checks=excluded,
        transport_kwargs={"headers": headers} if headers else None,
    )


@schema.exclude(path_regex=CALLBACKS).parametrize()
@FUZZ_SETTINGS
def test_api_conforms_to_openapi(case: Any, auth: dict[str, str]) -> None:
    """Every operation but the callback, with a valid API key on every call.

    Cases that test authentication (a missing or malformed Authorization) keep their own value.
    """
    response = case.call(headers=auth)
    _validate(case, response, auth)


@schema.include(path_regex=CALLBACKS).parametrize()
@FUZZ_SETTINGS
def test_callback_conforms_to_openapi(case: Any) -> None:
    """The Deep-Image callback authenticates by its URL token: no API key; 401s are documented."""
    response = case.call()
    _validate(case, response, None)


# --- Regressions: the spec gaps this run once found (K1-K4), checked one request each ----------


def _check(api_schema: Any, method: str, path: str, checks: list[Any], **kwargs: Any) -> None:
    """Send one request through schemathesis and run `checks` on the response."""
    headers = kwargs.pop("headers", None)
    case = api_schema[path][method].Case(**kwargs)
    response = case.call(headers=headers)
    case.validate_response(response, checks=checks, headers=headers)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "authenticated"),
    [
        # `default` (components/responses/DEFAULT_ERROR)
        ("GET", "/v1/events", {}, False),
        # @blp.alt_response(404, schema=ProblemSchema)
        (
            "GET",
            "/v1/generations/{generation_id}",
            {"path_parameters": {"generation_id": "x"}},
            True,
        ),
        # webargs' 422 (components/responses/UNPROCESSABLE_ENTITY)
        ("GET", "/v1/subscriptions", {"query": {"limit": "0"}}, True),
        # @blp.alt_response(401, schema=ProblemSchema) on the callback
        (
            "POST",
            "/v1/callbacks/deepimage/{generation_id}/{token}",
            {"path_parameters": {"generation_id": "x", "token": "y"}, "body": {}},
            False,
        ),
    ],
    ids=["default", "alt_response-404", "webargs-422", "callback-401"],
)
def test_regression_error_responses_are_documented_as_problem_json(
    api_schema: Any,
    auth: dict[str, str],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    authenticated: bool,
) -> None:
    checks = schemathesis.checks
    _check(
        api_schema,
        method,
        path,
        [checks.content_type_conformance, checks.response_schema_conformance],
        headers=auth if authenticated else None,
        **kwargs,
    )


def test_regression_metrics_200_is_documented(api_schema: Any) -> None:
    checks = schemathesis.checks
    _check(
        api_schema,
        "GET",
        "/metrics",
        [checks.status_code_conformance, checks.content_type_conformance],
    )


def _spec_accepts(api_schema: Any, path: str, method: str, body: Any) -> bool:
    """Whether `body` is valid against the operation's documented JSON request schema."""
    spec = api_schema.raw_schema
    media = spec["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]
    validator = jsonschema_rs.Draft202012Validator(
        {**media["schema"], "components": spec["components"]}
    )
    return bool(validator.is_valid(body))


class SpecGap(AssertionError):
    """The API refuses a request that its OpenAPI schema accepts."""


def _assert_spec_refuses_what_the_api_refuses(
    api_schema: Any, response: Any, path: str, method: str, body: Any, field: str | None
) -> None:
    """positive_data_acceptance for one field (None: the whole body): what the API refuses
    with 422, its spec must refuse too."""
    problem = response.get_json() or {}
    if field is None:
        refused = response.status_code == 422
    else:
        refused = field in {error["field"] for error in problem.get("errors", [])}
    if refused and _spec_accepts(api_schema, path, method, body):
        raise SpecGap(
            f"{method} {path} refuses `{field or 'the body'}`, which its OpenAPI schema accepts: "
            f"{response.status_code} {problem}"
        )


_GENERATE = {"width": 1024, "height": 1024, "background": {"generate": {"description": "a dawn"}}}
_TARGET = "http://127.0.0.1:9/hook"  # loopback is allowed in tests; nothing is sent


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/v1/subscriptions",
            {"url": _TARGET, "events": ["generation.failed", "generation.failed"]},
            "events",
        ),
        (
            "/v1/generations",
            {"input": _GENERATE, "webhook_events_filter": ["generation.failed"] * 2},
            "webhook_events_filter",
        ),
    ],
    ids=["subscription-events", "webhook_events_filter"],
)
def test_regression_spec_gap_repeated_event_types(
    api_schema: Any, client: Any, auth: dict[str, str], path: str, body: Any, field: str
) -> None:
    response = client.post(path, json=body, headers=auth)
    _assert_spec_refuses_what_the_api_refuses(api_schema, response, path, "POST", body, field)


def test_regression_spec_gap_empty_subscription_update(
    api_schema: Any, client: Any, auth: dict[str, str]
) -> None:
    created = client.post("/v1/subscriptions", json={"url": _TARGET}, headers=auth)
    assert created.status_code == 201, created.get_json()
    path = "/v1/subscriptions/{subscription_id}"
    response = client.patch(f"/v1/subscriptions/{created.get_json()['id']}", json={}, headers=auth)
    _assert_spec_refuses_what_the_api_refuses(api_schema, response, path, "PATCH", {}, None)
