"""Shared fixtures: databases (SQLite and PostgreSQL), the simulator, the app.

PostgreSQL tests use GENRELAY_TEST_POSTGRES_URL (default: the local server's `test`
database); each test session creates a database of its own there and drops it at the end.
Where no server answers, those tests are skipped with the reason shown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

from service.adapters.blobstore import GcsBlobStore
from service.bootstrap import Services, build_services
from service.config import Config
from service.database import Store
from service.migrate import upgrade_to_head
from service.models import Base
from service.runtime.kinds import SUBMIT
from service.runtime.queue import RetryPolicy
from tests.helpers import Receiver

if TYPE_CHECKING:
    from service.devtools.gcs_emulator import FakeGcsServer
    from service.devtools.simulator import SimulatorServer

DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SIMULATOR_KEY = "sim-key"


def _postgres_admin_url() -> tuple[str | None, str]:
    url = os.environ.get("GENRELAY_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except Exception as exc:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
        return (
            None,
            f"no PostgreSQL at {shown} ({type(exc).__name__}); set GENRELAY_TEST_POSTGRES_URL",
        )
    finally:
        engine.dispose()
    return url, ""


@contextlib.contextmanager
def new_postgres_database(*, migrate: bool = True) -> Iterator[str]:
    """A new PostgreSQL database (migrated unless told not to), dropped afterwards; the test
    skips where no server answers (fails under GENRELAY_REQUIRE_POSTGRES=1)."""
    admin_url, reason = _postgres_admin_url()
    if admin_url is None:
        if os.environ.get("GENRELAY_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"GENRELAY_REQUIRE_POSTGRES is set but {reason}")
        pytest.skip(reason)
    name = f"genrelay_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        if migrate:
            upgrade_to_head(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A migrated PostgreSQL database of this test session's own."""
    with new_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("template") / "genrelay.db"
    upgrade_to_head(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    """An empty, migrated database: each test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "genrelay.db"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_database")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        connection.execute(sa.text(f"TRUNCATE {tables}"))
    engine.dispose()
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    yield store
    store.dispose()


@pytest.fixture
def simulator() -> Iterator[SimulatorServer]:
    """The Deep-Image simulator on a free loopback port, fresh for each test."""
    from service.devtools.simulator import SimulatorServer, SimulatorSettings

    with SimulatorServer(
        SimulatorSettings(api_keys=frozenset({SIMULATOR_KEY}), processing_time=0.2)
    ) as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGcsServer]:
    """fake-gcs-server (in memory) for the whole test session: it speaks the real GCS API."""
    from service.devtools.gcs_emulator import FakeGcsServer

    with FakeGcsServer(backend="memory") as server:
        yield server


@pytest.fixture
def gcs_bucket(gcs_server: FakeGcsServer) -> str:
    name = f"genrelay-test-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(name)
    return name


def emulator_blob_store(url: str, bucket: str, **options: Any) -> GcsBlobStore:
    """The real GCS adapter with an anonymous client pointed at an emulator."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="genrelay-test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": url},
    )
    return GcsBlobStore(bucket, client=client, **options)


@pytest.fixture
def blobs(gcs_server: FakeGcsServer, gcs_bucket: str) -> GcsBlobStore:
    return emulator_blob_store(gcs_server.url, gcs_bucket)


@pytest.fixture
def config(database_url: str, simulator: SimulatorServer, gcs_bucket: str) -> Config:
    return Config(
        database_url=database_url,
        deepimage_url=simulator.url,
        deepimage_api_key=SIMULATOR_KEY,
        deepimage_timeout=(2.0, 5.0),
        gcs_bucket=gcs_bucket,
        reconcile_after=0.1,
        # Test receivers listen on loopback.
        allow_private_webhooks=True,
    )


@pytest.fixture
def services(config: Config, store: Store, blobs: GcsBlobStore) -> Iterator[Services]:
    services = build_services(config, store=store, blobs=blobs)
    yield services
    services.deepimage.close()
    services.downloads.close()


@pytest.fixture
def app(config: Config, services: Services) -> Any:
    from service.app import create_app

    return create_app(config, services=services)


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def api_key(services: Services) -> str:
    return services.api_keys.create("acme")


@pytest.fixture
def auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture
def make_client(
    store: Store, blobs: GcsBlobStore
) -> Iterator[Callable[..., tuple[Services, Any, dict[str, str]]]]:
    """An app on its own config (and fast submit retries if asked): services, client, auth."""
    from service.app import create_app

    made: list[Services] = []

    def make(config: Config, *, fast_retries: bool = False) -> tuple[Services, Any, dict[str, str]]:
        policies = None
        if fast_retries:
            policies = {SUBMIT: RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.1)}
        services = build_services(config, store=store, blobs=blobs, policies=policies)
        made.append(services)
        client = create_app(config, services=services).test_client()
        return services, client, {"Authorization": "Bearer " + services.api_keys.create("acme")}

    yield make
    for services in made:
        services.deepimage.close()
        services.downloads.close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    """Loopback receivers a test makes (or adds), stopped after it."""
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.stop()


@pytest.fixture
def receiver_factory(receivers: list[Receiver]) -> Callable[..., Receiver]:
    """Makes loopback receivers answering a script of statuses (the last repeats)."""

    def make(statuses: list[int] | None = None) -> Receiver:
        receiver = Receiver(statuses)
        receivers.append(receiver)
        return receiver

    return make
