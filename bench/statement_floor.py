"""The statement floor of the intake benchmark: genrelay's intake, statement for statement, with
nothing but Flask and psycopg.

One route, ``POST /v1/generations``, on genrelay's own database (``FLOOR_DATABASE``, a libpq
URL, migrated by genrelay): the same SQL statements in the same transactions as an intake of
genrelay's on PostgreSQL (``bench/intake_cost.py`` lists them), and the same ``POST`` to
``{GENRELAY_DEEPIMAGE_URL}/rest_api/process``; then it answers ``202`` with the row as the
status change returned it. What it leaves out is everything genrelay does in Python around
those statements: validating the request, SQLAlchemy, the ORM, marshmallow, retries, metrics,
logging context, pooled connections with a pre-ping (it keeps one autocommit connection per
thread and opens its transactions explicitly).

So it is what the design's statements cost on this machine whatever the Python around them.
``create_app(one_call=True)``, the **function floor**, runs the same statements in the same
transactions inside two PL/pgSQL functions (``install_functions`` creates them), one call per
transaction: what the same guarantees cost with one round trip per transaction.
``bench/intake.py`` runs both under gunicorn with genrelay's settings, next to genrelay and
the forwarders (PostgreSQL only).

    python -m gunicorn -c python:service.server.gunicorn_conf --chdir bench \\
        'statement_floor:create_app()'
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import threading
import uuid
from typing import Any

import psycopg
from flask import Flask, jsonify, request
from minimal_forwarder import UPSTREAM_TIMEOUT, connect, upstream_session
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

ACCOUNT = "deepimage"  # genrelay's one upstream account row (service/generations/line.py)
LEASE = dt.timedelta(seconds=300)  # the inline submit's lease (GENRELAY_TASK_LEASE default)
FIRST_POLL = 120.0  # seconds: GENRELAY_RECONCILE_AFTER's default

# ApiKeys.tenant_for: the key's tenant and its settings, autocommitted.
TENANT_FOR_KEY = """
SELECT t.id, t.name, t.weight, t.max_in_flight, t.created_at, t.allowed_input_buckets,
       t.allowed_storages, t.output_uri, t.retention_seconds
FROM tenants t JOIN api_keys k ON k.tenant_id = t.id
WHERE k.key_hash = %(key_hash)s AND k.revoked_at IS NULL"""
# Intake's transaction: Line.admit_new (the account locked, then whether a slot is free), the
# generation, its submit task claimed by this request.
LOCK_ACCOUNT = """
SELECT concurrency_limit, limit_source, paused_until FROM upstream_accounts
WHERE id = %(account)s FOR UPDATE"""
ALONE = """
SELECT (SELECT count(*) FROM (
          SELECT id FROM generations
          WHERE admitted_at IS NOT NULL AND source_found_at IS NULL
            AND (status IN ('queued', 'processing')
                 OR (status = 'canceled' AND upstream_job IS NOT NULL))
          LIMIT %(limit)s) AS in_flight) AS used,
       EXISTS (SELECT 1 FROM generations
               WHERE status = 'queued' AND admitted_at IS NULL) AS others_wait,
       max_in_flight AS cap
FROM tenants WHERE id = %(tenant_id)s"""
INSERT_GENERATION = """
INSERT INTO generations (id, tenant_id, status, input, metadata, created_at, updated_at,
                         priority, admitted_at)
VALUES (%(generation_id)s, %(tenant_id)s, 'queued', %(input)s, %(metadata)s, %(now)s,
        %(now)s, 0, %(now)s)"""
INSERT_SUBMIT = """
INSERT INTO tasks (id, kind, generation_id, payload, status, attempts, run_at, claim_token,
                   lease_expires_at, created_at, updated_at)
VALUES (%(task_id)s, 'submit', %(generation_id)s, '{}', 'running', 1, %(now)s, %(token)s,
        %(lease)s, %(now)s, %(now)s)"""
# The submit's transaction: change_status (which also asks whether the tenant has an enabled
# subscription) with its event and fan-out (the subscriptions read only if it has),
# Line.note_accepted, and the task going on as the job's poll (TaskQueue.continue_in).
TO_PROCESSING = """
UPDATE generations SET status = 'processing', upstream_job = %(job)s, updated_at = %(now)s,
                       submitted_at = %(now)s
WHERE id = %(generation_id)s AND status = 'queued'
RETURNING *, EXISTS (SELECT 1 FROM subscriptions s
                     WHERE s.tenant_id = generations.tenant_id AND s.enabled) AS subscribed"""
INSERT_EVENT = """
INSERT INTO events (id, tenant_id, generation_id, type, data, created_at)
VALUES (%(event_id)s, %(tenant_id)s, %(generation_id)s, 'generation.processing', %(data)s,
        %(now)s)"""
SUBSCRIPTIONS = """
SELECT id, url, format, events FROM subscriptions
WHERE tenant_id = %(tenant_id)s AND enabled"""
ACCOUNT_LEARNING = """
SELECT limit_source, refusals_in_a_row FROM upstream_accounts WHERE id = %(account)s"""
SUBMIT_BECOMES_POLL = """
UPDATE tasks SET kind = 'poll', payload = %(payload)s, status = 'pending', attempts = 0,
                 run_at = %(run_at)s, created_at = %(now)s, last_error = NULL,
                 claim_token = NULL, lease_expires_at = NULL, updated_at = %(now)s
WHERE id = %(task_id)s AND claim_token = %(token)s AND status = 'running'"""


def _plpgsql(statement: str, perform: bool = False) -> str:
    """One of the statements above inside a PL/pgSQL function: its parameters become the
    function's arguments and variables (``%(name)s`` is ``p_name``); ``perform`` runs a
    ``SELECT`` for its work alone, as the Python path does with a read it does not use."""
    statement = re.sub(r"%\((\w+)\)s", r"p_\1", statement.strip())
    if perform:
        assert statement.startswith("SELECT")
        statement = "PERFORM" + statement.removeprefix("SELECT")
    return statement


def _function(name: str, arguments: dict[str, str], returns: str, body: str) -> tuple[str, str]:
    """A PL/pgSQL function's ``CREATE OR REPLACE`` and its call with the named parameters of
    the Python path (``%(name)s``)."""
    signature = ", ".join(f"p_{argument} {kind}" for argument, kind in arguments.items())
    create = (
        f"CREATE OR REPLACE FUNCTION {name}({signature}) RETURNS {returns}\n"
        f"LANGUAGE plpgsql AS $floor$\n{body}\n$floor$"
    )
    call = f"SELECT {name}({', '.join(f'%({a})s' for a in arguments)}) AS result"
    return create, call


# The function floor (create_app(one_call=True)): each transaction above as one call of a
# PL/pgSQL function, the same statements in the same order, one round trip per transaction.
# A VOLATILE function takes a new snapshot for each statement under READ COMMITTED, so the
# count after the account's lock sees what the lock's last holder committed, as it does
# statement by statement.
CREATE_ADMIT, ADMIT = _function(
    "bench_floor_admit",
    {
        "account": "text", "tenant_id": "text", "generation_id": "text", "task_id": "text",
        "token": "text", "input": "jsonb", "metadata": "jsonb", "now": "timestamptz",
        "lease": "timestamptz",
    },
    "boolean",
    f"""DECLARE account record; line record; p_limit integer;
BEGIN
  {_plpgsql(LOCK_ACCOUNT)} INTO account;
  IF NOT FOUND THEN RETURN NULL; END IF;
  p_limit := account.concurrency_limit;
  {_plpgsql(ALONE)} INTO line;
  IF (account.paused_until IS NOT NULL AND account.paused_until > p_now)
     OR line.used >= p_limit OR line.others_wait OR coalesce(line.cap, 0) <> 0 THEN
    RETURN false;
  END IF;
  {_plpgsql(INSERT_GENERATION)};
  {_plpgsql(INSERT_SUBMIT)};
  RETURN true;
END""",
)  # fmt: skip
CREATE_PROCESSING, PROCESSING = _function(
    "bench_floor_processing",
    {
        "account": "text", "generation_id": "text", "job": "text", "now": "timestamptz",
        "tenant_id": "text", "event_id": "text", "task_id": "text", "token": "text",
        "payload": "jsonb", "run_at": "timestamptz",
    },
    "jsonb",
    f"""DECLARE changed record; p_data jsonb;
BEGIN
  {_plpgsql(TO_PROCESSING)} INTO changed;
  IF NOT FOUND THEN RETURN NULL; END IF;
  p_data := to_jsonb(changed) - 'subscribed';
  {_plpgsql(INSERT_EVENT)};
  IF changed.subscribed THEN
    {_plpgsql(SUBSCRIPTIONS, perform=True)};
  END IF;
  {_plpgsql(ACCOUNT_LEARNING, perform=True)};
  {_plpgsql(SUBMIT_BECOMES_POLL)};
  RETURN p_data;
END""",
)  # fmt: skip


def install_functions(database: str) -> None:
    """Create (or replace) the function floor's two functions in ``database`` (a libpq URL)."""
    with psycopg.connect(database, autocommit=True, connect_timeout=10) as db:
        db.execute(CREATE_ADMIT)
        db.execute(CREATE_PROCESSING)


Db = psycopg.Connection[dict[str, Any]]


def admit_in_statements(db: Db, params: dict[str, Any]) -> bool | None:
    """Intake's transaction, statement by statement: True once the generation and its claimed
    submit task are stored, False if it would wait in line, None without the account's row."""
    with db.transaction():
        account = db.execute(LOCK_ACCOUNT, params).fetchone()
        if account is None:
            return None
        limit = account["concurrency_limit"]
        line = db.execute(ALONE, {**params, "limit": limit}).fetchone()
        assert line is not None
        now = params["now"]
        paused = account["paused_until"] is not None and account["paused_until"] > now
        if paused or line["used"] >= limit or line["others_wait"] or line["cap"]:
            return False
        db.execute(INSERT_GENERATION, params)
        db.execute(INSERT_SUBMIT, params)
    return True


def processing_in_statements(db: Db, params: dict[str, Any]) -> dict[str, Any] | None:
    """The submit's transaction, statement by statement: the generation as its event shows
    it, None if it was no longer queued."""
    with db.transaction():
        row = db.execute(TO_PROCESSING, params).fetchone()
        if row is None:
            return None
        generation = _shown(row)
        subscribed = generation.pop("subscribed")
        db.execute(INSERT_EVENT, {**params, "data": Jsonb(generation)})
        if subscribed:  # read only when there are some, as genrelay does
            db.execute(SUBSCRIPTIONS, params).fetchall()
        db.execute(ACCOUNT_LEARNING, params).fetchone()
        db.execute(SUBMIT_BECOMES_POLL, params)
    return generation


def admit_in_one_call(db: Db, params: dict[str, Any]) -> bool | None:
    """admit_in_statements as one call of bench_floor_admit."""
    row = db.execute(ADMIT, params).fetchone()
    assert row is not None
    return row["result"]


def processing_in_one_call(db: Db, params: dict[str, Any]) -> dict[str, Any] | None:
    """processing_in_statements as one call of bench_floor_processing."""
    row = db.execute(PROCESSING, params).fetchone()
    assert row is not None
    return row["result"]


def create_app(one_call: bool = False) -> Flask:
    """The floor's app: one upstream session, and one database connection per thread. With
    ``one_call``, each transaction is one call of a function (install_functions first)."""
    admit, processing = (admit_in_statements, processing_in_statements)
    if one_call:
        admit, processing = (admit_in_one_call, processing_in_one_call)
    base_url = os.environ["GENRELAY_DEEPIMAGE_URL"].rstrip("/")
    process_url = f"{base_url}/rest_api/process"
    session = upstream_session()
    database = os.environ["FLOOR_DATABASE"]
    local = threading.local()

    def connection() -> Db:
        held = getattr(local, "connection", None)
        if held is None or held.closed:
            held = connect(database)  # the durable forwarder's: autocommit, 10 s to connect
            held.row_factory = dict_row
            local.connection = held
        return held

    app = Flask(__name__)

    @app.post("/v1/generations")
    def create_generation() -> Any:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = request.get_json(force=True)
        db = connection()
        key_hash = hashlib.sha256(key.encode()).hexdigest()
        tenant = db.execute(TENANT_FOR_KEY, {"key_hash": key_hash}).fetchone()
        if tenant is None:
            return jsonify({"status": "error", "error": "unauthorized"}), 401
        now = dt.datetime.now(dt.UTC)
        ids = {
            "account": ACCOUNT,
            "tenant_id": tenant["id"],
            "generation_id": f"gen_{uuid.uuid4().hex}",
            "task_id": f"task_{uuid.uuid4().hex}",
            "token": uuid.uuid4().hex,
        }
        admitted = admit(
            db,
            {**ids, "input": Jsonb(body["input"]), "metadata": Jsonb({}), "now": now,
             "lease": now + LEASE},
        )  # fmt: skip
        if admitted is None:  # genrelay makes the account's row with its first intake
            return jsonify({"status": "error", "error": "no account row yet"}), 503
        if not admitted:
            return jsonify({"status": "queued"}), 202  # genrelay would wait in line
        upstream = session.post(
            process_url, json=body["input"], timeout=UPSTREAM_TIMEOUT, allow_redirects=False
        )
        with upstream:
            if not upstream.ok:
                return jsonify({"status": "error", "upstream_status": upstream.status_code}), 502
            job = upstream.json().get("job")
        now = dt.datetime.now(dt.UTC)
        generation = processing(
            db,
            {**ids, "job": job, "now": now, "event_id": f"evt_{uuid.uuid4().hex}",
             "payload": Jsonb({"delay": FIRST_POLL}),
             "run_at": now + dt.timedelta(seconds=FIRST_POLL)},
        )  # fmt: skip
        if generation is None:
            return jsonify({"status": "error", "error": "no longer queued"}), 409
        return jsonify({**generation, "upstream": {"job": job}}), 202

    return app


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON: its columns, times in ISO 8601."""
    return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}
