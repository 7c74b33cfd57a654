"""Result images are recognised by their first bytes; their size is read from the header."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from service.generations.images import JPEG, PNG, WEBP, dimensions, sniff


def encode(fmt: str, size: tuple[int, int], **options: object) -> bytes:
    buffer = io.BytesIO()
    mode = "RGBA" if fmt in ("PNG", "WEBP") else "RGB"
    Image.new(mode, size, (200, 100, 50)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "options", "kind"),
    [
        ("PNG", {}, PNG),
        ("JPEG", {}, JPEG),
        ("JPEG", {"progressive": True}, JPEG),
        ("JPEG", {"exif": b"Exif\x00\x00" + b"\x00" * 5000}, JPEG),  # size after a big APP1
        ("WEBP", {"lossless": True}, WEBP),  # VP8L
        ("WEBP", {"quality": 80}, WEBP),  # VP8 (lossy) or VP8X with alpha
    ],
)
@pytest.mark.parametrize("size", [(1, 1), (2048, 1024), (3000, 7)])
def test_real_images_are_recognised_and_measured_from_a_prefix(
    fmt: str, options: dict[str, object], kind: object, size: tuple[int, int]
) -> None:
    data = encode(fmt, size, **options)
    assert sniff(data[:12]) is kind
    assert dimensions(data[: 64 * 1024]) == size


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!DOCTYPE html><html>",
        b"GIF89a\x01\x00\x01\x00",
        b"RIFF\x00\x00\x00\x00WAVE",
        b"\xff\xd8",
        b"%PDF-1.7",
    ],
)
def test_other_content_is_not_an_image(data: bytes) -> None:
    assert sniff(data) is None
    assert dimensions(data) is None


def test_a_prefix_too_short_for_the_header_gives_no_dimensions() -> None:
    data = encode("PNG", (10, 10))
    assert sniff(data[:12]) is PNG
    assert dimensions(data[:14]) is None
    jpeg = encode("JPEG", (10, 10), exif=b"Exif\x00\x00" + b"\x00" * 5000)
    assert dimensions(jpeg[:200]) is None
