"""/v1/batches on SQLite and PostgreSQL, with the simulator over HTTP and loopback receivers."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import io
import json
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from schemas.batches import deep_merge
from service.bootstrap import Services
from service.config import Config
from service.models import Batch, Event, Generation, IdempotencyKey, Task
from service.tenants import Tenants
from tests.helpers import Receiver, drain, forget_answers, kept_answers

PROBLEM = "application/problem+json"
NDJSON = "application/x-ndjson"
TEMPLATE = {
    "width": 1024,
    "height": 1024,
    "background": {
        "generate": {"description": "product on a beach", "adapter_type": "generate_background"}
    },
}
FAST_SCHEDULE = (0.0, 0.05, 0.05)


def item(n: int, **fields: Any) -> dict[str, Any]:
    return {"input": {"url": f"https://shop.example.com/p/{n}.jpg"}, **fields}


def catalog(count: int, **fields: Any) -> dict[str, Any]:
    return {"template": TEMPLATE, "items": [item(n) for n in range(count)], **fields}


def post(client: Any, auth: dict[str, str], body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/batches", json=body, headers={**auth, **headers})


def post_ndjson(client: Any, auth: dict[str, str], lines: list[Any], **headers: str) -> Any:
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    return client.post(
        "/v1/batches", data=data.encode(), content_type=NDJSON, headers={**auth, **headers}
    )


def accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.get_json()
    return response.json  # type: ignore[no-any-return]


def rows(services: Services, model: Any, *where: Any) -> int:
    with services.store.read() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model).where(*where)) or 0


def batch_generations(client: Any, auth: dict[str, str], batch_id: str) -> list[dict[str, Any]]:
    """Every generation of the batch, in the order its items were sent."""
    found: list[dict[str, Any]] = []
    url = f"/v1/batches/{batch_id}/generations?limit=100"
    while True:
        page = client.get(url, headers=auth).json
        found.extend(page["data"])
        if page["next_cursor"] is None:
            return list(reversed(found))
        url = f"/v1/batches/{batch_id}/generations?limit=100&cursor={page['next_cursor']}"


def test_deep_merge_merges_dicts_recursively_and_replaces_everything_else() -> None:
    template = {"a": {"b": 1, "c": {"d": 2}}, "list": [1, 2], "x": 1}
    merged = deep_merge(template, {"a": {"c": {"e": 3}}, "list": [9], "x": None, "y": "new"})
    assert merged == {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "list": [9], "x": None, "y": "new"}
    assert template == {"a": {"b": 1, "c": {"d": 2}}, "list": [1, 2], "x": 1}  # untouched


def test_a_json_batch_merges_the_template_and_metadata_into_every_item(
    client: Any, auth: dict[str, str]
) -> None:
    body = {
        "template": {**TEMPLATE, "enhancements": ["denoise", "deblur"]},
        "metadata": {"campaign": "summer", "shop": "eu"},
        "deadline": "2099-01-01T00:00:00+00:00",
        "items": [
            item(0, custom_id="sku-0", metadata={"sku": "0"}),
            {
                "input": {
                    "url": "https://shop.example.com/p/1.jpg",
                    "background": {"generate": {"description": "product in snow"}},
                    "enhancements": ["light"],
                },
                "metadata": {"sku": "1", "shop": "us"},
                "custom_id": "sku-1",
            },
        ],
    }
    response = post(client, auth, body)
    batch = accepted(response)
    assert response.headers["Location"] == f"/v1/batches/{batch['id']}"
    assert batch["id"].startswith("bat_")
    assert batch["status"] == "processing"
    assert batch["counts"]["total"] == 2
    assert batch["metadata"] == {"campaign": "summer", "shop": "eu"}
    assert batch["completed_at"] is None and batch["canceled_at"] is None
    assert batch["links"] == {
        "self": f"/v1/batches/{batch['id']}",
        "generations": f"/v1/batches/{batch['id']}/generations",
        "cancel": f"/v1/batches/{batch['id']}/cancel",
    }
    first, second = batch_generations(client, auth, batch["id"])
    assert first["input"] == {
        **TEMPLATE,
        "enhancements": ["denoise", "deblur"],
        "url": "https://shop.example.com/p/0.jpg",
    }
    # Dicts merge key by key; the list is replaced whole.
    assert second["input"] == {
        "width": 1024,
        "height": 1024,
        "url": "https://shop.example.com/p/1.jpg",
        "background": {
            "generate": {"description": "product in snow", "adapter_type": "generate_background"}
        },
        "enhancements": ["light"],
    }
    # The item's metadata over the batch's.
    assert first["metadata"] == {"campaign": "summer", "shop": "eu", "sku": "0"}
    assert second["metadata"] == {"campaign": "summer", "shop": "us", "sku": "1"}
    assert [first["custom_id"], second["custom_id"]] == ["sku-0", "sku-1"]
    assert {first["deadline"], second["deadline"]} == {"2099-01-01T00:00:00+00:00"}
    assert {first["priority"], second["priority"]} == {0}
    assert {first["batch_id"], second["batch_id"]} == {batch["id"]}


def test_an_ndjson_batch_reads_its_header_line_and_one_item_per_line(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    header = {"batch": {"template": TEMPLATE, "metadata": {"feed": "nightly"}, "priority": 7}}
    lines: list[Any] = [header, item(0, custom_id="a"), "", item(1, custom_id="b"), "  "]
    batch = accepted(post_ndjson(client, auth, lines))
    assert batch["counts"]["total"] == 2
    assert batch["metadata"] == {"feed": "nightly"}
    generations = batch_generations(client, auth, batch["id"])
    assert [g["custom_id"] for g in generations] == ["a", "b"]
    assert [g["input"]["url"] for g in generations] == [
        "https://shop.example.com/p/0.jpg",
        "https://shop.example.com/p/1.jpg",
    ]
    assert all(g["input"]["background"] == TEMPLATE["background"] for g in generations)
    assert {g["priority"] for g in generations} == {7}
    assert {json.dumps(g["metadata"]) for g in generations} == {json.dumps({"feed": "nightly"})}
    # Without a header line every line is an item.
    plain = accepted(post_ndjson(client, auth, [{"input": {**TEMPLATE, "url": "base64,AAAA"}}]))
    assert plain["counts"]["total"] == 1
    assert rows(services, Batch) == 2


def _bad_width(n: int) -> dict[str, Any]:
    return {"input": {"url": f"https://shop.example.com/p/{n}.jpg", "width": -5}}


@pytest.mark.parametrize("form", ["json", "ndjson"])
def test_one_bad_item_refuses_the_whole_batch_naming_it_and_nothing_is_stored(
    client: Any, auth: dict[str, str], services: Services, form: str
) -> None:
    items = [item(0), item(1), item(2), _bad_width(3), item(4), {"input": {}, "color": "red"}]
    if form == "json":
        response = post(client, auth, {"template": TEMPLATE, "items": items})
    else:
        response = post_ndjson(client, auth, [{"batch": {"template": TEMPLATE}}, *items])
    assert response.status_code == 422
    assert response.mimetype == PROBLEM
    fields = [e["field"] for e in response.json["errors"]]
    assert "items[3].input.width" in fields
    assert "items[5].color" in fields
    assert not any(f.startswith(("items[0]", "items[1]", "items[2]", "items[4]")) for f in fields)
    assert "2 of 6 items are invalid" in response.json["detail"]
    assert rows(services, Generation) == rows(services, Batch) == 0


@pytest.mark.parametrize(
    ("template", "field"),
    [
        ({**TEMPLATE, "width": "wide"}, "template.width"),
        ({**TEMPLATE, "colour": "red"}, "template.colour"),
        ({**TEMPLATE, "webhooks": {"success": "https://a.example/x"}}, "template.webhooks"),
        ({**TEMPLATE, "quality": 2**60}, "template.quality"),
        (
            deep_merge(TEMPLATE, {"background": {"generate": {"x": 1}}}),
            "template.background.generate.x",
        ),
    ],
    ids=["bad-value", "unknown", "webhooks", "beyond-2**53", "nested"],
)
@pytest.mark.parametrize("form", ["json", "ndjson"])
def test_a_bad_template_field_is_named_once_as_the_templates(
    client: Any,
    auth: dict[str, str],
    services: Services,
    form: str,
    template: dict[str, Any],
    field: str,
) -> None:
    """Each item's input is validated merged over the template: an error in a value that came
    from the template was reported once per item (`items[0..99].input.width`), never naming
    the template. Item 1 gives its own `background.generate` (merged with the template's)."""
    items = [item(n) for n in range(250)]
    items[1]["input"]["background"] = {"generate": {"description": "product in snow"}}
    if form == "json":
        response = post(client, auth, {"template": template, "items": items})
    else:
        response = post_ndjson(client, auth, [{"batch": {"template": template}}, *items])
        field = "batch." + field
    assert response.status_code == 422, response.json
    assert [e["field"] for e in response.json["errors"]] == [field]
    assert response.json["detail"].startswith("250 of 250 items are invalid; nothing was stored.")
    assert field in response.json["detail"]
    assert rows(services, Generation) == rows(services, Batch) == 0


def test_template_and_item_errors_are_told_apart(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    """An item that replaces the template's bad value is valid; an item's own bad value, and a
    field missing from both the item and the template, are the item's."""
    template = {"width": "wide", "height": 1024, "colour": "red"}
    items = [
        {"input": {"url": "https://shop.example.com/p/0.jpg", "width": 512}},  # only colour
        {"input": {"url": "https://shop.example.com/p/1.jpg", "width": -5}},
        {"input": {"width": 512}},  # no url, no background.generate: the item's to give
        item(3),
    ]
    response = post(client, auth, {"template": template, "items": items})
    assert response.status_code == 422, response.json
    fields = [e["field"] for e in response.json["errors"]]
    # (marshmallow checks what needs the whole input, such as an image, after the fields.)
    assert fields == ["template.colour", "template.width", "items[1].input.width"]
    assert response.json["detail"].startswith("4 of 4 items are invalid; nothing was stored.")
    # Without the unknown field, the item that gives its own width is valid.
    del template["colour"]
    response = post(client, auth, {"template": template, "items": items})
    fields = [e["field"] for e in response.json["errors"]]
    assert fields[0] == "template.width"
    assert sorted(fields[1:]) == ["items[1].input.width", "items[2].input"]
    assert response.json["detail"].startswith("3 of 4 items are invalid; nothing was stored.")
    assert rows(services, Generation) == rows(services, Batch) == 0


@pytest.mark.parametrize(
    ("lines", "field"),
    [
        ([{"batch": {"template": TEMPLATE}}, item(0), "{not json", item(2)], "items[1]"),
        (["[1, 2", item(1)], "items[0]"),
        ([{"batch": {"webhook": "not a url"}}, item(0)], "batch.webhook"),
        ([{"batch": {"priority": 99}}, item(0)], "batch.priority"),
        ([{"batch": {"template": TEMPLATE}}, item(0), {"batch": {}}], "items[1].batch"),
        ([{"batch": {}, "input": {"url": "https://a.example/1.jpg"}}, item(0)], "batch"),
        ([{"batch": {"template": TEMPLATE}}], "items"),
        ([{"batch": {"deadline": "2001-01-01T00:00:00Z"}}, item(0)], "batch.deadline"),
        ([{"batch": {"deadline": "9999-12-31T23:59:59-01:00"}}, item(0)], "batch.deadline"),
    ],
    ids=[
        "bad-json-line",
        "bad-first-line",
        "header-field",
        "header-priority",
        "late-header",
        "header-with-input",
        "no-items",
        "header-deadline-passed",
        "header-deadline-out-of-range",
    ],
)
def test_ndjson_errors_name_the_line_as_items_i(
    client: Any, auth: dict[str, str], services: Services, lines: list[Any], field: str
) -> None:
    response = post_ndjson(client, auth, lines)
    assert response.status_code == 422, response.json
    assert field in [e["field"] for e in response.json["errors"]]
    assert rows(services, Generation) == rows(services, Batch) == 0


def _no_such_host(host: str, port: int) -> list[str]:
    raise OSError("Name or service not known")


@pytest.mark.parametrize(
    "webhook",
    ["https://169.254.169.254/hook", "https://hooks.example.com/hook", "not a url"],
    ids=["metadata-address", "host-does-not-resolve", "malformed"],
)
@pytest.mark.parametrize("form", ["json", "ndjson"])
def test_a_refused_batch_webhook_is_named_where_it_was_given(
    client: Any, auth: dict[str, str], services: Services, form: str, webhook: str
) -> None:
    """From an NDJSON header line, a webhook the SSRF policy refused (or whose host did not
    resolve) was named `webhook`, where a malformed one was `batch.webhook`."""
    from service.notifications.ssrf import URLPolicy

    services.batches.policy = URLPolicy(allow_private=True, resolver=_no_such_host)
    if form == "json":
        response = post(client, auth, {"webhook": webhook, "items": [item(0)]})
        field = "webhook"
    else:
        response = post_ndjson(client, auth, [{"batch": {"webhook": webhook}}, item(0)])
        field = "batch.webhook"
    assert response.status_code == 422, response.json
    assert [e["field"] for e in response.json["errors"]] == [field]
    assert response.json["detail"].startswith(f"{field}: ")
    assert rows(services, Generation) == rows(services, Batch) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"template": TEMPLATE}, "items"),
        ({"template": TEMPLATE, "items": []}, "items"),
        ({"template": TEMPLATE, "items": {"0": item(0)}}, "items"),
        ({"template": TEMPLATE, "items": [item(0)], "priority": 10}, "priority"),
        ({"template": TEMPLATE, "items": [item(0)], "colour": "red"}, "colour"),
        ({"template": TEMPLATE, "items": [item(0, custom_id="")]}, "items[0].custom_id"),
        ({"template": TEMPLATE, "items": ["just a url"]}, "items[0]"),
        (
            {
                "template": TEMPLATE,
                "metadata": {f"k{i}": "v" for i in range(40)},
                "items": [item(0, metadata={f"m{i}": "v" for i in range(11)})],
            },
            "items[0].metadata",
        ),
        (
            {"template": TEMPLATE, "items": [item(0)], "deadline": "2001-01-01T00:00:00Z"},
            "deadline",
        ),
        # In UTC, a time outside the calendar (the year 10000; below, the year 0).
        (
            {"template": TEMPLATE, "items": [item(0)], "deadline": "9999-12-31T23:59:59-01:00"},
            "deadline",
        ),
        (
            {"template": TEMPLATE, "items": [item(0)], "deadline": "0001-01-01T00:00:00+01:00"},
            "deadline",
        ),
        ({"template": TEMPLATE, "items": [item(0)], "retention": 0}, "retention"),
    ],
    ids=[
        "no-items",
        "empty",
        "not-a-list",
        "priority",
        "unknown",
        "custom-id",
        "string",
        "keys",
        "deadline-passed",
        "deadline-year-10000",
        "deadline-year-0",
        "retention",
    ],
)
def test_bad_batch_fields_are_named(
    client: Any, auth: dict[str, str], services: Services, body: dict[str, Any], field: str
) -> None:
    response = post(client, auth, body)
    assert response.status_code == 422, response.json
    assert response.mimetype == PROBLEM
    assert field in [e["field"] for e in response.json["errors"]]
    assert rows(services, Generation) == 0


def test_more_than_ten_thousand_items_or_another_media_type_are_refused(
    client: Any, auth: dict[str, str]
) -> None:
    too_many = post(client, auth, {"template": TEMPLATE, "items": [item(0)] * 10_001})
    assert too_many.status_code == 422
    assert [e["field"] for e in too_many.json["errors"]] == ["items"]
    form = client.post("/v1/batches", data={"a": "b"}, headers=auth)
    assert form.status_code == 415
    assert form.mimetype == PROBLEM
    broken = client.post("/v1/batches", data=b"{", content_type="application/json", headers=auth)
    assert broken.status_code == 400


@pytest.mark.parametrize("form", ["json", "ndjson"])
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_content_coded_batch_is_a_415_naming_content_encoding(
    client: Any, auth: dict[str, str], services: Services, form: str, coding: str
) -> None:
    """A gzip batch was "400 Invalid JSON body." (NDJSON: every line "Invalid JSON.")."""
    body = catalog(2)
    if form == "json":
        data, content_type = json.dumps(body).encode(), "application/json"
    else:
        lines = [{"batch": {"template": TEMPLATE}}, *body["items"]]
        data, content_type = "".join(json.dumps(x) + "\n" for x in lines).encode(), NDJSON
    headers = {**auth, "Content-Type": content_type, "Content-Encoding": coding}
    response = client.post("/v1/batches", data=gzip.compress(data), headers=headers)
    assert response.status_code == 415, response.json
    assert response.mimetype == PROBLEM
    assert "Content-Encoding" in response.json["detail"]
    assert response.headers["Accept-Encoding"] == "identity"
    assert rows(services, Batch) == 0
    plain = client.post(
        "/v1/batches", data=data, headers={**headers, "Content-Encoding": "identity"}
    )
    assert plain.status_code == 202, plain.json


@pytest.mark.parametrize("form", ["json", "ndjson"])
def test_a_body_over_the_size_limit_is_413(config: Config, make_client: Any, form: str) -> None:
    services, client, auth = make_client(config.replace(max_request_bytes=2000))
    body = catalog(40)
    if form == "json":
        response = post(client, auth, body)
    else:
        response = post_ndjson(client, auth, [{"batch": {"template": TEMPLATE}}, *body["items"]])
    assert response.status_code == 413
    assert response.mimetype == PROBLEM
    assert rows(services, Generation) == 0


def test_an_ndjson_line_over_the_limit_is_named_and_the_rest_still_read(
    client: Any, auth: dict[str, str], services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    import handlers.batches

    monkeypatch.setattr(handlers.batches, "MAX_LINE_BYTES", 200)
    long = {"input": {"url": "https://shop.example.com/" + "p" * 300 + ".jpg"}}
    lines = [{"batch": {"template": TEMPLATE}}, item(0), long, item(2), _bad_width(3)]
    response = post_ndjson(client, auth, lines)
    assert response.status_code == 422
    assert [e["field"] for e in response.json["errors"]] == ["items[1]", "items[3].input.width"]
    assert "longer than 200 bytes" in response.json["errors"][0]["message"]
    assert rows(services, Generation) == 0


def test_an_ndjson_body_may_open_with_a_byte_order_mark_and_a_blank_line(
    client: Any, auth: dict[str, str]
) -> None:
    lines = ["\ufeff", {"batch": {"template": TEMPLATE}}, item(0)]
    batch = accepted(post_ndjson(client, auth, lines))
    assert batch["counts"]["total"] == 1
    [generation] = batch_generations(client, auth, batch["id"])
    assert generation["input"]["background"] == TEMPLATE["background"]


def test_an_ndjson_body_is_read_in_blocks_not_a_byte_at_a_time() -> None:
    from werkzeug.wsgi import LimitedStream

    from handlers.batches import LINE_BUFFER, _lines

    class Counted(io.BytesIO):
        reads = 0

        def read(self, size: int | None = -1) -> bytes:
            Counted.reads += 1
            return super().read(size)

    line = b'{"input": {"url": "https://x.example/' + b"p" * 1_000_000 + b'.jpg"}}\n'
    body = line * 2
    read = list(_lines(LimitedStream(Counted(body), len(body))))  # what request.stream is
    assert read == [line, line]
    assert Counted.reads <= 2 * len(body) // LINE_BUFFER + 4  # not one per byte


def test_a_template_image_stored_with_every_item_is_bounded(
    client: Any, auth: dict[str, str], services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    import handlers.batches

    monkeypatch.setattr(handlers.batches, "MAX_TEMPLATE_IMAGE_BYTES", 10_000)
    backdrop = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"x" * 3000).decode()
    template = {"width": 1024, "height": 1024, "background": {"replace": backdrop}}
    size = len(backdrop)

    def catalog_of(count: int, own: int = 0) -> dict[str, Any]:
        items = [item(n) for n in range(count)]
        for n in range(own):  # these give their own background: the template's is not stored
            items[n]["input"]["background"] = {"replace": f"https://shop.example.com/b/{n}.jpg"}
        return {"template": template, "items": items}

    accepted(post(client, auth, catalog_of(2)))
    accepted(post(client, auth, catalog_of(5, own=3)))
    refused = post(client, auth, catalog_of(5))
    assert refused.status_code == 422
    [error] = refused.json["errors"]
    assert error["field"] == "template.background.replace"
    assert f"{5 * size} bytes" in error["message"] and "URL instead" in error["message"]
    assert rows(services, Generation) == 7
    # The same from an NDJSON body's header line, named as its field.
    ndjson = [{"batch": {"template": template}}, *catalog_of(5)["items"]]
    refused = post_ndjson(client, auth, ndjson)
    assert refused.status_code == 422
    assert [e["field"] for e in refused.json["errors"]] == ["batch.template.background.replace"]


def test_template_text_stored_with_every_item_is_bounded(
    client: Any, auth: dict[str, str], services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long prompt in the template is a copy per item: 2 MiB in 300 items was 600 MiB of
    rows from one request."""
    import handlers.batches

    monkeypatch.setattr(handlers.batches, "MAX_TEMPLATE_BYTES", 10_000)
    prompt = "a product on a beach at dawn, " * 100  # 3,000 characters
    template = {**TEMPLATE, "background": {"generate": {"description": prompt}}}

    def catalog_of(count: int, own: int = 0) -> dict[str, Any]:
        items = [item(n) for n in range(count)]
        for n in range(own):  # these give their own description: the template's is not stored
            items[n]["input"]["background"] = {"generate": {"description": "a shelf"}}
        return {"template": template, "items": items}

    accepted(post(client, auth, catalog_of(3)))
    accepted(post(client, auth, catalog_of(5, own=3)))
    refused = post(client, auth, catalog_of(4))
    assert refused.status_code == 422
    fields = [error["field"] for error in refused.json["errors"]]
    assert fields[0] == "template.background.generate.description"
    assert {"template.width", "template.height"} >= set(fields[1:])
    stored = 4 * (len(json.dumps(prompt)) + len("1024") * 2)
    assert f"{stored} bytes" in refused.json["errors"][0]["message"]
    assert rows(services, Generation) == 8
    ndjson = [{"batch": {"template": template}}, *catalog_of(4)["items"]]
    assert post_ndjson(client, auth, ndjson).status_code == 422


@pytest.mark.parametrize("form", ["json", "ndjson"])
def test_a_template_value_nested_too_deep_is_refused_even_where_items_replace_it(
    client: Any, auth: dict[str, str], services: Services, form: str
) -> None:
    """Kept as sent, such a value (about 920 levels) was read, then could not be written: a
    500. Past 64 levels, well within what the parser reads, it is refused."""
    deep: Any = 1024
    for _ in range(100):
        deep = [deep]
    template = {**TEMPLATE, "width": deep}
    items = [{"input": {"url": "https://shop.example.com/p/1.jpg", "width": 1024}}]
    if form == "json":
        refused = post(client, auth, {"template": template, "items": items})
    else:
        refused = post_ndjson(client, auth, [{"batch": {"template": template}}, *items])
    assert refused.status_code == 422, refused.get_json()
    [error] = refused.json["errors"]
    assert error["field"].removeprefix("batch.").startswith("template.width.0.0")
    assert "Nested deeper than 64 levels" in error["message"]
    assert rows(services, Batch) == 0


def test_a_repeated_custom_id_is_named_at_its_repetition(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    items = [item(0, custom_id="A"), item(1, custom_id="B"), item(2, custom_id="A")]
    response = post(client, auth, {"template": TEMPLATE, "items": items})
    assert response.status_code == 422
    [error] = response.json["errors"]
    assert error["field"] == "items[2].custom_id"
    assert "items[0].custom_id" in error["message"]
    assert rows(services, Generation) == 0
    # The same custom id in two batches is fine.
    accepted(post(client, auth, {"template": TEMPLATE, "items": [item(0, custom_id="A")]}))
    accepted(post(client, auth, {"template": TEMPLATE, "items": [item(0, custom_id="A")]}))


def test_an_idempotency_key_replays_the_whole_batch_and_refuses_another_body(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    key = {"Idempotency-Key": "catalog-2026-12-05"}
    first = post(client, auth, catalog(3), **key)
    again = post(client, auth, catalog(3), **key)
    assert first.status_code == again.status_code == 202
    assert again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert (
        again.headers["Location"] == first.headers["Location"] == f"/v1/batches/{first.json['id']}"
    )
    assert rows(services, Batch) == 1
    assert rows(services, Generation) == 3
    assert rows(services, IdempotencyKey, IdempotencyKey.batch_id == first.json["id"]) == 1
    # The same items as NDJSON are the same request.
    lines = [{"batch": {"template": TEMPLATE}}, *catalog(3)["items"]]
    assert post_ndjson(client, auth, lines, **key).json == first.json
    other = post(client, auth, catalog(4), **key)
    assert other.status_code == 422
    assert other.json["type"].endswith("/idempotency-key-reused")
    # A key first used for a single generation is not a batch's either.
    single = {"input": {**TEMPLATE, "url": "https://shop.example.com/p/0.jpg"}}
    used = {"Idempotency-Key": "single-1"}
    assert client.post("/v1/generations", json=single, headers={**auth, **used}).status_code == 202
    assert post(client, auth, catalog(1), **used).status_code == 422
    assert rows(services, Generation) == 4


def test_a_batch_retry_gets_its_first_answer_after_the_tenants_buckets_changed(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    """The retry of a request whose answer was lost: told it was refused, a client would send
    the batch again under a new key, and pay for it twice."""
    Tenants(services.store).set("acme", input_buckets=["catalog-bucket"])
    body = {"template": TEMPLATE, "items": [{"input": {"url": "gs://catalog-bucket/p/1.jpg"}}]}
    key = {"Idempotency-Key": "nightly-42"}
    first = post(client, auth, body, **key)
    assert first.status_code == 202, first.json
    Tenants(services.store).set("acme", input_buckets=[])
    again = post(client, auth, body, **key)
    assert again.status_code == 202, again.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json["id"] == first.json["id"]
    assert rows(services, Batch) == 1
    # A new request is checked against the settings of the moment.
    assert post(client, auth, body, **{"Idempotency-Key": "nightly-43"}).status_code == 422


def test_a_batch_retry_after_its_deadline_passed_still_gets_the_first_answer(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    body = catalog(2, deadline=deadline.isoformat())
    key = {"Idempotency-Key": "catalog-2026-12-08"}
    first = accepted(post(client, auth, body, **key))
    time.sleep(max(0.0, (deadline - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    again = post(client, auth, body, **key)
    assert again.status_code == 202, again.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json == first
    # The same request without the key, or with a new one, is new: its deadline has passed.
    for headers in ({}, {"Idempotency-Key": "catalog-2026-12-09"}):
        refused = post(client, auth, body, **headers)
        assert refused.status_code == 422
        assert [e["field"] for e in refused.json["errors"]] == ["deadline"]
    # The key with another body is still a reused key.
    other = post(client, auth, {**body, "priority": 5}, **key)
    assert other.json["type"].endswith("/idempotency-key-reused")
    # Before the first answer was kept, the retry shows the batch as it is now.
    forget_answers(services)
    shown = post(client, auth, body, **key)
    assert shown.status_code == 202
    assert "Idempotent-Replayed" not in shown.headers
    assert shown.json["id"] == first["id"]
    assert rows(services, Batch) == 1


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ('{"template": {"quality": 1e999}, "items": [%s]}', "template.quality"),
        ('{"template": {"width": -1e999}, "items": [%s]}', "template.width"),
        (
            '{"items": [%s, {"input": {"url": "https://a.example/1.jpg", "quality": 1e999}}]}',
            "items[1].input.quality",
        ),
        ('{"batch": {"template": {"quality": 1e999}}}\n%s\n', "batch.template.quality"),
    ],
    ids=["template", "template-negative", "item", "ndjson-header"],
)
def test_numbers_beyond_a_double_are_422_naming_the_field(
    client: Any, auth: dict[str, str], services: Services, data: str, field: str
) -> None:
    # 1e999 parses to infinity, which no JSON column can hold (PostgreSQL refused it with a
    # 500); the template is kept with the batch as sent, so even a value every item overrides.
    one = json.dumps({"input": {"url": "https://shop.example.com/p/0.jpg", "quality": 80}})
    ndjson = data.startswith('{"batch"')
    response = client.post(
        "/v1/batches",
        data=data % one,
        content_type=NDJSON if ndjson else "application/json",
        headers=auth,
    )
    assert response.status_code == 422, response.json
    assert response.mimetype == PROBLEM
    assert [e["field"] for e in response.json["errors"]] == [field]
    assert rows(services, Batch) == 0


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ('{"template": {"width": 1%s}, "items": [%s]}', "template.width"),
        ('{"priority": -1%s, "items": [%s]}', "priority"),
        ('{"batch": {"template": {"width": 1%s}}}\n%s\n', "batch.template.width"),
        (
            '{"batch": {}}\n{"input": {"url": "https://a.example/1.jpg", "quality": 1%s}}\n%s\n',
            "items[0].input.quality",
        ),
    ],
    ids=["template", "priority-negative", "ndjson-header", "ndjson-item"],
)
def test_an_integer_past_pythons_digit_limit_is_422_naming_the_field(
    client: Any, auth: dict[str, str], services: Services, data: str, field: str
) -> None:
    """Past 4300 digits int() refuses the text: the body was "400 Invalid JSON body." (NDJSON:
    the line "Invalid JSON."), where a 400-digit integer is the 422 naming the field."""
    one = json.dumps({"input": {"url": "https://shop.example.com/p/0.jpg", "quality": 80}})
    ndjson = data.startswith('{"batch"')
    response = client.post(
        "/v1/batches",
        data=data % ("0" * 5000, one),
        content_type=NDJSON if ndjson else "application/json",
        headers=auth,
    )
    assert response.status_code == 422, response.json
    assert response.mimetype == PROBLEM
    assert [e["field"] for e in response.json["errors"]] == [field]
    assert rows(services, Batch) == 0


@pytest.mark.parametrize("form", ["json", "ndjson"])
def test_a_batchs_retention_applies_to_every_item(
    client: Any, auth: dict[str, str], services: Services, form: str
) -> None:
    body = catalog(2, retention=3600)
    if form == "json":
        batch = accepted(post(client, auth, body))
    else:
        header = {"batch": {"template": TEMPLATE, "retention": 3600}}
        batch = accepted(post_ndjson(client, auth, [header, *body["items"]]))
    assert [g["retention"] for g in batch_generations(client, auth, batch["id"])] == [3600, 3600]
    # Without one, the tenant's setting (by default: forever).
    plain = accepted(post(client, auth, catalog(1)))
    assert [g["retention"] for g in batch_generations(client, auth, plain["id"])] == [None]
    # It is part of the request: the same key with another retention is another body.
    key = {"Idempotency-Key": "kept-an-hour"}
    accepted(post(client, auth, body, **key))
    other = post(client, auth, catalog(2, retention=60), **key)
    assert other.json["type"].endswith("/idempotency-key-reused")


def test_a_batch_retry_before_the_first_answer_shows_the_batch_now_and_keeps_nothing(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    key = {"Idempotency-Key": "catalog-2026-12-07"}
    first = post(client, auth, catalog(2), **key)
    forget_answers(services)  # as if the first had not answered yet
    retry = post(client, auth, catalog(2), **key)
    assert retry.status_code == 202
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.json == client.get(f"/v1/batches/{first.json['id']}", headers=auth).json
    assert kept_answers(services) == [None]
    assert rows(services, Batch) == 1


def test_counts_follow_the_items_and_batch_completed_goes_out_once_with_them(
    config: Config, make_client: Any, receivers: list[Receiver]
) -> None:
    services, client, auth = make_client(config.replace(webhook_retry_schedule=FAST_SCHEDULE))
    subscribed, hooked, everything = Receiver(), Receiver(), Receiver()
    receivers.extend([subscribed, hooked, everything])
    for receiver, events in ((subscribed, ["batch.completed"]), (everything, None)):
        fields = {"url": receiver.url} | ({"events": events} if events else {})
        assert client.post("/v1/subscriptions", json=fields, headers=auth).status_code == 201
    body = catalog(3, webhook=hooked.url, webhook_events_filter=["batch.completed"])
    batch = accepted(post(client, auth, body))
    assert batch["counts"]["queued"] + batch["counts"]["processing"] == 3
    drain(services)
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert done["status"] == "completed"
    assert done["completed_at"] is not None and done["canceled_at"] is None
    assert done["counts"] == {
        "queued": 0,
        "processing": 0,
        "succeeded": 3,
        "failed": 0,
        "canceled": 0,
        "total": 3,
    }
    for receiver in (subscribed, hooked):
        [request] = receiver.requests
        payload = json.loads(request["body"])
        assert payload["type"] == "batch.completed"
        assert payload["data"]["id"] == batch["id"]
        assert payload["data"]["counts"] == done["counts"]
        assert payload["data"]["status"] == "completed"
    # A subscription without `events` gets the generation.* types, not batch.completed.
    types = [json.loads(r["body"])["type"] for r in everything.requests]
    assert sorted(set(types)) == ["generation.processing", "generation.succeeded"]
    assert len(types) == 6
    [event] = client.get("/v1/events?type=batch.completed", headers=auth).json["data"]
    assert event["generation_id"] == batch["id"]
    assert rows(services, Event, Event.type == "batch.completed") == 1
    # A batch that completed on its own cannot be canceled any more.
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth).status_code == 409


def cancel_at_once(services: Services, generation_ids: list[str]) -> list[bool]:
    """Cancel the generations from as many threads, released together; did each one move?"""
    from service.domain import GenerationStatus
    from service.generations.lifecycle import change_status
    from service.models import utcnow

    start = threading.Barrier(len(generation_ids))
    moved: list[bool] = []

    def cancel(generation_id: str) -> None:
        start.wait(timeout=10)
        with services.store.transaction() as session:
            now = utcnow()
            moved.append(change_status(session, generation_id, GenerationStatus.CANCELED, now=now))

    threads = [threading.Thread(target=cancel, args=(g,)) for g in generation_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return moved


def test_items_finishing_at_the_same_moment_complete_their_batch_exactly_once(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    batch_ids = [accepted(post(client, auth, catalog(2)))["id"] for _ in range(5)]
    for batch_id in batch_ids:
        with services.store.read() as session:
            items = list(
                session.scalars(sa.select(Generation.id).where(Generation.batch_id == batch_id))
            )
        assert cancel_at_once(services, items) == [True, True]
        done = client.get(f"/v1/batches/{batch_id}", headers=auth).json
        assert done["status"] == "completed", done
        assert done["counts"]["canceled"] == 2
    assert rows(services, Event, Event.type == "batch.completed") == len(batch_ids)


def test_a_failed_item_counts_as_failed_and_the_batch_still_completes(
    client: Any, auth: dict[str, str], services: Services, simulator: Any
) -> None:
    from tests.helpers import set_simulator

    set_simulator(simulator.url, failure_rate=1.0)
    batch = accepted(post(client, auth, catalog(2)))
    drain(services)
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert done["status"] == "completed"
    assert done["counts"]["failed"] == 2 and done["counts"]["total"] == 2


def test_cancel_cancels_every_unfinished_item_each_with_its_event(
    config: Config, make_client: Any
) -> None:
    services, client, auth = make_client(config.replace(upstream_concurrency=1))
    batch = accepted(post(client, auth, catalog(5)))
    canceled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    assert canceled.status_code == 200
    body = canceled.json
    assert body["status"] == "completed"
    assert body["canceled_at"] is not None and body["completed_at"] is not None
    assert body["counts"]["canceled"] == body["counts"]["total"] == 5
    assert rows(services, Event, Event.type == "generation.canceled") == 5
    assert rows(services, Event, Event.type == "batch.completed") == 1
    again = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    assert again.status_code == 200
    assert again.json["canceled_at"] == body["canceled_at"]
    drain(services)  # the admitted item's submit task finds it canceled: nothing is sent
    assert rows(services, Generation, Generation.upstream_job.is_not(None)) == 0
    assert rows(services, Event, Event.type == "batch.completed") == 1


def test_a_large_cancel_goes_on_in_a_task_when_the_request_runs_out_of_time(
    config: Config, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.generations.batches

    monkeypatch.setattr(service.generations.batches, "CANCEL_CHUNK", 7)
    # One chunk, then the task.
    monkeypatch.setattr(service.generations.batches, "CANCEL_BUDGET", 0.0)
    services, client, auth = make_client(config.replace(upstream_concurrency=2))
    batch = accepted(post(client, auth, catalog(30)))
    body = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth).json
    assert body["status"] == "processing"
    assert body["canceled_at"] is not None and body["completed_at"] is None
    assert body["counts"]["canceled"] == 7
    # Waiting items go first: the two holding upstream slots are still there.
    waiting = Generation.admitted_at.is_(None)
    assert rows(services, Generation, Generation.status == "canceled", waiting) == 7
    assert rows(services, Task, Task.kind == "cancel_batch") == 1
    drain(services)
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert done["status"] == "completed"
    assert done["counts"]["canceled"] == 30
    assert rows(services, Event, Event.type == "generation.canceled") == 30
    assert rows(services, Event, Event.type == "batch.completed") == 1


def test_a_cancel_whose_request_fails_midway_is_finished_by_its_task(
    config: Config, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.generations.batches import BatchService

    services, client, auth = make_client(config.replace(upstream_concurrency=2))
    batch = accepted(post(client, auth, catalog(12)))
    real_chunk = BatchService._cancel_chunk
    calls = []

    def failing_once(self: BatchService, batch_id: str) -> int:
        calls.append(batch_id)
        if len(calls) == 1:
            raise RuntimeError("the database went away")
        return real_chunk(self, batch_id)

    monkeypatch.setattr(BatchService, "_cancel_chunk", failing_once)
    answer = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    assert answer.status_code == 200
    assert answer.json["canceled_at"] is not None
    assert answer.json["counts"]["canceled"] == 0  # nothing canceled by the request
    assert rows(services, Task, Task.kind == "cancel_batch") == 1
    drain(services)
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert (done["status"], done["counts"]["canceled"]) == ("completed", 12)
    assert rows(services, Event, Event.type == "batch.completed") == 1


def test_batches_list_newest_first_and_their_generations_page_with_a_status_filter(
    client: Any, auth: dict[str, str], config: Config, make_client: Any
) -> None:
    ids = [accepted(post(client, auth, catalog(n)))["id"] for n in (1, 2, 5)]
    seen: list[str] = []
    url = "/v1/batches?limit=2"
    while True:
        page = client.get(url, headers=auth).json
        assert len(page["data"]) <= 2
        seen.extend(b["id"] for b in page["data"])
        if page["next_cursor"] is None:
            break
        url = f"/v1/batches?limit=2&cursor={page['next_cursor']}"
    assert seen == list(reversed(ids))
    listed = client.get("/v1/batches", headers=auth).json["data"]
    assert [b["counts"]["total"] for b in listed] == [5, 2, 1]
    big = ids[2]
    generations = batch_generations(client, auth, big)
    assert [g["input"]["url"] for g in generations] == [
        f"https://shop.example.com/p/{n}.jpg" for n in range(5)
    ]
    one = generations[1]["id"]
    assert client.post(f"/v1/generations/{one}/cancel", headers=auth).status_code == 200
    only = client.get(f"/v1/batches/{big}/generations?status=canceled", headers=auth).json
    assert [g["id"] for g in only["data"]] == [one]
    assert client.get(f"/v1/batches/{big}", headers=auth).json["counts"]["canceled"] == 1
    bad = client.get(f"/v1/batches/{big}/generations?status=done", headers=auth)
    assert bad.status_code == 422


def test_generations_filter_by_batch_and_by_metadata(client: Any, auth: dict[str, str]) -> None:
    body = catalog(0, metadata={"campaign": "summer"})
    body["items"] = [
        item(n, metadata={"sku": str(n), "color": "red" if n % 2 else "blue"}) for n in range(4)
    ]
    batch = accepted(post(client, auth, body))
    other = accepted(post(client, auth, catalog(2)))
    single = {"input": {**TEMPLATE, "url": "https://a.example/x.jpg"}, "metadata": {"sku": "1"}}
    assert client.post("/v1/generations", json=single, headers=auth).status_code == 202

    def urls(query: dict[str, str]) -> list[str]:
        response = client.get("/v1/generations", headers=auth, query_string=query)
        assert response.status_code == 200, response.json
        return sorted(g["input"]["url"].rsplit("/", 1)[1] for g in response.json["data"])

    assert urls({"batch": batch["id"]}) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert urls({"batch": other["id"]}) == ["0.jpg", "1.jpg"]
    assert urls({"metadata[sku]": "1"}) == ["1.jpg", "x.jpg"]
    assert urls({"metadata[sku]": "1", "batch": batch["id"]}) == ["1.jpg"]
    assert urls({"metadata[color]": "red", "metadata[campaign]": "summer"}) == ["1.jpg", "3.jpg"]
    assert urls({"metadata[color]": "green"}) == []
    # With the other filters: all four items still wait (no worker ran).
    summer = {"metadata[campaign]": "summer", "status": "queued"}
    assert urls(summer) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]


def test_a_metadata_filter_finds_any_key(client: Any, auth: dict[str, str]) -> None:
    keys = ["a.b", 'a"b', "a'b", "a[0]", "$", "ключ", "a\\b", "*", "%", "a b"]
    items = [item(n, metadata={key: f"v{n}", "other": f"v{n}"}) for n, key in enumerate(keys)]
    accepted(post(client, auth, {"template": TEMPLATE, "items": items}))
    for n, key in enumerate(keys):
        query = {f"metadata[{key}]": f"v{n}"}
        response = client.get("/v1/generations", headers=auth, query_string=query)
        assert response.status_code == 200, response.json
        assert [g["metadata"] for g in response.json["data"]] == [{key: f"v{n}", "other": f"v{n}"}]
    # A value under another key is no match.
    query = {f"metadata[{keys[0]}]": "v1"}
    assert client.get("/v1/generations", headers=auth, query_string=query).json["data"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("metadata[]=x", "metadata[]"),
        (f"metadata[{'k' * 41}]=x", f"metadata[{'k' * 41}]"),
        ("metadata[a]=1&metadata[a]=2", "metadata[a]"),
        (f"metadata[a]={'v' * 501}", "metadata[a]"),
        ("batch=", "batch"),
    ],
    ids=["empty-key", "long-key", "repeated-key", "long-value", "empty-batch"],
)
def test_bad_generation_filters_are_named(
    client: Any, auth: dict[str, str], query: str, field: str
) -> None:
    response = client.get(f"/v1/generations?{query}", headers=auth)
    assert response.status_code == 422
    assert response.mimetype == PROBLEM, response.get_data()
    assert field in [e["field"] for e in response.json["errors"]]


def test_another_tenants_batch_is_not_found(
    client: Any, auth: dict[str, str], services: Services
) -> None:
    batch = accepted(post(client, auth, catalog(2)))
    other = {"Authorization": "Bearer " + services.api_keys.create("globex")}
    for path in ("", "/generations"):
        assert client.get(f"/v1/batches/{batch['id']}{path}", headers=other).status_code == 404
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=other).status_code == 404
    assert client.get("/v1/batches", headers=other).json["data"] == []
    assert client.get(f"/v1/generations?batch={batch['id']}", headers=other).json["data"] == []
    assert client.get(f"/v1/batches/{batch['id']}", headers=auth).json["counts"]["total"] == 2


def test_intake_admits_only_what_the_line_allows(config: Config, make_client: Any) -> None:
    services, client, auth = make_client(config.replace(upstream_concurrency=2))
    batch = accepted(post(client, auth, catalog(6)))
    assert rows(services, Generation, Generation.batch_id == batch["id"]) == 6
    assert rows(services, Generation, Generation.admitted_at.is_not(None)) == 2
    assert batch["counts"]["queued"] == 6
    drain(services)
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert done["counts"]["succeeded"] == 6
    assert done["status"] == "completed"


def test_a_ten_thousand_item_batch_is_accepted_in_one_request(
    config: Config, make_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    services, client, auth = make_client(config.replace(upstream_concurrency=2))
    body = {
        "template": TEMPLATE,
        "metadata": {"feed": "full"},
        "items": [
            {"input": {"url": f"https://shop.example.com/p/{n}.jpg"}, "custom_id": f"sku-{n}"}
            for n in range(10_000)
        ],
    }
    data = json.dumps(body).encode()
    started = time.perf_counter()
    response = client.post("/v1/batches", data=data, content_type="application/json", headers=auth)
    elapsed = time.perf_counter() - started
    batch = accepted(response)
    assert batch["counts"]["total"] == batch["counts"]["queued"] == 10_000
    assert rows(services, Generation, Generation.batch_id == batch["id"]) == 10_000
    assert rows(services, Generation, Generation.admitted_at.is_not(None)) == 2
    lines = [json.dumps({"batch": {"template": TEMPLATE}})] + [json.dumps(i) for i in body["items"]]
    started = time.perf_counter()
    response = client.post(
        "/v1/batches", data="\n".join(lines).encode(), content_type=NDJSON, headers=auth
    )
    ndjson_elapsed = time.perf_counter() - started
    assert accepted(response)["counts"]["total"] == 10_000
    dialect = services.store.dialect
    with capsys.disabled():
        print(
            f"\n10,000-item batch on {dialect}: accepted in {elapsed:.2f} s (JSON), "
            f"{ndjson_elapsed:.2f} s (NDJSON)"
        )
    # Typically 2-6 s each; the bound only catches a pathological slowdown (a busy machine
    # must not fail it).
    assert elapsed < 60 and ndjson_elapsed < 60
