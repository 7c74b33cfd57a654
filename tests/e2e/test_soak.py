"""The fault-injection soak of bench/soak.py at CI size, on SQLite and on PostgreSQL (the
crash test on PostgreSQL).

120 generations go through `genrelay serve`, `genrelay worker`, the simulator, fake-gcs-server
and a flaky receiver with every fault injected (upstream 5xx, 429, timeouts, job failures,
duplicate and lost callbacks, receiver 5xx, GCS outages). The crash test does the same while
the worker and the web process are SIGKILLed 10 times each and restarted. The engine checks
the invariants; a failure prints its whole report (violations first).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from bench.soak import SoakConfig, SoakError, SoakReport, run_soak
from service.models import Base

pytestmark = pytest.mark.e2e

GENERATIONS = 120
RATE = 15.0  # submissions per second: an 8 s load, over which faults and kills are spread
# Seconds allowed after the last submission. A healthy run needs about 10, but a submit that
# meets 6 upstream faults in a row (16 % each: about 1 run in 300) waits out the submit
# backoff, 2 s doubling, up to 126 s in all; 180 s leaves the rest to 7 faults in a row.
SETTLE = 180.0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def soak_database(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """(kind, URL): SQLite is a fresh file the soak makes; PostgreSQL the session's database."""
    if request.param == "sqlite":
        return "sqlite", None
    url: str = request.getfixturevalue("postgres_database")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        connection.execute(sa.text(f"TRUNCATE {tables}"))
    engine.dispose()
    return "postgresql", url


def soak(database: tuple[str, str | None], work_dir: Path, *, crash: bool) -> SoakReport:
    kind, url = database
    config = SoakConfig(
        generations=GENERATIONS,
        database=kind,
        database_url=url,
        crash=crash,
        seed=7,
        rate=RATE,
        drain_timeout=SETTLE,
        work_dir=work_dir,
    )
    try:
        report = run_soak(config)
    except SoakError as exc:
        pytest.fail(f"the soak could not run: {exc}")
    print(report.format())
    return report


def failure_text(report: SoakReport) -> str:
    return "\n".join(report.violations[:40]) + "\n" + report.format()


@pytest.mark.parametrize("soak_database", ["sqlite"], indirect=True)
def test_soak_with_faults(soak_database: tuple[str, str | None], tmp_path: Path) -> None:
    # On SQLite only (`make run`'s database): on PostgreSQL the crash soak below injects the
    # same faults and kills the processes on top, so a faults-only run there adds nothing.
    report = soak(soak_database, tmp_path / "soak", crash=False)
    assert report.ok, failure_text(report)
    assert report.timings["generations"] == GENERATIONS
    assert not any(kill for kill in report.faults["kills"])


@pytest.mark.parametrize(
    "soak_database", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_crash_worker_and_web_ten_times_each(
    soak_database: tuple[str, str | None], tmp_path: Path
) -> None:
    # On PostgreSQL only: what a crash tests (leases, claims, the line's slots, idempotent
    # steps) is the same code on both databases, and the faults soak runs on SQLite.
    report = soak(soak_database, tmp_path / "crash", crash=True)
    assert report.ok, failure_text(report)
    kills = [kill["process"] for kill in report.faults["kills"]]
    assert kills.count("worker") == kills.count("serve") == 10
