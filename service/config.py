"""Service configuration, read once from the environment (DESIGN §5).

Every setting has one environment variable. `Config.from_env` parses them all and raises
`ConfigError` naming the variable at fault, so a bad deployment stops at start-up instead of
failing on the first request.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "sqlite:///var/genrelay.db"
DEFAULT_DEEPIMAGE_URL = "https://deep-image.ai"
DEFAULT_WEBHOOK_RETRY_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


class ConfigError(Exception):
    """A configuration value is missing or malformed; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment."""

    database_url: str = DEFAULT_DATABASE_URL
    deepimage_url: str = DEFAULT_DEEPIMAGE_URL
    deepimage_api_key: str = dataclasses.field(default="", repr=False)
    public_url: str | None = None
    callback_secret: str = dataclasses.field(default="", repr=False)
    gcs_bucket: str = ""
    gcs_prefix: str = ""
    # Service account that signs result URLs through IAM (Cloud Run has no private key).
    gcs_signing_account: str | None = None
    signed_url_ttl: float = 3600.0
    # Check a completion with GET /rest_api/result/{job} before downloading (callbacks are
    # unsigned; the URL token proves who they are for, the upstream confirms what they say).
    confirm_results: bool = True
    max_result_bytes: int = 256 * 1024 * 1024
    allow_private_webhooks: bool = False
    reconcile_after: float = 120.0
    generation_timeout: float = 3600.0
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY_SCHEDULE
    port: int = 8080
    # For Cloud Logging's trace field (projects/P/traces/T); Cloud Run does not set it.
    gcp_project: str | None = None
    # Outgoing HTTP to Deep-Image: (connect, read) seconds.
    deepimage_timeout: tuple[float, float] = (5.0, 30.0)
    # When set, GET /metrics needs `Authorization: Bearer <token>` (the web service is public).
    metrics_token: str | None = dataclasses.field(default=None, repr=False)
    # How long a claimed task is held before another process may take it (holder died).
    task_lease: float = 300.0
    # How long a submit task is retried (transient errors) before its generation fails;
    # None: service/bootstrap.py's SUBMIT_POLICY (6 h).
    submit_max_age: float | None = None
    # Per API key and per process (see service/ratelimit.py); 0 turns the limit off.
    rate_limit: float = 50.0
    rate_limit_burst: int = 100
    # Largest request body accepted, in bytes (inline base64 images make bodies large).
    max_request_bytes: int = 25 * 1024 * 1024
    # Jobs the Deep-Image account may have processing at once; None: learned (service/line.py).
    upstream_concurrency: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Parse the GENRELAY_* variables; raise ConfigError naming the first bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def text(name: str) -> str | None:
            value = env.get(name)
            if value is None or value.strip() == "":
                return None
            return value.strip()

        values["database_url"] = cls.database_url_from_env(env)
        if (v := text("GENRELAY_DEEPIMAGE_URL")) is not None:
            values["deepimage_url"] = _http_url("GENRELAY_DEEPIMAGE_URL", v)
        values["deepimage_api_key"] = text("GENRELAY_DEEPIMAGE_API_KEY") or ""
        if not values["deepimage_api_key"]:
            raise ConfigError("GENRELAY_DEEPIMAGE_API_KEY is required (the Deep-Image API key)")
        if (v := text("GENRELAY_PUBLIC_URL")) is not None:
            values["public_url"] = _http_url("GENRELAY_PUBLIC_URL", v)
        values["callback_secret"] = text("GENRELAY_CALLBACK_SECRET") or ""
        # Callback URLs carry an HMAC of the generation id; without a public URL none are
        # sent (polling-only mode) and no secret is needed. A short secret is refused.
        if values.get("public_url") and not values["callback_secret"]:
            raise ConfigError(
                "GENRELAY_CALLBACK_SECRET is required when GENRELAY_PUBLIC_URL is set"
            )
        if values["callback_secret"] and len(values["callback_secret"]) < 16:
            raise ConfigError("GENRELAY_CALLBACK_SECRET must be at least 16 characters")
        values["gcs_bucket"] = text("GENRELAY_GCS_BUCKET") or ""
        if not values["gcs_bucket"]:
            raise ConfigError("GENRELAY_GCS_BUCKET is required (results are stored there)")
        values["gcs_signing_account"] = text("GENRELAY_GCS_SIGNING_ACCOUNT")
        if (v := text("GENRELAY_SIGNED_URL_TTL")) is not None:
            ttl = _seconds("GENRELAY_SIGNED_URL_TTL", v)
            if not 1 <= ttl <= 7 * 24 * 3600:
                raise ConfigError(
                    "GENRELAY_SIGNED_URL_TTL must be between 1 s and 7 days (V4 limit)"
                )
            values["signed_url_ttl"] = ttl
        if (v := text("GENRELAY_CONFIRM_RESULTS")) is not None:
            values["confirm_results"] = _boolean("GENRELAY_CONFIRM_RESULTS", v)
        if (v := text("GENRELAY_MAX_RESULT_BYTES")) is not None:
            if not v.isdigit() or int(v) < 1:
                raise ConfigError("GENRELAY_MAX_RESULT_BYTES must be a positive number of bytes")
            values["max_result_bytes"] = int(v)
        values["gcs_prefix"] = (text("GENRELAY_GCS_PREFIX") or "").strip("/")
        if (v := text("GENRELAY_ALLOW_PRIVATE_WEBHOOKS")) is not None:
            values["allow_private_webhooks"] = _boolean("GENRELAY_ALLOW_PRIVATE_WEBHOOKS", v)
        if (v := text("GENRELAY_RECONCILE_AFTER")) is not None:
            values["reconcile_after"] = _seconds("GENRELAY_RECONCILE_AFTER", v)
        if (v := text("GENRELAY_GENERATION_TIMEOUT")) is not None:
            values["generation_timeout"] = _seconds("GENRELAY_GENERATION_TIMEOUT", v)
        if (v := text("GENRELAY_WEBHOOK_RETRY_SCHEDULE")) is not None:
            parts = [p.strip() for p in v.split(",")]
            values["webhook_retry_schedule"] = tuple(
                _seconds("GENRELAY_WEBHOOK_RETRY_SCHEDULE", p) for p in parts
            )
        if (v := text("GENRELAY_DEEPIMAGE_TIMEOUT")) is not None:
            read_timeout = _seconds("GENRELAY_DEEPIMAGE_TIMEOUT", v)
            if read_timeout <= 0:
                raise ConfigError("GENRELAY_DEEPIMAGE_TIMEOUT must be above 0 seconds")
            values["deepimage_timeout"] = (min(5.0, read_timeout), read_timeout)
        if (v := text("GENRELAY_TASK_LEASE")) is not None:
            values["task_lease"] = _seconds("GENRELAY_TASK_LEASE", v)
            if values["task_lease"] < 1:
                raise ConfigError("GENRELAY_TASK_LEASE must be at least 1 second")
        if (v := text("GENRELAY_SUBMIT_MAX_AGE")) is not None:
            values["submit_max_age"] = _seconds("GENRELAY_SUBMIT_MAX_AGE", v)
            if values["submit_max_age"] < 1:
                raise ConfigError("GENRELAY_SUBMIT_MAX_AGE must be at least 1 second")
        values["gcp_project"] = text("GOOGLE_CLOUD_PROJECT")
        values["metrics_token"] = text("GENRELAY_METRICS_TOKEN")
        if (v := text("GENRELAY_RATE_LIMIT")) is not None:
            try:
                values["rate_limit"] = float(v)
            except ValueError:
                values["rate_limit"] = -1.0
            if not math.isfinite(values["rate_limit"]) or values["rate_limit"] < 0:
                raise ConfigError(
                    "GENRELAY_RATE_LIMIT must be requests per second per key (0 turns it off)"
                )
        if (v := text("GENRELAY_RATE_LIMIT_BURST")) is not None:
            if not v.isdigit() or int(v) < 1:
                raise ConfigError("GENRELAY_RATE_LIMIT_BURST must be a whole number above 0")
            values["rate_limit_burst"] = int(v)
        if (v := text("GENRELAY_UPSTREAM_CONCURRENCY")) is not None:
            if not v.isdigit() or int(v) < 1:
                raise ConfigError(
                    "GENRELAY_UPSTREAM_CONCURRENCY must be a whole number above 0 (jobs the "
                    "Deep-Image account may have processing at once)"
                )
            values["upstream_concurrency"] = int(v)
        if (v := text("PORT")) is not None:
            if not v.isdigit() or not 0 < int(v) < 65536:
                raise ConfigError("PORT must be a TCP port number (1-65535)")
            values["port"] = int(v)
        return cls(**values)

    @staticmethod
    def database_url_from_env(environ: Mapping[str, str] | None = None) -> str:
        """Only the database URL: what `genrelay migrate` and `keys create` need."""
        env = os.environ if environ is None else environ
        value = (env.get("GENRELAY_DATABASE_URL") or "").strip() or DEFAULT_DATABASE_URL
        if not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ConfigError(
                "GENRELAY_DATABASE_URL must be a sqlite:/// or postgresql+psycopg:// URL"
            )
        return value

    def replace(self, **changes: Any) -> Config:
        """Return a copy with some fields changed (tests, dev mode)."""
        return dataclasses.replace(self, **changes)


def _http_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def _boolean(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {value!r}")


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{name} must be a non-negative number of seconds, got {value!r}")
    return seconds
