"""API keys: created per tenant, stored as SHA-256, looked up on every request.

Nothing caches a key's validity: every request reads the `api_keys` row, so a revoked key is
refused from the next request on.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import hashlib
import logging
import secrets
import unicodedata

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from service.database import Store
from service.ids import new_id
from service.models import ApiKey, Tenant, utcnow
from service.notifications.signing import new_secret
from service.tenants import SETTINGS_COLUMNS, TENANTS, TenantSettings, settings_of

KEY_PREFIX = "gr_"

log = logging.getLogger("genrelay.auth")


class UnknownApiKey(LookupError):
    """No API key has the given id."""


@dataclasses.dataclass(frozen=True)
class ApiKeyInfo:
    """What may be shown about a key: never the key itself nor its hash."""

    id: str
    tenant: str  # the tenant's name, as given to `create`
    prefix: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Revocation:
    """The outcome of `ApiKeys.revoke`: the key as it now is, and whether this call revoked it."""

    key: ApiKeyInfo
    already_revoked: bool


# Built once: the lookup of every request. It reads the tenant's settings too, which intake
# needs next: one statement instead of two.
_TENANT_FOR_KEY = (
    sa.select(*SETTINGS_COLUMNS)
    .join_from(TENANTS, ApiKey, ApiKey.tenant_id == TENANTS.c.id)
    .where(ApiKey.key_hash == sa.bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)


MAX_TENANT_NAME = 200  # tenants.name


def tenant_name_problem(name: str) -> str | None:
    """Why `name` cannot be a new tenant's, or None. A name is shown in one column of `keys
    list` and `tenants list` (tab-separated lines) and stored in 200 characters; any other
    Unicode (a no-break space, a soft hyphen, a joined emoji) is fine."""
    if not name.strip():
        return "a tenant name must not be empty"
    if len(name) > MAX_TENANT_NAME:
        return f"a tenant name has at most {MAX_TENANT_NAME} characters"
    control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"a tenant name must not hold a control character such as a tab ({control!r})"
    return None


def hash_api_key(key: str) -> str:
    """The stored form of a key. Keys carry 256 random bits, so one SHA-256 is enough."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeys:
    """Creates tenants' keys and resolves a presented key to its tenant."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, tenant_name: str) -> str:
        """Create a key for `tenant_name` (making the tenant if new); return the key itself.
        ValueError if there is no such tenant and the name cannot be a new one's
        (`tenant_name_problem`)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.store.transaction() as session:
            tenant_id = session.scalar(sa.select(Tenant.id).where(Tenant.name == tenant_name))
            if tenant_id is None:
                problem = tenant_name_problem(tenant_name)  # a tenant that exists keeps its name
                if problem is not None:
                    raise ValueError(problem)
                # Another `keys create` may be making the same tenant at this moment: the
                # insert waits for it and then does nothing, and the tenant it made is read
                # (PostgreSQL's next statement sees what committed; SQLite has one writer).
                dialect = session.get_bind().dialect.name
                insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
                session.execute(
                    insert(Tenant)
                    .values(id=new_id("ten_"), name=tenant_name, webhook_secret=new_secret())
                    .on_conflict_do_nothing(index_elements=[Tenant.name])
                )
                tenant_id = session.scalars(
                    sa.select(Tenant.id).where(Tenant.name == tenant_name)
                ).one()
            key_id = new_id("key_")
            prefix = key[: len(KEY_PREFIX) + 6]
            session.add(
                ApiKey(id=key_id, tenant_id=tenant_id, key_hash=hash_api_key(key), prefix=prefix)
            )
        # The id (what `revoke` takes) and the prefix identify the key without revealing it.
        log.info("created API key %s (%s…) for tenant %s", key_id, prefix, tenant_name)
        return key

    def list(self, tenant_name: str | None = None) -> builtins.list[ApiKeyInfo]:
        """Every key (or `tenant_name`'s), active and revoked, by tenant then creation time."""
        query = (
            sa.select(ApiKey, Tenant.name)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .order_by(Tenant.name, ApiKey.created_at, ApiKey.id)
        )
        if tenant_name is not None:
            query = query.where(Tenant.name == tenant_name)
        with self.store.read() as session:
            return [_info(key, name) for key, name in session.execute(query)]

    def revoke(self, key_id: str) -> Revocation:
        """Revoke the key `key_id` (once: a revoked key keeps its first revocation time).

        Raises UnknownApiKey if no key has that id.
        """
        with self.store.transaction() as session:
            # Conditional, so concurrent revocations agree on who revoked and when.
            result = session.execute(
                sa.update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            revoked_now = getattr(result, "rowcount", 0) == 1
            row = session.execute(
                sa.select(ApiKey, Tenant.name)
                .join(Tenant, Tenant.id == ApiKey.tenant_id)
                .where(ApiKey.id == key_id)
            ).one_or_none()
        if row is None:
            raise UnknownApiKey(key_id)
        info = _info(*row)
        if revoked_now:
            log.info("revoked API key %s (%s…) of tenant %s", info.id, info.prefix, info.tenant)
        return Revocation(key=info, already_revoked=not revoked_now)

    def tenant_for(self, key: str) -> TenantSettings | None:
        """The tenant owning an active `key`, with its settings; None for any other key."""
        if not key.startswith(KEY_PREFIX) or len(key) > 200:
            return None
        with self.store.read_one() as connection:
            row = connection.execute(_TENANT_FOR_KEY, {"key_hash": hash_api_key(key)}).first()
        return None if row is None else settings_of(row)


def _info(key: ApiKey, tenant_name: str) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=key.id,
        tenant=tenant_name,
        prefix=key.prefix,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )
