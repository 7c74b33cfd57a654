"""API keys: created per tenant, stored as SHA-256, looked up on every request."""

from __future__ import annotations

import hashlib
import secrets
import uuid

import sqlalchemy as sa

from service.models import ApiKey, Tenant
from service.signing import new_secret
from service.store import Store

KEY_PREFIX = "gr_"


def hash_api_key(key: str) -> str:
    """The stored form of a key. Keys carry 256 random bits, so one SHA-256 is enough."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeys:
    """Creates tenants' keys and resolves a presented key to its tenant."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, tenant_name: str) -> str:
        """Create a key for `tenant_name` (making the tenant if new); return the key itself."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.store.transaction() as session:
            tenant_id = session.scalar(sa.select(Tenant.id).where(Tenant.name == tenant_name))
            if tenant_id is None:
                tenant_id = "ten_" + uuid.uuid4().hex
                session.add(Tenant(id=tenant_id, name=tenant_name, webhook_secret=new_secret()))
                session.flush()
            session.add(
                ApiKey(
                    id="key_" + uuid.uuid4().hex,
                    tenant_id=tenant_id,
                    key_hash=hash_api_key(key),
                    prefix=key[: len(KEY_PREFIX) + 6],
                )
            )
        return key

    def tenant_for(self, key: str) -> str | None:
        """The tenant id owning an active `key`, or None."""
        if not key.startswith(KEY_PREFIX) or len(key) > 200:
            return None
        with self.store.read() as session:
            return session.scalar(
                sa.select(ApiKey.tenant_id).where(
                    ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None)
                )
            )
