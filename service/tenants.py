"""Tenant settings, managed by the operator with `genrelay tenants …`.

A tenant is made by `genrelay keys create NAME`. Its settings shape its share of the
Deep-Image account (service/generations/line.py): `weight` (the slots are shared in
proportion once every waiting tenant holds one; default 1) and `max_in_flight` (at most this
many of its jobs at Deep-Image at once; none by default).

And its part of the GCP loop (service/generations/inputs.py):
- `allowed_input_buckets`: GCS buckets its `gs://bucket/object` inputs may name (none by
  default). genrelay reads them with its own credentials, so only the operator may grant them.
- `allowed_storages`: Deep-Image storages (`storage://NAME/...` in `url` and `target`) it may
  use. They are the operator's, configured at Deep-Image under genrelay's one key: none by
  default.
- `output`: `gs://bucket[/prefix]` where its results are stored (default GENRELAY_GCS_BUCKET
  and GENRELAY_GCS_PREFIX).
- `retention`: seconds its results are kept before they are deleted (default: forever); a
  request's own `retention` wins.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Sequence
from typing import Any, cast

import sqlalchemy as sa

from service.adapters.gcs_urls import BUCKET_RE, parse_gs_url
from service.database import Store
from service.domain import MAX_IN_FLIGHT
from service.models import Tenant

MAX_WEIGHT = 1000
# Deep-Image storage names as they appear in storage://NAME/...
STORAGE_NAME_RE = re.compile(r"^[^/\s]{1,200}$")
MAX_RETENTION = 10 * 365 * 24 * 3600
_DURATION_RE = re.compile(r"^(\d{1,12})([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UnknownTenant(LookupError):
    """No tenant has that name."""


class InvalidSetting(ValueError):
    """A setting's value is out of range; the message names it."""


@dataclasses.dataclass(frozen=True)
class TenantSettings:
    id: str
    name: str
    weight: int
    max_in_flight: int | None
    created_at: dt.datetime
    allowed_input_buckets: tuple[str, ...] = ()
    allowed_storages: tuple[str, ...] = ()
    # gs://bucket[/prefix], or None for the service's GENRELAY_GCS_BUCKET/PREFIX.
    output: str | None = None
    retention: int | None = None


# Marks "leave as it is" apart from None ("no cap").
UNCHANGED: object = object()


def parse_duration(text: str) -> int:
    """Seconds from `3600`, `90s`, `15m`, `12h` or `30d`; InvalidSetting otherwise."""
    match = _DURATION_RE.match(text.strip().lower())
    if match is None:
        raise InvalidSetting(
            f"retention must be whole seconds or a number with s, m, h or d (e.g. 30d), "
            f"not {text!r}"
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not 1 <= seconds <= MAX_RETENTION:
        raise InvalidSetting("retention must be from 1 second to 10 years")
    return seconds


def check_buckets(buckets: Sequence[str]) -> tuple[str, ...]:
    for bucket in buckets:
        if not BUCKET_RE.fullmatch(bucket):
            raise InvalidSetting(f"{bucket!r} is not a GCS bucket name")
    return tuple(dict.fromkeys(buckets))


def check_storages(storages: Sequence[str]) -> tuple[str, ...]:
    for storage in storages:
        if not STORAGE_NAME_RE.fullmatch(storage):
            raise InvalidSetting(f"{storage!r} is not a Deep-Image storage name")
    return tuple(dict.fromkeys(storages))


def check_output(output: str) -> str:
    parsed = parse_gs_url(output, object_required=False)
    if parsed is None:
        raise InvalidSetting(
            f"output must look like gs://bucket or gs://bucket/prefix, not {output!r}"
        )
    bucket, prefix = parsed
    prefix = prefix.strip("/")
    return f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"


class Tenants:
    """Reads and changes tenants' settings."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def list(self) -> list[TenantSettings]:
        with self.store.read() as session:
            return [_settings(t) for t in session.scalars(sa.select(Tenant).order_by(Tenant.name))]

    def get(self, name: str) -> TenantSettings:
        with self.store.read() as session:
            return _settings(_by_name(session, name))

    def set(
        self,
        name: str,
        *,
        weight: int | None = None,
        max_in_flight: int | object | None = UNCHANGED,
        input_buckets: Sequence[str] | None = None,
        add_input_buckets: Sequence[str] | None = None,
        storages: Sequence[str] | None = None,
        output: str | object | None = UNCHANGED,
        retention: int | object | None = UNCHANGED,
    ) -> TenantSettings:
        """Change the given settings.

        `max_in_flight=None` removes the cap, `output=None` goes back to the service's bucket,
        `retention=None` keeps results forever. `input_buckets` and `storages` replace the
        lists (an empty list allows none); `add_input_buckets` adds to the list.
        """
        if weight is not None and not 1 <= weight <= MAX_WEIGHT:
            raise InvalidSetting(f"weight must be a whole number from 1 to {MAX_WEIGHT}")
        capped = max_in_flight is not UNCHANGED and max_in_flight is not None
        if capped and (
            not isinstance(max_in_flight, int) or not 1 <= max_in_flight <= MAX_IN_FLIGHT
        ):
            raise InvalidSetting(
                f"max in flight must be a whole number from 1 to {MAX_IN_FLIGHT} (or none)"
            )
        if input_buckets is not None:
            check_buckets(input_buckets)
        if add_input_buckets is not None:
            check_buckets(add_input_buckets)
        if storages is not None:
            check_storages(storages)
        if isinstance(output, str):
            output = check_output(output)
        limited = retention is not UNCHANGED and retention is not None
        if limited and (not isinstance(retention, int) or not 1 <= retention <= MAX_RETENTION):
            raise InvalidSetting("retention must be from 1 second to 10 years")
        with self.store.transaction() as session:
            tenant = _by_name(session, name)
            if weight is not None:
                tenant.weight = weight
            if max_in_flight is not UNCHANGED:
                tenant.max_in_flight = max_in_flight  # type: ignore[assignment]
            if input_buckets is not None:
                tenant.allowed_input_buckets = list(check_buckets(input_buckets))
            if add_input_buckets is not None:
                current = list(tenant.allowed_input_buckets or [])
                tenant.allowed_input_buckets = list(check_buckets([*current, *add_input_buckets]))
            if storages is not None:
                tenant.allowed_storages = list(check_storages(storages))
            if output is not UNCHANGED:
                tenant.output_uri = output  # type: ignore[assignment]
            if retention is not UNCHANGED:
                tenant.retention_seconds = retention  # type: ignore[assignment]
            session.flush()
            return _settings(tenant)


TENANTS = cast(sa.Table, Tenant.__table__)
# The columns TenantSettings is made of (not the webhook secret: the settings are read on
# every request, and carried with it).
SETTINGS_COLUMNS = tuple(
    TENANTS.c[name]
    for name in (
        "id",
        "name",
        "weight",
        "max_in_flight",
        "created_at",
        "allowed_input_buckets",
        "allowed_storages",
        "output_uri",
        "retention_seconds",
    )
)
_SETTINGS = sa.select(*SETTINGS_COLUMNS).where(TENANTS.c.id == sa.bindparam("tenant_id"))


def settings_by_id(session: sa.orm.Session, tenant_id: str) -> TenantSettings:
    """The settings of the tenant with this id (it must exist).

    One Core SELECT (intake reads them on every request): the row's columns are named as the
    model's attributes, so it reads like a Tenant.
    """
    row = session.connection().execute(_SETTINGS, {"tenant_id": tenant_id}).first()
    if row is None:
        raise UnknownTenant(tenant_id)
    return _settings(row)  # type: ignore[arg-type]


def settings_of(tenant: Tenant | sa.Row[Any]) -> TenantSettings:
    """The settings of a tenant already read: its ORM object, or its table's row (e.g. joined
    to what it owns), whose columns are named as the model's attributes."""
    return _settings(tenant)  # type: ignore[arg-type]


def _by_name(session: sa.orm.Session, name: str) -> Tenant:
    tenant = session.scalar(sa.select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise UnknownTenant(name)
    return tenant


def _settings(tenant: Tenant) -> TenantSettings:
    return TenantSettings(
        id=tenant.id,
        name=tenant.name,
        weight=tenant.weight,
        max_in_flight=tenant.max_in_flight,
        created_at=tenant.created_at,
        allowed_input_buckets=tuple(tenant.allowed_input_buckets or ()),
        allowed_storages=tuple(tenant.allowed_storages or ()),
        output=tenant.output_uri,
        retention=tenant.retention_seconds,
    )
