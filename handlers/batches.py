"""/v1/batches: many generations in one request, as a JSON document or as NDJSON lines.

NDJSON (`Content-Type: application/x-ndjson`) is one JSON object per line, read from the
request stream line by line (never the whole body as one string; a line may be at most
MAX_LINE_BYTES). Each line is one item, `{input, metadata?, custom_id?}`; an optional FIRST
line `{"batch": {template?, webhook?, webhook_events_filter?, metadata?, priority?,
deadline?, retention?}}` carries the batch-level fields (named `batch.webhook` and so on in
errors; the line holds `batch` alone). Blank lines are skipped; item lines are numbered from 0,
like the `items` array of the JSON form, so both name a bad item `items[i]`.

Every item is checked before anything is stored: one bad item refuses the whole batch with a
422 naming each bad field (`items[3].input.width`, `items[7].custom_id`), and nothing is kept.
A bad value an item takes from the `template` is named once, as the template's
(`template.width`; `batch.template.width` in NDJSON), not once per item that takes it.
Strings no database can store (NUL, lone surrogates) and numbers beyond a double (`1e999`) are
refused wherever they are, the batch-level fields (the `template` is kept as sent) included.
A `deadline` already passed is refused after the Idempotency-Key lookup: a retry of a batch
its key made gets the first answer.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import IO, Any, NoReturn

import flask
from flask_smorest import Blueprint
from marshmallow import ValidationError
from webargs.flaskparser import is_json_request
from werkzeug.exceptions import BadRequest

from handlers.auth import require_tenant, services, tenant, tenant_id
from handlers.idempotency import IdempotencyHeaderSchema, answer_past_deadline, render_answer
from handlers.problems import (
    StrictJSONParser,
    flatten_messages,
    parse_json_int,
    problem_response,
)
from schemas.batches import (
    MAX_ITEMS,
    BatchCreateSchema,
    BatchGenerationsArgsSchema,
    BatchHeaderSchema,
    BatchItemSchema,
    BatchListArgsSchema,
    BatchOptionsSchema,
    BatchPageSchema,
    BatchSchema,
    deep_merge,
)
from schemas.deepimage import ProcessRequestSchema
from schemas.generations import (
    MAX_METADATA_KEYS,
    GenerationPageSchema,
    deadline_passed,
    inline_images,
)
from schemas.problems import ProblemSchema
from service.errors import InvalidRequest, require_identity_coding
from service.generations.batches import MAX_REPORTED_ERRORS, NewBatch, NewBatchItem
from service.text import unstorable_values

NDJSON = "application/x-ndjson"
# Room for one item with a large inline (base64) image; the body limit (25 MiB) bounds the rest.
MAX_LINE_BYTES = 20 * 1024 * 1024
# Inline image data a template may have stored with its items, in all: past this, a shared
# image belongs at a URL (a 1.4 MB background in 1,000 items would be 1.4 GB of rows).
MAX_TEMPLATE_IMAGE_BYTES = 64 * 1024 * 1024
# All that a template stores with its items (each field's JSON, once per item that takes it):
# a long prompt shared by 10,000 items is 10,000 copies of it.
MAX_TEMPLATE_BYTES = 64 * 1024 * 1024
LINE_BUFFER = 64 * 1024  # bytes read from the body at a time
HEADER_ALONE = (
    "The first line holds `batch` alone: the batch-level fields go inside it, and each item "
    "on a line of its own."
)
_BOM = b"\xef\xbb\xbf"

blp = Blueprint(
    "batches",
    __name__,
    url_prefix="/v1/batches",
    description="Many generations in one request: a catalog with shared settings.",
)
blp.ARGUMENTS_PARSER = StrictJSONParser()
blp.before_request(require_tenant)

_ITEM = BatchItemSchema()
_INPUT = ProcessRequestSchema()
_OPTIONS = BatchOptionsSchema()
_HEADER = BatchHeaderSchema()

_NDJSON_DESCRIPTION = (
    'One JSON object per line. An optional first line `{"batch": {...}}` holds the '
    "batch-level fields (as in the JSON form, without `items`); every other line is one item "
    "`{input, metadata?, custom_id?}`. Blank lines are skipped; item lines are numbered from 0 "
    "(`items[i]` in errors; the first line's fields are `batch.…`). "
    f"At most {MAX_ITEMS} items; a line may be {MAX_LINE_BYTES} bytes."
)
REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": BatchCreateSchema},
        NDJSON: {"schema": {"type": "string", "description": _NDJSON_DESCRIPTION}},
    },
}


@blp.before_request
def _require_batch_body() -> flask.Response | None:
    """A body must be JSON or NDJSON, sent without a content coding, else 415 (after
    authentication)."""
    request = flask.request
    if request.method != "POST":
        return None
    has_body = (
        bool(request.content_length)
        or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    )
    if has_body and request.mimetype != NDJSON and not is_json_request(request):
        return problem_response(
            415,
            "Unsupported Media Type",
            f"send the body as application/json or {NDJSON}, "
            f"not {request.mimetype or 'no content type'}",
        )
    if has_body:
        require_identity_coding(request.headers.get("Content-Encoding"))
    return None


def _leaves(
    template: dict[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """The template's fields that an item takes or replaces whole: every value that is not an
    object (objects merge), by path."""
    for key, value in template.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def _split_errors(messages: Any, item: Any, template: Any) -> tuple[Any, dict[Any, Any]]:
    """marshmallow's errors for an item's input merged over the template, split into the
    item's and the template's. An error is the template's where its path leaves the item's own
    input for a key only the template has: the value came from the template, the same for every
    item that takes it. A field missing from both is the item's (the item may give it)."""
    if not isinstance(messages, dict) or not isinstance(item, dict):
        return messages, {}  # the item's own value (it replaced the template's whole)
    own: dict[Any, Any] = {}
    shared: dict[Any, Any] = {}
    for key, value in messages.items():
        if key in item:
            below = template.get(key) if isinstance(template, dict) else None
            own_below, shared_below = _split_errors(value, item[key], below)
            if own_below:
                own[key] = own_below
            if shared_below:
                shared[key] = shared_below
        elif isinstance(template, dict) and key in template:
            shared[key] = value
        else:
            own[key] = value
    return own, shared


class BatchBody:
    """Checks items one at a time against the batch-level `options`; keeps the good ones.

    `prefix`: where the batch-level fields are in the body (`batch.` on an NDJSON header line),
    to name the template's fields in errors.
    """

    def __init__(self, options: dict[str, Any], prefix: str = "") -> None:
        self.options = options
        self.template: dict[str, Any] = options.get("template") or {}
        self.template_field = prefix + "template"
        self.metadata: dict[str, str] = options.get("metadata") or {}
        self.items: list[NewBatchItem] = []
        self.errors: list[dict[str, Any]] = []
        # Errors in the template's values, each once (by field and message), in the order found.
        self.template_errors: dict[tuple[str, str], dict[str, Any]] = {}
        self.bad_items = 0
        self.count = 0
        self._custom_ids: dict[str, int] = {}
        # The template's fields are stored again with every item that takes them: the bytes
        # of each (its JSON); the items kept so far, and how many of them replaced each part
        # of the template (counted from the items' own inputs: a template may be large).
        self._template_fields = {
            path: len(json.dumps(value, ensure_ascii=False).encode())
            for path, value in _leaves(self.template)
        }
        self._kept = 0
        self._replaced: dict[tuple[str, ...], int] = {}
        self._template_images = {
            path: len(value.encode()) for path, value in inline_images(self.template)
        }

    def add(self, raw: Any) -> None:
        index = self.count
        self.count += 1
        if self.count > MAX_ITEMS:
            _refuse([{"field": "items", "message": f"At most {MAX_ITEMS} items."}])
        errors, template_errors = self._check(index, raw)
        if errors or template_errors:
            self.bad_items += 1
            self.errors.extend(errors[: max(0, MAX_REPORTED_ERRORS - len(self.errors))])
            for error in template_errors:
                self.template_errors.setdefault((error["field"], error["message"]), error)

    def add_error(self, field: str, message: str) -> None:
        """An item that could not even be read (not JSON, a line too long)."""
        self.count += 1
        self.bad_items += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"field": field, "message": message})

    def _check(self, index: int, raw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The item's errors, and those of the template's values it takes."""
        name = f"items[{index}]"
        if not isinstance(raw, dict):
            return [{"field": name, "message": "Must be an object with `input`."}], []
        unstorable = unstorable_values(raw, name)
        if unstorable:
            return unstorable, []
        try:
            item = _ITEM.load(raw)
        except ValidationError as exc:
            return flatten_messages(exc.messages, name), []
        errors: list[dict[str, Any]] = []
        template_errors: list[dict[str, Any]] = []
        try:
            merged = _INPUT.load(deep_merge(self.template, item["input"]))
        except ValidationError as exc:
            own, shared = _split_errors(exc.messages, item["input"], self.template)
            errors.extend(flatten_messages(own, f"{name}.input"))
            template_errors = flatten_messages(shared, self.template_field)
        metadata = {**self.metadata, **item.get("metadata", {})}
        if len(metadata) > MAX_METADATA_KEYS:
            errors.append(
                {
                    "field": f"{name}.metadata",
                    "message": f"At most {MAX_METADATA_KEYS} keys with the batch's metadata.",
                }
            )
        custom_id = item.get("custom_id")
        if custom_id is not None:
            first = self._custom_ids.setdefault(custom_id, index)
            if first != index:
                errors.append(
                    {
                        "field": f"{name}.custom_id",
                        "message": f"Repeats items[{first}].custom_id; custom ids are unique "
                        "within a batch.",
                    }
                )
        if not errors and not template_errors:
            self.items.append(NewBatchItem(input=merged, metadata=metadata, custom_id=custom_id))
            self._kept += 1
            self._count_replaced(self.template, item["input"], ())
        return errors, template_errors

    def _count_replaced(
        self, template: dict[str, Any], item_input: dict[str, Any], path: tuple[str, ...]
    ) -> None:
        """Count the parts of `template` that `item_input` replaces (where both hold an
        object, they merge: only what is below is replaced)."""
        for key, value in item_input.items():
            if key not in template:
                continue
            below = template[key]
            if isinstance(below, dict) and isinstance(value, dict):
                self._count_replaced(below, value, (*path, key))
            else:
                self._replaced[(*path, key)] = self._replaced.get((*path, key), 0) + 1

    def _taken(self, leaf: tuple[str, ...]) -> int:
        """How many kept items take the template's field at `leaf`."""
        replaced = sum(self._replaced.get(leaf[:n], 0) for n in range(1, len(leaf) + 1))
        return self._kept - replaced

    def new_batch(self) -> NewBatch:
        if self.count == 0:
            _refuse([{"field": "items", "message": f"Give 1 to {MAX_ITEMS} items."}])
        stored = {path: size * self._taken(path) for path, size in self._template_fields.items()}
        image_bytes = sum(size * self._taken(path) for path, size in self._template_images.items())
        if image_bytes > MAX_TEMPLATE_IMAGE_BYTES:
            message = (
                f"Inline image data is stored with every item that uses it: "
                f"{image_bytes} bytes for these items, over the limit of "
                f"{MAX_TEMPLATE_IMAGE_BYTES}. Give the image as a gs:// or https URL instead."
            )
            _refuse(
                [
                    {"field": ".".join((self.template_field, *path)), "message": message}
                    for path in self._template_images
                ]
            )
        if sum(stored.values()) > MAX_TEMPLATE_BYTES:
            message = (
                f"The template's fields are stored with every item that takes them: "
                f"{sum(stored.values())} bytes for these items, over the limit of "
                f"{MAX_TEMPLATE_BYTES}. Shorten the largest, or give them in the items' own input."
            )
            largest = sorted(stored, key=lambda path: stored[path], reverse=True)[:3]
            _refuse(
                [
                    {"field": ".".join((self.template_field, *path)), "message": message}
                    for path in largest
                ]
            )
        if self.bad_items:
            # The template's errors first: each is once, and may be why every item is invalid.
            errors = [*self.template_errors.values(), *self.errors][:MAX_REPORTED_ERRORS]
            shown = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
            raise InvalidRequest(
                f"{self.bad_items} of {self.count} items are invalid; nothing was stored. " + shown,
                errors=errors,
            )
        return NewBatch(items=self.items, **self.options)


def _refuse(errors: list[dict[str, Any]]) -> NoReturn:
    shown = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
    raise InvalidRequest(shown, errors=errors[:MAX_REPORTED_ERRORS])


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _load_options(raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    unstorable = unstorable_values(raw, prefix)
    if unstorable:
        _refuse(unstorable)
    try:
        options: dict[str, Any] = _OPTIONS.load(raw)
    except ValidationError as exc:
        _refuse(flatten_messages(exc.messages, prefix))
    return options


def read_json(data: bytes) -> NewBatch:
    """The application/json form: `{items: [...], ...batch-level fields}`."""
    try:
        body = json.loads(data, parse_constant=_reject_constant, parse_int=parse_json_int)
    except RecursionError:
        raise BadRequest("JSON body is nested too deeply.") from None
    except ValueError:
        raise BadRequest("Invalid JSON body.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with `items`")
    items = body.pop("items", None)
    batch = BatchBody(_load_options(body, ""))
    if not isinstance(items, list):
        _refuse([{"field": "items", "message": f"A list of 1 to {MAX_ITEMS} items is required."}])
    if len(items) > MAX_ITEMS:
        _refuse([{"field": "items", "message": f"At most {MAX_ITEMS} items."}])
    for raw in items:
        batch.add(raw)
    return batch.new_batch()


def _lines(stream: IO[bytes]) -> Iterator[bytes | None]:
    """The stream's lines, one at a time, a UTF-8 byte order mark off the first; None for a
    line over MAX_LINE_BYTES (skipped)."""
    if isinstance(stream, io.RawIOBase):
        # werkzeug's LimitedStream: its readline reads a byte at a time (6 s of CPU for a
        # line of 12 MB). Buffered, it reads in blocks.
        stream = io.BufferedReader(stream, LINE_BUFFER)
    first = True
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if first:
            line, first = line.removeprefix(_BOM), False
        if not line:
            return
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):  # drop the rest of it, a chunk at a time
            line = stream.readline(1024 * 1024)
        yield None


def read_ndjson(stream: IO[bytes]) -> NewBatch:
    """The application/x-ndjson form (see the module docstring)."""
    batch: BatchBody | None = None
    for line in _lines(stream):
        if line is not None and not line.strip():
            continue
        value: Any = None
        problem = None
        if line is None:
            problem = f"The line is longer than {MAX_LINE_BYTES} bytes."
        else:
            try:
                value = json.loads(line, parse_constant=_reject_constant, parse_int=parse_json_int)
            except (ValueError, RecursionError):
                problem = "Invalid JSON."
        if batch is None:
            if isinstance(value, dict) and "batch" in value:
                unstorable = unstorable_values(value)
                if unstorable:
                    _refuse(unstorable)
                if len(value) > 1:
                    # Named as the line (`batch`): an `input` beside it is not items[0]'s.
                    _refuse([{"field": "batch", "message": HEADER_ALONE}])
                try:
                    header = _HEADER.load(value)
                except ValidationError as exc:
                    _refuse(flatten_messages(exc.messages))
                batch = BatchBody(header["batch"], prefix="batch.")
                continue
            batch = BatchBody(_load_options({}, ""))
        if problem is not None:
            if batch.count >= MAX_ITEMS:
                _refuse([{"field": "items", "message": f"At most {MAX_ITEMS} items."}])
            batch.add_error(f"items[{batch.count}]", problem)
        else:
            batch.add(value)
    if batch is None:
        _refuse([{"field": "items", "message": f"Give 1 to {MAX_ITEMS} items."}])
    return batch.new_batch()


@blp.route("", methods=["POST"])
@blp.arguments(IdempotencyHeaderSchema(), location="headers", as_kwargs=True)
@blp.doc(requestBody=REQUEST_BODY)
@blp.response(202, BatchSchema)
@blp.alt_response(413, schema=ProblemSchema, description="The body is over the size limit")
@blp.alt_response(
    415, schema=ProblemSchema, description="Neither JSON nor NDJSON, or a Content-Encoding"
)
@blp.alt_response(
    422,
    schema=ProblemSchema,
    description="Invalid items (named `items[i]…`, a value taken from the template "
    "`template…`), or a reused key",
)
def create_batch(idempotency_key: str | None = None) -> Any:
    """Accept up to 10,000 generations at once; they wait in the line and go in turn."""
    request = flask.request
    ndjson = request.mimetype == NDJSON
    new = read_ndjson(request.stream) if ndjson else read_json(request.get_data(cache=False))
    caller = tenant()
    batches = services().batches
    if deadline_passed(new.deadline):
        # Refused, unless it retries a request its key answered (before the deadline).
        answer = answer_past_deadline(
            idempotency_key,
            lambda key: batches.retry_answer(caller.id, new, key),
            "batch.deadline" if ndjson else "deadline",
        )
    else:
        answer = batches.create(
            caller.id,
            new,
            idempotency_key=idempotency_key,
            settings=caller,
            webhook_field="batch.webhook" if ndjson else "webhook",
        )
    return render_answer(answer, "/v1/batches")


@blp.route("", methods=["GET"])
@blp.arguments(BatchListArgsSchema, location="query", as_kwargs=True)
@blp.response(200, BatchPageSchema)
def list_batches(**args: Any) -> Any:
    """This tenant's batches, newest first, each with its counts."""
    page = services().batches.list(tenant_id(), **args)
    return {"data": page.items, "next_cursor": page.next_cursor}


@blp.route("/<string:batch_id>", methods=["GET"])
@blp.response(200, BatchSchema)
@blp.alt_response(404, schema=ProblemSchema)
def get_batch(batch_id: str) -> Any:
    """One batch, with its items counted by status."""
    return services().batches.get(tenant_id(), batch_id)


@blp.route("/<string:batch_id>/generations", methods=["GET"])
@blp.arguments(BatchGenerationsArgsSchema, location="query", as_kwargs=True)
@blp.response(200, GenerationPageSchema)
@blp.alt_response(404, schema=ProblemSchema)
def list_batch_generations(batch_id: str, **args: Any) -> Any:
    """The batch's generations, newest first (the last item first); `status` filters."""
    tenant = tenant_id()
    services().batches.require(tenant, batch_id)
    page = services().generations.list(tenant, batch=batch_id, **args)
    return {"data": page.items, "next_cursor": page.next_cursor}


@blp.route("/<string:batch_id>/cancel", methods=["POST"])
@blp.response(200, BatchSchema)
@blp.alt_response(404, schema=ProblemSchema)
@blp.alt_response(409, schema=ProblemSchema, description="Completed before it was canceled")
def cancel_batch(batch_id: str) -> Any:
    """Cancel every item still queued or processing (each gets its generation.canceled)."""
    return services().batches.cancel(tenant_id(), batch_id)
