"""How the Store hands out connections: one per request, one-statement reads without a
transaction, and transactions that stay transactions on a connection reused for both."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from service import database
from service.bootstrap import Services
from service.database import Store, create_db_engine
from service.models import Tenant, utcnow
from tests.helpers import seed_examples

TEXT_ONLY = seed_examples()["text_only"]
# SQLite holds no connection across transactions (`reusing_connection` does nothing there).
POSTGRESQL_ONLY = pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)


def _tenant_count(store: Store) -> int:
    with store.read_one() as connection:
        return connection.scalar(sa.select(sa.func.count()).select_from(Tenant)) or 0


def _insert_tenant(session: Any, name: str) -> None:
    session.add(Tenant(id=f"ten_{name}", name=name, weight=1, created_at=utcnow()))
    session.flush()


def test_a_transaction_after_a_one_statement_read_on_the_same_connection_rolls_back(
    store: Store,
) -> None:
    with store.reusing_connection():
        assert _tenant_count(store) == 0
        with pytest.raises(RuntimeError), store.transaction() as session:
            _insert_tenant(session, "rolled-back")
            raise RuntimeError("the caller fails")
        assert _tenant_count(store) == 0
        with store.transaction() as session:
            _insert_tenant(session, "kept")
        assert _tenant_count(store) == 1
    assert _tenant_count(store) == 1


@POSTGRESQL_ONLY
def test_a_one_statement_read_on_a_held_postgresql_connection_opens_no_transaction(
    store: Store, database_url: str
) -> None:
    import psycopg

    with store.reusing_connection():
        with store.read_one() as connection:
            connection.scalar(sa.select(sa.func.count()).select_from(Tenant))
            driver = connection.connection.dbapi_connection
            assert driver is not None
            # Autocommit: the statement was its own transaction, none is left open.
            assert driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with store.transaction() as session:
            session.scalar(sa.select(sa.func.count()).select_from(Tenant))
            status = session.connection().connection.dbapi_connection.info.transaction_status
            assert status == psycopg.pq.TransactionStatus.INTRANS


def test_an_intake_checks_out_one_pooled_connection(
    services: Services, client: Any, auth: dict[str, str], database_url: str
) -> None:
    """Authentication, the generation's transaction, the inline submit's and the answer share
    the request's connection, which is back in the pool when the answer is sent."""
    engine = services.store.engine
    checkouts: list[object] = []

    def counted(driver_connection: object, *_: object) -> None:
        checkouts.append(driver_connection)

    sa.event.listen(engine, "checkout", counted)
    try:
        response = client.post("/v1/generations", json={"input": TEXT_ONLY}, headers=auth)
    finally:
        sa.event.remove(engine, "checkout", counted)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "processing"
    if database_url.startswith("postgresql"):
        assert len(checkouts) == 1
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A TCP port whose listener never answers: a PostgreSQL server that stopped responding
    (the kernel completes the handshake, nobody reads the startup packet)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def _seconds_to_fail(url: str) -> float:
    """How long a first connection to `url` takes to fail; fails the test if it is still
    waiting after 20 s (libpq's own default waits for ever)."""
    engine = create_db_engine(url)
    outcome: list[BaseException | float] = []

    def connect() -> None:
        began = time.monotonic()
        try:
            engine.connect().close()
        except sa.exc.OperationalError:
            outcome.append(time.monotonic() - began)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout=20)
    engine.dispose()
    assert outcome, "the connection was still waiting after 20 s"
    assert isinstance(outcome[0], float), outcome[0]
    return outcome[0]


def test_a_postgresql_server_that_does_not_answer_fails_a_connection_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(database, "POSTGRES_CONNECT_TIMEOUT", 2)
    with _silent_server() as port:
        assert _seconds_to_fail(f"postgresql://genrelay@127.0.0.1:{port}/genrelay") < 8


def test_the_database_url_s_own_connect_timeout_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "POSTGRES_CONNECT_TIMEOUT", 600)
    with _silent_server() as port:
        url = f"postgresql://genrelay@127.0.0.1:{port}/genrelay?connect_timeout=2"
        assert _seconds_to_fail(url) < 8
