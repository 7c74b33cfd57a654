"""Property-based tests: intake and the simulator against a model of Deep-Image's own rules.

VENDOR_RULES below is this project's compact description of the processing request Deep-Image
documents: the fields, types, vocabularies, bounds and required companions of its OpenAPI
description, plus the fields and values its newer docs pages add. It is written here, from
those facts, independently of schemas/deepimage.py and of the simulator, so that both are
checked against it:

(a) payloads built from the vendor's rules are accepted by intake and by the simulator;
(b) a payload that breaks exactly one vendor rule is refused, with the offending field named;
(c) what intake accepts is forwarded unchanged (load, store as JSON, forward).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError
from PIL import Image

from schemas.deepimage import ProcessRequestSchema
from schemas.generations import GenerationCreateSchema
from service.devtools.simulator.errors import SimulatorError
from service.devtools.simulator.validation import validate_process_request

# Largest integer JSON carries exactly (RFC 7493); genrelay refuses larger ones on purpose.
JSON_INTEGER = 2**53 - 1
# The simulator's pixel limit stands for Deep-Image's unpublished one; it is not a field rule.
NO_PIXEL_LIMIT = 2**60

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _png_base64(side: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (10, 120, 200)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


INLINE_PNG = _png_base64(100)

# --- The vendor's vocabularies (facts) -------------------------------------------------------

MODELS = (
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
ADAPTERS = (
    "generate_background",
    "face",
    "control",
    "control2",
    "upscale",
    "inpainting",
    "img2img",
)
NEEDS_IMAGE = ("face", "control", "control2", "upscale", "inpainting")
REMOVE = ("auto", "v2", "human", "item", "generative")
FITS = ("canvas", "crop", "bounds", "cover")
CROPS = ("item", "content", "center")
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
PRESETS = ("real_estate", "real_estate_upscaled", "ecommerce", "ecommerce_upscaled")
FORMATS = ("jpeg", "jpg", "png", "webp")
# The OpenAPI PrintSize enum; ISO series first.
PAPER = [
    *(f"{series}{number}" for series in "abc" for number in range(11)),
    *("a2extra", "a3extra", "a3super", "supera3", "a4extra", "a4super", "supera4", "a4long"),
    *("a5extra", "sob5extra", "letter", "legal", "executive", "tabloid", "statement"),
    *("halfletter", "folio", "flsa", "flse", "note", "11x17", "10x14", "juniorlegal", "memo"),
    *("governmentletter", "governmentlegal", "ledger"),
    *(f"arch{number}" for number in (1, 2, 3, 4, 5, 6, "a", "b", "c", "d", "e", "e1", "e2", "e3")),
]
POSITIONS = tuple(a + b for a in "LMR" for b in "TMB") + tuple(b + a for a in "LMR" for b in "TMB")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one field takes: a kind, and its vocabulary or bounds where the vendor gives one."""

    kind: str
    values: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    # Values outside `values` that Deep-Image decides per account (custom presets): no refusal.
    open_vocabulary: bool = False


VENDOR_RULES: dict[tuple[str, ...], Rule] = {
    ("url",): Rule("image"),
    ("target",): Rule("storage_folder"),
    ("width",): Rule("size", low=1),
    ("height",): Rule("size", low=1),
    ("min_length",): Rule("integer", low=1),
    ("padding",): Rule("size", low=0),
    ("fit",): Rule("fit"),
    ("enhancements",): Rule("choices", ENHANCEMENTS),
    ("background", "remove"): Rule("choice", REMOVE),
    ("background", "prompt"): Rule("text"),
    ("background", "color"): Rule("text"),
    ("background", "replace"): Rule("image"),
    ("background", "generate", "model_type"): Rule("choice", MODELS),
    ("background", "generate", "description"): Rule("text"),
    ("background", "generate", "sample_num"): Rule("integer"),
    ("background", "generate", "adapter_type"): Rule("choice", ADAPTERS),
    ("background", "generate", "face_id"): Rule("boolean"),
    ("background", "generate", "controlnet_conditioning_scale"): Rule("number", low=0, high=1),
    ("background", "generate", "item_area_percentage"): Rule("number", low=0, high=1),
    ("background", "generate", "color"): Rule("text"),
    ("background", "generate", "additional_prompt"): Rule("text"),
    ("background", "generate", "negative_prompt"): Rule("text"),
    ("background", "generate", "ip_image2"): Rule("web_image"),
    ("background", "generate", "strength"): Rule("number"),
    ("background", "generate", "avatar_generation_type"): Rule("text"),
    ("background", "generate", "context_images"): Rule("web_images"),
    ("generative_upscale",): Rule("boolean"),
    ("upscale_strength",): Rule("integer", low=1, high=9),
    ("upscale_parameters", "type"): Rule("choice", ("v1", "text_x4")),
    ("denoise_parameters", "type"): Rule("choice", ("v1", "v2")),
    ("deblur_parameters", "type"): Rule("choice", ("v1", "v2")),
    ("light_parameters", "type"): Rule("choice", ("contrast", "hdr_light", "hdr_light_advanced")),
    ("light_parameters", "level"): Rule("number", low=0, high=1),
    ("color_parameters", "type"): Rule("choice", ("contrast", "hdr_light", "hdr_light_advanced")),
    ("color_parameters", "level"): Rule("number", low=0, high=1),
    ("white_balance_parameters", "level"): Rule("number", low=0, high=1),
    ("output_format",): Rule("choice", FORMATS),
    ("quality",): Rule("integer", low=0, high=100),
    ("max_file_size",): Rule("file_size"),
    ("safe",): Rule("boolean"),
    ("nsfw_parameters", "threshold"): Rule("number", low=0, high=1),
    ("nsfw_parameters", "image_url"): Rule("web_image"),
    ("nsfw_parameters", "nsfw_image_url"): Rule("web_image"),
    ("caption", "url"): Rule("web_image"),
    ("caption", "position"): Rule("choice", POSITIONS),
    ("caption", "target_width_percentage"): Rule("number", low=0, high=100),
    ("caption", "padding"): Rule("integer", low=0),
    ("caption", "opacity"): Rule("number", low=0, high=100),
    ("preset",): Rule("choice", PRESETS, open_vocabulary=True),
    ("print_size",): Rule("choice", tuple(PAPER)),
    ("dpi",): Rule("integer"),
    ("print_reorientation",): Rule("boolean"),
}
# Objects that hold the fields above.
CONTAINERS = {path[:n] for path in VENDOR_RULES for n in range(1, len(path))}
# Requirements the vendor documents, checked by `_complete` / broken by `_break_requirement`:
# - an image (url) or a generation (background.generate): "File or image url is required";
# - url for the adapters in NEEDS_IMAGE: the same message (generative_upscale needs no url of
#   its own: the "generate image in high resolution" example upscales a generated image);
# - img2img: url or context_images; inpainting: ip_image2 (the mask); caption: url.

# --- Valid values ----------------------------------------------------------------------------

WEB_URL = st.sampled_from(
    [
        "https://deep-image.ai/api-example.png",
        "http://example.com/a.jpg",
        "https://cdn.example.org/path/to/image.webp?size=large&v=2",
        "HTTPS://EXAMPLE.COM/UPPER.PNG",
        "https://[2001:db8::1]:8443/a.png",
    ]
)
IMAGE = st.one_of(
    WEB_URL,
    st.sampled_from(
        [
            "storage://my-s3/photos/a.jpg",
            "storage://dropbox/deep/folder/b.png",
            f"base64,{INLINE_PNG}",
            f"data:image/png;base64,{INLINE_PNG}",
        ]
    ),
)
TEXT = st.text(max_size=40)


def _bounded_int(rule: Rule) -> st.SearchStrategy[int]:
    low = int(rule.low) if rule.low is not None else -JSON_INTEGER
    high = int(rule.high) if rule.high is not None else JSON_INTEGER
    return st.integers(low, high)


def _bounded_number(rule: Rule) -> st.SearchStrategy[Any]:
    low = rule.low if rule.low is not None else -1e9
    high = rule.high if rule.high is not None else 1e9
    return st.one_of(
        st.integers(int(low), int(high)),
        st.floats(low, high, allow_nan=False, allow_infinity=False),
    )


def _size(rule: Rule) -> st.SearchStrategy[Any]:
    low = int(rule.low or 0)
    pixels = st.integers(low, 20_000)
    percent = st.one_of(
        st.integers(max(low, 1), 800).map(lambda p: f"{p}%"),
        st.decimals(1, 800, places=2, allow_nan=False).map(lambda d: f"{d}%"),
    )
    return st.one_of(pixels, percent, pixels.map(str))


def _file_size() -> st.SearchStrategy[Any]:
    unit = st.sampled_from(["", "kb", "KB", "mb", "MB", "Mb", "gb", "GB"])
    return st.one_of(
        st.integers(1, JSON_INTEGER),
        st.builds(lambda n, u: f"{n}{u}", st.integers(1, 100_000), unit),
        st.builds(lambda n, u: f"{n}.5{u}", st.integers(0, 100), unit),
    )


def valid_value(rule: Rule) -> st.SearchStrategy[Any]:
    kind = rule.kind
    if kind == "image":
        return IMAGE
    if kind == "web_image":
        return WEB_URL
    if kind == "web_images":
        return st.lists(WEB_URL, min_size=1, max_size=20)
    if kind == "storage_folder":
        return st.sampled_from(["storage://my-s3/", "storage://my-s3/results/", "storage://g/a/b"])
    if kind == "size":
        return _size(rule)
    if kind == "integer":
        return _bounded_int(rule)
    if kind == "number":
        return _bounded_number(rule)
    if kind == "boolean":
        return st.booleans()
    if kind == "text":
        return TEXT
    if kind == "choice":
        return st.sampled_from(rule.values)
    if kind == "choices":
        return st.lists(st.sampled_from(rule.values), max_size=10)
    if kind == "fit":
        return st.one_of(
            st.sampled_from(FITS), st.sampled_from(CROPS).map(lambda crop: {"crop": crop})
        )
    if kind == "file_size":
        return _file_size()
    raise AssertionError(kind)


def _set(payload: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = payload
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _get(payload: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = payload
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _complete(payload: dict[str, Any], image: str | None) -> dict[str, Any]:
    """Make a payload meet the vendor's documented requirements."""
    generate = payload.get("background", {}).get("generate")
    if image is not None:
        payload["url"] = image
    else:
        payload.pop("url", None)
        if generate is None:
            _set(payload, ("background", "generate", "description"), "a red bicycle")
            generate = payload["background"]["generate"]
        if generate.get("adapter_type") in NEEDS_IMAGE:
            del generate["adapter_type"]
        if generate.get("adapter_type") == "img2img" and not generate.get("context_images"):
            generate["context_images"] = ["https://example.com/context.png"]
    if generate is not None and generate.get("adapter_type") == "inpainting":
        generate.setdefault("ip_image2", "https://example.com/mask.png")
    if "caption" in payload:
        payload["caption"].setdefault("url", "https://example.com/logo.png")
    return payload


@st.composite
def vendor_payloads(draw: st.DrawFn) -> dict[str, Any]:
    """A processing request Deep-Image's documented rules accept."""
    paths = draw(st.sets(st.sampled_from(sorted(VENDOR_RULES)), max_size=12))
    payload: dict[str, Any] = {}
    for path in sorted(paths):
        _set(payload, path, draw(valid_value(VENDOR_RULES[path])))
    image = draw(st.one_of(st.none(), IMAGE))
    return _complete(payload, image)


# --- One broken rule -------------------------------------------------------------------------

# Values of the wrong JSON type, for every kind.
WRONG_TYPES: dict[str, list[Any]] = {
    "image": [5, ["https://example.com/a.png"], {"href": "x"}, True],
    "web_image": [5, [], True],
    "web_images": ["https://example.com/a.png", [5], ["ftp://x/y.png"], {}],
    "storage_folder": [5, "s3://bucket/folder/", "https://example.com/out/", "storage://"],
    "size": [1.5, 1024.0, True, "wide", "-5%", "50 %", "0x10", [100], {"px": 1}],
    "integer": [1.5, "7", True, [1], {}],
    "number": ["0.5", True, [0.5], {}],
    "boolean": [1, 0, "true", "yes", []],
    "text": [5, ["a"], {"a": 1}, False],
    "choice": [5, ["x"], {}, True],
    "choices": ["denoise", [5], [["light"]], {}],
    "fit": ["stretch", {"crop": "face"}, {}, ["crop"], 5],
    "file_size": [0, -1, "0kb", "5tb", "1 MB", True, 1.5, ["1MB"]],
}


def invalid_value(rule: Rule) -> st.SearchStrategy[Any]:
    options: list[st.SearchStrategy[Any]] = [st.sampled_from(WRONG_TYPES[rule.kind])]
    if rule.kind == "choice" and not rule.open_vocabulary:
        options.append(
            st.sampled_from(rule.values).map(lambda v: v.upper() if v.upper() != v else v + "x")
        )
        options.append(st.sampled_from(["", "unknown", "arch-a", "a11", "dall-e"]))
    if rule.kind == "choices":
        options.append(st.sampled_from([["sharpen"], ["denoise", "Light"]]))
    if rule.kind in ("image", "web_image"):
        options.append(
            st.sampled_from(
                ["ftp://x/y.png", "not a url", "", "https://", "https://exa mple.com/a.png"]
            )
        )
    if rule.kind == "image":
        options.append(st.sampled_from(["storage://s3", "storage://s3/", "storage:///a.png"]))
    if rule.kind == "web_image":
        options.append(st.just(f"base64,{INLINE_PNG}"))
    if rule.kind == "size":
        options.append(st.integers(-1000, int(rule.low or 0) - 1))
        if rule.low:
            options.append(st.sampled_from(["0%", "0.0%", "0"]))
    if rule.kind in ("integer", "number"):
        if rule.low is not None:
            options.append(st.integers(int(rule.low) - 1000, int(rule.low) - 1))
            options.append(st.floats(rule.low - 10, rule.low, exclude_max=True))
        if rule.high is not None:
            options.append(st.integers(int(rule.high) + 1, int(rule.high) + 1000))
            options.append(st.floats(rule.high, rule.high + 10, exclude_min=True))
    return st.one_of(options)


def _error_at(messages: Any, path: tuple[str, ...]) -> bool:
    node = messages
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return bool(node)


@st.composite
def payloads_breaking_one_field(draw: st.DrawFn) -> tuple[dict[str, Any], tuple[str, ...]]:
    payload = draw(vendor_payloads())
    path = draw(st.sampled_from(sorted(VENDOR_RULES)))
    rule = VENDOR_RULES[path]
    value = draw(invalid_value(rule))
    _set(payload, path, value)
    # Keep the rest valid: an image reference broken in url must not leave a payload that
    # also lacks an image for another reason, so give it a generation to do as well.
    if path == ("url",):
        _set(payload, ("background", "generate", "adapter_type"), "generate_background")
    if path == ("background", "generate", "adapter_type") and "url" not in payload:
        payload["url"] = "https://example.com/a.png"
    if path == ("background", "generate", "context_images") and "url" not in payload:
        payload["url"] = "https://example.com/a.png"
    return payload, path


# Requirements the vendor documents, each broken on its own, and the field named.
Breaker = Callable[[dict[str, Any]], tuple[str, ...]]


def _drop_image_and_generation(payload: dict[str, Any]) -> tuple[str, ...]:
    payload.pop("url", None)
    payload.get("background", {}).pop("generate", None)
    return ("_schema",)


def _image_adapter_without_url(payload: dict[str, Any]) -> tuple[str, ...]:
    payload.pop("url", None)
    generate = payload.setdefault("background", {}).setdefault("generate", {})
    generate["adapter_type"] = "control"
    return ("url",)


def _upscale_without_image_or_generation(payload: dict[str, Any]) -> tuple[str, ...]:
    payload.pop("url", None)
    payload.get("background", {}).pop("generate", None)
    payload["generative_upscale"] = True
    return ("_schema",)


def _img2img_without_an_image(payload: dict[str, Any]) -> tuple[str, ...]:
    payload.pop("url", None)
    generate = payload.setdefault("background", {}).setdefault("generate", {})
    generate["adapter_type"] = "img2img"
    generate.pop("context_images", None)
    return ("url",)


def _inpainting_without_mask(payload: dict[str, Any]) -> tuple[str, ...]:
    payload["url"] = "https://example.com/a.png"
    generate = payload.setdefault("background", {}).setdefault("generate", {})
    generate["adapter_type"] = "inpainting"
    generate.pop("ip_image2", None)
    return ("background", "generate", "ip_image2")


def _caption_without_url(payload: dict[str, Any]) -> tuple[str, ...]:
    payload["caption"] = {"position": "RB"}
    return ("caption", "url")


REQUIREMENT_BREAKERS: list[Breaker] = [
    _drop_image_and_generation,
    _image_adapter_without_url,
    _upscale_without_image_or_generation,
    _img2img_without_an_image,
    _inpainting_without_mask,
    _caption_without_url,
]


# --- The two implementations under test ------------------------------------------------------


def intake(payload: Any) -> dict[str, Any]:
    """Load through intake; return the error messages ({} when accepted)."""
    try:
        ProcessRequestSchema().load(copy.deepcopy(payload))
    except ValidationError as exc:
        return exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    return {}


def simulator_accepts(payload: Any) -> bool:
    try:
        validate_process_request(copy.deepcopy(payload), None, max_pixels_side=NO_PIXEL_LIMIT)
    except SimulatorError as exc:
        assert exc.status == 400
        return False
    return True


def forwarded(payload: dict[str, Any]) -> dict[str, Any]:
    """What genrelay would send upstream for ``payload``, minus the webhooks it adds itself.

    The handler loads the body with GenerationCreateSchema, the service stores ``input`` in a
    JSON column, and the submit task sends ``dict(generation.input)`` plus ``webhooks``.
    """
    loaded = GenerationCreateSchema().load({"input": copy.deepcopy(payload)})["input"]
    stored = json.loads(json.dumps(loaded))
    sent = {**dict(stored), "webhooks": {"complete": "https://relay.example/cb"}}
    del sent["webhooks"]
    return sent


# --- Properties ------------------------------------------------------------------------------


@SETTINGS
@given(vendor_payloads())
def test_a_payload_the_vendor_accepts_is_accepted_by_intake_and_the_simulator(
    payload: dict[str, Any],
) -> None:
    assert intake(payload) == {}
    assert simulator_accepts(payload)


@SETTINGS
@given(payloads_breaking_one_field())
def test_a_payload_breaking_one_field_rule_is_refused_naming_that_field(
    case: tuple[dict[str, Any], tuple[str, ...]],
) -> None:
    payload, path = case
    messages = intake(payload)
    assert _error_at(messages, path), (path, messages)
    assert not simulator_accepts(payload)


@SETTINGS
@given(vendor_payloads(), st.sampled_from(REQUIREMENT_BREAKERS))
def test_a_payload_breaking_one_requirement_is_refused_naming_the_field(
    payload: dict[str, Any], breaker: Breaker
) -> None:
    path = breaker(payload)
    messages = intake(payload)
    assert _error_at(messages, path), (breaker.__name__, messages)
    assert not simulator_accepts(payload)


@SETTINGS
@given(vendor_payloads())
def test_what_intake_accepts_is_forwarded_unchanged(payload: dict[str, Any]) -> None:
    loaded = ProcessRequestSchema().load(copy.deepcopy(payload))
    assert loaded == payload
    # Exactly, down to 1 vs 1.0 and key order irrelevance: compare the JSON text too.
    assert json.dumps(loaded, sort_keys=True) == json.dumps(payload, sort_keys=True)
    assert forwarded(payload) == payload


# The defaults of the vendor's OpenAPI description, which its generated client fills in for
# every object it sends.
CLIENT_DEFAULTS: dict[tuple[str, ...], dict[str, Any]] = {
    (): {"fit": "canvas", "quality": 85, "dpi": 300, "print_reorientation": True},
    ("background",): {"remove": "auto"},
    ("background", "generate"): {"adapter_type": "generate_background", "item_area_percentage": 1},
    ("denoise_parameters",): {"type": "v1"},
    ("deblur_parameters",): {"type": "v1"},
    ("light_parameters",): {"level": 1},
    ("color_parameters",): {"level": 1},
    ("white_balance_parameters",): {"level": 1},
}


@SETTINGS
@given(vendor_payloads())
def test_the_defaults_the_vendor_client_fills_in_change_no_verdict(
    payload: dict[str, Any],
) -> None:
    for path, defaults in CLIENT_DEFAULTS.items():
        present, node = _get(payload, path) if path else (True, payload)
        if present:
            for field, default in defaults.items():
                node.setdefault(field, default)
    assert intake(payload) == {}
    assert simulator_accepts(payload)
    assert forwarded(payload) == payload


@SETTINGS
@given(vendor_payloads(), st.integers(JSON_INTEGER + 1, 2**200))
def test_integers_beyond_json_precision_are_refused_naming_the_field(
    payload: dict[str, Any], huge: int
) -> None:
    # A deliberate difference (docs/compatibility.md): the simulator, like Deep-Image, takes them.
    payload.setdefault("background", {}).setdefault("generate", {})["sample_num"] = huge
    assert _error_at(intake(payload), ("background", "generate", "sample_num"))


def test_the_model_covers_every_field_intake_knows() -> None:
    """Every field of the intake schema, except the reserved webhooks, is described here."""

    def paths(schema: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
        out: set[tuple[str, ...]] = set()
        for name, field in schema.fields.items():
            nested = getattr(field, "schema", None)
            if nested is not None and hasattr(nested, "fields"):
                out |= paths(nested, (*prefix, name))
            else:
                out.add((*prefix, name))
        return out

    assert paths(ProcessRequestSchema()) - {("webhooks",)} == set(VENDOR_RULES)
    assert len(PAPER) == len(set(PAPER)) == 74


@pytest.mark.parametrize("path", sorted(CONTAINERS))
def test_a_container_of_the_wrong_type_is_refused_naming_it(path: tuple[str, ...]) -> None:
    payload: dict[str, Any] = {"url": "https://example.com/a.png"}
    _set(payload, path, "not an object")
    assert _error_at(intake(payload), path)
    assert not simulator_accepts(payload)
