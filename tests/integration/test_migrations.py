"""The migrations build exactly the schema the models describe, and run down and up again."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.database import create_db_engine
from service.migrate import alembic_config
from service.models import Base


def schema_drift(database_url: str) -> list[Any]:
    """What autogenerate would write to bring the database to the models (nothing, if equal)."""
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": False})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def index_names(database_url: str, table: str) -> set[str]:
    engine = create_db_engine(database_url)
    try:
        return {str(index["name"]) for index in sa.inspect(engine).get_indexes(table)}
    finally:
        engine.dispose()


def column_names(database_url: str, table: str) -> set[str]:
    engine = create_db_engine(database_url)
    try:
        return {str(column["name"]) for column in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def has_table(database_url: str, table: str) -> bool:
    engine = create_db_engine(database_url)
    try:
        return bool(sa.inspect(engine).has_table(table))
    finally:
        engine.dispose()


def fillfactor(database_url: str) -> list[str] | None:
    """The generations table's storage parameters on PostgreSQL; None on SQLite or unset."""
    if not database_url.startswith("postgresql"):
        return None
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            options = connection.execute(
                sa.text("SELECT reloptions FROM pg_class WHERE relname = 'generations'")
            ).scalar_one()
        return list(options) if options else None
    finally:
        engine.dispose()


def test_the_migrated_schema_matches_the_models(database_url: str) -> None:
    assert schema_drift(database_url) == []
    assert "ix_generations_tenant_status_created" in index_names(database_url, "generations")
    assert "ix_generations_waiting" in index_names(database_url, "generations")


def test_the_newest_migrations_go_down_and_up_again(database_url: str) -> None:
    config = alembic_config(database_url)
    postgres = database_url.startswith("postgresql")
    assert fillfactor(database_url) == (["fillfactor=90"] if postgres else None)
    command.downgrade(config, "-1")
    assert fillfactor(database_url) is None
    assert "ix_generations_upstream_job" not in index_names(database_url, "generations")
    command.downgrade(config, "-1")
    assert "ix_generations_upstream_job" in index_names(database_url, "generations")
    command.downgrade(config, "-1")
    assert "max_attempts" in column_names(database_url, "tasks")
    command.downgrade(config, "-1")
    assert not has_table(database_url, "triggers")
    assert not has_table(database_url, "trigger_events")
    command.downgrade(config, "-1")
    assert "ix_generations_in_flight" not in index_names(database_url, "generations")
    command.upgrade(config, "head")
    assert has_table(database_url, "triggers")
    assert "max_attempts" not in column_names(database_url, "tasks")
    assert "ix_generations_upstream_job" not in index_names(database_url, "generations")
    assert fillfactor(database_url) == (["fillfactor=90"] if postgres else None)
    assert schema_drift(database_url) == []
