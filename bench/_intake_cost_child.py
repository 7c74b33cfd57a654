"""The measured process of intake_cost.py: one target's app, WARMUP + COUNT requests through
Flask's test client. It imports only the target (genrelay's `service.app.create_app`, what
gunicorn serves, or minimal_forwarder.py), so that another checkout's genrelay runs as it is.

Environment: INTAKE_COST_TARGET (genrelay | forwarder), INTAKE_COST_COUNT, INTAKE_COST_BODY
(the JSON body), INTAKE_COST_KEY (genrelay's API key), INTAKE_COST_END_JOBS (the SQL that ends
the jobs in flight, run every END_JOBS_EVERY requests, as intake.py's JobsEnding does), and
INTAKE_COST_STATEMENTS=1 to print the SQL statements of one request instead.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import sqlalchemy as sa

WARMUP = 20
END_JOBS_EVERY = 20


def main() -> None:
    target, count = os.environ["INTAKE_COST_TARGET"], int(os.environ["INTAKE_COST_COUNT"])
    body = json.loads(os.environ["INTAKE_COST_BODY"])
    headers: dict[str, str] = {}
    jobs: sa.Engine | None = None
    app: Any
    if target == "genrelay":
        from service.app import create_app

        app = create_app()
        headers = {"Authorization": f"Bearer {os.environ['INTAKE_COST_KEY']}"}
        jobs = sa.create_engine(os.environ["GENRELAY_DATABASE_URL"], isolation_level="AUTOCOMMIT")
    else:
        from minimal_forwarder import create_app as create_forwarder

        app = create_forwarder()
    client = app.test_client()
    end_jobs = sa.text(os.environ["INTAKE_COST_END_JOBS"])

    def post(n: int) -> None:
        if jobs is not None and n % END_JOBS_EVERY == 0:
            with jobs.connect() as connection:
                connection.execute(end_jobs)
        answer = client.post("/v1/generations", json=body, headers=headers)
        if answer.status_code != 202 or answer.json["status"] != "processing":
            sys.exit(f"{target} answered {answer.status_code}: {answer.text[:300]}")

    for n in range(WARMUP):
        post(n)
    if os.environ.get("INTAKE_COST_STATEMENTS"):
        seen: list[str] = []
        sa.event.listen(sa.Engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        post(1)  # not a multiple of END_JOBS_EVERY: the request's own statements alone
        for statement in seen:
            print("STATEMENT", " ".join(statement.split())[:160])
        return
    before = resource.getrusage(resource.RUSAGE_THREAD)
    for n in range(WARMUP, WARMUP + count):
        post(n)
    after = resource.getrusage(resource.RUSAGE_THREAD)
    # User and system CPU apart: callgrind counts user space only, and every round trip to
    # the database or upstream costs system calls.
    print(
        f"USER {after.ru_utime - before.ru_utime:.6f} SYSTEM {after.ru_stime - before.ru_stime:.6f}"
    )


if __name__ == "__main__":
    main()
