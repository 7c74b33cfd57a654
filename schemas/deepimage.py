"""Marshmallow schema for the body of a Deep-Image.ai processing request.

genrelay validates the ``input`` of ``POST /v1/generations`` with :data:`ProcessRequestSchema`
and then forwards that input unchanged as the JSON body of Deep-Image's
``POST /rest_api/process``. Field names, values and defaults follow the research notes in
``/work/shared/reference/deep-image-api.md`` (§1.3 for the image reference in ``url``, §2 for the
request fields, §3 for ``webhooks``); where the notes say the docs are silent (§5, question 8) the
bounds chosen here are documented on the constants below.

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

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from service.gcs_urls import gs_url_problem

__all__ = [
    "ADAPTER_TYPES",
    "DEFAULT_ADAPTER_TYPE",
    "DEFAULT_MODEL_TYPE",
    "MODEL_TYPES",
    "PRINT_SIZES",
    "WEBHOOKS_RESERVED_MESSAGE",
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
    "HttpUrl",
    "ImageSource",
    "ImageUrl",
    "JsonNumber",
    "PixelsOrPercent",
    "ProcessRequestSchema",
    "StrictBoolean",
    "Text",
    "model_type_of",
]

# --- Vocabularies (reference §2) -------------------------------------------------------------

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

# img2img is not in the generation page's list but is used by the prompt-based editing pages.
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
PRINT_SIZES: tuple[str, ...] = (
    *(f"{series}{number}" for series in "abc" for number in range(11)),
    "letter",
    "legal",
    "tabloid",
    "ledger",
    *(f"arch-{letter}" for letter in "abcde"),
    "arch-e1",
)

# --- Bounds the docs leave open (reference §5, question 8) ------------------------------------

# Deep-Image does not publish its output pixel limit (it answers 400 "cannot be upscaled above
# {max_width} x {max_height}"); 16384 px a side is far above every documented example and is the
# largest size common image libraries and GPUs handle, so anything larger is certainly a mistake.
MAX_PIXELS = 16384
# AI upscaling stops at 4x and bicubic takes over (§2.4); 10x is the most that is still sensible.
MAX_SCALE_PERCENT = 1000
MAX_PADDING_PERCENT = 100
MAX_URL_LENGTH = 2048
# A base64 image travels inside the JSON body; 20 MiB of text is ~15 MB of image.
MAX_BASE64_LENGTH = 20 * 1024 * 1024
MAX_PROMPT_LENGTH = 4000
MAX_SAMPLE_NUM = 2**32 - 1
MAX_CONTEXT_IMAGES = 16
MAX_DPI = 2400
MAX_FILE_SIZE_BYTES = 10 * 1024**3
_FILE_SIZE_UNITS = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}

# Adapters that read the input image in `url`; img2img reads `context_images` instead.
URL_FREE_ADAPTER_TYPES = frozenset({"img2img"})

WEBHOOKS_RESERVED_MESSAGE = (
    "webhooks is set by genrelay; register a webhook on the generation instead."
)

# --- Shapes (regular expressions are bounded so huge strings fail fast) ----------------------
# Patterns handed to FullMatch are also published as OpenAPI "pattern", so they use ^...$
# (valid ECMA-262); FullMatch itself matches the whole string, so "RB\n" cannot slip through.

_PERCENT_RE = re.compile(r"^\d{1,4}(?:\.\d{1,4})?%$")
# Case-insensitive units written out so the published pattern needs no flags.
_FILE_SIZE_RE = re.compile(r"^(\d{1,10}(?:\.\d{1,6})?)([kKmMgG][bB])$")
_COLOR_ARGUMENT = r"\s*\d{1,3}(?:\.\d{1,6})?%?\s*"
_COLOR_RE = re.compile(
    r"^(?:#(?:[0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})"
    # rgb(), rgba(), hsl(), hsv() with three or four numeric (or percent) arguments.
    rf"|(?:rgba?|hsl|hsv)\({_COLOR_ARGUMENT}(?:,{_COLOR_ARGUMENT}){{2,3}}\)"
    # auto, transparent and the HTML colour names are all plain words; upstream knows the list.
    r"|[A-Za-z]{3,32})$"
)
_POSITION_RE = re.compile(r"^(?:[LMR][TMB]|[TMB][LMR])$")
_PRESET_RE = re.compile(r"^[a-z0-9_]{1,64}$")
_STORAGE_FILE_RE = re.compile(r"storage://[^/\s]+/\S+")
_STORAGE_FOLDER_RE = re.compile(r"^storage://[^/\s]+/\S*$")
_DATA_URI_PREFIX_RE = re.compile(r"data:image/[A-Za-z0-9.+-]{1,32};base64,")
# Standard and URL-safe alphabets, padding, and the line breaks MIME encoders insert.
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_=\r\n-]+")
_WHITESPACE_OR_CONTROL_RE = re.compile(r"[\s\x00-\x1f\x7f]")


def _http_url_problem(value: str) -> str | None:
    """Return why ``value`` is not an absolute http(s) URL with a host, or None if it is."""
    if len(value) > MAX_URL_LENGTH:
        return f"URL must be at most {MAX_URL_LENGTH} characters."
    if _WHITESPACE_OR_CONTROL_RE.search(value):
        return "URL must not contain spaces or control characters."
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unbalanced "[" in an IPv6 host
        return "Not a valid URL."
    if parts.scheme.lower() not in ("http", "https"):
        return "URL must start with http:// or https://."
    if not parts.hostname:
        return "URL must name a host."
    return None


# --- Fields ----------------------------------------------------------------------------------


def _document(field: fields.Field, shape: dict[str, Any]) -> None:
    """Publish the JSON-schema ``shape`` apispec cannot infer from a custom field."""
    field.metadata = {**shape, **field.metadata}


class FullMatch(validate.Regexp):
    """Like ``validate.Regexp`` but the whole string must match (Regexp uses re.match)."""

    def __call__(self, value: Any) -> Any:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


class Text(fields.String):
    """A JSON string; bytes are refused so the loaded value is exactly the input."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return value


class HttpUrl(Text):
    """An absolute http(s) URL with a host, at most 2048 characters."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _document(self, {"format": "uri", "maxLength": MAX_URL_LENGTH})

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        problem = _http_url_problem(text)
        if problem:
            raise ValidationError(problem)
        return text


class ImageUrl(HttpUrl):
    """An image to read: an http(s) URL, or ``gs://bucket/object`` (genrelay signs it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        described = self.metadata.get("description")
        note = "http(s) URL, or gs://bucket/object in a bucket the tenant may read."
        self.metadata = {**self.metadata, "description": f"{described} {note}".strip()}

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        if isinstance(value, str) and value.startswith("gs://"):
            problem = gs_url_problem(value)
            if problem:
                raise ValidationError(problem)
            return value
        return super()._deserialize(value, attr, data, **kwargs)


class ImageSource(Text):
    """The input image reference: an http(s) URL, a base64 image, a ``storage://`` path or a
    ``gs://bucket/object`` (which genrelay signs)."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        encoded = self._base64_payload(text)
        if encoded is not None:
            if len(text) > MAX_BASE64_LENGTH:
                raise ValidationError(
                    f"A base64 image must be at most {MAX_BASE64_LENGTH} characters."
                )
            if not _BASE64_RE.fullmatch(encoded):
                raise ValidationError("The base64 image data is empty or not base64.")
            return text
        if text.startswith("storage://"):
            if len(text) > MAX_URL_LENGTH or not _STORAGE_FILE_RE.fullmatch(text):
                raise ValidationError("A storage URL looks like storage://storage_name/path.")
            return text
        if text.startswith("gs://"):
            gs_problem = gs_url_problem(text)
            if gs_problem:
                raise ValidationError(gs_problem)
            return text
        problem = _http_url_problem(text)
        if problem:
            raise ValidationError(
                f"{problem} (url also accepts base64,... data or storage://name/path.)"
            )
        return text

    @staticmethod
    def _base64_payload(text: str) -> str | None:
        """Return the encoded part of a ``base64,`` or ``data:image/...;base64,`` value."""
        if text.startswith("base64,"):
            return text[len("base64,") :]
        prefix = _DATA_URI_PREFIX_RE.match(text)
        return text[prefix.end() :] if prefix else None


class StorageFolder(Text):
    """A ``storage://name/folder/`` destination for results (reference §2.6)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _document(self, {"pattern": _STORAGE_FOLDER_RE.pattern, "maxLength": MAX_URL_LENGTH})

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > MAX_URL_LENGTH or not _STORAGE_FOLDER_RE.fullmatch(text):
            raise ValidationError("Must look like storage://storage_name/folder/.")
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


class JsonNumber(fields.Number[float]):
    """A finite JSON number (int or float) returned unchanged, so 1 stays 1 and is not 1.0."""

    num_type = float  # only for apispec and marshmallow's bookkeeping; values are not cast
    default_error_messages = {"special": "NaN and infinity are not allowed."}

    def _validated(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.make_error("special")
        return value


class PixelsOrPercent(fields.Field):
    """A whole number of pixels, or a percent string such as ``"200%"`` (reference §2.4)."""

    default_error_messages = {
        "invalid": 'Must be a whole number of pixels or a percent string such as "200%".',
        "pixels": "Pixels must be between {minimum} and {maximum}.",
        "percent": "Percent must be {lowest} and at most {maximum}%.",
    }

    def __init__(
        self, *, min_pixels: int, max_pixels: int, max_percent: int, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_percent = max_percent
        _document(
            self,
            {
                "oneOf": [
                    {"type": "integer", "minimum": min_pixels, "maximum": max_pixels},
                    {"type": "string", "pattern": _PERCENT_RE.pattern},
                ]
            },
        )

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool):
            if not self.min_pixels <= value <= self.max_pixels:
                raise self.make_error("pixels", minimum=self.min_pixels, maximum=self.max_pixels)
            return value
        if isinstance(value, str) and _PERCENT_RE.fullmatch(value):
            percent = Decimal(value[:-1])
            # "0%" is allowed exactly when 0 pixels is (padding), never for an output size.
            allows_zero = self.min_pixels == 0
            if (percent == 0 and not allows_zero) or percent > self.max_percent:
                lowest = "at least 0" if allows_zero else "above 0"
                raise self.make_error("percent", lowest=lowest, maximum=self.max_percent)
            return value
        raise self.make_error("invalid")


class FitMode(fields.Field):
    """``canvas|crop|bounds|cover`` or ``{"crop": "item"|"content"|"center"}`` (§2.4)."""

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
        if isinstance(value, Mapping) and list(value) == ["crop"]:
            crop = value["crop"]
            if isinstance(crop, str) and crop in CROP_MODES:
                return {"crop": crop}
        raise self.make_error("invalid")


class FileSize(fields.Field):
    """Bytes as a whole number, or a string such as ``"500kb"``, ``"1MB"``, ``"1gb"`` (§2.6)."""

    default_error_messages = {
        "invalid": 'Must be a whole number of bytes or a size such as "500kb", "10MB" or "1gb".',
        "range": "Must be more than 0 bytes and at most {maximum} bytes.",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _document(
            self,
            {
                "oneOf": [
                    {"type": "integer", "minimum": 1, "maximum": MAX_FILE_SIZE_BYTES},
                    {"type": "string", "pattern": _FILE_SIZE_RE.pattern},
                ]
            },
        )

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int | str:
        size: int | Decimal
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str) and (match := _FILE_SIZE_RE.fullmatch(value)):
            size = Decimal(match[1]) * _FILE_SIZE_UNITS[match[2].lower()]
        else:
            raise self.make_error("invalid")
        if not 0 < size <= MAX_FILE_SIZE_BYTES:
            raise self.make_error("range", maximum=MAX_FILE_SIZE_BYTES)
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


def _integer(minimum: int, maximum: int, description: str, default: Any = None) -> fields.Integer:
    return fields.Integer(
        strict=True, validate=validate.Range(minimum, maximum), metadata=_meta(description, default)
    )


def _number(
    minimum: float,
    maximum: float,
    description: str,
    default: Any = None,
    *,
    min_inclusive: bool = True,
) -> JsonNumber:
    return JsonNumber(
        validate=validate.Range(minimum, maximum, min_inclusive=min_inclusive),
        metadata=_meta(description, default),
    )


def _boolean(description: str, default: Any = None) -> StrictBoolean:
    return StrictBoolean(metadata=_meta(description, default))


def _choice(choices: tuple[str, ...], description: str, default: Any = None) -> Text:
    return Text(validate=validate.OneOf(choices), metadata=_meta(description, default))


def _text(description: str, *, min_length: int = 0, max_length: int = MAX_PROMPT_LENGTH) -> Text:
    return Text(validate=validate.Length(min_length, max_length), metadata=_meta(description))


def _color(description: str, default: Any = None) -> Text:
    return Text(
        validate=FullMatch(
            _COLOR_RE,
            error="Must be auto, transparent, #RGB, #RRGGBB, #RRGGBBAA, rgb(), rgba(), hsl(), "
            "hsv() or an HTML colour name.",
        ),
        metadata=_meta(description, default),
    )


def _unique_items(values: list[Any]) -> None:
    """Refuse a list that names the same item twice."""
    if len(set(values)) != len(values):
        raise ValidationError("Items must be unique.")


def _only_with(errors: dict[str, Any], data: Mapping[str, Any], field: str, reason: str) -> None:
    """Record ``reason`` against ``field`` if the caller sent it."""
    if field in data:
        errors.setdefault(field, []).append(reason)


# --- Schemas ---------------------------------------------------------------------------------


class DeepImageGenerateSchema(Schema):
    """``background.generate``: image generation, editing and inpainting (§2.1, §2.2)."""

    class Meta:
        unknown = RAISE

    model_type = _choice(MODEL_TYPES, "Generator model.", DEFAULT_MODEL_TYPE)
    description = _text("Generation prompt.", min_length=1)
    sample_num = _integer(0, MAX_SAMPLE_NUM, "Random seed.")
    adapter_type = _choice(ADAPTER_TYPES, "How the input image is used.", DEFAULT_ADAPTER_TYPE)
    face_id = _boolean("Use only facial details; adapter_type face only.")
    controlnet_conditioning_scale = _number(0, 1, "How strongly edges are preserved.", 0.5)
    item_area_percentage = _number(
        0, 1, "Share of the canvas the item occupies.", 1, min_inclusive=False
    )
    color = _color("Colour hint.")
    additional_prompt = _text("Extra prompt text.")
    negative_prompt = _text("What the image must not show.")
    ip_image2 = ImageUrl(
        metadata=_meta("Second image: inpainting mask or face-swap face; required for inpainting.")
    )
    strength = _number(0, 1, "Reimagine strength (face swap).")
    avatar_generation_type = _text(
        "Avatar generation mode, e.g. creative_img2img.", min_length=1, max_length=64
    )
    context_images = fields.List(
        ImageUrl(),
        validate=validate.Length(1, MAX_CONTEXT_IMAGES),
        metadata=_meta("Source images for img2img; required for img2img."),
    )

    @validates_schema
    def _check_adapter_companions(self, data: dict[str, Any], **kwargs: Any) -> None:
        adapter = data.get("adapter_type", DEFAULT_ADAPTER_TYPE)
        errors: dict[str, Any] = {}
        if adapter != "face":
            _only_with(errors, data, "face_id", 'face_id is only allowed with adapter_type "face".')
        if adapter == "inpainting" and "ip_image2" not in data:
            errors["ip_image2"] = ['ip_image2 (the mask URL) is required for "inpainting".']
        if adapter == "img2img" and "context_images" not in data:
            errors["context_images"] = ['context_images is required for "img2img".']
        if errors:
            raise ValidationError(errors)


class DeepImageBackgroundSchema(Schema):
    """``background``: removal, replacement or generation of the background (§2.3)."""

    class Meta:
        unknown = RAISE

    remove = _choice(BACKGROUND_REMOVE_MODES, "Background removal mode.", "auto")
    prompt = _text('What stays in the foreground; with remove "generative" only.', min_length=1)
    color = _color("Colour of the new background.")
    replace = ImageUrl(metadata=_meta("Backdrop image URL."))
    generate = fields.Nested(
        DeepImageGenerateSchema, metadata=_meta("Generate a new image or background.")
    )

    @validates_schema
    def _check_prompt_needs_generative_removal(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "prompt" in data and data.get("remove") != "generative":
            raise ValidationError(
                'prompt is only used with remove "generative"; add "remove": "generative".',
                "prompt",
            )


class DeepImageFilterParametersSchema(Schema):
    """``denoise_parameters`` / ``deblur_parameters``: which algorithm version (§2.5)."""

    class Meta:
        unknown = RAISE

    type = _choice(FILTER_TYPES, "Algorithm version.", "v1")


class DeepImageToneParametersSchema(Schema):
    """``light_parameters`` / ``color_parameters`` (§2.5)."""

    class Meta:
        unknown = RAISE

    type = _choice(TONE_TYPES, "Correction method.")
    level = _number(0, 1, "Correction strength.", 1)


class DeepImageWhiteBalanceParametersSchema(Schema):
    """``white_balance_parameters`` (§2.5)."""

    class Meta:
        unknown = RAISE

    level = _number(0, 1, "Correction strength.", 1)


class DeepImageUpscaleParametersSchema(Schema):
    """``upscale_parameters``: which AI upscaler (§2.4)."""

    class Meta:
        unknown = RAISE

    type = _choice(UPSCALE_TYPES, "v1 for photos, text_x4 for images with text.", "v1")


class DeepImageNsfwParametersSchema(Schema):
    """``nsfw_parameters`` for the ``safe`` filter (§2.6)."""

    class Meta:
        unknown = RAISE

    threshold = _number(0, 1, "Score above which the image is replaced.")
    image_url = ImageUrl(metadata=_meta("Image returned instead of an NSFW result."))
    # The docs' table names it nsfw_image_url while their example uses image_url; take both.
    nsfw_image_url = ImageUrl(metadata=_meta("Alias of image_url used by the docs' table."))

    @validates_schema
    def _check_single_replacement(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "image_url" in data and "nsfw_image_url" in data:
            raise ValidationError(
                "Give either image_url or nsfw_image_url, not both.", "nsfw_image_url"
            )


class DeepImageCaptionSchema(Schema):
    """``caption``: an overlay image such as a logo (§2.6)."""

    class Meta:
        unknown = RAISE

    url = ImageUrl(required=True, metadata=_meta("Overlay image URL."))
    position = Text(
        validate=FullMatch(
            _POSITION_RE,
            error="Must be two letters: one of L, M, R and one of T, M, B, e.g. RB or BR.",
        ),
        metadata=_meta("Where the overlay goes.", "RB"),
    )
    target_width_percentage = _number(1, 100, "Overlay width as a share of the image.", 25)
    padding = _integer(0, MAX_PIXELS, "Margin in pixels (upstream default: 5% of width).")
    opacity = _number(0, 100, "Overlay opacity in percent.", 100)


class DeepImageProcessRequestSchema(Schema):
    """The JSON body of Deep-Image ``POST /rest_api/process`` (reference §2)."""

    class Meta:
        unknown = RAISE

    url = ImageSource(
        metadata=_meta(
            "Input image: http(s) URL, base64,… / data:image/…;base64,…, storage:// or "
            "gs://bucket/object."
        )
    )
    width = PixelsOrPercent(
        min_pixels=1,
        max_pixels=MAX_PIXELS,
        max_percent=MAX_SCALE_PERCENT,
        metadata=_meta('Output width in pixels, or a scale such as "200%".'),
    )
    height = PixelsOrPercent(
        min_pixels=1,
        max_pixels=MAX_PIXELS,
        max_percent=MAX_SCALE_PERCENT,
        metadata=_meta('Output height in pixels, or a scale such as "200%".'),
    )
    min_length = _integer(1, MAX_PIXELS, "Scale so the shorter side is at least this long.")
    padding = PixelsOrPercent(
        min_pixels=0,
        max_pixels=MAX_PIXELS,
        max_percent=MAX_PADDING_PERCENT,
        metadata=_meta("Margin in pixels or percent."),
    )
    fit = FitMode(metadata=_meta("How the image fills width x height.", "canvas"))
    background = fields.Nested(DeepImageBackgroundSchema, metadata=_meta("Background handling."))

    generative_upscale = _boolean("Diffusion-based upscaling; needs url.")
    upscale_strength = _integer(1, 9, "1-3 strongest effect … 7-9 closest to plain upscale.")
    upscale_parameters = fields.Nested(
        DeepImageUpscaleParametersSchema, metadata=_meta("AI upscaler choice.")
    )

    enhancements = fields.List(
        _choice(ENHANCEMENTS, "Enhancement."),
        validate=_unique_items,
        metadata={**_meta("Enhancements to apply."), "uniqueItems": True},
    )
    denoise_parameters = fields.Nested(
        DeepImageFilterParametersSchema, metadata=_meta('Needs "denoise" in enhancements.')
    )
    deblur_parameters = fields.Nested(
        DeepImageFilterParametersSchema, metadata=_meta('Needs "deblur" in enhancements.')
    )
    light_parameters = fields.Nested(
        DeepImageToneParametersSchema, metadata=_meta('Needs "light" in enhancements.')
    )
    color_parameters = fields.Nested(
        DeepImageToneParametersSchema, metadata=_meta('Needs "color" in enhancements.')
    )
    white_balance_parameters = fields.Nested(
        DeepImageWhiteBalanceParametersSchema,
        metadata=_meta('Needs "white_balance" in enhancements.'),
    )

    output_format = _choice(OUTPUT_FORMATS, "Output image format.")
    quality = _integer(0, 100, "JPEG/WEBP quality.", 85)
    max_file_size = FileSize(
        metadata=_meta('Largest result size (jpeg/jpg/webp only): bytes or "500kb"/"1MB"/"1gb".')
    )
    safe = _boolean("Turn on the NSFW filter.")
    nsfw_parameters = fields.Nested(
        DeepImageNsfwParametersSchema, metadata=_meta("NSFW filter settings.")
    )
    caption = fields.Nested(DeepImageCaptionSchema, metadata=_meta("Overlay image."))
    preset = Text(
        validate=FullMatch(
            _PRESET_RE, error="Must be 1-64 lowercase letters, digits or underscores."
        ),
        metadata={
            **_meta("Preset name; custom presets are allowed."),
            "example": KNOWN_PRESETS[0],
            "x-known-values": list(KNOWN_PRESETS),
        },
    )
    print_size = _choice(PRINT_SIZES, "Paper size, lowercase (a4, letter, arch-e1 …).")
    dpi = _integer(1, MAX_DPI, "Print resolution; needs print_size.", 300)
    print_reorientation = _boolean("Match paper orientation; needs print_size.", True)
    target = StorageFolder(metadata=_meta("Upload results to storage://name/folder/."))
    # genrelay registers its own webhook upstream; a caller's URL would bypass it.
    webhooks = Reserved(
        WEBHOOKS_RESERVED_MESSAGE, metadata=_meta(f"Reserved. {WEBHOOKS_RESERVED_MESSAGE}")
    )

    @validates_schema
    def _check_cross_field_rules(self, data: dict[str, Any], **kwargs: Any) -> None:
        generate = data.get("background", {}).get("generate")
        has_url = "url" in data
        if not has_url and generate is None:
            raise ValidationError(
                "Nothing to do: give at least a url (an image to process) or "
                "background.generate (an image to create)."
            )

        errors: dict[str, Any] = {}
        if generate is not None:
            self._check_generation(data, generate, errors)
        if data.get("generative_upscale") is True:
            if not has_url:
                errors.setdefault("url", []).append("url is required for generative_upscale.")
        else:
            _only_with(
                errors, data, "upscale_strength", "upscale_strength needs generative_upscale: true."
            )
        if "print_size" not in data:
            for name in ("dpi", "print_reorientation"):
                _only_with(errors, data, name, f"{name} is only used with print_size.")
        enhancements = data.get("enhancements", [])
        for enhancement in ("denoise", "deblur", "light", "color", "white_balance"):
            if enhancement not in enhancements:
                name = f"{enhancement}_parameters"
                _only_with(errors, data, name, f'{name} needs "{enhancement}" in enhancements.')
        if data.get("output_format") == "png":
            _only_with(
                errors, data, "max_file_size", "max_file_size works only with jpeg, jpg or webp."
            )
        if errors:
            raise ValidationError(errors)

    @staticmethod
    def _check_generation(
        data: dict[str, Any], generate: dict[str, Any], errors: dict[str, Any]
    ) -> None:
        """Rules linking background.generate to the top-level fields."""
        adapter = generate.get("adapter_type")
        if adapter is not None and adapter not in URL_FREE_ADAPTER_TYPES and "url" not in data:
            errors.setdefault("url", []).append(
                f'url (the input image) is required with adapter_type "{adapter}".'
            )
        is_text_to_image = (
            "url" not in data and adapter is None and "context_images" not in generate
        )
        if not is_text_to_image:
            return
        # With no input image a percent has nothing to scale: the size must be in pixels.
        for name in ("width", "height"):
            if name not in data:
                errors.setdefault(name, []).append(
                    f"{name} in pixels is required for text-to-image."
                )
            elif not isinstance(data[name], int):
                errors.setdefault(name, []).append(
                    f"{name} must be in pixels for text-to-image; a percent needs an input image."
                )
        if "description" not in generate:
            errors["background"] = {
                "generate": {"description": ["description is required for text-to-image."]}
            }


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
