"""The migrations build exactly the schema the models describe, and run down and up again."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.auth import ApiKeys
from service.database import Store, create_db_engine
from service.migrate import alembic_config, upgrade_to_head
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


UNACCEPTED_EVENTS = "ix_trigger_events_unaccepted_created"


def test_the_migrated_schema_matches_the_models(database_url: str) -> None:
    assert schema_drift(database_url) == []
    assert "ix_generations_tenant_status_created" in index_names(database_url, "generations")
    assert "ix_generations_waiting" in index_names(database_url, "generations")


def test_the_newest_migrations_go_down_and_up_again(database_url: str) -> None:
    config = alembic_config(database_url)
    postgres = database_url.startswith("postgresql")
    assert fillfactor(database_url) == (["fillfactor=90"] if postgres else None)
    assert "earlier_secrets" in column_names(database_url, "subscriptions")
    command.downgrade(config, "-1")
    assert "earlier_secrets" not in column_names(database_url, "subscriptions")
    assert UNACCEPTED_EVENTS in index_names(database_url, "trigger_events")
    command.downgrade(config, "-1")
    assert UNACCEPTED_EVENTS not in index_names(database_url, "trigger_events")
    command.downgrade(config, "-1")
    assert "fair_tag" not in column_names(database_url, "tenants")
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
    assert "fair_tag" in column_names(database_url, "tenants")
    assert UNACCEPTED_EVENTS in index_names(database_url, "trigger_events")
    assert "earlier_secrets" in column_names(database_url, "subscriptions")
    assert schema_drift(database_url) == []


def test_migrations_go_down_to_nothing_and_up_again_with_a_key_in_place(
    database_url: str,
) -> None:
    # On SQLite a batch migration rebuilds a table: with foreign keys enforced, dropping
    # `tenants` while a key refers to it failed the downgrade below 0006.
    store = Store(database_url)
    try:
        ApiKeys(store).create("acme")
    finally:
        store.dispose()
    config = alembic_config(database_url)
    command.downgrade(config, "0005")
    assert table_rows(database_url, "api_keys") == 1
    assert table_rows(database_url, "tenants") == 1
    command.downgrade(config, "base")
    assert not has_table(database_url, "tenants")
    command.upgrade(config, "head")
    assert schema_drift(database_url) == []


def test_a_sqlite_migration_that_leaves_a_broken_reference_fails(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'broken.db'}"
    config = alembic_config(database_url)
    command.upgrade(config, "head")
    command.downgrade(config, "-1")
    # A key of a tenant that is not there, written with enforcement off (as a migration runs).
    with sqlite3.connect(tmp_path / "broken.db") as connection:
        connection.execute(
            "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at)"
            " VALUES ('key_1', 'ten_gone', 'h', 'gr_x', '2025-01-01 00:00:00')"
        )
    with pytest.raises(RuntimeError, match="broken foreign keys: api_keys row 1 -> tenants"):
        command.upgrade(config, "head")


def table_rows(database_url: str, table: str) -> int:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = sa.select(sa.func.count()).select_from(sa.table(table))
            return int(connection.execute(rows).scalar_one())
    finally:
        engine.dispose()


def _postgres_only(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("CONCURRENTLY and advisory locks are PostgreSQL's; SQLite has neither")


def test_an_index_build_cut_short_is_built_again_not_taken_for_done(database_url: str) -> None:
    """A concurrent build killed midway leaves the index there, invalid and never used; the
    next migrate must not skip it as existing."""
    _postgres_only(database_url)
    config = alembic_config(database_url)
    command.downgrade(config, "0003")
    name = "ix_generations_tenant_status_created"
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as connection:  # what a cut-short CREATE INDEX CONCURRENTLY leaves
            connection.execute(
                sa.text(f"CREATE INDEX {name} ON generations (tenant_id, status, created_at, id)")
            )
            connection.execute(
                sa.text("UPDATE pg_index SET indisvalid = false WHERE indexrelid = :n ::regclass"),
                {"n": name},
            )
        command.upgrade(config, "head")
        with engine.connect() as connection:
            valid = connection.scalar(
                sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = :n ::regclass"),
                {"n": name},
            )
    finally:
        engine.dispose()
    assert valid is True


def start_migrations(count: int, database_url: str) -> list[subprocess.Popen[str]]:
    """`count` runs of `genrelay migrate` on the database, started at once."""
    env = {**os.environ, "GENRELAY_DATABASE_URL": database_url}
    command = [sys.executable, "-m", "service.cli", "migrate"]
    pipe = subprocess.PIPE
    return [
        subprocess.Popen(command, env=env, stdout=pipe, stderr=pipe, text=True)
        for _ in range(count)
    ]


def test_two_migrations_at_once_take_turns(database_url: str) -> None:
    """Two deploys' migrate jobs overlapping: both read the same version, and the second's
    first change failed on the first's (the column is already there). Both must succeed."""
    _postgres_only(database_url)
    command.downgrade(alembic_config(database_url), "0009")  # 0010 adds tenants.fair_tag
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as blocker:
            # Both start while this holds the table the migration changes: they meet there.
            blocker.execute(sa.text("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE"))
            runs = start_migrations(2, database_url)
            time.sleep(3)
            blocker.rollback()
        results = [run.communicate(timeout=60) for run in runs]
    finally:
        engine.dispose()
    assert [run.returncode for run in runs] == [0, 0], [err[-500:] for _, err in results]
    assert "fair_tag" in column_names(database_url, "tenants")


def test_migrations_at_once_on_one_sqlite_file_take_turns(tmp_path: Path) -> None:
    """Without a lock on SQLite, runs started together read the same (empty) version and one
    failed on what another had just made ("no such index: ..."). Here a run that holds the
    lock keeps three more waiting; once it lets go, each finds its turn and all succeed."""
    import fcntl

    database = tmp_path / "genrelay.db"
    with open(f"{database}-migrate", "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a `migrate` running now holds it
        runs = start_migrations(3, f"sqlite:///{database}")
        # Long enough for unlocked runs to start, migrate and exit (about 3 s here).
        until = time.monotonic() + 6
        while time.monotonic() < until:
            assert [run.poll() for run in runs] == [None, None, None]  # waiting their turn
            if database.exists():  # a run's engine may have made the file: nothing in it yet
                with contextlib.closing(sqlite3.connect(database)) as connection:
                    tables = connection.execute("SELECT name FROM sqlite_master").fetchall()
                assert ("generations",) not in tables
            time.sleep(0.2)
        fcntl.flock(held, fcntl.LOCK_UN)
    results = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err[-500:] for _, err in results]
    assert schema_drift(f"sqlite:///{database}") == []


@pytest.mark.postgres
def test_a_user_refused_a_privilege_is_told_so_in_one_line() -> None:
    """`permission denied for schema public` from `migrate` (a user that does not own the
    database, as docs/deploy.md describes) was a traceback, and so was any other privilege
    refused; each is one line naming the fix."""
    from tests.conftest import new_postgres_database

    role = f"genrelay_test_{uuid.uuid4().hex[:12]}"
    with new_postgres_database(migrate=False) as admin_url:
        url = sa.engine.make_url(admin_url).set(username=role)
        env = {**os.environ, "GENRELAY_DATABASE_URL": url.render_as_string(hide_password=False)}

        def genrelay_as_the_role(*argv: str) -> tuple[int, list[str]]:
            done = subprocess.run(
                [sys.executable, "-m", "service.cli", *argv],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "Traceback" not in done.stderr, done.stderr[-2000:]
            lines = [ln for ln in done.stderr.splitlines() if not ln.startswith('{"severity": ')]
            return done.returncode, lines

        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                connection.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
                # PostgreSQL 15's default; older servers let every role create in public.
                connection.execute(sa.text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
            migrated = genrelay_as_the_role("migrate")
            upgrade_to_head(admin_url)  # the tables are postgres's, not the role's
            listed = genrelay_as_the_role("keys", "list")
        finally:
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
            admin.dispose()
    where = f"{url.host}:{url.port or 5432}/{url.database}"
    assert migrated == (
        1,
        [
            f"genrelay: the database {where} refused the user {role} (permission denied for "
            "schema public); the user must own the database: as postgres, "
            f"`ALTER DATABASE {url.database} OWNER TO {role};` (docs/deploy.md)"
        ],
    )
    assert listed == (
        1,
        [
            f"genrelay: the database {where} refused the user {role} (permission denied for "
            "table api_keys); grant it that privilege, or run `genrelay migrate` as the user "
            "every process uses, the database's owner (docs/deploy.md)"
        ],
    )


def test_migrate_on_a_database_a_newer_release_migrated_changes_nothing_and_says_so(
    database_url: str,
) -> None:
    """A rollback redeploys the previous image, whose migrate job ran into a revision it did
    not know: a traceback ("Can't locate revision identified by ..."), and a failed deploy.
    This release's migrated() takes such a database as fine; migrate does too."""
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as connection:
            head = connection.scalar(sa.text("SELECT version_num FROM alembic_version"))
            connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "service.cli", "migrate"],
                env={**os.environ, "GENRELAY_DATABASE_URL": database_url},
                capture_output=True,
                text=True,
                timeout=60,
            )
            with engine.connect() as connection:
                after = connection.scalar(sa.text("SELECT version_num FROM alembic_version"))
        finally:
            with engine.begin() as connection:
                connection.execute(
                    sa.text("UPDATE alembic_version SET version_num = :v"), {"v": head}
                )
    finally:
        engine.dispose()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert json.loads(line)["message"] == (
        "the database is at a newer revision (9999_future) than this release knows; nothing to do"
    )
    assert after == "9999_future"
