"""What a tenant's request may reach outside genrelay, and how `gs://` inputs are handed on.

genrelay talks to Deep-Image with one API key and to GCS with one service account, so a
tenant's `input` must not name what belongs to someone else:
- `storage://NAME/...` (wherever the schema takes one: `url`, `background.replace`, and
  `target` for results) is a storage the operator set up at Deep-Image under genrelay's key;
  a tenant may name it only when NAME is on its `allowed_storages`.
- `gs://bucket/object` (wherever `input` takes an image) is read with genrelay's own
  credentials; only buckets on the tenant's `allowed_input_buckets`.
Both refusals are 422 naming the field (`input.url`, `input.target`, …). Which fields those are
is read from the schema (schemas/deepimage.py), so a field that takes a reference is checked.

At submission every `gs://` reference becomes a V4 signed https GET URL, valid for
GENRELAY_INPUT_URL_TTL seconds, that Deep-Image downloads like any public URL. Only the
payload sent upstream carries it: the stored `input` keeps the `gs://` form, and the signed
URL is never logged or stored.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Callable, Iterator
from typing import Any

from marshmallow import Schema, fields

from schemas.deepimage import STORAGE, ImageReference, ProcessRequestSchema, StorageFolder
from service.adapters.blobstore import BlobStore, PermanentBlobError
from service.adapters.gcs_urls import parse_gs_url
from service.errors import InvalidRequest
from service.tenants import TenantSettings

log = logging.getLogger("genrelay.inputs")


def _schema_fields(
    schema: Schema, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], fields.Field]]:
    """(path of keys, field) of every leaf field; "*" stands for every item of a list."""
    for name, field in schema.declared_fields.items():
        yield from _leaves(field, (*path, field.data_key or name))


def _leaves(
    field: fields.Field, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], fields.Field]]:
    if isinstance(field, fields.Nested):
        assert isinstance(field.schema, Schema)
        yield from _schema_fields(field.schema, path)
    elif isinstance(field, fields.List):
        yield from _leaves(field.inner, (*path, "*"))
    else:
        yield path, field


_REQUEST_FIELDS = tuple(_schema_fields(ProcessRequestSchema()))
# Where `input` takes an image: path of keys, "*" for every item of a list.
IMAGE_FIELDS: tuple[tuple[str, ...], ...] = tuple(
    path for path, field in _REQUEST_FIELDS if isinstance(field, ImageReference)
)
# Where `input` may name a Deep-Image storage (an image, or `target`'s folder for results).
STORAGE_FIELDS: tuple[tuple[str, ...], ...] = tuple(
    path
    for path, field in _REQUEST_FIELDS
    if isinstance(field, StorageFolder)
    or (isinstance(field, ImageReference) and STORAGE in field.kinds)
)


class InputNotSignable(Exception):
    """A `gs://` input cannot be turned into a URL Deep-Image can download."""


def _walk(
    document: Any, path: tuple[str, ...], shown: tuple[str, ...] = ()
) -> Iterator[tuple[str, Any, Any, str | int]]:
    """(dotted field name, value, container, key) for every value at `path`."""
    if not path:
        return
    head, rest = path[0], path[1:]
    if head == "*":
        if isinstance(document, list):
            for index, item in enumerate(document):
                if rest:
                    yield from _walk(item, rest, (*shown, str(index)))
                else:
                    yield ".".join((*shown, str(index))), item, document, index
        return
    if not isinstance(document, dict) or head not in document:
        return
    if rest:
        yield from _walk(document[head], rest, (*shown, head))
    else:
        yield ".".join((*shown, head)), document[head], document, head


def image_references(request: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, value) of every image reference in a Deep-Image request that is a string."""
    for path in IMAGE_FIELDS:
        for field, value, _container, _key in _walk(request, path):
            if isinstance(value, str):
                yield field, value


def access_problems(settings: TenantSettings, request: dict[str, Any]) -> list[dict[str, str]]:
    """`[{field, message}]` for every bucket or storage the tenant may not use (none: fine)."""
    problems: list[dict[str, str]] = []
    for path in STORAGE_FIELDS:
        for field, value, _container, _key in _walk(request, path):
            if not isinstance(value, str) or not value.startswith("storage://"):
                continue
            name = value[len("storage://") :].split("/", 1)[0]
            if name not in settings.allowed_storages:
                problems.append(
                    {
                        "field": f"input.{field}",
                        "message": f"storage {name!r} is not allowed for this tenant "
                        "(the operator lists the storages it may use)",
                    }
                )
    for field, value in image_references(request):
        parsed = parse_gs_url(value)
        if parsed is not None and parsed[0] not in settings.allowed_input_buckets:
            problems.append(
                {
                    "field": f"input.{field}",
                    "message": f"bucket {parsed[0]!r} is not allowed for this tenant's inputs "
                    "(the operator lists the buckets it may read)",
                }
            )
    return problems


def require_access(settings: TenantSettings, request: dict[str, Any]) -> None:
    """InvalidRequest (422) naming each field that reaches what the tenant may not use."""
    problems = access_problems(settings, request)
    if problems:
        raise InvalidRequest(
            "the request names storage the tenant may not use",
            errors=problems,
        )


def with_signed_inputs(
    request: dict[str, Any],
    blobs: BlobStore,
    ttl: dt.timedelta,
    *,
    sign: Callable[[BlobStore, str, dt.timedelta], str | None] | None = None,
) -> dict[str, Any]:
    """A copy of `request` whose `gs://` image references are V4 signed https GET URLs.

    Raises InputNotSignable when the credentials cannot sign, or signing is refused for good;
    TransientBlobError (from the store) when signing through IAM fails for a moment.
    """
    signer = sign or (lambda store, name, expires: store.signed_url(name, expires))
    payload = copy.deepcopy(request)
    for path in IMAGE_FIELDS:
        for field, value, container, key in list(_walk(payload, path)):
            parsed = parse_gs_url(value) if isinstance(value, str) else None
            if parsed is None:
                continue
            bucket, name = parsed
            try:
                url = signer(blobs.for_bucket(bucket), name, ttl)
            except PermanentBlobError as exc:
                # Its text (IAM's or google-auth's answer) is for the operator, not the tenant.
                log.error("signing input.%s failed for good: %s", field, exc.message)
                raise InputNotSignable(
                    f"input.{field} names gs://{bucket}/…, but signing its URL was refused "
                    "(genrelay's signing credentials); the operator's logs say why"
                ) from None
            if url is None:
                raise InputNotSignable(
                    f"input.{field} names gs://{bucket}/…, but genrelay's credentials cannot "
                    "sign URLs (set GENRELAY_GCS_SIGNING_ACCOUNT on Cloud Run, or use a "
                    "service-account key)"
                )
            container[key] = url
    return payload
