"""Marshmallow schema for the body of a Deep-Image.ai processing request.

genrelay validates the ``input`` of ``POST /v1/generations`` with :data:`ProcessRequestSchema`
and then forwards that input unchanged as the JSON body of Deep-Image's
``POST /rest_api/process``. The rule is to accept what Deep-Image accepts: the union of its
OpenAPI description (``ProcessPayload``) and its newer documentation pages, which add fields and
values the OpenAPI description lacks. Where the vendor documents a closed set of values or a
range, exactly that is accepted; where it documents only a type, any value of that type is.
genrelay refuses more than Deep-Image only where docs/compatibility.md says so, and each such
refusal's message gives the reason.

Two properties matter more than usual:

* Loading never changes a valid input (``ProcessRequestSchema().load(x) == x``): there are no
  ``load_default`` values (documented defaults live in ``metadata["default"]`` for OpenAPI only)
  and numbers, booleans and strings are returned exactly as they arrived.
* Every schema is rendered into OpenAPI by apispec, which names components after the class, so
  every class carries the ``DeepImage`` prefix to stay clear of the project's other schemas.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, validates_schema

from service.adapters.gcs_urls import gs_url_problem

__all__ = [
    "ADAPTER_TYPES",
    "ANY_IMAGE",
    "DEFAULT_ADAPTER_TYPE",
    "DEFAULT_MODEL_TYPE",
    "IMAGE_ADAPTER_TYPES",
    "MAX_JSON_INTEGER",
    "MODEL_TYPES",
    "NULL_MESSAGE",
    "PRINT_SIZES",
    "UNKNOWN_FIELD_MESSAGE",
    "WEBHOOKS_RESERVED_MESSAGE",
    "WEB_IMAGE",
    "DeepImageBackgroundSchema",
    "DeepImageCaptionSchema",
    "DeepImageFilterParametersSchema",
    "DeepImageGenerateSchema",
    "DeepImageNsfwParametersSchema",
    "DeepImageProcessRequestSchema",
    "DeepImageToneParametersSchema",
    "DeepImageUpscaleParametersSchema",
    "DeepImageWhiteBalanceParametersSchema",
    "FileSize",
    "FitMode",
    "ImageReference",
    "JsonInteger",
    "JsonNumber",
    "PixelsOrPercent",
    "ProcessRequestSchema",
    "StorageFolder",
    "StrictBoolean",
    "Text",
    "base64_payload",
    "image_reference_problem",
    "model_type_of",
]

# --- Vocabularies ----------------------------------------------------------------------------

# The image-generation docs page; the OpenAPI description predates model_type.
MODEL_TYPES: tuple[str, ...] = (
    "gemini-3-pro-image-preview",
    "see-dream-4.5",
    "qwen",
    "flux2-klein9b",
    "z-image-turbo",
    "realistic",
    "fantasy",
    "premium",
    "google-gemini-image-flash",
)
DEFAULT_MODEL_TYPE = "realistic"

# The OpenAPI enum has the first three; the generation docs add control2, upscale and
# inpainting, and the prompt-based editing pages use img2img.
ADAPTER_TYPES: tuple[str, ...] = (
    "generate_background",
    "face",
    "control",
    "control2",
    "upscale",
    "inpainting",
    "img2img",
)
DEFAULT_ADAPTER_TYPE = "generate_background"
# Adapters that work on the input image in `url` (Deep-Image: "File or image url is required").
# generate_background without an image is text-to-image; img2img may use context_images instead.
IMAGE_ADAPTER_TYPES = frozenset({"face", "control", "control2", "upscale", "inpainting"})

# OpenAPI: auto, human, item; the background docs add v2 and generative.
BACKGROUND_REMOVE_MODES = ("auto", "v2", "human", "item", "generative")
FIT_MODES = ("canvas", "crop", "bounds", "cover")
CROP_MODES = ("item", "content", "center")
UPSCALE_TYPES = ("v1", "text_x4")
ENHANCEMENTS = (
    "denoise",
    "deblur",
    "clean",
    "face_enhance",
    "light",
    "color",
    "white_balance",
    "exposure_correction",
)
FILTER_TYPES = ("v1", "v2")
TONE_TYPES = ("contrast", "hdr_light", "hdr_light_advanced")
OUTPUT_FORMATS = ("jpeg", "jpg", "png", "webp")
KNOWN_PRESETS = ("real_estate", "real_estate_upscaled", "ecommerce", "ecommerce_upscaled")
# The 74 paper names of the OpenAPI PrintSize enum, lowercase, grouped by family.
PRINT_SIZES: tuple[str, ...] = (
    *(f"{series}{number}" for series in "abc" for number in range(11)),
    *("a2extra", "a3extra", "a3super", "supera3", "a4extra", "a4super", "supera4", "a4long"),
    *("a5extra", "sob5extra"),
    *("letter", "legal", "executive", "tabloid", "statement", "halfletter", "folio"),
    *("flsa", "flse", "note", "11x17", "10x14", "juniorlegal", "memo"),
    *("governmentletter", "governmentlegal", "ledger"),
    *(f"arch{number}" for number in range(1, 7)),
    *("archa", "archb", "archc", "archd", "arche", "arche1", "arche2", "arche3"),
)

# --- Limits genrelay adds (each is listed in docs/compatibility.md) --------------------------

# genrelay stores `input` as JSON and forwards it as JSON; integers beyond 2**53 - 1 are not
# carried exactly by every JSON implementation (RFC 7493, I-JSON), and Python refuses to print
# integers of more than 4300 digits at all.
MAX_JSON_INTEGER = 2**53 - 1
_LONG_DIGITS = 16  # 2**53 has 16 digits; longer digit strings are certainly out of range

WEBHOOKS_RESERVED_MESSAGE = (
    "webhooks is set by genrelay; register a webhook on the generation instead."
)
NULL_MESSAGE = (
    "Must not be null: Deep-Image's fields are not nullable; leave the field out instead."
)
UNKNOWN_FIELD_MESSAGE = (
    "Unknown field. Deep-Image would silently ignore it, so genrelay refuses it to catch "
    "misspellings (see docs/compatibility.md)."
)
_INTEGER_RANGE_MESSAGE = (
    f"Must be between -{MAX_JSON_INTEGER} and {MAX_JSON_INTEGER}: larger numbers are not "
    "carried exactly by JSON (see docs/compatibility.md)."
)

# --- Shapes (patterns are bounded so huge strings fail fast) ---------------------------------
# Patterns published as OpenAPI "pattern" use ^...$ (valid ECMA-262); they are always applied
# with fullmatch, so "RB\n" cannot slip through.

_PERCENT_RE = re.compile(rf"^(\d{{1,{_LONG_DIGITS}}}(?:\.\d{{1,{_LONG_DIGITS}}})?)%$")
_DIGITS_RE = re.compile(rf"^\d{{1,{_LONG_DIGITS}}}$")
_FILE_SIZE_RE = re.compile(
    rf"^(\d{{1,{_LONG_DIGITS}}}(?:\.\d{{1,{_LONG_DIGITS}}})?)([kKmMgG][bB])?$"
)
_FILE_SIZE_UNITS = {None: 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
_POSITION_RE = re.compile(r"^(?:[LMR][TMB]|[TMB][LMR])$")
_DATA_URI_PREFIX_RE = re.compile(r"data:image/[A-Za-z0-9.+-]{1,32};base64,")
# Standard and URL-safe alphabets, padding, and the line breaks MIME encoders insert.
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_=\r\n-]+")
_STORAGE_RE = re.compile(r"storage://([^/\s]+)/(\S*)")
_WHITESPACE_OR_CONTROL_RE = re.compile(r"[\s\x00-\x1f\x7f]")

# --- Image references: the one place that decides what an image URL may be -------------------

# Kinds of reference. `url` and `background.replace` take Deep-Image's ImageUrl type (a web URL,
# a base64 image or a storage file); the fields the docs describe only as "URL" take web URLs.
# Every one of them may also be `gs://bucket/object`: genrelay checks the tenant may read that
# bucket and forwards a short-lived signed https URL instead (service/generations/inputs.py).
HTTP, BASE64, STORAGE, GCS = "http", "base64", "storage", "gcs"
ANY_IMAGE = frozenset({HTTP, BASE64, STORAGE, GCS})
WEB_IMAGE = frozenset({HTTP, GCS})
_KIND_NAMES = {
    HTTP: "an http(s) URL",
    BASE64: "base64,… data",
    STORAGE: "storage://name/path",
    GCS: "gs://bucket/object",
}


def _http_problem(value: str) -> str | None:
    if _WHITESPACE_OR_CONTROL_RE.search(value):
        return "A URL must not contain spaces or control characters."
    try:
        parts = urlsplit(value)
        if parts.port == 0:  # (reading it raises ValueError for one past 65535, or no number)
            return "Not a valid URL."
    except ValueError:  # e.g. an unbalanced "[" in an IPv6 host, a port of 99999
        return "Not a valid URL."
    if parts.scheme.lower() not in ("http", "https"):
        return "A URL must start with http:// or https://."
    if not parts.hostname:
        return "A URL must name a host."
    return None


def base64_payload(text: str) -> str | None:
    """Return the encoded part of a ``base64,`` or ``data:image/...;base64,`` value."""
    if text.startswith("base64,"):
        return text[len("base64,") :]
    prefix = _DATA_URI_PREFIX_RE.match(text)
    return text[prefix.end() :] if prefix else None


def image_reference_problem(value: str, kinds: frozenset[str]) -> str | None:
    """Return why ``value`` is not an image reference of one of ``kinds``, or None if it is.

    Every image field goes through here, so a new kind of reference (or a policy on storage
    names) is added in one place.
    """
    encoded = base64_payload(value)
    if encoded is not None:
        if BASE64 not in kinds:
            return "Must be an http(s) URL; base64 images are only taken in url and replace."
        if not _BASE64_RE.fullmatch(encoded):
            return "The base64 image data is empty or not base64."
        return None
    if value.startswith("storage://"):
        if STORAGE not in kinds:
            return "Must be an http(s) URL; storage URLs are only taken in url and replace."
        match = _STORAGE_RE.fullmatch(value)
        if match is None or not match[2] or match[2].endswith("/"):
            # Deep-Image: "File path not specified" / "Found folder instead of file".
            return "A storage image looks like storage://storage_name/path/to/file."
        return None
    if value.startswith("gs://") and GCS in kinds:
        return gs_url_problem(value)
    problem = _http_problem(value)
    if problem and kinds != WEB_IMAGE:
        accepted = ", ".join(_KIND_NAMES[kind] for kind in sorted(kinds))
        problem = f"{problem} (Accepted: {accepted}.)"
    return problem


def storage_folder_problem(value: str) -> str | None:
    """Return why ``value`` is not a ``storage://name/[folder/]`` destination, or None."""
    if _STORAGE_RE.fullmatch(value) is None:
        return "Must look like storage://storage_name/ or storage://storage_name/folder/."
    return None


# --- Fields ----------------------------------------------------------------------------------


def _document(field: fields.Field, shape: dict[str, Any]) -> None:
    """Publish the JSON-schema ``shape`` apispec cannot infer from a custom field."""
    field.metadata = {**shape, **field.metadata}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Text(fields.String):
    """A JSON string, any content; bytes are refused so the loaded value is exactly the input."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return value


class Choice(Text):
    """One of a closed set of strings; ``hint`` may suggest the intended value."""

    def __init__(self, choices: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.choices = choices
        self._set = frozenset(choices)
        _document(self, {"enum": list(choices)})

    def explain(self, value: str) -> str:
        return f"Must be one of: {', '.join(self.choices)}."

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if text not in self._set:
            raise ValidationError(self.explain(text))
        return text


class PrintSize(Choice):
    """``print_size``: Deep-Image's paper names, lowercase and without hyphens."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(PRINT_SIZES, **kwargs)

    def explain(self, value: str) -> str:
        squeezed = value.lower().replace("-", "").replace(" ", "")
        if squeezed in self._set:
            return f'Deep-Image spells this paper size "{squeezed}".'
        return (
            f"Must be one of Deep-Image's {len(self.choices)} paper names, lowercase: "
            "a0-a10, b0-b10, c0-c10, letter, legal, ledger, archa-arche, arch1-arch6 … "
            "(the enum of the OpenAPI document)."
        )


class ImageReference(Text):
    """An image given by reference; which kinds are taken is decided by ``kinds``."""

    def __init__(self, kinds: frozenset[str] = WEB_IMAGE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kinds = kinds
        _document(self, {"format": "uri"} if kinds == WEB_IMAGE else {})

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        problem = image_reference_problem(text, self.kinds)
        if problem:
            raise ValidationError(problem)
        return text


class StorageFolder(Text):
    """A ``storage://name/folder/`` destination for results."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _document(self, {"pattern": "^storage://[^/\\s]+/\\S*$"})

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        problem = storage_folder_problem(text)
        if problem:
            raise ValidationError(problem)
        return text


class StrictBoolean(fields.Boolean):
    """Only JSON true/false; marshmallow's Boolean would also take 1, "yes", "on"…"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(truthy={True}, falsy={False}, **kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> bool:
        # `1 in {True}` is true in Python, so the truthy/falsy sets alone are not enough.
        if value is True or value is False:
            return value
        raise self.make_error("invalid", input=value)


def _range_problem(
    value: int | float | Decimal, minimum: float | None, maximum: float | None
) -> str | None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        return f"Must be between {minimum:g} and {maximum:g}."
    if minimum is not None and value < minimum:
        return f"Must be at least {minimum:g}."
    if maximum is not None and value > maximum:
        return f"Must be at most {maximum:g}."
    return None


class JsonNumber(fields.Field):
    """A finite JSON number (int or float) returned unchanged, so 1 stays 1 and is not 1.0."""

    default_error_messages = {
        "invalid": "Not a valid number.",
        "special": "NaN and infinity are not allowed.",
    }

    def __init__(
        self, minimum: float | None = None, maximum: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.minimum = minimum
        self.maximum = maximum
        shape: dict[str, Any] = {"type": "number"}
        if minimum is not None:
            shape["minimum"] = minimum
        if maximum is not None:
            shape["maximum"] = maximum
        _document(self, shape)

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.make_error("special")
        if abs(value) > MAX_JSON_INTEGER:
            # A float too: PostgreSQL keeps 1e16 as 10000000000000000, forwarded as an integer.
            raise ValidationError(_INTEGER_RANGE_MESSAGE)
        problem = _range_problem(value, self.minimum, self.maximum)
        if problem:
            raise ValidationError(problem)
        return value


class JsonInteger(JsonNumber):
    """A JSON integer (1.0 is refused: the vendor types these fields integer)."""

    default_error_messages = {
        "invalid": "Not a valid integer: Deep-Image types this field integer (a number "
        "written with a decimal point or an exponent, such as 1.0 or 1e3, is not one)."
    }

    def __init__(
        self, minimum: float | None = None, maximum: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(minimum, maximum, **kwargs)
        self.metadata = {**self.metadata, "type": "integer"}

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int | float:
        if not _is_int(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class PixelsOrPercent(fields.Field):
    """Whole pixels (a number or a string of digits) or a percent string such as ``"200%"``."""

    default_error_messages = {
        "invalid": 'Must be a whole number of pixels or a percent string such as "200%".',
        "pixels": "Must be at least {minimum} (pixels): a size cannot be smaller.",
        "percent": "A percent must be above 0%: no image can be 0 pixels wide.",
    }

    def __init__(self, *, min_pixels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_pixels = min_pixels
        _document(
            self,
            {
                "oneOf": [
                    {"type": "integer", "minimum": min_pixels, "maximum": MAX_JSON_INTEGER},
                    {"type": "string", "pattern": _PERCENT_RE.pattern},
                    {"type": "string", "pattern": _DIGITS_RE.pattern},
                ]
            },
        )

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int | str:
        if _is_int(value) or (isinstance(value, str) and _DIGITS_RE.fullmatch(value)):
            pixels = int(value)
            if pixels > MAX_JSON_INTEGER:
                raise ValidationError(_INTEGER_RANGE_MESSAGE)
            if pixels < self.min_pixels:
                raise self.make_error("pixels", minimum=self.min_pixels)
            return value
        if isinstance(value, str) and (match := _PERCENT_RE.fullmatch(value)):
            # "0%" is allowed exactly when 0 pixels is (padding), never for an output size.
            if self.min_pixels > 0 and Decimal(match[1]) == 0:
                raise self.make_error("percent")
            return value
        raise self.make_error("invalid")


class FitMode(fields.Field):
    """``canvas|crop|bounds|cover`` or ``{"crop": "item"|"content"|"center"}``."""

    default_error_messages = {
        "invalid": (
            # Braces doubled: make_error() runs str.format on the message.
            'Must be one of canvas, crop, bounds, cover, or {{"crop": "item"|"content"|"center"}}.'
        )
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        crop = {"type": "string", "enum": list(CROP_MODES)}
        _document(
            self,
            {
                "oneOf": [
                    {"type": "string", "enum": list(FIT_MODES)},
                    {
                        "type": "object",
                        "properties": {"crop": crop},
                        "required": ["crop"],
                        "additionalProperties": False,
                    },
                ]
            },
        )

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str | dict[str, str]:
        if isinstance(value, str) and value in FIT_MODES:
            return value
        if isinstance(value, Mapping) and "crop" in value and len(value) > 1:
            raise ValidationError(f'Only the key "crop" is known here. {UNKNOWN_FIELD_MESSAGE}')
        if isinstance(value, Mapping) and list(value) == ["crop"]:
            crop = value["crop"]
            if isinstance(crop, str) and crop in CROP_MODES:
                return {"crop": crop}
        raise self.make_error("invalid")


class FileSize(fields.Field):
    """Bytes as a whole number, or a string such as ``"500kb"``, ``"1MB"``, ``"1gb"``."""

    default_error_messages = {
        "invalid": 'Must be a whole number of bytes or a size such as "500kb", "10MB" or "1gb".',
        "range": "Must be more than 0 bytes: no image fits in less.",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _document(
            self,
            {
                "oneOf": [
                    {"type": "integer", "minimum": 1, "maximum": MAX_JSON_INTEGER},
                    {"type": "string", "pattern": _FILE_SIZE_RE.pattern},
                ]
            },
        )

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int | str:
        if _is_int(value):
            if value > MAX_JSON_INTEGER:
                raise ValidationError(_INTEGER_RANGE_MESSAGE)
            size: int | Decimal = value
        elif isinstance(value, str) and (match := _FILE_SIZE_RE.fullmatch(value)):
            unit = match[2].lower() if match[2] else None
            size = Decimal(match[1]) * _FILE_SIZE_UNITS[unit]
        else:
            raise self.make_error("invalid")
        if size <= 0:
            raise self.make_error("range")
        return value


class Reserved(fields.Field):
    """A field genrelay fills in itself: any value from the caller, even null, is refused."""

    def __init__(self, reason: str, **kwargs: Any) -> None:
        super().__init__(error_messages={"null": reason, "reserved": reason}, **kwargs)
        _document(self, {"not": {}})  # JSON schema for "no value is valid"

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> Any:
        raise self.make_error("reserved")


# Small factories keep each field declaration on one readable line.


def _meta(description: str, default: Any = None) -> dict[str, Any]:
    """OpenAPI metadata; the upstream default is documentation only, never loaded."""
    metadata: dict[str, Any] = {"description": description}
    if default is not None:
        metadata["default"] = default
    return metadata


def _integer(
    description: str,
    default: Any = None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> JsonInteger:
    return JsonInteger(minimum, maximum, metadata=_meta(description, default))


def _number(
    description: str,
    default: Any = None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> JsonNumber:
    return JsonNumber(minimum, maximum, metadata=_meta(description, default))


def _boolean(description: str, default: Any = None) -> StrictBoolean:
    return StrictBoolean(metadata=_meta(description, default))


def _choice(choices: tuple[str, ...], description: str, default: Any = None) -> Choice:
    return Choice(choices, metadata=_meta(description, default))


def _text(description: str) -> Text:
    return Text(metadata=_meta(description))


def _web_image(description: str, **kwargs: Any) -> ImageReference:
    return ImageReference(WEB_IMAGE, metadata=_meta(description), **kwargs)


def _two_letter_position(value: str) -> None:
    if not _POSITION_RE.fullmatch(value):
        raise ValidationError(
            "Must be two letters: one of L, M, R and one of T, M, B, e.g. RB or BR."
        )


# --- Schemas ---------------------------------------------------------------------------------


class _Strict(Schema):
    """Unknown fields are refused, with the reason (docs/compatibility.md)."""

    class Meta:
        unknown = RAISE

    error_messages = {"unknown": UNKNOWN_FIELD_MESSAGE}


class DeepImageGenerateSchema(_Strict):
    """``background.generate``: image generation, editing and inpainting."""

    model_type = _choice(MODEL_TYPES, "Generator model.", DEFAULT_MODEL_TYPE)
    description = _text("Generation prompt.")
    sample_num = _integer("Random seed.")
    adapter_type = _choice(ADAPTER_TYPES, "How the input image is used.", DEFAULT_ADAPTER_TYPE)
    face_id = _boolean("Use only facial details; has an effect with adapter_type face.")
    controlnet_conditioning_scale = _number(
        "How strongly edges are preserved.", 0.5, minimum=0, maximum=1
    )
    item_area_percentage = _number(
        "Share of the canvas the item occupies.", 1, minimum=0, maximum=1
    )
    color = _text("Colour hint.")
    additional_prompt = _text("Extra prompt text.")
    negative_prompt = _text("What the image must not show.")
    ip_image2 = _web_image(
        "Second image: inpainting mask or face-swap face; required for inpainting."
    )
    strength = _number("Reimagine strength (face swap).")
    avatar_generation_type = _text("Avatar generation mode, e.g. creative_img2img.")
    context_images = fields.List(
        _web_image("Source image."),
        metadata=_meta("Source images for img2img."),
    )

    @validates_schema
    def _check_inpainting_mask(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("adapter_type") == "inpainting" and "ip_image2" not in data:
            raise ValidationError(
                'ip_image2 (the mask image URL) is required with adapter_type "inpainting".',
                "ip_image2",
            )


class DeepImageBackgroundSchema(_Strict):
    """``background``: removal, replacement or generation of the background."""

    remove = _choice(BACKGROUND_REMOVE_MODES, "Background removal mode.", "auto")
    prompt = _text('What stays in the foreground; has an effect with remove "generative".')
    color = _text("Colour of the new background: auto, transparent, #RRGGBB, rgb(), a name…")
    replace = ImageReference(
        ANY_IMAGE,
        metadata=_meta("Backdrop image: http(s) URL, base64,…, storage:// or gs://bucket/object."),
    )
    generate = fields.Nested(
        DeepImageGenerateSchema, metadata=_meta("Generate a new image or background.")
    )


class DeepImageFilterParametersSchema(_Strict):
    """``denoise_parameters`` / ``deblur_parameters``: which algorithm version."""

    type = _choice(FILTER_TYPES, "Algorithm version.", "v1")


class DeepImageToneParametersSchema(_Strict):
    """``light_parameters`` / ``color_parameters``."""

    type = _choice(TONE_TYPES, "Correction method.")
    level = _number("Correction strength.", 1, minimum=0, maximum=1)


class DeepImageWhiteBalanceParametersSchema(_Strict):
    """``white_balance_parameters``."""

    level = _number("Correction strength.", 1, minimum=0, maximum=1)


class DeepImageUpscaleParametersSchema(_Strict):
    """``upscale_parameters``: which AI upscaler."""

    type = _choice(UPSCALE_TYPES, "v1 for photos, text_x4 for images with text.", "v1")


class DeepImageNsfwParametersSchema(_Strict):
    """``nsfw_parameters`` for the ``safe`` filter."""

    threshold = _number("Score above which the image is replaced.", minimum=0, maximum=1)
    image_url = _web_image("Image returned instead of an NSFW result.")
    # The docs' table names it nsfw_image_url while their example uses image_url; take both.
    nsfw_image_url = _web_image("Name of image_url in the docs' table.")


class DeepImageCaptionSchema(_Strict):
    """``caption``: an overlay image such as a logo."""

    url = ImageReference(WEB_IMAGE, required=True, metadata=_meta("Overlay image URL."))
    position = Text(validate=_two_letter_position, metadata=_meta("Where the overlay goes.", "RB"))
    target_width_percentage = _number(
        "Overlay width as a share of the image.", 25, minimum=0, maximum=100
    )
    padding = _integer("Margin in pixels (upstream default: 5% of width).", minimum=0)
    opacity = _number("Overlay opacity in percent.", 100, minimum=0, maximum=100)


class DeepImageProcessRequestSchema(_Strict):
    """The JSON body of Deep-Image ``POST /rest_api/process``."""

    url = ImageReference(
        ANY_IMAGE,
        metadata=_meta(
            "Input image: http(s) URL, base64,… / data:image/…;base64,…, storage:// or "
            "gs://bucket/object (signed by genrelay)."
        ),
    )
    width = PixelsOrPercent(
        min_pixels=1, metadata=_meta('Output width in pixels, or a scale such as "200%".')
    )
    height = PixelsOrPercent(
        min_pixels=1, metadata=_meta('Output height in pixels, or a scale such as "200%".')
    )
    min_length = _integer("Scale so the shorter side is at least this long.", minimum=1)
    padding = PixelsOrPercent(min_pixels=0, metadata=_meta("Margin in pixels or percent."))
    fit = FitMode(metadata=_meta("How the image fills width x height.", "canvas"))
    background = fields.Nested(DeepImageBackgroundSchema, metadata=_meta("Background handling."))

    generative_upscale = _boolean(
        "Diffusion-based upscaling of the input image (url) or of the generated one."
    )
    upscale_strength = _integer(
        "1-3 strongest effect … 7-9 closest to plain upscale.", minimum=1, maximum=9
    )
    upscale_parameters = fields.Nested(
        DeepImageUpscaleParametersSchema, metadata=_meta("AI upscaler choice.")
    )

    enhancements = fields.List(
        _choice(ENHANCEMENTS, "Enhancement."), metadata=_meta("Enhancements to apply.")
    )
    denoise_parameters = fields.Nested(
        DeepImageFilterParametersSchema, metadata=_meta('Used with "denoise" in enhancements.')
    )
    deblur_parameters = fields.Nested(
        DeepImageFilterParametersSchema, metadata=_meta('Used with "deblur" in enhancements.')
    )
    light_parameters = fields.Nested(
        DeepImageToneParametersSchema, metadata=_meta('Used with "light" in enhancements.')
    )
    color_parameters = fields.Nested(
        DeepImageToneParametersSchema, metadata=_meta('Used with "color" in enhancements.')
    )
    white_balance_parameters = fields.Nested(
        DeepImageWhiteBalanceParametersSchema,
        metadata=_meta('Used with "white_balance" in enhancements.'),
    )

    output_format = _choice(OUTPUT_FORMATS, "Output image format.")
    quality = _integer("JPEG/WEBP quality.", 85, minimum=0, maximum=100)
    max_file_size = FileSize(
        metadata=_meta('Largest result size (jpeg/jpg/webp): bytes or "500kb"/"1MB"/"1gb".')
    )
    safe = _boolean("Turn on the NSFW filter.")
    nsfw_parameters = fields.Nested(
        DeepImageNsfwParametersSchema, metadata=_meta("NSFW filter settings.")
    )
    caption = fields.Nested(DeepImageCaptionSchema, metadata=_meta("Overlay image."))
    preset = Text(
        metadata={
            **_meta("Preset name; Deep-Image answers 400 for a name the account does not have."),
            "example": KNOWN_PRESETS[0],
            "x-known-values": list(KNOWN_PRESETS),
        },
    )
    print_size = PrintSize(metadata=_meta("Paper size, lowercase (a4, letter, archa …)."))
    dpi = _integer("Print resolution; used with print_size.", 300)
    print_reorientation = _boolean("Match paper orientation; used with print_size.", True)
    target = StorageFolder(metadata=_meta("Upload results to storage://name/folder/."))
    # genrelay registers its own webhook upstream; a caller's URL would bypass it.
    webhooks = Reserved(
        WEBHOOKS_RESERVED_MESSAGE, metadata=_meta(f"Reserved. {WEBHOOKS_RESERVED_MESSAGE}")
    )

    @validates_schema
    def _check_an_image_where_one_is_needed(self, data: dict[str, Any], **kwargs: Any) -> None:
        """Deep-Image answers "File or image url is required" to all of these."""
        generate = data.get("background", {}).get("generate")
        has_url = "url" in data
        if not has_url and generate is None:
            raise ValidationError(
                "Nothing to do: give a url (an image to process) or background.generate "
                '(an image to create); Deep-Image answers "File or image url is required".'
            )
        if has_url:
            return
        reasons: list[str] = []
        adapter = (generate or {}).get("adapter_type", DEFAULT_ADAPTER_TYPE)
        if adapter in IMAGE_ADAPTER_TYPES:
            reasons.append(f'url (the input image) is required with adapter_type "{adapter}".')
        if adapter == "img2img" and not (generate or {}).get("context_images"):
            reasons.append(
                'adapter_type "img2img" needs an image: url or background.generate.context_images.'
            )
        # generative_upscale needs no url of its own: the vendor's "generate in high resolution"
        # example upscales a generated image (background.generate, no url).
        if reasons:
            raise ValidationError({"url": reasons})


def _explain_nulls(*schemas: type[Schema]) -> None:
    """Give every field's "may not be null" error the reason."""
    for schema in schemas:
        for field in schema._declared_fields.values():
            for each in (field, getattr(field, "inner", None)):
                if isinstance(each, fields.Field) and not isinstance(each, Reserved):
                    each.error_messages = {**each.error_messages, "null": NULL_MESSAGE}


_explain_nulls(
    DeepImageGenerateSchema,
    DeepImageBackgroundSchema,
    DeepImageFilterParametersSchema,
    DeepImageToneParametersSchema,
    DeepImageWhiteBalanceParametersSchema,
    DeepImageUpscaleParametersSchema,
    DeepImageNsfwParametersSchema,
    DeepImageCaptionSchema,
    DeepImageProcessRequestSchema,
)

# The name the rest of genrelay uses; the class keeps the DeepImage prefix for apispec.
ProcessRequestSchema = DeepImageProcessRequestSchema


def model_type_of(input: Mapping[str, Any]) -> str | None:
    """Return the effective model_type of a request, or None when it generates nothing."""
    background = input.get("background") if isinstance(input, Mapping) else None
    generate = background.get("generate") if isinstance(background, Mapping) else None
    if not isinstance(generate, Mapping):
        return None
    model_type = generate.get("model_type", DEFAULT_MODEL_TYPE)
    return model_type if isinstance(model_type, str) else DEFAULT_MODEL_TYPE
