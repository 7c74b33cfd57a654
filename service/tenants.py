"""Tenant settings, managed by the operator with `genrelay tenants …`.

A tenant is made by `genrelay keys create NAME`. Its settings shape its share of the
Deep-Image account (service/line.py): `weight` (free slots are shared in proportion, default
1) and `max_in_flight` (at most this many of its jobs at Deep-Image at once; none by default).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import sqlalchemy as sa

from service.models import Tenant
from service.store import Store

MAX_WEIGHT = 1000


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


# Marks "leave as it is" apart from None ("no cap").
UNCHANGED: object = object()


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
    ) -> TenantSettings:
        """Change the given settings (`max_in_flight=None` removes the cap)."""
        if weight is not None and not 1 <= weight <= MAX_WEIGHT:
            raise InvalidSetting(f"weight must be a whole number from 1 to {MAX_WEIGHT}")
        capped = max_in_flight is not UNCHANGED and max_in_flight is not None
        if capped and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise InvalidSetting("max in flight must be a whole number above 0")
        with self.store.transaction() as session:
            tenant = _by_name(session, name)
            if weight is not None:
                tenant.weight = weight
            if max_in_flight is not UNCHANGED:
                tenant.max_in_flight = max_in_flight  # type: ignore[assignment]
            session.flush()
            return _settings(tenant)


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
    )
