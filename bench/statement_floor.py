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

So it is what the design costs on this machine whatever the code around it: no implementation
of genrelay's intake in Python does less work per request and keeps the same guarantees.
``bench/intake.py`` runs it under gunicorn with genrelay's settings, next to genrelay and the
forwarders (PostgreSQL only).

    python -m gunicorn -c python:service.server.gunicorn_conf --chdir bench \\
        'statement_floor:create_app()'
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
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
VALUES (%(id)s, %(tenant_id)s, 'queued', %(input)s, %(metadata)s, %(now)s, %(now)s,
        0, %(now)s)"""
INSERT_SUBMIT = """
INSERT INTO tasks (id, kind, generation_id, payload, status, attempts, run_at, claim_token,
                   lease_expires_at, created_at, updated_at)
VALUES (%(id)s, 'submit', %(generation_id)s, '{}', 'running', 1, %(now)s, %(token)s,
        %(lease)s, %(now)s, %(now)s)"""
# The submit's transaction: change_status (which also asks whether the tenant has an enabled
# subscription) with its event and fan-out (the subscriptions read only if it has),
# Line.note_accepted, and the task going on as the job's poll (TaskQueue.continue_in).
TO_PROCESSING = """
UPDATE generations SET status = 'processing', upstream_job = %(job)s, updated_at = %(now)s,
                       submitted_at = %(now)s
WHERE id = %(id)s AND status = 'queued'
RETURNING *, EXISTS (SELECT 1 FROM subscriptions s
                     WHERE s.tenant_id = generations.tenant_id AND s.enabled) AS subscribed"""
INSERT_EVENT = """
INSERT INTO events (id, tenant_id, generation_id, type, data, created_at)
VALUES (%(id)s, %(tenant_id)s, %(generation_id)s, 'generation.processing', %(data)s, %(now)s)"""
SUBSCRIPTIONS = """
SELECT id, url, format, events FROM subscriptions
WHERE tenant_id = %(tenant_id)s AND enabled"""
ACCOUNT_LEARNING = """
SELECT limit_source, refusals_in_a_row FROM upstream_accounts WHERE id = %(account)s"""
SUBMIT_BECOMES_POLL = """
UPDATE tasks SET kind = 'poll', payload = %(payload)s, status = 'pending', attempts = 0,
                 run_at = %(run_at)s, created_at = %(now)s, last_error = NULL,
                 claim_token = NULL, lease_expires_at = NULL, updated_at = %(now)s
WHERE id = %(id)s AND claim_token = %(token)s AND status = 'running'"""


def create_app() -> Flask:
    """The floor's app: one upstream session, and one database connection per thread."""
    base_url = os.environ["GENRELAY_DEEPIMAGE_URL"].rstrip("/")
    process_url = f"{base_url}/rest_api/process"
    session = upstream_session()
    database = os.environ["FLOOR_DATABASE"]
    local = threading.local()

    def connection() -> psycopg.Connection[dict[str, Any]]:
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
        generation_id, task_id = f"gen_{uuid.uuid4().hex}", f"task_{uuid.uuid4().hex}"
        token, now = uuid.uuid4().hex, dt.datetime.now(dt.UTC)
        with db.transaction():
            account = db.execute(LOCK_ACCOUNT, {"account": ACCOUNT}).fetchone()
            if account is None:  # genrelay makes it with its first intake
                return jsonify({"status": "error", "error": "no account row yet"}), 503
            limit = account["concurrency_limit"]
            line = db.execute(ALONE, {"limit": limit, "tenant_id": tenant["id"]}).fetchone()
            assert line is not None
            paused = account["paused_until"] is not None and account["paused_until"] > now
            if paused or line["used"] >= limit or line["others_wait"] or line["cap"]:
                return jsonify({"status": "queued"}), 202  # genrelay would wait in line
            db.execute(
                INSERT_GENERATION,
                {
                    "id": generation_id,
                    "tenant_id": tenant["id"],
                    "input": Jsonb(body["input"]),
                    "metadata": Jsonb({}),
                    "now": now,
                },
            )
            task = {"id": task_id, "generation_id": generation_id, "token": token}
            db.execute(INSERT_SUBMIT, {**task, "now": now, "lease": now + LEASE})
        upstream = session.post(
            process_url, json=body["input"], timeout=UPSTREAM_TIMEOUT, allow_redirects=False
        )
        with upstream:
            if not upstream.ok:
                return jsonify({"status": "error", "upstream_status": upstream.status_code}), 502
            job = upstream.json().get("job")
        now = dt.datetime.now(dt.UTC)
        with db.transaction():
            row = db.execute(TO_PROCESSING, {"job": job, "now": now, "id": generation_id})
            generation = _shown(row.fetchone() or {})
            subscribed = generation.pop("subscribed", False)
            event = {"id": f"evt_{uuid.uuid4().hex}", "data": Jsonb(generation), "now": now}
            event.update(tenant_id=tenant["id"], generation_id=generation_id)
            db.execute(INSERT_EVENT, event)
            if subscribed:  # read only when there are some, as genrelay does
                db.execute(SUBSCRIPTIONS, {"tenant_id": tenant["id"]}).fetchall()
            db.execute(ACCOUNT_LEARNING, {"account": ACCOUNT}).fetchone()
            run_at = now + dt.timedelta(seconds=FIRST_POLL)
            poll = {"payload": Jsonb({"delay": FIRST_POLL}), "run_at": run_at, "now": now}
            db.execute(SUBMIT_BECOMES_POLL, {**poll, "id": task_id, "token": token})
        return jsonify({**generation, "upstream": {"job": job}}), 202

    return app


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON: its columns, times in ISO 8601."""
    return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}
