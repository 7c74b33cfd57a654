"""The baseline of the intake benchmark: the least a Flask service can do and still forward.

One route, ``POST /v1/generations``: read the JSON body, send ``body["input"]`` to
``{GENRELAY_DEEPIMAGE_URL}/rest_api/process`` with the ``x-api-key`` header and answer
``202 {"status": "processing", "upstream": {"job": ...}}``. No validation, no database, no
authentication. `bench/intake.py` runs it under gunicorn with genrelay's own settings
(``service/server/gunicorn_conf.py``), so whatever genrelay costs beyond this is its intake work.

    python -m gunicorn -c python:service.server.gunicorn_conf --chdir bench \\
        'minimal_forwarder:create_app()'

With ``FORWARDER_DATABASE`` set (a libpq URL, or ``sqlite:PATH``) it is the *durable*
forwarder: it also writes each request down before forwarding it and records the job after,
each an autocommitted statement of plain DB-API (an INSERT, then an UPDATE), on one
connection per thread. That is the least a forwarder can do and still lose no request, so
next to genrelay it shows what durability alone costs on the machine.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from typing import Any

import requests
from flask import Flask, jsonify, request

# The same (connect, read) timeout genrelay's Deep-Image client uses.
UPSTREAM_TIMEOUT: tuple[float, float] = (5.0, 30.0)


def upstream_session() -> requests.Session:
    """One session for every thread's calls upstream, with the API key in its headers."""
    session = requests.Session()
    session.headers.update(
        {
            "x-api-key": os.environ.get("GENRELAY_DEEPIMAGE_API_KEY", ""),
            "accept": "application/json",
        }
    )
    return session


def create_app() -> Flask:
    """The forwarder app; its upstream session is created once, here, and shared by threads."""
    base_url = os.environ.get("GENRELAY_DEEPIMAGE_URL", "https://deep-image.ai").rstrip("/")
    process_url = f"{base_url}/rest_api/process"
    session = upstream_session()
    journal = (
        Journal(os.environ["FORWARDER_DATABASE"]) if "FORWARDER_DATABASE" in os.environ else None
    )
    app = Flask(__name__)

    @app.post("/v1/generations")
    def create_generation() -> Any:
        body = request.get_json(force=True)
        request_id = journal.received(body["input"]) if journal else ""
        try:
            upstream = session.post(
                process_url,
                json=body["input"],
                timeout=UPSTREAM_TIMEOUT,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return jsonify({"status": "error", "error": type(exc).__name__}), 502
        with upstream:
            if not upstream.ok:
                return jsonify({"status": "error", "upstream_status": upstream.status_code}), 502
            job = upstream.json().get("job")
        if journal:
            journal.forwarded(request_id, job)
        return jsonify({"status": "processing", "upstream": {"job": job}}), 202

    return app


class Journal:
    """The durable forwarder's table of requests (`create_journal` makes it): one row each,
    written before forwarding and updated with the job after; one autocommit connection per
    thread."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.marker = "?" if database.startswith("sqlite:") else "%s"
        self.local = threading.local()

    def connection(self) -> Any:
        if getattr(self.local, "connection", None) is None:
            self.local.connection = connect(self.database)
        return self.local.connection

    def received(self, payload: Any) -> str:
        request_id = uuid.uuid4().hex
        self.execute(
            "INSERT INTO forwarded (id, input, status) VALUES (?, ?, 'received')",
            (request_id, json.dumps(payload)),
        )
        return request_id

    def forwarded(self, request_id: str, job: str | None) -> None:
        self.execute(
            "UPDATE forwarded SET status = 'forwarded', job = ? WHERE id = ?", (job, request_id)
        )

    def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        self.connection().execute(sql.replace("?", self.marker), params)


def connect(database: str) -> Any:
    """An autocommit connection: SQLite in WAL with synchronous=NORMAL, as genrelay runs it."""
    if database.startswith("sqlite:"):
        import sqlite3

        connection = sqlite3.connect(
            database.removeprefix("sqlite:"), timeout=30, isolation_level=None
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection
    import psycopg

    return psycopg.connect(database, autocommit=True, connect_timeout=10)


def create_journal(database: str) -> None:
    """The durable forwarder's table, made once before its processes start."""
    connection = connect(database)
    try:
        connection.execute(
            "CREATE TABLE forwarded (id TEXT PRIMARY KEY, input TEXT NOT NULL, "
            "status TEXT NOT NULL, job TEXT)"
        )
    finally:
        connection.close()
