"""`genrelay keys create|list|revoke` against a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from service.auth import hash_api_key
from service.cli import main
from service.database import Store
from service.models import ApiKey
from tests.conftest import new_postgres_database

ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@dataclasses.dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def genrelay(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., Run]]:
    """Run the `genrelay` command in-process on the test database; its output, captured."""
    monkeypatch.setenv("GENRELAY_DATABASE_URL", database_url)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def run(*argv: str) -> Run:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return Run(code, out, err)

    yield run
    # The command sets up JSON logging on the (captured) stderr; give pytest its handlers back.
    root.handlers[:], level = saved
    root.setLevel(level)


def create_key(genrelay: Callable[..., Run], tenant: str) -> str:
    created = genrelay("keys", "create", tenant)
    assert created.code == 0, created.err
    return created.out.strip()


def listed(genrelay: Callable[..., Run], *tenant: str) -> list[list[str]]:
    result = genrelay("keys", "list", *tenant)
    assert result.code == 0, result.err
    return [line.split("\t") for line in result.out.splitlines()]


def key_id(genrelay: Callable[..., Run], key: str) -> str:
    """The id `keys list` shows for `key` (the line whose prefix the key starts with)."""
    [row] = [row for row in listed(genrelay) if key.startswith(row[2])]
    return row[0]


def test_create_prints_the_key_alone_and_logs_its_id_on_stderr(
    genrelay: Callable[..., Run],
) -> None:
    created = genrelay("keys", "create", "acme")
    assert created.code == 0
    key = created.out.strip()
    assert created.out == key + "\n"
    [log_line] = [
        json.loads(line) for line in created.err.splitlines() if "created API key" in line
    ]
    [row] = listed(genrelay)
    assert row[0] in log_line["message"]
    assert key not in created.err
    assert hash_api_key(key) not in created.err


def test_list_shows_every_key_by_tenant_then_age_without_the_secret(
    genrelay: Callable[..., Run], database_url: str
) -> None:
    keys = [create_key(genrelay, tenant) for tenant in ("globex", "acme", "acme")]
    result = genrelay("keys", "list")
    assert result.code == 0
    rows = [line.split("\t") for line in result.out.splitlines()]
    assert [row[1] for row in rows] == ["acme", "acme", "globex"]
    # Each acme key in creation order, then globex's: matched by their prefixes.
    assert [row[2] for row in rows] == [keys[1][:9], keys[2][:9], keys[0][:9]]
    for row in rows:
        key_id_, _tenant, prefix, created_at, state = row
        assert key_id_.startswith("key_")
        assert prefix.startswith("gr_")
        assert re.fullmatch(ISO_UTC, created_at)
        assert state == "active"
    assert [row[3] for row in rows[:2]] == sorted(row[3] for row in rows[:2])
    store = Store(database_url)
    try:
        with store.read() as session:
            hashes = list(session.scalars(sa.select(ApiKey.key_hash)))
    finally:
        store.dispose()
    for secret in [*keys, *hashes]:
        assert secret not in result.out
        assert secret not in result.err


def test_list_filters_by_tenant(genrelay: Callable[..., Run]) -> None:
    acme = create_key(genrelay, "acme")
    create_key(genrelay, "globex")
    [row] = listed(genrelay, "acme")
    assert row[1] == "acme"
    assert acme.startswith(row[2])
    assert [row[1] for row in listed(genrelay, "globex")] == ["globex"]
    assert listed(genrelay, "initech") == []


def test_list_with_no_keys_prints_nothing_and_succeeds(genrelay: Callable[..., Run]) -> None:
    assert genrelay("keys", "list") == Run(0, "", "")


def test_a_revoked_key_is_refused_from_the_next_request(
    genrelay: Callable[..., Run], client: Any
) -> None:
    key = create_key(genrelay, "acme")
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/generations", headers=auth).status_code == 200
    revoked = genrelay("keys", "revoke", key_id(genrelay, key))
    assert revoked.code == 0, revoked.err
    assert "revoked at" in revoked.out
    assert key not in revoked.out + revoked.err
    response = client.get("/v1/generations", headers=auth)
    assert response.status_code == 401
    assert response.content_type == "application/problem+json"
    [row] = listed(genrelay)
    assert re.fullmatch(f"revoked {ISO_UTC}", row[4])


def test_revoking_leaves_the_tenants_other_keys_working(
    genrelay: Callable[..., Run], client: Any
) -> None:
    old, new = create_key(genrelay, "acme"), create_key(genrelay, "acme")
    assert genrelay("keys", "revoke", key_id(genrelay, old)).code == 0
    response = client.get("/v1/generations", headers={"Authorization": f"Bearer {new}"})
    assert response.status_code == 200
    states = {row[2]: row[4] for row in listed(genrelay, "acme")}
    assert states[new[:9]] == "active"
    assert states[old[:9]].startswith("revoked ")


def test_revoking_twice_says_so_and_keeps_the_first_time(genrelay: Callable[..., Run]) -> None:
    key_id_ = key_id(genrelay, create_key(genrelay, "acme"))
    first = genrelay("keys", "revoke", key_id_)
    [before] = listed(genrelay)
    again = genrelay("keys", "revoke", key_id_)
    assert again.code == 0, again.err
    assert "already revoked" in again.out
    assert "already" not in first.out
    assert listed(genrelay) == [before]


def test_revoking_an_unknown_id_fails_with_a_message_on_stderr(
    genrelay: Callable[..., Run],
) -> None:
    create_key(genrelay, "acme")
    result = genrelay("keys", "revoke", "key_doesnotexist")
    assert result.code == 1
    assert result.out == ""
    assert "key_doesnotexist" in result.err
    assert listed(genrelay)[0][4] == "active"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("t" * 201, "at most 200"),
        ("acme\tshop", "control character"),
        ("acme\nshop", "control character"),
    ],
)
def test_a_tenant_name_that_cannot_be_one_is_refused_in_one_line(
    genrelay: Callable[..., Run], name: str, reason: str
) -> None:
    """Before, such names made a tenant (a tab split its `keys list` line) or a traceback."""
    result = genrelay("keys", "create", name)
    assert result.code == 2
    assert result.out == ""
    assert reason in result.err and "Traceback" not in result.err
    assert listed(genrelay) == []


@pytest.mark.parametrize(
    "name", ["Acme\u00a0GmbH", "caf\u00e9\u00adbar", "\u05e9\u05dc\u05d5\u05dd\u200f"]
)
def test_a_tenant_name_in_any_unicode_but_control_characters_is_taken(
    genrelay: Callable[..., Run], name: str
) -> None:
    """A no-break space, a soft hyphen, a direction mark: names people write."""
    first = genrelay("keys", "create", name)
    assert first.code == 0, first.err
    assert genrelay("keys", "create", name).code == 0  # a second key for the same tenant
    assert [row[1] for row in listed(genrelay)] == [name, name]


@pytest.mark.postgres
def test_a_postgresql_database_that_is_not_migrated_says_to_migrate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    with new_postgres_database(migrate=False) as url:
        monkeypatch.setenv("GENRELAY_DATABASE_URL", url)
        assert main(["keys", "create", "acme"]) == 1
        [line] = capsys.readouterr().err.splitlines()
        assert "is not migrated (relation " in line
        assert line.endswith("does not exist): run `genrelay migrate`")
        assert main(["migrate"]) == 0
        assert main(["keys", "create", "acme"]) == 0


def test_keys_created_at_once_for_a_new_tenant_all_succeed_and_share_it(database_url: str) -> None:
    """Two `keys create NEWTENANT` at once on PostgreSQL: both found no tenant, both inserted
    it, and one failed on tenants_name_key (IntegrityError)."""
    import threading

    from service.auth import ApiKeys

    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite takes one writer at a time: two creations cannot interleave")
    store = Store(database_url)
    keys: list[str] = []
    failures: list[BaseException] = []

    def create() -> None:
        try:
            keys.append(ApiKeys(store).create("newtenant"))
        except Exception as exc:  # reported by the assertion below
            failures.append(exc)

    try:
        with store.engine.connect() as blocker:
            # Each creation finds no tenant, then waits here to insert it: they meet at the
            # unique name once the lock is let go.
            blocker.execute(sa.text("LOCK TABLE tenants IN SHARE ROW EXCLUSIVE MODE"))
            creations = [threading.Thread(target=create) for _ in range(4)]
            for creation in creations:
                creation.start()
            time.sleep(1)
            blocker.rollback()
        for creation in creations:
            creation.join(30)
        assert failures == []
        assert len(keys) == 4
        with store.read() as session:
            tenants = session.scalars(
                sa.select(ApiKey.tenant_id).where(ApiKey.key_hash.in_(map(hash_api_key, keys)))
            ).all()
    finally:
        store.dispose()
    assert len(tenants) == 4 and len(set(tenants)) == 1
