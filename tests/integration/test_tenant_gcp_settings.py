"""Tenant settings of the GCP loop through `genrelay tenants`: input buckets, storages,
output and retention (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.tenants import InvalidSetting, parse_duration
from tests.integration.test_api_keys_cli import Run, create_key, genrelay  # noqa: F401


def fields_of(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.strip().split("\t")[2:])


def test_defaults_allow_no_bucket_or_storage_and_keep_results_forever(
    genrelay: Callable[..., Run],  # noqa: F811
) -> None:
    create_key(genrelay, "acme")
    shown = genrelay("tenants", "show", "acme")
    assert shown.code == 0, shown.err
    assert fields_of(shown.out) == {
        "weight": "1",
        "max_in_flight": "-",
        "input_buckets": "-",
        "storages": "-",
        "output": "default",
        "retention": "forever",
    }


def test_set_changes_every_gcp_setting_and_list_shows_them(
    genrelay: Callable[..., Run],  # noqa: F811
) -> None:
    create_key(genrelay, "acme")
    create_key(genrelay, "beta")
    changed = genrelay(
        "tenants", "set", "acme",
        "--input-buckets", "in-a,in-b",
        "--storages", "my_s3,drive",
        "--output", "gs://acme-out/renders/",
        "--retention", "30d",
    )  # fmt: skip
    assert changed.code == 0, changed.err
    assert fields_of(changed.out) == {
        "weight": "1",
        "max_in_flight": "-",
        "input_buckets": "in-a,in-b",
        "storages": "my_s3,drive",
        "output": "gs://acme-out/renders",
        "retention": "2592000s",
    }
    added = genrelay("tenants", "set", "acme", "--allow-input-bucket", "in-c",
                     "--allow-input-bucket", "in-a", "--retention", "3600")  # fmt: skip
    assert fields_of(added.out)["input_buckets"] == "in-a,in-b,in-c"
    assert fields_of(added.out)["retention"] == "3600s"
    listed = genrelay("tenants", "list").out.splitlines()
    by_name = {line.split("\t")[0]: fields_of(line) for line in listed}
    assert by_name["acme"]["storages"] == "my_s3,drive"
    assert by_name["beta"]["input_buckets"] == "-"

    reset = genrelay("tenants", "set", "acme", "--input-buckets", "none", "--storages", "",
                     "--output", "default", "--retention", "none")  # fmt: skip
    assert fields_of(reset.out) == fields_of(genrelay("tenants", "show", "beta").out)


@pytest.mark.parametrize(
    "argv",
    [
        ("--output", "s3://bucket/x"),
        ("--output", "gs://Bad_Bucket"),
        ("--input-buckets", "UPPER"),
        ("--allow-input-bucket", "a"),
        ("--storages", "with/slash"),
    ],
)
def test_bad_values_are_refused_and_change_nothing(
    genrelay: Callable[..., Run],  # noqa: F811
    argv: tuple[str, ...],
) -> None:
    create_key(genrelay, "acme")
    before = genrelay("tenants", "show", "acme").out
    refused = genrelay("tenants", "set", "acme", *argv)
    assert refused.code == 2
    assert "genrelay:" in refused.err
    assert genrelay("tenants", "show", "acme").out == before


def test_a_bad_retention_is_refused_by_the_parser(
    genrelay: Callable[..., Run],  # noqa: F811
) -> None:
    create_key(genrelay, "acme")
    with pytest.raises(SystemExit) as exit_info:
        genrelay("tenants", "set", "acme", "--retention", "soon")
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1", "1w", "", "3.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidSetting):
        parse_duration(text)
