"""Downloading http(s) inputs, as Deep-Image does, when the `fetch_inputs` knob is on.

Off by default: the seed examples name public URLs that cannot be reached from dev, CI or
benchmark machines, and a nominal size is enough for everything else. On, every http(s)
image of a process request (`url`, `background.replace`, `background.generate.ip_image2`,
`background.generate.context_images`, `caption.url`, `nsfw_parameters.image_url`) is
downloaded before the job is created; one that cannot be downloaded, or is not an image, is
refused with Deep-Image's documented 400 `{"message": "Unidentified image", "code":
"BAD_REQUEST"}` (which of its documented 400 messages the real service picks for an
unreachable URL is not documented; this one is invented in that choice).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests

from service.devtools.simulator.errors import bad_request
from service.devtools.simulator.images import image_size

MAX_INPUT_BYTES = 64 * 1024 * 1024
FETCH_TIMEOUT = (5.0, 20.0)


def _image_urls(body: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    def at(document: Any, *keys: str) -> Any:
        for key in keys:
            if not isinstance(document, Mapping):
                return None
            document = document.get(key)
        return document

    candidates: list[tuple[str, Any]] = [
        ("url", at(body, "url")),
        ("background.replace", at(body, "background", "replace")),
        ("background.generate.ip_image2", at(body, "background", "generate", "ip_image2")),
        ("caption.url", at(body, "caption", "url")),
        ("nsfw_parameters.image_url", at(body, "nsfw_parameters", "image_url")),
    ]
    context = at(body, "background", "generate", "context_images")
    if isinstance(context, list):
        candidates += [
            (f"background.generate.context_images.{i}", u) for i, u in enumerate(context)
        ]
    for field, value in candidates:
        if isinstance(value, str) and urlsplit(value).scheme in ("http", "https"):
            yield field, value


def fetch_inputs(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Download every http(s) input; what was fetched (no query strings: they may be
    signatures). Raises the 400 "Unidentified image" when one cannot be read as an image."""
    fetched: list[dict[str, Any]] = []
    with requests.Session() as session:
        for field, url in _image_urls(body):
            data = _download(session, url)
            if data is None:
                raise bad_request("Unidentified image")
            image_size(data)  # the same 400 when it is not an image
            parts = urlsplit(url)
            fetched.append(
                {
                    "field": field,
                    "host": parts.netloc,
                    "path": parts.path,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
    return fetched


def _download(session: requests.Session, url: str) -> bytes | None:
    try:
        with session.get(url, stream=True, timeout=FETCH_TIMEOUT) as response:
            if response.status_code != 200:
                return None
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_content(1024 * 1024):
                size += len(chunk)
                if size > MAX_INPUT_BYTES:
                    return None
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException:
        return None
