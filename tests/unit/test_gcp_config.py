"""The GCP loop's settings: GENRELAY_INPUT_URL_TTL, GENRELAY_OIDC_CERTS_URL and
GENRELAY_OIDC_AUDIENCE, and how long a notification's result link lasts."""

from __future__ import annotations

import pytest

from service.config import DEFAULT_OIDC_CERTS_URL, Config, ConfigError

MINIMAL = {"GENRELAY_DEEPIMAGE_API_KEY": "k", "GENRELAY_GCS_BUCKET": "results"}


def test_defaults() -> None:
    config = Config.from_env(MINIMAL)
    assert config.input_url_ttl == 900
    assert config.oidc_certs_url == DEFAULT_OIDC_CERTS_URL
    assert config.oidc_certs_url == "https://www.googleapis.com/oauth2/v1/certs"
    assert config.oidc_audience is None


def test_values_are_read() -> None:
    config = Config.from_env(
        {
            **MINIMAL,
            "GENRELAY_INPUT_URL_TTL": "120",
            "GENRELAY_OIDC_CERTS_URL": "http://127.0.0.1:9999/certs",
            "GENRELAY_OIDC_AUDIENCE": "https://relay.example.com/pushes",
        }
    )
    assert config.input_url_ttl == 120
    assert config.oidc_certs_url == "http://127.0.0.1:9999/certs"
    assert config.oidc_audience == "https://relay.example.com/pushes"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GENRELAY_INPUT_URL_TTL", "0"),
        ("GENRELAY_INPUT_URL_TTL", "700000"),
        ("GENRELAY_INPUT_URL_TTL", "soon"),
        ("GENRELAY_OIDC_CERTS_URL", "file:///etc/certs.json"),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Config.from_env({**MINIMAL, name: value})


def test_a_notification_link_outlives_the_retry_schedule_within_the_v4_limit() -> None:
    default = Config.from_env(MINIMAL)
    schedule = sum(default.webhook_retry_schedule)
    # Two schedules: a delivery held back behind an earlier event's starts its own after it.
    assert default.notification_url_ttl >= 2 * schedule * 1.2 + 3600
    assert default.notification_url_ttl <= 7 * 24 * 3600
    short = Config.from_env({**MINIMAL, "GENRELAY_WEBHOOK_RETRY_SCHEDULE": "0,5"})
    assert short.notification_url_ttl == 3612.0  # 2 x 5 s x 1.2 + an hour
    long = Config.from_env({**MINIMAL, "GENRELAY_WEBHOOK_RETRY_SCHEDULE": "0,900000"})
    assert long.notification_url_ttl == 7 * 24 * 3600
