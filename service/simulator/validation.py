"""The simulated upstream's own view of a process request.

Deliberately light and independent of genrelay's request schema: it rejects what Deep-Image
documents as errors (or what reference section 5.8 tells the simulator to reject) and works out
what the result will look like (size, format), nothing more. Unknown fields are ignored, as an
upstream that grows new options would.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from service.simulator.errors import bad_request
from service.simulator.images import (
    NOMINAL_SOURCE_SIZE,
    Dimension,
    OutputFormat,
    image_size,
    inline_image_bytes,
    output_size,
)

MODEL_TYPES = frozenset(
    {
        "gemini-3-pro-image-preview",
        "see-dream-4.5",
        "qwen",
        "flux2-klein9b",
        "z-image-turbo",
        "realistic",
        "fantasy",
        "premium",
        "google-gemini-image-flash",
    }
)
# img2img is not in the generation page's list but is used by the prompt-based-editing docs.
ADAPTER_TYPES = frozenset(
    {"generate_background", "face", "control", "control2", "upscale", "inpainting", "img2img"}
)
# Adapters that work on an input image; generate_background without an image is text-to-image.
IMAGE_ADAPTERS = frozenset({"face", "control", "control2", "upscale", "inpainting"})
PRESETS = frozenset({"real_estate", "real_estate_upscaled", "ecommerce", "ecommerce_upscaled"})
OUTPUT_FORMATS: dict[str, OutputFormat] = {
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "png": "png",
    "webp": "webp",
}
FITS = frozenset({"canvas", "crop", "bounds", "cover"})
ENHANCEMENTS = frozenset(
    {
        "denoise",
        "deblur",
        "clean",
        "face_enhance",
        "light",
        "color",
        "white_balance",
        "exposure_correction",
    }
)
# Fields that ask for some processing of an input image. A body with none of these, no image
# and no generation asks for nothing.
OPERATION_KEYS = frozenset(
    {
        "width",
        "height",
        "min_length",
        "padding",
        "fit",
        "background",
        "enhancements",
        "denoise_parameters",
        "deblur_parameters",
        "light_parameters",
        "color_parameters",
        "white_balance_parameters",
        "upscale_parameters",
        "generative_upscale",
        "upscale_strength",
        "print_size",
        "caption",
        "preset",
    }
)
_PERCENT = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,9})?)\s*%\s*$")
_DIGITS = re.compile(r"^\s*(\d{1,9})\s*$")


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart request."""

    part: str
    filename: str | None
    data: bytes


@dataclass(frozen=True)
class UploadInfo:
    """What is kept of an upload once validated (the bytes are not held on to)."""

    part: str
    filename: str | None
    size: int


@dataclass(frozen=True)
class ProcessRequest:
    """A validated process request and what its result will be."""

    body: dict[str, Any]
    source_kind: str  # "none", "url", "storage", "inline" or "file"
    source_size: tuple[int, int] | None
    width: int
    height: int
    output_format: OutputFormat
    quality: int
    transparent: bool
    generation: bool
    webhook_url: str | None
    upload: UploadInfo | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _one_of(value: Any, allowed: frozenset[str]) -> bool:
    # Checked as a string first: a JSON list or object is unhashable and would raise in "in".
    return isinstance(value, str) and value in allowed


def _object(body: Mapping[str, Any], key: str, where: str = "") -> dict[str, Any] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"{where}{key} must be an object")
    return value


def _dimension(value: Any, name: str) -> Dimension | None:
    if value is None:
        return None
    if _is_int(value):
        if value < 1:
            raise bad_request(f"{name} must be a positive integer or a percentage like '200%'")
        return Dimension(pixels=value)
    if isinstance(value, str):
        digits = _DIGITS.match(value)
        if digits:
            return _dimension(int(digits.group(1)), name)
        percent = _PERCENT.match(value)
        if percent and float(percent.group(1)) > 0:
            return Dimension(percent=float(percent.group(1)))
    raise bad_request(f"{name} must be a positive integer or a percentage like '200%'")


def _http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _source(body: Mapping[str, Any], upload: Upload | None) -> tuple[str, tuple[int, int] | None]:
    # Decision (reference 5.13): an uploaded file wins over "url" when both are sent.
    if upload is not None:
        return "file", image_size(upload.data)
    url = body.get("url")
    if url is None or url == "":
        return "none", None
    if not isinstance(url, str):
        raise bad_request("url must be a string")
    inline = inline_image_bytes(url.strip())
    if inline is not None:
        return "inline", image_size(inline)
    if url.startswith("storage://"):
        return "storage", NOMINAL_SOURCE_SIZE
    if _http_url(url):
        # Never fetched: the simulator has no network and a nominal size is enough.
        return "url", NOMINAL_SOURCE_SIZE
    raise bad_request("Unidentified image")


def _check_generate(generate: Mapping[str, Any], has_image: bool) -> None:
    model_type = generate.get("model_type")
    if model_type is not None and not _one_of(model_type, MODEL_TYPES):
        raise bad_request(
            f"Unknown model_type {model_type!r}. Allowed: {', '.join(sorted(MODEL_TYPES))}"
        )
    adapter = generate.get("adapter_type")
    if adapter is not None and not _one_of(adapter, ADAPTER_TYPES):
        raise bad_request(
            f"Unknown adapter_type {adapter!r}. Allowed: {', '.join(sorted(ADAPTER_TYPES))}"
        )
    description = generate.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request("description must be a string")
    scale = generate.get("controlnet_conditioning_scale")
    if scale is not None and not (_is_number(scale) and 0.0 <= scale <= 1.0):
        raise bad_request("controlnet_conditioning_scale must be a number between 0 and 1")
    sample_num = generate.get("sample_num")
    if sample_num is not None and not _is_int(sample_num):
        raise bad_request("sample_num must be an integer")
    context_images = generate.get("context_images")
    if context_images is not None and not (
        isinstance(context_images, list) and all(isinstance(u, str) for u in context_images)
    ):
        raise bad_request("context_images must be a list of image URLs")
    if adapter in IMAGE_ADAPTERS and not has_image:
        raise bad_request("File or image url is required")
    if adapter == "img2img" and not has_image and not context_images:
        raise bad_request("File or image url is required")
    mask = generate.get("ip_image2")
    if adapter == "inpainting" and not (isinstance(mask, str) and mask):
        raise bad_request("ip_image2 (the mask image url) is required for inpainting")


def _check_misc(body: Mapping[str, Any]) -> None:
    preset = body.get("preset")
    if preset is not None and not _one_of(preset, PRESETS):
        raise bad_request(f"Preset {preset} not found!")
    enhancements = body.get("enhancements")
    if enhancements is not None and not (
        isinstance(enhancements, list) and all(_one_of(e, ENHANCEMENTS) for e in enhancements)
    ):
        raise bad_request(f"enhancements must be a list of: {', '.join(sorted(ENHANCEMENTS))}")
    fit = body.get("fit")
    if fit is not None and not (_one_of(fit, FITS) or isinstance(fit, dict)):
        raise bad_request(f"fit must be one of {', '.join(sorted(FITS))} or an object")
    generative_upscale = body.get("generative_upscale")
    if generative_upscale is not None and not isinstance(generative_upscale, bool):
        raise bad_request("generative_upscale must be true or false")
    min_length = body.get("min_length")
    if min_length is not None and not (_is_int(min_length) and min_length > 0):
        raise bad_request("min_length must be a positive integer")


def _output_format(body: Mapping[str, Any], generation: bool, transparent_bg: bool) -> OutputFormat:
    value = body.get("output_format")
    if value is None:
        # Decision (reference 5.10): generated images default to PNG, as in the generation
        # examples; a transparent background needs alpha, so PNG too; everything else JPEG.
        return "png" if generation or transparent_bg else "jpeg"
    if not isinstance(value, str) or value.lower() not in OUTPUT_FORMATS:
        raise bad_request("output_format must be one of jpeg, jpg, png, webp")
    return OUTPUT_FORMATS[value.lower()]


def _quality(body: Mapping[str, Any]) -> int:
    quality = body.get("quality")
    if quality is None:
        return 85
    if not (_is_int(quality) and 0 <= quality <= 100):
        raise bad_request("quality must be an integer between 0 and 100")
    # Pillow refuses quality 0 for some encoders; 1 looks the same for a simulator.
    return max(int(quality), 1)


def _webhook_url(body: Mapping[str, Any]) -> str | None:
    webhooks = _object(body, "webhooks")
    if webhooks is None:
        return None
    complete = webhooks.get("complete")
    if complete is None:
        return None
    if not _http_url(complete):
        raise bad_request("webhooks.complete must be an http(s) URL")
    return str(complete)


def validate_process_request(
    body: Any, upload: Upload | None, *, max_pixels_side: int
) -> ProcessRequest:
    """Validate a process payload the way the simulated upstream does; raise 400s."""
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    background = _object(body, "background")
    generate = _object(background, "generate", "background.") if background else None
    _check_misc(body)
    webhook_url = _webhook_url(body)
    quality = _quality(body)
    width = _dimension(body.get("width"), "width")
    height = _dimension(body.get("height"), "height")
    source_kind, source_size = _source(body, upload)
    has_image = source_size is not None
    if generate is not None:
        _check_generate(generate, has_image)
    if body.get("generative_upscale") and not has_image:
        raise bad_request("File or image url is required")
    if generate is None and not has_image:
        if OPERATION_KEYS & body.keys():
            raise bad_request("File or image url is required")
        raise bad_request("Nothing to process: send an image (url or file) or an operation")
    transparent_bg = background is not None and background.get("color") == "transparent"
    output_format = _output_format(body, generate is not None, transparent_bg)
    fit = body.get("fit")
    out_w, out_h = output_size(
        source_size,
        width,
        height,
        fit=fit if isinstance(fit, str) else "canvas",
        min_length=body.get("min_length"),
        generative_upscale=bool(body.get("generative_upscale")),
        max_side=max_pixels_side,
    )
    return ProcessRequest(
        body=body,
        source_kind=source_kind,
        source_size=source_size,
        width=out_w,
        height=out_h,
        output_format=output_format,
        quality=quality,
        transparent=transparent_bg and output_format != "jpeg",
        generation=generate is not None,
        webhook_url=webhook_url,
        upload=None
        if upload is None
        else UploadInfo(part=upload.part, filename=upload.filename, size=len(upload.data)),
    )
