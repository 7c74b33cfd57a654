"""The Flask app factory: `create_app()` is what gunicorn serves."""

from __future__ import annotations

from pathlib import Path

import flask

from service.bootstrap import Services, build_services
from service.config import Config, ProcessSettings

# Swagger UI's files, vendored from npm's swagger-ui-dist (see its SOURCE): /docs needs no CDN.
SWAGGER_UI_DIR = Path(__file__).parent / "static" / "swagger-ui"
SWAGGER_UI_PATH = "/docs/swagger-ui/"


def create_app(config: Config | None = None, *, services: Services | None = None) -> flask.Flask:
    """Build the web app; config is read from the environment when not given."""
    # Handlers import the service layer, never the reverse: the import stays local to the
    # factory so `service` can be used (worker, CLI) without the web layer loaded.
    from handlers import (
        batches,
        callbacks,
        feed,
        generations,
        health,
        subscriptions,
        triggers,
    )
    from handlers.auth import release_connection
    from handlers.observability import register_observability
    from handlers.problems import ProblemApi, refuse_unstorable_url, register_error_handlers

    config = config or Config.from_env()
    if services is None:
        # Callbacks whose result the process stores itself at once, the rest going to the
        # workers: each streams, holding about one chunk (service/runtime/inline.py).
        inline = ProcessSettings.from_env().web_inline_stores
        services = build_services(config, inline_store_threads=inline)
    app = flask.Flask("genrelay")
    app.config.update(
        API_TITLE="genrelay",
        API_VERSION="v1",
        OPENAPI_VERSION="3.1.0",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=SWAGGER_UI_PATH,
        API_SPEC_OPTIONS={
            "security": [{"bearerAuth": []}],
            "components": {
                "securitySchemes": {
                    "bearerAuth": {"type": "http", "scheme": "bearer"},
                    # Trigger pushes: a Google-signed OIDC ID token (service/adapters/oidc.py).
                    "googleIdToken": {
                        "type": "http",
                        "scheme": "bearer",
                        "bearerFormat": "JWT",
                        "description": "A Google-signed ID token for a service account on the "
                        "trigger's push_accounts, with the push URL as its audience.",
                    },
                    # /metrics: GENRELAY_METRICS_TOKEN, not an API key.
                    "metricsToken": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "GENRELAY_METRICS_TOKEN, when the operator set one.",
                    },
                }
            },
        },
        MAX_CONTENT_LENGTH=config.max_request_bytes,
    )
    app.extensions["genrelay"] = services
    api = ProblemApi(app)
    api.register_blueprint(generations.blp)
    api.register_blueprint(batches.blp)
    api.register_blueprint(subscriptions.blp)
    api.register_blueprint(subscriptions.webhooks_blp)
    api.register_blueprint(feed.events_blp)
    api.register_blueprint(feed.deliveries_blp)
    api.register_blueprint(callbacks.blp)
    api.register_blueprint(triggers.blp)
    api.register_blueprint(triggers.push_blp)
    api.register_blueprint(health.blp)
    register_error_handlers(app)
    app.add_url_rule(
        SWAGGER_UI_PATH + "<path:filename>", "swagger_ui_files", _swagger_ui_file, methods=["GET"]
    )
    # The request's id and timing first, so that a refused request has them too; then, before
    # every blueprint's hooks (authentication reads the database), the URL's check.
    register_observability(app, config.gcp_project)
    app.before_request(refuse_unstorable_url)
    app.teardown_request(release_connection)
    return app


def _swagger_ui_file(filename: str) -> flask.Response:
    """One of Swagger UI's vendored files (404 for anything else)."""
    return flask.send_from_directory(SWAGGER_UI_DIR, filename, max_age=24 * 3600)
