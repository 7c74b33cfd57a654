"""Config comes from the environment only and fails fast, naming the variable."""

from __future__ import annotations

import os

import pytest

from service.config import Config, ConfigError

MINIMAL = {"GENRELAY_DEEPIMAGE_API_KEY": "k", "GENRELAY_GCS_BUCKET": "results"}


def test_minimal_environment_gives_the_documented_defaults() -> None:
    config = Config.from_env(MINIMAL)
    assert config.database_url == "sqlite:///var/genrelay.db"
    assert config.deepimage_url == "https://deep-image.ai"
    assert config.public_url is None
    assert config.confirm_results is True
    assert config.max_result_bytes == 256 * 1024 * 1024
    assert config.signed_url_ttl == 3600
    # As the README documents it (the constant itself could change unnoticed).
    assert config.webhook_retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    # Results come from Deep-Image's own host and its documented result store, nowhere else.
    assert config.allowed_result_hosts == (
        "deep-image.ai",
        "neuroapi-store.s3.eu-central-1.amazonaws.com",
    )


def test_the_default_result_hosts_follow_the_deepimage_url() -> None:
    config = Config.from_env({**MINIMAL, "GENRELAY_DEEPIMAGE_URL": "http://127.0.0.1:8090"})
    assert config.allowed_result_hosts[0] == "127.0.0.1"


def test_every_variable_is_read() -> None:
    config = Config.from_env(
        {
            **MINIMAL,
            "GENRELAY_DATABASE_URL": "postgresql+psycopg://u@h/db",
            "GENRELAY_DEEPIMAGE_URL": "http://127.0.0.1:9000/",
            "GENRELAY_PUBLIC_URL": "https://relay.example.com",
            "GENRELAY_CALLBACK_SECRET": "s" * 32,
            "GENRELAY_GCS_BUCKET": "bucket",
            "GENRELAY_GCS_SIGNING_ACCOUNT": "signer@p.iam.gserviceaccount.com",
            "GENRELAY_SIGNED_URL_TTL": "600",
            "GENRELAY_CONFIRM_RESULTS": "false",
            "GENRELAY_METRICS_TOKEN": "m-token",
            "GENRELAY_RATE_LIMIT": "2.5",
            "GENRELAY_RATE_LIMIT_BURST": "7",
            "GENRELAY_TRUSTED_PROXIES": "2",
            "GOOGLE_CLOUD_PROJECT": "proj",
            "GENRELAY_DEEPIMAGE_TIMEOUT": "2",
            "GENRELAY_TASK_LEASE": "5",
            "GENRELAY_SUBMIT_MAX_AGE": "60",
            "GENRELAY_MAX_RESULT_BYTES": "1000",
            "GENRELAY_GCS_PREFIX": "/results/",
            "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
            "GENRELAY_RECONCILE_AFTER": "30",
            "GENRELAY_GENERATION_TIMEOUT": "600",
            "GENRELAY_WEBHOOK_RETRY_SCHEDULE": "0, 1,2.5",
            "PORT": "9999",
            "GENRELAY_RESULT_HOSTS": "cdn.example.com, *.Store.Example.NET",
            "GENRELAY_REQUEST_TIMEOUT": "4.5",
        }
    )
    assert config.database_url == "postgresql+psycopg://u@h/db"
    assert config.deepimage_url == "http://127.0.0.1:9000"
    assert config.public_url == "https://relay.example.com"
    assert config.gcs_bucket == "bucket"
    assert config.gcs_prefix == "results"
    assert config.gcs_signing_account == "signer@p.iam.gserviceaccount.com"
    assert config.signed_url_ttl == 600
    assert config.confirm_results is False
    assert config.max_result_bytes == 1000
    assert config.metrics_token == "m-token"
    assert (config.rate_limit, config.rate_limit_burst) == (2.5, 7)
    assert config.trusted_proxies == 2
    assert config.gcp_project == "proj"
    assert config.deepimage_timeout == (2.0, 2.0)
    assert config.task_lease == 5
    assert config.submit_max_age == 60
    assert config.allow_private_webhooks is True
    assert config.reconcile_after == 30
    assert config.generation_timeout == 600
    assert config.webhook_retry_schedule == (0, 1, 2.5)
    assert config.allowed_result_hosts == ("cdn.example.com", "*.store.example.net")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GENRELAY_GCS_BUCKET": "b"}, "GENRELAY_DEEPIMAGE_API_KEY"),
        ({"GENRELAY_DEEPIMAGE_API_KEY": "k"}, "GENRELAY_GCS_BUCKET"),
        ({**MINIMAL, "GENRELAY_SIGNED_URL_TTL": "0"}, "GENRELAY_SIGNED_URL_TTL"),
        ({**MINIMAL, "GENRELAY_CONFIRM_RESULTS": "sure"}, "GENRELAY_CONFIRM_RESULTS"),
        ({**MINIMAL, "GENRELAY_MAX_RESULT_BYTES": "1e9"}, "GENRELAY_MAX_RESULT_BYTES"),
        ({**MINIMAL, "GENRELAY_RATE_LIMIT": "fast"}, "GENRELAY_RATE_LIMIT"),
        ({**MINIMAL, "GENRELAY_DEEPIMAGE_TIMEOUT": "0"}, "GENRELAY_DEEPIMAGE_TIMEOUT"),
        ({**MINIMAL, "GENRELAY_TASK_LEASE": "0.5"}, "GENRELAY_TASK_LEASE"),
        ({**MINIMAL, "GENRELAY_SUBMIT_MAX_AGE": "0"}, "GENRELAY_SUBMIT_MAX_AGE"),
        ({**MINIMAL, "GENRELAY_RATE_LIMIT": "-1"}, "GENRELAY_RATE_LIMIT"),
        ({**MINIMAL, "GENRELAY_RATE_LIMIT_BURST": "0"}, "GENRELAY_RATE_LIMIT_BURST"),
        ({**MINIMAL, "GENRELAY_TRUSTED_PROXIES": "-1"}, "GENRELAY_TRUSTED_PROXIES"),
        ({**MINIMAL, "GENRELAY_TRUSTED_PROXIES": "11"}, "GENRELAY_TRUSTED_PROXIES"),
        ({**MINIMAL, "GENRELAY_DATABASE_URL": "mysql://x"}, "GENRELAY_DATABASE_URL"),
        ({**MINIMAL, "GENRELAY_DEEPIMAGE_URL": "ftp://x"}, "GENRELAY_DEEPIMAGE_URL"),
        ({**MINIMAL, "GENRELAY_PUBLIC_URL": "relay.example.com"}, "GENRELAY_PUBLIC_URL"),
        ({**MINIMAL, "GENRELAY_PUBLIC_URL": "https://r.example"}, "GENRELAY_CALLBACK_SECRET"),
        ({**MINIMAL, "GENRELAY_CALLBACK_SECRET": "short"}, "GENRELAY_CALLBACK_SECRET"),
        (
            {**MINIMAL, "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "maybe"},
            "GENRELAY_ALLOW_PRIVATE_WEBHOOKS",
        ),
        ({**MINIMAL, "GENRELAY_RECONCILE_AFTER": "soon"}, "GENRELAY_RECONCILE_AFTER"),
        ({**MINIMAL, "GENRELAY_GENERATION_TIMEOUT": "-1"}, "GENRELAY_GENERATION_TIMEOUT"),
        ({**MINIMAL, "GENRELAY_GENERATION_TIMEOUT": "nan"}, "GENRELAY_GENERATION_TIMEOUT"),
        ({**MINIMAL, "GENRELAY_WEBHOOK_RETRY_SCHEDULE": "0,,5"}, "GENRELAY_WEBHOOK_RETRY_SCHEDULE"),
        ({**MINIMAL, "GENRELAY_RESULT_HOSTS": "https://x.com/"}, "GENRELAY_RESULT_HOSTS"),
        ({**MINIMAL, "GENRELAY_RESULT_HOSTS": " , "}, "GENRELAY_RESULT_HOSTS"),
        ({**MINIMAL, "GENRELAY_REQUEST_TIMEOUT": "0"}, "GENRELAY_REQUEST_TIMEOUT"),
        ({**MINIMAL, "GENRELAY_REQUEST_TIMEOUT": "soon"}, "GENRELAY_REQUEST_TIMEOUT"),
        ({**MINIMAL, "PORT": "http"}, "PORT"),
        ({**MINIMAL, "PORT": "70000"}, "PORT"),
        # str.isdigit() takes '²' (and other digits int() refuses): ValueError, not this.
        ({**MINIMAL, "GENRELAY_MAX_RESULT_BYTES": "²"}, "GENRELAY_MAX_RESULT_BYTES"),
        ({**MINIMAL, "GENRELAY_UPSTREAM_CONCURRENCY": "²"}, "GENRELAY_UPSTREAM_CONCURRENCY"),
        # Stored in an integer column: 2^31 failed every intake on PostgreSQL with a 500.
        (
            {**MINIMAL, "GENRELAY_UPSTREAM_CONCURRENCY": "2147483648"},
            "GENRELAY_UPSTREAM_CONCURRENCY",
        ),
        (
            {**MINIMAL, "GENRELAY_UPSTREAM_CONCURRENCY": "100001"},
            "GENRELAY_UPSTREAM_CONCURRENCY",
        ),
        ({**MINIMAL, "GENRELAY_RATE_LIMIT_BURST": "²"}, "GENRELAY_RATE_LIMIT_BURST"),
        ({**MINIMAL, "GENRELAY_WORKER_THREADS": "²"}, "GENRELAY_WORKER_THREADS"),
        ({**MINIMAL, "PORT": "\uff18\uff10\uff18\uff10"}, "PORT"),  # fullwidth 8080
        # float() takes other digits and exponents too: durations and rates are ASCII decimals.
        ({**MINIMAL, "GENRELAY_RECONCILE_AFTER": "\uff11\uff12\uff10"}, "GENRELAY_RECONCILE_AFTER"),
        ({**MINIMAL, "GENRELAY_REQUEST_TIMEOUT": "\u0661\u0665"}, "GENRELAY_REQUEST_TIMEOUT"),
        ({**MINIMAL, "GENRELAY_RATE_LIMIT": "\u0665"}, "GENRELAY_RATE_LIMIT"),
        ({**MINIMAL, "GENRELAY_TASK_LEASE": "1e3"}, "GENRELAY_TASK_LEASE"),
        # A lease ending after the year 9999 failed every claim with OverflowError.
        ({**MINIMAL, "GENRELAY_TASK_LEASE": "1e12"}, "GENRELAY_TASK_LEASE"),
        ({**MINIMAL, "GENRELAY_GENERATION_TIMEOUT": "1e12"}, "GENRELAY_GENERATION_TIMEOUT"),
        (
            {**MINIMAL, "GENRELAY_WEBHOOK_RETRY_SCHEDULE": "0,1e12"},
            "GENRELAY_WEBHOOK_RETRY_SCHEDULE",
        ),
        (
            {**MINIMAL, "GENRELAY_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1:notaport/db"},
            "GENRELAY_DATABASE_URL",
        ),
        (
            {**MINIMAL, "GENRELAY_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1:99999/db"},
            "GENRELAY_DATABASE_URL",
        ),
        ({**MINIMAL, "GENRELAY_DATABASE_URL": "postgresql:no-slashes"}, "GENRELAY_DATABASE_URL"),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Config.from_env(env)


def test_the_upstream_concurrency_may_be_up_to_a_tenants_largest_cap() -> None:
    config = Config.from_env({**MINIMAL, "GENRELAY_UPSTREAM_CONCURRENCY": "100000"})
    assert config.upstream_concurrency == 100_000
    with pytest.raises(ConfigError, match="from 1 to 100000"):
        Config.from_env({**MINIMAL, "GENRELAY_UPSTREAM_CONCURRENCY": "0"})


# What os.environ holds for bytes that are not UTF-8 (b"\xff" is U+DCFF): with such a
# callback secret every submit failed later, encoding it for its HMAC.
NOT_UTF8 = os.fsdecode(b"secret-\xff\xfe-0123456789")


@pytest.mark.parametrize(
    "name",
    [
        "GENRELAY_CALLBACK_SECRET",
        "GENRELAY_DEEPIMAGE_API_KEY",
        "GENRELAY_METRICS_TOKEN",
        "GENRELAY_GCS_PREFIX",
        "GENRELAY_GCS_SIGNING_ACCOUNT",
        "GENRELAY_OIDC_AUDIENCE",
        "GENRELAY_DATABASE_URL",
        "GENRELAY_LOG_LEVEL",
        "GENRELAY_WEB_THREADS",
    ],
)
def test_a_value_that_is_not_utf8_is_refused_naming_the_variable_not_showing_it(
    name: str,
) -> None:
    env = {**MINIMAL, "GENRELAY_PUBLIC_URL": "https://relay.example.com"}
    env["GENRELAY_CALLBACK_SECRET"] = "s" * 32
    env[name] = NOT_UTF8
    with pytest.raises(ConfigError, match=f"^{name} is not UTF-8 text") as refused:
        Config.from_env(env)
    assert "secret-" not in str(refused.value)


@pytest.mark.parametrize(
    "bucket", ["gs://results", "gs://results/prefix", "Results", "ab", "results/prefix", "-a-"]
)
def test_a_gcs_bucket_that_is_not_a_bucket_name_is_refused(bucket: str) -> None:
    """gs://bucket was taken, and every bucket check then asked for gs://gs://bucket."""
    with pytest.raises(ConfigError, match=r"^GENRELAY_GCS_BUCKET must be a GCS bucket name"):
        Config.from_env({**MINIMAL, "GENRELAY_GCS_BUCKET": bucket})


def test_gcs_bucket_names_as_gcs_allows_them_are_taken() -> None:
    for bucket in ("my-bucket", "a_b.c", "abc", "example.com.results"):
        assert Config.from_env({**MINIMAL, "GENRELAY_GCS_BUCKET": bucket}).gcs_bucket == bucket


def test_secrets_do_not_appear_in_the_config_repr() -> None:
    config = Config.from_env(
        {
            **MINIMAL,
            "GENRELAY_DEEPIMAGE_API_KEY": "di-secret-key",
            "GENRELAY_CALLBACK_SECRET": "callback-secret-value",
        }
    )
    assert "di-secret-key" not in repr(config)
    assert "callback-secret-value" not in repr(config)


def test_the_cli_reports_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    monkeypatch.delenv("GENRELAY_DEEPIMAGE_API_KEY", raising=False)
    assert main(["worker"]) == 2
    assert "GENRELAY_DEEPIMAGE_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "0"),
        ("GENRELAY_WEB_PROCESSES", "two"),
        ("GENRELAY_WEB_THREADS", "-1"),
        ("GENRELAY_WEB_INLINE_STORES", "-1"),
        ("GENRELAY_WEB_INLINE_STORES", "65"),
        ("GENRELAY_WORKER_THREADS", "0"),
        ("GENRELAY_LOG_LEVEL", "LOUD"),
        ("GENRELAY_REQUEST_TIMEOUT", "0"),
    ],
)
def test_process_settings_are_checked_like_every_other_setting(name: str, value: str) -> None:
    from service.config import ProcessSettings

    with pytest.raises(ConfigError, match=name):
        ProcessSettings.from_env({name: value})


def test_process_settings_come_from_the_environment() -> None:
    from service.config import ProcessSettings

    settings = ProcessSettings.from_env(
        {
            "PORT": "9000",
            "GENRELAY_WEB_PROCESSES": "3",
            "GENRELAY_WEB_THREADS": "16",
            "GENRELAY_WEB_INLINE_STORES": "0",
            "GENRELAY_WORKER_THREADS": "6",
            "GENRELAY_LOG_LEVEL": "debug",
        }
    )
    assert (settings.port, settings.web_processes, settings.web_threads) == (9000, 3, 16)
    assert settings.web_inline_stores == 0
    assert ProcessSettings.from_env({}).web_inline_stores == 2
    assert (settings.worker_threads, settings.log_level) == (6, "DEBUG")


def test_a_malformed_database_url_is_refused_without_showing_its_password() -> None:
    url = "postgresql+psycopg://postgres:SECRETPW@127.0.0.1:notaport/db"
    with pytest.raises(ConfigError, match="GENRELAY_DATABASE_URL") as refused:
        Config.database_url_from_env({"GENRELAY_DATABASE_URL": url})
    assert "SECRETPW" not in str(refused.value)


def test_time_settings_may_be_up_to_ten_years() -> None:
    ten_years = str(10 * 365 * 24 * 3600)
    config = Config.from_env({**MINIMAL, "GENRELAY_TASK_LEASE": ten_years})
    assert config.task_lease == float(ten_years)
    with pytest.raises(ConfigError, match="GENRELAY_TASK_LEASE must be at most 10 years"):
        Config.from_env({**MINIMAL, "GENRELAY_TASK_LEASE": str(int(ten_years) + 1)})


def test_a_notification_link_outlives_two_whole_retry_schedules_within_the_v4_limit() -> None:
    """A later event to a target waits while an earlier one is pending, then starts its own
    schedule: its link must last both schedules (each stretched 20 % by the jitter) and an
    hour, at least GENRELAY_SIGNED_URL_TTL and at most the 7 days of a V4 signed URL."""
    default = Config.from_env(MINIMAL)
    schedule = sum(default.webhook_retry_schedule) * 1.2
    assert default.notification_url_ttl == 2 * schedule + 3600  # about 67 hours
    assert default.notification_url_ttl > default.signed_url_ttl
    short = Config.from_env({**MINIMAL, "GENRELAY_WEBHOOK_RETRY_SCHEDULE": "0,5"})
    assert short.notification_url_ttl == 3612.0  # 2 x 5 s x 1.2 + an hour
    longer = Config.from_env({**MINIMAL, "GENRELAY_SIGNED_URL_TTL": "86400"})
    assert longer.notification_url_ttl == max(86400, 2 * schedule + 3600)
    capped = Config.from_env({**MINIMAL, "GENRELAY_WEBHOOK_RETRY_SCHEDULE": "0,300000"})
    assert capped.notification_url_ttl == 7 * 24 * 3600
