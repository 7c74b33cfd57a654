"""Alembic wiring: the migration scripts ship inside the installed `migrations` package."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig


def alembic_config(database_url: str) -> AlembicConfig:
    """An Alembic config pointing at the packaged scripts and the given database."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("migrations")))
    # Passed as an attribute, not a main option: URLs may hold '%' (ConfigParser syntax).
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade_to_head(database_url: str) -> None:
    """Apply every pending migration (what `genrelay migrate` does)."""
    command.upgrade(alembic_config(database_url), "head")
