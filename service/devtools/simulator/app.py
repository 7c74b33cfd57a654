"""Flask app of the Deep-Image REST API simulator.

Routes of the simulated API live under ``/rest_api/``; result images under ``/images/``; the
``/_sim/`` routes are the simulator's own control and introspection API (no auth), used by
tests to inject faults and to check what the "upstream" saw. Nothing here runs at import time:
`create_simulator_app` builds a fresh engine per app.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from service.devtools.simulator.errors import SimulatorError, bad_request
from service.devtools.simulator.fetch import fetch_inputs
from service.devtools.simulator.jobs import Clock, Job, SimulatorEngine
from service.devtools.simulator.settings import SimulatorSettings
from service.devtools.simulator.validation import Upload, validate_process_request

logger = logging.getLogger("genrelay.simulator")

EXTENSION_KEY = "genrelay_simulator"
# Upper bound of a request body; multipart uploads of real photos fit easily.
MAX_CONTENT_LENGTH = 64 * 1024 * 1024
FILE_PARTS = ("fileName", "image")  # the spec's part name first, then the one real code uses
# Endpoints (view names) whose answers the timeout_rate fault may hold back.
TIMEOUT_ENDPOINTS = frozenset({"process", "result"})


def get_engine(app: Flask | None = None) -> SimulatorEngine:
    """The engine (all state) behind a simulator app; the current app if none is given."""
    target = app if app is not None else current_app
    engine: SimulatorEngine = target.extensions[EXTENSION_KEY]
    return engine


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def parse_json(raw: bytes | str) -> Any:
    """Parse a JSON document strictly (no NaN/Infinity); 400 Invalid JSON otherwise."""
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise bad_request("Invalid JSON body") from exc


def _read_process_payload() -> tuple[Any, Upload | None]:
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raw: str | bytes | None = request.form.get("parameters")
        if raw is None and "parameters" in request.files:
            # Clients that send "parameters" as a file-like part (with a filename) land here.
            raw = request.files["parameters"].read()
        if raw is None:
            raise bad_request("parameters is required")
        body = parse_json(raw)
        for part in FILE_PARTS:
            storage = request.files.get(part)
            if storage is not None:
                return body, Upload(part=part, filename=storage.filename, data=storage.read())
        return body, None
    # Anything else is read as JSON whatever its Content-Type says, as lenient APIs do.
    return parse_json(request.get_data(cache=False)), None


def _authenticate(engine: SimulatorEngine) -> str:
    key = request.headers.get("x-api-key")  # werkzeug headers are case-insensitive
    if not key:
        raise SimulatorError(403, "No x-api-key header is provided")
    account = engine.account_for(key)
    if account is None:
        raise SimulatorError(404, "No user found for provided token")
    return account


def _submit(endpoint: str) -> Job:
    engine = get_engine()
    account = _authenticate(engine)
    engine.requests_left()
    injected = engine.injected_upstream_error()
    if injected is not None:
        raise injected
    body, upload = _read_process_payload()
    process_request = validate_process_request(
        body, upload, max_pixels_side=engine.settings.max_pixels_side
    )
    fetched = fetch_inputs(body) if engine.settings.fetch_inputs else []
    # root_url keeps a mount prefix, so result URLs point back at this app's /images route.
    return engine.submit(account, process_request, endpoint, request.root_url, fetched=fetched)


def _register_api(app: Flask) -> None:
    @app.post("/rest_api/process")
    def process() -> Any:
        job = _submit("process")
        return {"job": job.id, "status": "received"}

    @app.post("/rest_api/process_result")
    def process_result() -> Any:
        job = _submit("process_result")
        engine = get_engine()
        return engine.wait_result(job, engine.settings.process_result_wait)

    @app.get("/rest_api/result/<job_id>")
    def result(job_id: str) -> Any:
        engine = get_engine()
        account = _authenticate(engine)
        engine.requests_left()
        return engine.result_body(engine.lookup(account, job_id))

    @app.delete("/rest_api/result/<job_id>")
    def delete_result(job_id: str) -> Any:
        engine = get_engine()
        return engine.delete(_authenticate(engine), job_id)

    @app.get("/rest_api/me")
    def me() -> Any:
        engine = get_engine()
        return engine.me(_authenticate(engine))

    @app.get("/images/<date>/<name>")
    def image(date: str, name: str) -> Response:
        data, content_type = get_engine().image(date, name)
        return Response(data, mimetype=content_type)


def _register_control(app: Flask) -> None:
    @app.get("/_sim/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.get("/_sim/settings")
    def read_settings() -> Any:
        return get_engine().settings.public_knobs()

    @app.post("/_sim/settings")
    def change_settings() -> Any:
        overrides = parse_json(request.get_data(cache=False))
        if not isinstance(overrides, dict):
            raise bad_request("Send a JSON object of knob overrides")
        try:
            settings = get_engine().update_settings(overrides)
        except (ValueError, TypeError) as exc:
            raise bad_request(str(exc)) from exc
        logger.info("simulator knobs changed: %s", ", ".join(sorted(overrides)))
        return settings.public_knobs()

    @app.get("/_sim/stats")
    def stats() -> Any:
        return get_engine().stats()

    @app.get("/_sim/jobs")
    def jobs() -> Any:
        return {"jobs": get_engine().job_list()}

    @app.get("/_sim/jobs/<job_id>")
    def job(job_id: str) -> Any:
        return get_engine().job_debug(job_id)

    @app.post("/_sim/reset")
    def reset() -> Any:
        get_engine().reset()
        return {"status": "reset"}


def _register_hooks(app: Flask) -> None:
    @app.before_request
    def add_latency() -> None:
        engine = get_engine()
        latency = engine.settings.latency
        if latency > 0 and request.path.startswith("/rest_api/"):
            # An Event wait rather than sleep, so shutting down does not wait it out.
            engine.stopping.wait(latency)

    @app.before_request
    def draw_timeout() -> None:
        if request.endpoint in TIMEOUT_ENDPOINTS:
            # Drawn before the call is handled; the answer (whatever it is) waits in
            # hold_answer, so a held process call has still created its job.
            g.sim_hold_seconds = get_engine().injected_timeout()

    @app.after_request
    def count_response(response: Response) -> Response:
        if request.path.startswith("/rest_api/"):
            get_engine().record_response(response.status_code)
        return response

    @app.after_request
    def hold_answer(response: Response) -> Response:
        hold = g.get("sim_hold_seconds")
        if hold:
            # An Event wait rather than sleep, so shutting down does not wait it out.
            get_engine().stopping.wait(hold)
        return response

    @app.errorhandler(SimulatorError)
    def simulator_error(error: SimulatorError) -> tuple[Response, int]:
        return jsonify(error.body()), error.status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        status = error.code or 500
        code = (error.name or "error").upper().replace(" ", "_")
        return jsonify({"message": error.description or error.name, "code": code}), status

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> tuple[Response, int]:
        logger.exception("simulator handler failed on %s %s", request.method, request.path)
        body = {"code": "INTERNAL_SERVER_ERROR", "message": "Unexpected simulator error"}
        return jsonify(body), 500


def create_simulator_app(
    settings: SimulatorSettings | None = None, *, clock: Clock | None = None
) -> Flask:
    """Build a simulator Flask app with its own in-memory state."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_CONTENT_LENGTH
    app.extensions[EXTENSION_KEY] = SimulatorEngine(settings or SimulatorSettings(), clock)
    _register_hooks(app)
    _register_api(app)
    _register_control(app)
    return app
