"""Where `input` takes an image or names a Deep-Image storage: read from the schema, so the
allow-lists (service/generations/inputs.py) cover every field the schema accepts."""

from __future__ import annotations

import datetime as dt

from service.adapters.gcs_urls import gs_url_problem
from service.generations.inputs import IMAGE_FIELDS, STORAGE_FIELDS, access_problems
from service.tenants import TenantSettings


def test_the_image_fields_are_every_image_reference_of_the_schema() -> None:
    assert IMAGE_FIELDS == (
        ("url",),
        ("background", "replace"),
        ("background", "generate", "ip_image2"),
        ("background", "generate", "context_images", "*"),
        ("nsfw_parameters", "image_url"),
        ("nsfw_parameters", "nsfw_image_url"),
        ("caption", "url"),
    )


def test_the_storage_fields_are_every_field_the_schema_takes_storage_in() -> None:
    assert STORAGE_FIELDS == (("url",), ("background", "replace"), ("target",))


def test_access_problems_name_every_storage_and_bucket_not_allowed() -> None:
    settings = TenantSettings(
        id="ten_1",
        name="acme",
        weight=1,
        max_in_flight=None,
        created_at=dt.datetime(2026, 12, 7, tzinfo=dt.UTC),
        allowed_input_buckets=("acme-in",),
        allowed_storages=("acme_drive",),
    )
    request = {
        "url": "storage://ops_s3/in/a.png",
        "background": {
            "replace": "storage://ops_s3/backdrop.png",
            "generate": {"context_images": ["gs://acme-in/a.png", "gs://other/b.png"]},
        },
        "caption": {"url": "gs://other/logo.png"},
        "target": "storage://acme_drive/out/",
    }
    assert [p["field"] for p in access_problems(settings, request)] == [
        "input.url",
        "input.background.replace",
        "input.background.generate.context_images.1",
        "input.caption.url",
    ]


def test_a_gs_reference_with_an_uppercase_bucket_is_told_buckets_are_lowercase() -> None:
    assert gs_url_problem("gs://acme-in/a.png") is None
    assert (
        gs_url_problem("gs://Acme-In/a.png")
        == "GCS bucket names are lowercase: gs://bucket/object."
    )
    assert "an object, not a folder" in (gs_url_problem("gs://acme-in/folder/") or "")
    assert "an object, not a folder" in (gs_url_problem("gs://A/a.png") or "")  # too short anyway
