"""Strings PostgreSQL cannot store (NUL, lone surrogates) are refused with a 4xx naming the
field, wherever they come in: JSON bodies, path ids, query parameters. Before, each was a 500
with the tenant's data in the logged traceback. Run on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from service.models import Batch
from tests.helpers import seed_examples

NUL = "a\x00b"
SURROGATE = "a\ud800b"


def _post(client: Any, path: str, body: dict[str, Any], auth: dict[str, str]) -> Any:
    # json.dumps escapes both as \u0000 and \ud800: valid JSON text, decoded to such strings.
    return client.post(path, data=json.dumps(body), content_type="application/json", headers=auth)


def _generate(description: str) -> dict[str, Any]:
    return {"background": {"generate": {"description": description}}, "width": 512, "height": 512}


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/v1/generations",
            lambda s: {"input": _generate("x"), "metadata": {"order": s}},
            "metadata.order",
        ),
        (
            "/v1/generations",
            lambda s: {"input": _generate(s)},
            "input.background.generate.description",
        ),
        ("/v1/generations", lambda s: {"input": _generate("x"), "metadata": {s: "1"}}, "metadata"),
        (
            "/v1/subscriptions",
            lambda s: {"url": "http://127.0.0.1:9/", "description": s},
            "description",
        ),
    ],
    ids=["metadata", "prompt", "metadata-key", "subscription-description"],
)
def test_unstorable_characters_in_a_json_body_are_422_naming_the_field(
    client: Any, auth: dict[str, str], bad: str, path: str, body: Any, field: str
) -> None:
    response = _post(client, path, body(bad), auth)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert [e["field"] for e in response.json["errors"]] == [field]


URL = "https://shop.example.com/p/1.jpg"


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(
    ("lines", "field"),
    [
        (lambda s: [{"input": {"url": URL}, "custom_id": s}], "items[0].custom_id"),
        (lambda s: [{"input": {"url": URL}, "metadata": {"k": s}}], "items[0].metadata.k"),
        (lambda s: [{"input": {"url": URL}, "metadata": {s: "1"}}], "items[0].metadata"),
        (
            lambda s: [{"input": {"url": URL, "background": {"generate": {"description": s}}}}],
            "items[0].input.background.generate.description",
        ),
        (lambda s: [{"batch": {"metadata": {"k": s}}}, {"input": {"url": URL}}], "metadata.k"),
        (
            # Overridden by every item, yet the template is kept with the batch as sent.
            lambda s: [
                {"batch": {"template": {"background": {"color": s}}}},
                {"input": {"url": URL, "background": {"color": "red"}}},
            ],
            "template.background.color",
        ),
    ],
    ids=["custom-id", "item-metadata", "item-metadata-key", "prompt", "metadata", "template"],
)
@pytest.mark.parametrize("form", ["json", "ndjson"])
def test_unstorable_characters_in_a_batch_are_422_naming_the_field(
    client: Any, auth: dict[str, str], services: Any, bad: str, lines: Any, field: str, form: str
) -> None:
    header, *items = lines(bad)
    if "batch" not in header:
        header, items = {"batch": {}}, [header, *items]
    if form == "json":
        response = _post(client, "/v1/batches", {**header["batch"], "items": items}, auth)
    else:
        data = "".join(json.dumps(line) + "\n" for line in [header, *items])
        response = client.post(
            "/v1/batches", data=data, content_type="application/x-ndjson", headers=auth
        )
        if not field.startswith("items"):
            field = "batch." + field  # the header line's fields
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert [e["field"] for e in response.json["errors"]] == [field]
    with services.store.read() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Batch)) == 0


@pytest.mark.parametrize(
    ("template", "field"),
    [
        ("/v1/generations/gen_{}", "generation_id"),
        ("/v1/generations/gen_{}/cancel", "generation_id"),
        ("/v1/subscriptions/sub_{}", "subscription_id"),
        ("/v1/events/evt_{}", "event_id"),
        ("/v1/deliveries/dlv_{}", "delivery_id"),
        ("/v1/generations?cursor={}", "cursor"),
        ("/v1/events?generation_id=gen_{}", "generation_id"),
        ("/v1/deliveries?subscription=sub_{}", "subscription"),
    ],
)
def test_a_nul_in_a_path_or_a_query_is_422_naming_it(
    client: Any, auth: dict[str, str], template: str, field: str
) -> None:
    # (Invalid UTF-8 in a URL, such as an encoded surrogate, is decoded to U+FFFD: storable.)
    url = template.format("%00")
    method = client.post if url.endswith("/cancel") else client.get
    response = method(url, headers=auth)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert [e["field"] for e in response.json["errors"]] == [field]


def test_ordinary_unicode_still_goes_through(client: Any, auth: dict[str, str]) -> None:
    body = {"input": seed_examples()["text_only"], "metadata": {"order": "Zürich 東京 🎨"}}
    response = _post(client, "/v1/generations", body, auth)
    assert response.status_code == 202
    assert response.json["metadata"] == {"order": "Zürich 東京 🎨"}
