"""The baseline of the intake benchmark: the least a Flask service can do and still forward.

One route, ``POST /v1/generations``: read the JSON body, send ``body["input"]`` to
``{GENRELAY_DEEPIMAGE_URL}/rest_api/process`` with the ``x-api-key`` header and answer
``202 {"status": "processing", "upstream": {"job": ...}}``. No validation, no database, no
authentication. `bench/intake.py` runs it under gunicorn with genrelay's own settings
(``service/server/gunicorn_conf.py``), so whatever genrelay costs beyond this is its intake work.

    python -m gunicorn -c python:service.server.gunicorn_conf --chdir bench \\
        'minimal_forwarder:create_app()'
"""

from __future__ import annotations

import os
from typing import Any

import requests
from flask import Flask, jsonify, request

# The same (connect, read) timeout genrelay's Deep-Image client uses.
UPSTREAM_TIMEOUT: tuple[float, float] = (5.0, 30.0)


def create_app() -> Flask:
    """The forwarder app; its upstream session is created once, here, and shared by threads."""
    base_url = os.environ.get("GENRELAY_DEEPIMAGE_URL", "https://deep-image.ai").rstrip("/")
    process_url = f"{base_url}/rest_api/process"
    session = requests.Session()
    session.headers.update(
        {
            "x-api-key": os.environ.get("GENRELAY_DEEPIMAGE_API_KEY", ""),
            "accept": "application/json",
        }
    )
    app = Flask(__name__)

    @app.post("/v1/generations")
    def create_generation() -> Any:
        body = request.get_json(force=True)
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
        return jsonify({"status": "processing", "upstream": {"job": job}}), 202

    return app
