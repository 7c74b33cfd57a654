"""Probes and API documentation need no key."""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa

from service.bootstrap import Services
from service.config import Config
from service.database import Store
from service.devtools.fakes import FakeBlobStore


def test_health_ready_and_docs_answer_without_a_key(client: Any) -> None:
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/readyz").json == {"status": "ready"}
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert b"swagger" in docs.data.lower()
    spec = client.get("/openapi.json").json
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    assert spec["security"] == [{"bearerAuth": []}]


def test_readyz_is_503_when_the_database_does_not_answer(
    config: Config, services: Services
) -> None:
    from service.app import create_app

    # Nothing listens on port 1: connections are refused at once.
    unreachable = Store("postgresql+psycopg://postgres@127.0.0.1:1/none")
    app = create_app(config, services=dataclasses.replace(services, store=unreachable))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    assert client_never_sees_internals(response.json["detail"])
    unreachable.dispose()


def test_with_the_database_down_the_api_answers_503_and_metrics_still_answer(
    config: Config, services: Services, caplog: Any
) -> None:
    from service.app import create_app
    from service.metrics import DatabaseCollector

    unreachable = Store("postgresql+psycopg://postgres@127.0.0.1:1/none")
    app = create_app(config, services=dataclasses.replace(services, store=unreachable))
    client = app.test_client()
    try:
        answer = client.get("/v1/generations", headers={"Authorization": "Bearer gr_" + "x" * 43})
        assert answer.status_code == 503
        assert answer.mimetype == "application/problem+json"
        assert answer.headers["Retry-After"] == "5"
        assert client_never_sees_internals(answer.json["detail"])
        assert "Traceback" not in caplog.text  # one warning line, not a traceback
        DatabaseCollector._cache.clear()  # no gauges cached from an earlier test's database
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        text = metrics.get_data(as_text=True)
        assert "genrelay_database_up 0.0" in text
        assert "genrelay_http_request_duration_seconds" in text  # the process's own metrics
        assert "genrelay_generations{" not in text
    finally:
        unreachable.dispose()


def client_never_sees_internals(detail: str) -> bool:
    return "127.0.0.1" not in detail and "Traceback" not in detail


def test_readyz_is_503_when_the_bucket_does_not_answer(config: Config, services: Services) -> None:
    from service.app import create_app

    blobs = FakeBlobStore(config.gcs_bucket)
    blobs.available = False
    app = create_app(config, services=dataclasses.replace(services, blobs=blobs))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert "bucket" in response.json["detail"]


def test_readyz_checks_the_bucket_at_most_every_few_seconds(
    config: Config, services: Services, monkeypatch: Any
) -> None:
    from handlers import health
    from service.app import create_app

    now = [1000.0]
    monkeypatch.setattr(health, "_clock", lambda: now[0])
    blobs = FakeBlobStore(config.gcs_bucket)
    checks = []
    original = blobs.check
    monkeypatch.setattr(blobs, "check", lambda: (checks.append(1), original())[1])
    client = create_app(config, services=dataclasses.replace(services, blobs=blobs)).test_client()
    for _ in range(10):  # anonymous, each a billed list operation before
        assert client.get("/readyz").status_code == 200
    assert len(checks) == 1
    blobs.available = False
    now[0] += health.BUCKET_CHECK_SECONDS - 0.1
    assert client.get("/readyz").status_code == 200  # still the cached answer
    now[0] += 0.2
    assert client.get("/readyz").status_code == 503  # checked again
    assert client.get("/readyz").status_code == 503
    assert len(checks) == 2


def test_readyz_is_503_on_a_database_not_migrated_to_this_release(
    config: Config, services: Services, database_url: str
) -> None:
    """It said ready while every API call failed with "the database is unavailable"."""
    from alembic import command

    from service.app import create_app
    from service.migrate import alembic_config

    def ready() -> tuple[int, str]:
        app = create_app(config, services=services)
        answer = app.test_client().get("/readyz")
        return answer.status_code, (answer.json or {}).get("detail", "")

    migrations = alembic_config(database_url)
    assert ready() == (200, "")
    command.downgrade(migrations, "-1")
    status, detail = ready()
    assert (status, "genrelay migrate" in detail) == (503, True)
    command.downgrade(migrations, "base")  # never migrated: no tables
    status, detail = ready()
    assert (status, "genrelay migrate" in detail) == (503, True)
    command.upgrade(migrations, "head")
    with services.store.transaction() as session:  # a newer release migrated first
        head = session.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        session.execute(sa.text("UPDATE alembic_version SET version_num = 'from-the-future'"))
    assert ready() == (200, "")
    with services.store.transaction() as session:
        session.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": head})
