"""`gs://bucket/object` references: one parser, shared by the request schema and the service.

Bucket names follow GCS's rules in their common form (3-63 characters of lowercase letters,
digits, `-`, `_` and `.`, starting and ending with a letter or digit; dotted names up to 222);
object names are 1-1024 characters with no control characters.
"""

from __future__ import annotations

import re

BUCKET_RE = re.compile(r"^(?=.{3,222}$)[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_OBJECT_NAME = 1024


def is_bucket_name(bucket: str) -> bool:
    """Whether `bucket` is a GCS bucket name (a name alone: no gs://, no object)."""
    return BUCKET_RE.fullmatch(bucket) is not None and (len(bucket) <= 63 or "." in bucket)


def parse_gs_url(value: str, *, object_required: bool = True) -> tuple[str, str] | None:
    """(bucket, object name) of `gs://bucket/object`, or None when `value` is not one.

    With `object_required=False` the object part may be empty (a bucket or a prefix).
    """
    if not value.startswith("gs://"):
        return None
    bucket, _, name = value[len("gs://") :].partition("/")
    if not is_bucket_name(bucket):
        return None
    if len(name.encode()) > MAX_OBJECT_NAME or _CONTROL_RE.search(name):
        return None
    if object_required and (not name or name.endswith("/")):
        return None
    return bucket, name


def gs_url_problem(value: str) -> str | None:
    """Why `value` is not a `gs://bucket/object` reference, or None if it is one."""
    if parse_gs_url(value) is None:
        bucket = value[len("gs://") :].partition("/")[0]
        if bucket != bucket.lower() and parse_gs_url(value.replace(bucket, bucket.lower(), 1)):
            return "GCS bucket names are lowercase: gs://bucket/object."
        return "A GCS reference looks like gs://bucket/object (an object, not a folder)."
    return None
