"""The simulated upstream's own view of a process request.

Independent of genrelay's request schema: it applies Deep-Image's documented field rules (the
vocabularies and ranges of its OpenAPI description and docs pages, kept here in small tables),
rejects what Deep-Image documents as errors (or what docs/simulator.md decision 8 chooses), and
works out what the result will look like (size, format), nothing more. Unknown fields are
ignored, as an upstream that grows new options would, except that a null is refused anywhere
in the body, unknown fields included (`_refuse_nulls`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from service.devtools.simulator.errors import bad_request
from service.devtools.simulator.images import (
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
CROPS = frozenset({"item", "content", "center"})
REMOVE_MODES = frozenset({"auto", "v2", "human", "item", "generative"})
FILTER_TYPES = frozenset({"v1", "v2"})
TONE_TYPES = frozenset({"contrast", "hdr_light", "hdr_light_advanced"})
UPSCALE_TYPES = frozenset({"v1", "text_x4"})
# Deep-Image's 74 paper names (OpenAPI PrintSize).
PRINT_SIZES = frozenset(
    (
        *(f"{series}{n}" for series in "abc" for n in range(11)),
        *(f"arch{n}" for n in (1, 2, 3, 4, 5, 6, "a", "b", "c", "d", "e", "e1", "e2", "e3")),
        *("a2extra", "a3extra", "a3super", "supera3", "a4extra", "a4super", "supera4"),
        *("a4long", "a5extra", "sob5extra", "letter", "legal", "executive", "tabloid"),
        *("statement", "halfletter", "folio", "flsa", "flse", "note", "11x17", "10x14"),
        *("juniorlegal", "memo", "governmentletter", "governmentlegal", "ledger"),
    )
)
Path = tuple[str, ...]
# Fields that hold an object.
OBJECTS: tuple[Path, ...] = (
    ("background",),
    ("background", "generate"),
    ("upscale_parameters",),
    ("denoise_parameters",),
    ("deblur_parameters",),
    ("light_parameters",),
    ("color_parameters",),
    ("white_balance_parameters",),
    ("nsfw_parameters",),
    ("caption",),
    ("webhooks",),
)
CHOICES: dict[Path, frozenset[str]] = {
    ("background", "remove"): REMOVE_MODES,
    ("upscale_parameters", "type"): UPSCALE_TYPES,
    ("denoise_parameters", "type"): FILTER_TYPES,
    ("deblur_parameters", "type"): FILTER_TYPES,
    ("light_parameters", "type"): TONE_TYPES,
    ("color_parameters", "type"): TONE_TYPES,
    ("print_size",): PRINT_SIZES,
}
# Numbers: (minimum, maximum, whole numbers only); None = no documented bound.
NUMBERS: dict[Path, tuple[float | None, float | None, bool]] = {
    ("background", "generate", "item_area_percentage"): (0, 1, False),
    ("background", "generate", "strength"): (None, None, False),
    ("light_parameters", "level"): (0, 1, False),
    ("color_parameters", "level"): (0, 1, False),
    ("white_balance_parameters", "level"): (0, 1, False),
    ("nsfw_parameters", "threshold"): (0, 1, False),
    ("upscale_strength",): (1, 9, True),
    ("dpi",): (None, None, True),
    ("caption", "target_width_percentage"): (0, 100, False),
    ("caption", "opacity"): (0, 100, False),
    ("caption", "padding"): (0, None, True),
}
BOOLEANS: tuple[Path, ...] = (
    ("safe",),
    ("print_reorientation",),
    ("background", "generate", "face_id"),
)
TEXTS: tuple[Path, ...] = (
    ("preset",),
    ("background", "color"),
    ("background", "prompt"),
    ("background", "generate", "color"),
    ("background", "generate", "additional_prompt"),
    ("background", "generate", "negative_prompt"),
    ("background", "generate", "avatar_generation_type"),
    ("caption", "position"),
)
# Images the docs give only as web URLs.
WEB_IMAGES: tuple[Path, ...] = (
    ("background", "generate", "ip_image2"),
    ("nsfw_parameters", "image_url"),
    ("nsfw_parameters", "nsfw_image_url"),
    ("caption", "url"),
)
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
_PERCENT = re.compile(r"^(\d{1,16}(?:\.\d{1,16})?)%$")
_DIGITS = re.compile(r"^(\d{1,16})$")
_FILE_SIZE = re.compile(r"^(\d{1,16}(?:\.\d{1,16})?)([kmg]b)?$", re.IGNORECASE)
_POSITION = re.compile(r"^(?:[LMR][TMB]|[TMB][LMR])$")
_STORAGE = re.compile(r"^storage://([^/\s]+)/(\S*)$")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


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


def _dimension(value: Any, name: str, minimum: int = 1) -> Dimension | None:
    """Pixels (an integer or a string of digits) or a percentage such as "200%"."""
    if value is None:
        return None
    kind = "a positive" if minimum > 0 else "a non-negative"
    problem = f"{name} must be {kind} integer or a percentage like '200%'"
    if _is_int(value):
        if value < minimum:
            raise bad_request(problem)
        return Dimension(pixels=value)
    if isinstance(value, str):
        digits = _DIGITS.fullmatch(value)
        if digits:
            return _dimension(int(digits.group(1)), name, minimum)
        percent = _PERCENT.fullmatch(value)
        if percent and (float(percent.group(1)) > 0 or minimum == 0):
            return Dimension(percent=float(percent.group(1)))
    raise bad_request(problem)


def _http_url(value: Any) -> bool:
    if not isinstance(value, str) or _SPACE_OR_CONTROL.search(value):
        return False
    try:
        parts = urlsplit(value)
        host = parts.hostname
        port = parts.port  # raises ValueError for a port past 65535, or no number
    except ValueError:  # e.g. an unbalanced "[" in an IPv6 host, a port of 99999
        return False
    return parts.scheme in ("http", "https") and bool(host) and port != 0


def _storage_file(value: str) -> None:
    """Deep-Image's storage errors for a storage:// image that names no file."""
    match = _STORAGE.fullmatch(value)
    if match is None:
        raise bad_request("Invalid source storage.")
    if not match.group(2):
        raise bad_request("File path not specified")
    if match.group(2).endswith("/"):
        raise bad_request("Found folder instead of file")


def _image_reference(value: Any, name: str) -> None:
    """Check an image given by reference (``background.replace``), as ``url`` is checked."""
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string")
    inline = inline_image_bytes(value)
    if inline is not None:
        image_size(inline)
    elif value.startswith("storage://"):
        _storage_file(value)
    elif not _http_url(value):
        raise bad_request("Unidentified image")


def _at(body: Mapping[str, Any], path: Path) -> tuple[bool, Any]:
    """Whether ``path`` is present in ``body`` and its value."""
    node: Any = body
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _refuse_nulls(node: Any, path: str = "") -> None:
    """Deep-Image's fields are not nullable: a null is not the same as leaving a field out."""
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        name = f"{path}.{key}" if path else str(key)
        if value is None:
            raise bad_request(f"{name} must not be null")
        _refuse_nulls(value, name)


def _check_fields(body: Mapping[str, Any]) -> None:
    """Deep-Image's documented types, vocabularies and ranges, one table at a time."""
    for path in OBJECTS:
        present, value = _at(body, path)
        if present and not isinstance(value, dict):
            raise bad_request(f"{'.'.join(path)} must be an object")
    for path, choices in CHOICES.items():
        present, value = _at(body, path)
        if present and not _one_of(value, choices):
            raise bad_request(f"{'.'.join(path)} must be one of {', '.join(sorted(choices))}")
    for path, (low, high, whole) in NUMBERS.items():
        present, value = _at(body, path)
        if not present:
            continue
        if not (_is_int(value) if whole else _is_number(value)):
            raise bad_request(f"{'.'.join(path)} must be {'an integer' if whole else 'a number'}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise bad_request(f"{'.'.join(path)} must be between {low} and {high}")
    for path in BOOLEANS:
        present, value = _at(body, path)
        if present and not isinstance(value, bool):
            raise bad_request(f"{'.'.join(path)} must be true or false")
    for path in TEXTS:
        present, value = _at(body, path)
        if present and not isinstance(value, str):
            raise bad_request(f"{'.'.join(path)} must be a string")
    for path in WEB_IMAGES:
        present, value = _at(body, path)
        if present and not _http_url(value):
            raise bad_request(f"{'.'.join(path)} must be an http(s) image URL")
    present, caption = _at(body, ("caption",))
    if present and "url" not in caption:
        raise bad_request("caption.url is required")
    if present and "position" in caption and not _POSITION.fullmatch(caption["position"]):
        raise bad_request("caption.position must be two letters such as RB")
    present, replace = _at(body, ("background", "replace"))
    if present:
        _image_reference(replace, "background.replace")
    present, target = _at(body, ("target",))
    if present and not (isinstance(target, str) and _STORAGE.fullmatch(target)):
        raise bad_request("Make sure your target url/storage is correct.")
    present, padding = _at(body, ("padding",))
    if present:
        _dimension(padding, "padding", minimum=0)
    present, size = _at(body, ("max_file_size",))
    if present and not _file_size(size):
        raise bad_request("max_file_size must be a number of bytes or a size such as '1MB'")


def _file_size(value: Any) -> bool:
    if _is_int(value):
        return bool(value > 0)
    match = _FILE_SIZE.fullmatch(value) if isinstance(value, str) else None
    return match is not None and float(match.group(1)) > 0


def _source(body: Mapping[str, Any], upload: Upload | None) -> tuple[str, tuple[int, int] | None]:
    # Decision (reference 5.13): an uploaded file wins over "url" when both are sent.
    if upload is not None:
        return "file", image_size(upload.data)
    if "url" not in body:
        return "none", None
    url = body["url"]
    if not isinstance(url, str):
        raise bad_request("url must be a string")
    inline = inline_image_bytes(url)
    if inline is not None:
        return "inline", image_size(inline)
    if url.startswith("storage://"):
        _storage_file(url)
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
        isinstance(context_images, list) and all(_http_url(u) for u in context_images)
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
    if fit is not None and not (
        _one_of(fit, FITS) or (isinstance(fit, dict) and _one_of(fit.get("crop"), CROPS))
    ):
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
    if not _one_of(value, frozenset(OUTPUT_FORMATS)):
        raise bad_request("output_format must be one of jpeg, jpg, png, webp")
    return OUTPUT_FORMATS[value]


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
    _refuse_nulls(body)
    background = _object(body, "background")
    generate = _object(background, "generate", "background.") if background else None
    _check_fields(body)
    _check_misc(body)
    webhook_url = _webhook_url(body)
    quality = _quality(body)
    width = _dimension(body.get("width"), "width")
    height = _dimension(body.get("height"), "height")
    source_kind, source_size = _source(body, upload)
    has_image = source_size is not None
    if generate is not None:
        _check_generate(generate, has_image)
    # generative_upscale needs an image or a generation to upscale: the generate-in-high-
    # resolution docs example upscales a generated image. Without either it is an operation
    # without an image (generative_upscale is in OPERATION_KEYS), refused just below.
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
