"""Service configuration, read once from the environment.

Every setting has one environment variable. `Config.from_env` parses them all and raises
`ConfigError` naming the variable at fault, so a bad deployment stops at start-up instead of
failing on the first request.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa

from service.adapters.gcs_urls import is_bucket_name
from service.domain import MAX_IN_FLIGHT

DEFAULT_DATABASE_URL = "sqlite:///var/genrelay.db"
DEFAULT_DEEPIMAGE_URL = "https://deep-image.ai"
# Google's OIDC signing certificates (JSON of key id -> PEM), as google-auth reads them.
DEFAULT_OIDC_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
DEFAULT_WEBHOOK_RETRY_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
# Where Deep-Image's result URLs point besides its own host: its API documentation shows
# both https://deep-image.ai/images/{date}/{uuid}.jpg and this S3 bucket (OpenAPI example).
DEEPIMAGE_RESULT_STORE = "neuroapi-store.s3.eu-central-1.amazonaws.com"
# The longest time setting taken: far beyond any sensible one, and far enough inside the dates
# Python and the databases hold (a lease of 1e12 s would end after the year 9999).
MAX_SECONDS = 10 * 365 * 24 * 3600.0
# A lone surrogate: what os.environ holds for a byte that is not UTF-8 (b"\xff": U+DCFF).
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    # Seconds a signed URL of a gs:// input, handed to Deep-Image at submission, stays valid.
    input_url_ttl: float = 900.0
    # Trigger pushes (service/generations/triggers.py): where the certificates of Google-signed ID
    # tokens
    # are read, and the audience they must name (None: each trigger's push URL).
    oidc_certs_url: str = DEFAULT_OIDC_CERTS_URL
    oidc_audience: str | None = None
    # Check a completion with GET /rest_api/result/{job} before downloading (callbacks are
    # unsigned; the URL token proves who they are for, the upstream confirms what they say).
    confirm_results: bool = True
    max_result_bytes: int = 256 * 1024 * 1024
    # Host names a result URL may name (`*.suffix` for subdomains); None: Deep-Image's own,
    # see `allowed_result_hosts`.
    result_hosts: tuple[str, ...] | None = None
    allow_private_webhooks: bool = False
    reconcile_after: float = 120.0
    generation_timeout: float = 3600.0
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY_SCHEDULE
    # For Cloud Logging's trace field (projects/P/traces/T); Cloud Run does not set it.
    gcp_project: str | None = None
    # Outgoing HTTP to Deep-Image: (connect, read) seconds.
    deepimage_timeout: tuple[float, float] = (5.0, 30.0)
    # When set, GET /metrics needs `Authorization: Bearer <token>` (the web service is public).
    metrics_token: str | None = dataclasses.field(default=None, repr=False)
    # How long a claimed task is held before another process may take it (holder died).
    task_lease: float = 300.0
    # How long a submit task is retried (transient errors) before its generation fails;
    # None: the submit policy's own (6 h, service/runtime/kinds.py).
    submit_max_age: float | None = None
    # Per API key and per process (see service/ratelimit.py); 0 turns the limit off.
    rate_limit: float = 50.0
    rate_limit_burst: int = 100
    # Proxies in front that each append to X-Forwarded-For: the client's address (for the
    # limit on invalid keys) is the entry that many from its end; 0: the connection's peer.
    trusted_proxies: int = 1
    # Largest request body accepted, in bytes (inline base64 images make bodies large).
    max_request_bytes: int = 25 * 1024 * 1024
    # Jobs the Deep-Image account may have processing at once; None: learned
    # (service/generations/line.py).
    upstream_concurrency: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Parse the GENRELAY_* variables; raise ConfigError naming the first bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def text(name: str) -> str | None:
            value = _env_value(env, name)
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
        if not is_bucket_name(values["gcs_bucket"]):
            # A gs:// URL here was taken, and every object then named gs://gs://...
            raise ConfigError(
                "GENRELAY_GCS_BUCKET must be a GCS bucket name (3-63 lowercase letters, digits, "
                f"'-', '_' and '.'; no gs://, no prefix: GENRELAY_GCS_PREFIX), got "
                f"{values['gcs_bucket']!r}"
            )
        values["gcs_signing_account"] = text("GENRELAY_GCS_SIGNING_ACCOUNT")
        if (v := text("GENRELAY_SIGNED_URL_TTL")) is not None:
            ttl = _seconds("GENRELAY_SIGNED_URL_TTL", v)
            if not 1 <= ttl <= 7 * 24 * 3600:
                raise ConfigError(
                    "GENRELAY_SIGNED_URL_TTL must be between 1 s and 7 days (V4 limit)"
                )
            values["signed_url_ttl"] = ttl
        if (v := text("GENRELAY_INPUT_URL_TTL")) is not None:
            ttl = _seconds("GENRELAY_INPUT_URL_TTL", v)
            if not 1 <= ttl <= 7 * 24 * 3600:
                raise ConfigError(
                    "GENRELAY_INPUT_URL_TTL must be between 1 s and 7 days (V4 limit)"
                )
            values["input_url_ttl"] = ttl
        if (v := text("GENRELAY_OIDC_CERTS_URL")) is not None:
            values["oidc_certs_url"] = _http_url("GENRELAY_OIDC_CERTS_URL", v)
        values["oidc_audience"] = text("GENRELAY_OIDC_AUDIENCE")
        if (v := text("GENRELAY_CONFIRM_RESULTS")) is not None:
            values["confirm_results"] = _boolean("GENRELAY_CONFIRM_RESULTS", v)
        if (v := text("GENRELAY_MAX_RESULT_BYTES")) is not None:
            if not _whole_number(v) or int(v) < 1:
                raise ConfigError("GENRELAY_MAX_RESULT_BYTES must be a positive number of bytes")
            values["max_result_bytes"] = int(v)
        if (v := text("GENRELAY_RESULT_HOSTS")) is not None:
            values["result_hosts"] = _host_list("GENRELAY_RESULT_HOSTS", v)
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
            values["rate_limit"] = float(v) if _decimal(v) else -1.0
            if not math.isfinite(values["rate_limit"]) or values["rate_limit"] < 0:
                raise ConfigError(
                    "GENRELAY_RATE_LIMIT must be requests per second per key (0 turns it off)"
                )
        if (v := text("GENRELAY_RATE_LIMIT_BURST")) is not None:
            if not _whole_number(v) or int(v) < 1:
                raise ConfigError("GENRELAY_RATE_LIMIT_BURST must be a whole number above 0")
            values["rate_limit_burst"] = int(v)
        if (v := text("GENRELAY_TRUSTED_PROXIES")) is not None:
            if not _whole_number(v) or int(v) > 10:
                raise ConfigError(
                    "GENRELAY_TRUSTED_PROXIES must be a whole number from 0 to 10 (proxies in "
                    "front that append to X-Forwarded-For; 0 when clients connect directly)"
                )
            values["trusted_proxies"] = int(v)
        if (v := text("GENRELAY_UPSTREAM_CONCURRENCY")) is not None:
            # Bounded like a tenant's --max-in-flight: the limit is stored in an integer
            # column (upstream_accounts), which PostgreSQL refuses past 2^31 - 1 on every
            # intake; no account processes more jobs at once anyway.
            if not _whole_number(v) or not 1 <= int(v) <= MAX_IN_FLIGHT:
                raise ConfigError(
                    f"GENRELAY_UPSTREAM_CONCURRENCY must be a whole number from 1 to "
                    f"{MAX_IN_FLIGHT} (jobs the Deep-Image account may have processing at once)"
                )
            values["upstream_concurrency"] = int(v)
        # The process settings (PORT, GENRELAY_WEB_*, ...) are ProcessSettings', read by the
        # processes themselves; checked here too, so a bad one stops every command at once.
        ProcessSettings.from_env(env)
        return cls(**values)

    @staticmethod
    def database_url_from_env(environ: Mapping[str, str] | None = None) -> str:
        """Only the database URL: what `genrelay migrate` and `keys create` need.

        Parsed here as SQLAlchemy will parse it, so a malformed one (a port that is no number)
        stops the command with one line instead of a traceback from the first connection. The
        messages never show the value: it may hold the database password.
        """
        env = os.environ if environ is None else environ
        value = (_env_value(env, "GENRELAY_DATABASE_URL") or "").strip() or DEFAULT_DATABASE_URL
        if not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ConfigError(
                "GENRELAY_DATABASE_URL must be a sqlite:/// or postgresql+psycopg:// URL"
            )
        try:
            port = sa.engine.make_url(value).port
        except (sa.exc.ArgumentError, ValueError):
            raise ConfigError(
                "GENRELAY_DATABASE_URL is not a valid URL (its value is not shown: it may "
                "hold a password)"
            ) from None
        if port is not None and not 1 <= port <= 65535:
            raise ConfigError("GENRELAY_DATABASE_URL's port must be from 1 to 65535")
        return value

    @property
    def allowed_result_hosts(self) -> tuple[str, ...]:
        """GENRELAY_RESULT_HOSTS, or by default GENRELAY_DEEPIMAGE_URL's host and Deep-Image's
        result store."""
        if self.result_hosts is not None:
            return self.result_hosts
        own = (urlsplit(self.deepimage_url).hostname or "").lower()
        return tuple(dict.fromkeys(h for h in (own, DEEPIMAGE_RESULT_STORE) if h))

    @property
    def notification_url_ttl(self) -> float:
        """Seconds the `result.url` in a notification stays valid.

        The URL is signed once, when the event's deliveries are written, because every
        attempt sends (and signs) the same stored bytes; it must outlive every attempt. A
        delivery held back while an earlier event to the same target is pending (lifecycle
        order: a generation's `processing` before its result) starts its own schedule only
        once that one has ended, so it lasts two whole retry schedules plus an hour (at least
        GENRELAY_SIGNED_URL_TTL, at most the V4 limit of 7 days).
        """
        schedule = sum(self.webhook_retry_schedule) * 1.2  # the jitter stretches it by 20 %
        return min(7 * 24 * 3600.0, max(self.signed_url_ttl, 2 * schedule + 3600.0))

    def replace(self, **changes: Any) -> Config:
        """Return a copy with some fields changed (tests, dev mode)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """How the processes themselves run: what gunicorn, the worker and logging need before
    (or without) the whole Config. Read from the environment like every other setting."""

    port: int = 8080
    web_processes: int = 2
    web_threads: int = 8
    # Accepted callbacks whose `store` a web process may run itself at once, after answering
    # (service/runtime/inline.py); 0: every store goes to the workers. A web service whose
    # CPU is allocated only during requests (Cloud Run's request-based billing) must run no
    # work after its answers, so it sets 0 (cloudbuild.yaml).
    web_inline_stores: int = 2
    worker_threads: int = 4
    log_level: str = "INFO"
    # Seconds a client has to send its request (service/server/gunicorn_worker.py).
    request_timeout: float = 15.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProcessSettings:
        """Parse PORT, GENRELAY_WEB_*, GENRELAY_WORKER_THREADS, GENRELAY_LOG_LEVEL and
        GENRELAY_REQUEST_TIMEOUT; ConfigError naming the first bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def whole(name: str, low: int, high: int) -> int | None:
            value = (_env_value(env, name) or "").strip()
            if not value:
                return None
            if not _whole_number(value) or not low <= int(value) <= high:
                raise ConfigError(f"{name} must be a whole number from {low} to {high}")
            return int(value)

        for name, field, low, high in (
            ("PORT", "port", 1, 65535),
            ("GENRELAY_WEB_PROCESSES", "web_processes", 1, 64),
            ("GENRELAY_WEB_THREADS", "web_threads", 1, 1000),
            ("GENRELAY_WEB_INLINE_STORES", "web_inline_stores", 0, 64),
            ("GENRELAY_WORKER_THREADS", "worker_threads", 1, 1000),
        ):
            if (number := whole(name, low, high)) is not None:
                values[field] = number
        level = (_env_value(env, "GENRELAY_LOG_LEVEL") or "").strip().upper()
        if level:
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                raise ConfigError(
                    "GENRELAY_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL"
                )
            values["log_level"] = level
        timeout = (_env_value(env, "GENRELAY_REQUEST_TIMEOUT") or "").strip()
        if timeout:
            values["request_timeout"] = _seconds("GENRELAY_REQUEST_TIMEOUT", timeout)
            if values["request_timeout"] <= 0:
                raise ConfigError("GENRELAY_REQUEST_TIMEOUT must be above 0 seconds")
        return cls(**values)


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    """The variable `name`, refused where it is not UTF-8 text.

    Bytes that are not UTF-8 reach os.environ as lone surrogates, which nothing encodes: the
    value would fail later, in every use (a callback secret in every submit's HMAC). The
    message does not show the value: it may be a secret.
    """
    value = env.get(name)
    if value is not None and _SURROGATE.search(value):
        raise ConfigError(f"{name} is not UTF-8 text (its value is not shown)")
    return value


def _http_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def _host_list(name: str, value: str) -> tuple[str, ...]:
    """Comma-separated host names; `*.example.com` stands for any subdomain of example.com."""
    hosts = []
    for part in value.split(","):
        host = part.strip().lower().rstrip(".")
        if not host:
            continue
        bare = host.removeprefix("*.")
        if not all(
            label and all(c.isalnum() or c == "-" for c in label) for label in bare.split(".")
        ):
            raise ConfigError(
                f"{name} must be comma-separated host names (optionally *.suffix), got {part!r}"
            )
        hosts.append(host)
    if not hosts:
        raise ConfigError(f"{name} must name at least one host")
    return tuple(hosts)


def _boolean(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {value!r}")


def _whole_number(value: str) -> bool:
    """Whether `value` is ASCII digits only (str.isdigit also takes '²', which int() refuses)."""
    return value.isascii() and value.isdigit()


def _decimal(value: str) -> bool:
    """Whether `value` is ASCII digits with at most one decimal point (float() also takes
    full-width and Arabic-Indic digits, and '1e3')."""
    return re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", value) is not None


def _seconds(name: str, value: str) -> float:
    if not _decimal(value):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{name} must be a non-negative number of seconds, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ConfigError(f"{name} must be at most 10 years ({MAX_SECONDS:.0f} s), got {value!r}")
    return seconds
