"""Alembic wiring: the migration scripts ship inside the installed `migrations` package."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources
from typing import Any

import sqlalchemy as sa
from alembic import command, op
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory

from service.database import create_db_engine, schema_behind


def alembic_config(database_url: str) -> AlembicConfig:
    """An Alembic config pointing at the packaged scripts and the given database."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("migrations")))
    # Passed as an attribute, not a main option: URLs may hold '%' (ConfigParser syntax).
    cfg.attributes["database_url"] = database_url
    return cfg


@functools.cache
def _revisions() -> tuple[str | None, frozenset[str]]:
    """The newest packaged revision, and every packaged revision."""
    scripts = ScriptDirectory.from_config(alembic_config(""))
    return scripts.get_current_head(), frozenset(r.revision for r in scripts.walk_revisions())


def _database_revision(connection: sa.Connection) -> str | None:
    """The revision the database was migrated to; None when it never was."""
    try:
        return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.DBAPIError as exc:
        if schema_behind(exc):
            return None
        raise


def migrated(connection: sa.Connection) -> bool:
    """Whether the database is at this code's newest migration or past it (a release deployed
    after this one migrates first, and this one keeps working meanwhile); False when it was
    never migrated or is at an older revision."""
    version = _database_revision(connection)
    head, known = _revisions()
    return version is not None and (version == head or version not in known)


def newer_revision(database_url: str) -> str | None:
    """The database's revision where this release does not know it (a later release
    migrated it, and migrated() takes it as fine); None otherwise, never migrated included."""
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            version = _database_revision(connection)
    finally:
        engine.dispose()
    return version if version is not None and version not in _revisions()[1] else None


def upgrade_to_head(database_url: str) -> None:
    """Apply every pending migration (what `genrelay migrate` does)."""
    command.upgrade(alembic_config(database_url), "head")


def create_index_concurrently(
    name: str, table: str, columns: Sequence[str], **options: Any
) -> None:
    """Build an index on PostgreSQL without blocking writes to `table` (in a migration, which
    it commits first: CONCURRENTLY cannot run in a transaction).

    A concurrent build cut short (a migrate job killed, a statement timeout) leaves the index
    behind, invalid: never used, yet there. It is dropped and built again, not taken for
    done (as IF NOT EXISTS would). `options` go to `op.create_index` (`postgresql_where`)."""
    with op.get_context().autocommit_block():
        invalid = op.get_bind().scalar(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": name},
        )
        if invalid:
            op.drop_index(name, table, postgresql_concurrently=True)
        op.create_index(
            name,
            table,
            list(columns),
            postgresql_concurrently=True,
            if_not_exists=True,
            **options,
        )
