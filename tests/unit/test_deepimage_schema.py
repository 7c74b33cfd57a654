"""Behaviour of the Deep-Image request schema (schemas/deepimage.py)."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, ValidationError, fields

from schemas.deepimage import (
    ADAPTER_TYPES,
    MAX_JSON_INTEGER,
    MODEL_TYPES,
    PRINT_SIZES,
    WEBHOOKS_RESERVED_MESSAGE,
    ProcessRequestSchema,
    model_type_of,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "seed_examples.json"
SEED_EXAMPLES: dict[str, dict[str, Any]] = json.loads(FIXTURES.read_text(encoding="utf-8"))

IMAGE = "https://deep-image.ai/api-example.png"
MASK = "https://example.com/images/mask.png"
LOGO = "https://example.com/brand/logo.png"


def with_url(**top: Any) -> dict[str, Any]:
    """A request that processes an input image."""
    return {"url": IMAGE, **top}


def text_to_image(**generate: Any) -> dict[str, Any]:
    """A pure text-to-image request, with extra background.generate fields."""
    return {
        "width": 1024,
        "height": 768,
        "background": {"generate": {"description": "a red bicycle", **generate}},
    }


def with_generate(**generate: Any) -> dict[str, Any]:
    """A request with an input image and a background.generate block."""
    return {"url": IMAGE, "background": {"generate": {"description": "on a beach", **generate}}}


def with_background(**background: Any) -> dict[str, Any]:
    return {"url": IMAGE, "background": background}


def caption(**fields_: Any) -> dict[str, Any]:
    return with_url(caption={"url": LOGO, **fields_})


# The companions each adapter needs besides url (img2img needs no url at all).
ADAPTER_COMPANIONS: dict[str, dict[str, Any]] = {
    "generate_background": {},
    "face": {},
    "control": {},
    "control2": {},
    "upscale": {},
    "inpainting": {"ip_image2": MASK},
    "img2img": {"context_images": [IMAGE]},
}


def load(payload: Any) -> Any:
    return ProcessRequestSchema().load(payload)


def assert_loads_unchanged(payload: dict[str, Any]) -> None:
    """The loaded dict equals the input, down to int-vs-float and key sets."""
    loaded = load(copy.deepcopy(payload))
    assert loaded == payload
    assert json.dumps(loaded, sort_keys=True) == json.dumps(payload, sort_keys=True)


def messages_at(messages: Any, path: tuple[Any, ...]) -> Any:
    node = messages
    for key in path:
        assert isinstance(node, dict) and key in node, f"no error at {path}: {messages}"
        node = node[key]
    return node


# --- Seed fixtures ---------------------------------------------------------------------------


def test_seed_fixture_file_holds_the_documented_examples() -> None:
    assert list(SEED_EXAMPLES) == [
        "text_only",
        "text_only_fantasy",
        "text_only_premium",
        "generate_background",
        "face",
        "control",
        "generative_upscale",
        "reference_full_example",
        "inpainting",
        "generative_upscale_text_to_image",
    ]
    assert all(isinstance(payload, dict) for payload in SEED_EXAMPLES.values())


@pytest.mark.parametrize("name", list(SEED_EXAMPLES))
def test_seed_example_loads_unchanged(name: str) -> None:
    assert_loads_unchanged(SEED_EXAMPLES[name])


# --- Valid requests --------------------------------------------------------------------------

VALID: list[tuple[str, dict[str, Any]]] = [
    # url forms: http(s), base64, storage://
    ("url_https", with_url()),
    ("url_http", {"url": "http://example.com/a.jpg"}),
    ("url_uppercase_scheme", {"url": "HTTPS://example.com/a.jpg"}),
    ("url_with_query", {"url": "https://example.com/a.jpg?x=1&y=%20"}),
    ("url_long", {"url": "https://example.com/" + "a" * 10_000}),
    ("url_base64_prefix", {"url": "base64,iVBORw0KGgoAAAANSUhEUg=="}),
    ("url_data_uri", {"url": "data:image/png;base64,iVBORw0KGgo="}),
    ("url_base64_with_line_breaks", {"url": "base64,iVBOR\r\nw0KGgo="}),
    ("url_storage", {"url": "storage://my-s3/photos/a.jpg"}),
    # size (§2.4)
    ("width_min_pixels", with_url(width=1)),
    ("width_max_pixels", with_url(width=16384)),
    ("width_percent", with_url(width="200%")),
    ("width_percent_decimals", with_url(width="150.5%")),
    ("width_percent_small", with_url(width="0.5%")),
    ("width_percent_max", with_url(width="1000%")),
    ("height_min_pixels", with_url(height=1)),
    ("height_max_pixels", with_url(height=16384)),
    ("height_percent", with_url(height="400%")),
    ("width_pixels_height_percent", with_url(width=300, height="400%")),
    ("min_length_min", with_url(min_length=1)),
    ("min_length_max", with_url(min_length=16384)),
    ("padding_zero", with_url(padding=0)),
    ("padding_max_pixels", with_url(padding=16384)),
    ("padding_zero_percent", with_url(padding="0%")),
    ("padding_max_percent", with_url(padding="100%")),
    *((f"fit_{mode}", with_url(fit=mode)) for mode in ("canvas", "crop", "bounds", "cover")),
    *((f"fit_crop_{mode}", with_url(fit={"crop": mode})) for mode in ("item", "content", "center")),
    # background (§2.3)
    *(
        (f"background_remove_{mode}", with_background(remove=mode))
        for mode in ("auto", "v2", "human", "item", "generative")
    ),
    ("background_generative_prompt", with_background(remove="generative", prompt="the chair")),
    *(
        (f"background_color_{name}", with_background(remove="auto", color=color))
        for name, color in [
            ("auto", "auto"),
            ("transparent", "transparent"),
            ("hex3", "#fff"),
            ("hex4", "#fff8"),
            ("hex6", "#FFFFFF"),
            ("hex8", "#FFFFFF80"),
            ("rgb", "rgb(255, 0, 0)"),
            ("rgba", "rgba(0,0,0,0.5)"),
            ("rgb_percent", "rgb(100%, 0%, 0%)"),
            ("hsl", "hsl(120, 50%, 50%)"),
            ("hsv", "hsv(120, 50%, 50%)"),
            ("name", "white"),
            ("mixed_case_name", "DarkSlateGray"),
        ]
    ),
    ("background_replace", with_background(replace="https://example.com/beach.jpg")),
    # background.generate (§2.1)
    *((f"model_type_{model}", text_to_image(model_type=model)) for model in MODEL_TYPES),
    *(
        (f"adapter_type_{adapter}", with_generate(adapter_type=adapter, **companions))
        for adapter, companions in ADAPTER_COMPANIONS.items()
    ),
    (
        "img2img_without_url_or_size",
        {
            "background": {
                "generate": {
                    "description": "put the car in front of a showroom",
                    "model_type": "gemini-3-pro-image-preview",
                    "adapter_type": "img2img",
                    "context_images": [IMAGE, MASK],
                }
            }
        },
    ),
    ("img2img_with_size", {**text_to_image(adapter_type="img2img", context_images=[IMAGE])}),
    ("context_images_max", with_generate(adapter_type="img2img", context_images=[IMAGE] * 16)),
    ("description_one_char", text_to_image(description="x")),
    ("description_4000_chars", text_to_image(description="x" * 4000)),
    ("sample_num_zero", text_to_image(sample_num=0)),
    ("sample_num_max", text_to_image(sample_num=2**32 - 1)),
    ("face_id_true", with_generate(adapter_type="face", face_id=True)),
    ("face_id_false", with_generate(adapter_type="face", face_id=False)),
    ("controlnet_scale_zero_int", with_generate(controlnet_conditioning_scale=0)),
    ("controlnet_scale_one_int", with_generate(controlnet_conditioning_scale=1)),
    ("controlnet_scale_float", with_generate(controlnet_conditioning_scale=0.5)),
    ("item_area_tiny", with_generate(item_area_percentage=0.0001)),
    ("item_area_one", with_generate(item_area_percentage=1)),
    ("generate_color", with_generate(color="#00FF00")),
    ("prompts", with_generate(additional_prompt="sunset", negative_prompt="people")),
    ("empty_additional_prompt", with_generate(additional_prompt="")),
    (
        "face_swap",
        with_generate(
            adapter_type="face",
            ip_image2=MASK,
            strength=0.1,
            avatar_generation_type="creative_img2img",
        ),
    ),
    ("strength_bounds", with_generate(strength=0)),
    ("strength_max", with_generate(strength=1.0)),
    # upscale (§2.4)
    ("generative_upscale", with_url(generative_upscale=True)),
    ("generative_upscale_false", with_url(generative_upscale=False)),
    # generative upscale of a generated image: the generate-in-high-resolution docs example
    ("generative_upscale_without_url", {**text_to_image(), "generative_upscale": True}),
    (
        "generative_upscale_text_to_image_with_strength",
        {**text_to_image(), "generative_upscale": True, "upscale_strength": 5},
    ),
    ("upscale_strength_min", with_url(generative_upscale=True, upscale_strength=1)),
    ("upscale_strength_max", with_url(generative_upscale=True, upscale_strength=9)),
    ("upscale_parameters_v1", with_url(upscale_parameters={"type": "v1"})),
    ("upscale_parameters_text", with_url(upscale_parameters={"type": "text_x4"})),
    # enhancements (§2.5)
    (
        "all_enhancements",
        with_url(
            enhancements=[
                "denoise",
                "deblur",
                "clean",
                "face_enhance",
                "light",
                "color",
                "white_balance",
                "exposure_correction",
            ]
        ),
    ),
    ("no_enhancements", with_url(enhancements=[])),
    (
        "enhancement_parameters",
        with_url(
            enhancements=["denoise", "deblur", "light", "color", "white_balance"],
            denoise_parameters={"type": "v2"},
            deblur_parameters={"type": "v1"},
            light_parameters={"type": "hdr_light_advanced", "level": 0.8},
            color_parameters={"type": "contrast", "level": 0},
            white_balance_parameters={"level": 1},
        ),
    ),
    ("tone_type_only", with_url(enhancements=["light"], light_parameters={"type": "hdr_light"})),
    # output (§2.6)
    *((f"output_format_{fmt}", with_url(output_format=fmt)) for fmt in ("jpeg", "jpg", "png")),
    ("output_format_webp", with_url(output_format="webp")),
    ("quality_min", with_url(quality=0)),
    ("quality_max", with_url(quality=100)),
    ("max_file_size_one_byte", with_url(max_file_size=1)),
    ("max_file_size_max_bytes", with_url(max_file_size=10 * 1024**3)),
    *(
        (f"max_file_size_{size}", with_url(max_file_size=size))
        for size in ("500kb", "1MB", "10mb", "1gb", "10GB", "1.5Mb")
    ),
    ("max_file_size_with_jpeg", with_url(output_format="jpeg", max_file_size="1MB")),
    ("max_file_size_with_webp", with_url(output_format="webp", max_file_size=500_000)),
    ("safe", with_url(safe=True)),
    ("nsfw_threshold_bounds", with_url(safe=True, nsfw_parameters={"threshold": 0})),
    (
        "nsfw_image_url",
        with_url(safe=True, nsfw_parameters={"threshold": 1, "image_url": LOGO}),
    ),
    ("nsfw_image_url_alias", with_url(nsfw_parameters={"nsfw_image_url": LOGO})),
    ("caption_url_only", caption()),
    *(
        (f"caption_position_{position}", caption(position=position))
        for position in ("LT", "MT", "RT", "LM", "MM", "RM", "LB", "MB", "RB", "ML", "BR", "TL")
    ),
    (
        "caption_bounds_low",
        caption(target_width_percentage=1, padding=0, opacity=0),
    ),
    (
        "caption_bounds_high",
        caption(target_width_percentage=100, padding=16384, opacity=100),
    ),
    ("caption_fractional_percentages", caption(target_width_percentage=12.5, opacity=50.5)),
    *((f"preset_{name}", with_url(preset=name)) for name in ("real_estate", "ecommerce_upscaled")),
    ("preset_custom", with_url(preset="my_preset_2")),
    ("preset_64_chars", with_url(preset="p" * 64)),
    *(
        (f"print_size_{size}", with_url(print_size=size))
        for size in ("a0", "a10", "b5", "c10", "letter", "ledger", "archa", "arche1", "11x17")
    ),
    ("dpi_min", with_url(print_size="a4", dpi=1)),
    ("dpi_max", with_url(print_size="a4", dpi=2400, print_reorientation=False)),
    ("target_folder", with_url(target="storage://my-s3/results/")),
    ("target_storage_root", with_url(target="storage://dropbox/")),
]


@pytest.mark.parametrize(("payload"), [pytest.param(p, id=name) for name, p in VALID])
def test_valid_request_loads_unchanged(payload: dict[str, Any]) -> None:
    assert_loads_unchanged(payload)


def test_a_large_base64_image_is_accepted() -> None:
    # The body limit of POST /v1/generations bounds it; the field itself has no limit.
    large = "base64," + "A" * (4 * 1024 * 1024)
    assert load({"url": large}) == {"url": large}


# --- Invalid requests ------------------------------------------------------------------------

NAN = float("nan")
INF = float("inf")
HUGE = 10**400

INVALID: list[tuple[str, Any, tuple[Any, ...]]] = [
    # nothing to do
    ("empty_object", {}, ("_schema",)),
    ("size_only", {"width": 100, "height": 100}, ("_schema",)),
    ("background_removal_without_url", {"background": {"remove": "auto"}}, ("_schema",)),
    ("unknown_top_level_field", with_url(foo=1), ("foo",)),
    (
        "legacy_remove_background_shape",
        with_url(remove_background={"type": "auto"}),
        ("remove_background",),
    ),
    # url
    ("url_number", {"url": 123}, ("url",)),
    ("url_null", {"url": None}, ("url",)),
    ("url_list", {"url": [IMAGE]}, ("url",)),
    ("url_ftp", {"url": "ftp://example.com/a.jpg"}, ("url",)),
    ("url_no_host", {"url": "https://"}, ("url",)),
    ("url_relative", {"url": "/images/a.jpg"}, ("url",)),
    ("url_plain_text", {"url": "not a url"}, ("url",)),
    ("url_with_space", {"url": "https://exa mple.com/a.jpg"}, ("url",)),
    ("url_bad_ipv6", {"url": "http://[::1/a.jpg"}, ("url",)),
    ("url_port_out_of_range", {"url": "http://example.com:99999/a.jpg"}, ("url",)),
    ("url_port_not_a_number", {"url": "http://example.com:xx/a.jpg"}, ("url",)),
    ("url_port_zero", {"url": "http://example.com:0/a.jpg"}, ("url",)),
    ("url_empty_base64", {"url": "base64,"}, ("url",)),
    ("url_base64_not_base64", {"url": "base64,@@@"}, ("url",)),
    ("url_empty_data_uri", {"url": "data:image/png;base64,"}, ("url",)),
    ("url_data_uri_not_image", {"url": "data:text/plain;base64,aGk="}, ("url",)),
    ("url_storage_without_path", {"url": "storage://my-s3"}, ("url",)),
    ("url_storage_without_name", {"url": "storage:///a.jpg"}, ("url",)),
    # width / height / min_length / padding
    *(
        (f"width_{name}", with_url(width=value), ("width",))
        for name, value in [
            ("zero", 0),
            ("negative", -1),
            ("huge", HUGE),
            ("float", 1.5),
            ("whole_float", 1024.0),
            ("bool", True),
            ("zero_percent", "0%"),
            ("negative_percent", "-5%"),
            ("percent_with_space", "50 %"),
            ("percent_trailing_dot", "50.%"),
            ("word", "wide"),
            ("null", None),
            ("object", {"a": 1}),
            ("list", [100]),
            ("nan", NAN),
        ]
    ),
    ("height_bool", with_url(height=False), ("height",)),
    ("min_length_zero", with_url(min_length=0), ("min_length",)),
    ("min_length_float", with_url(min_length=1.5), ("min_length",)),
    ("min_length_huge", with_url(min_length=HUGE), ("min_length",)),
    ("padding_negative", with_url(padding=-1), ("padding",)),
    ("padding_word", with_url(padding="wide"), ("padding",)),
    # fit
    ("fit_unknown_mode", with_url(fit="stretch"), ("fit",)),
    ("fit_unknown_crop", with_url(fit={"crop": "face"}), ("fit",)),
    ("fit_crop_extra_key", with_url(fit={"crop": "item", "x": 1}), ("fit",)),
    ("fit_empty_object", with_url(fit={}), ("fit",)),
    ("fit_crop_unhashable", with_url(fit={"crop": ["item"]}), ("fit",)),
    ("fit_list", with_url(fit=["crop"]), ("fit",)),
    ("fit_null", with_url(fit=None), ("fit",)),
    # background
    ("background_string", with_url(background="white"), ("background",)),
    ("background_list", with_url(background=[]), ("background",)),
    ("background_null", with_url(background=None), ("background",)),
    ("background_unknown_field", with_background(foo=1), ("background", "foo")),
    ("background_remove_unknown", with_background(remove="magic"), ("background", "remove")),
    ("background_color_number", with_background(color=123), ("background", "color")),
    ("background_replace_ftp", with_background(replace="ftp://x/y.jpg"), ("background", "replace")),
    # background.generate
    ("generate_string", with_url(background={"generate": "a cat"}), ("background", "generate")),
    ("generate_null", with_url(background={"generate": None}), ("background", "generate")),
    ("generate_unknown_field", with_generate(seed=1), ("background", "generate", "seed")),
    *(
        (
            f"model_type_{name}",
            text_to_image(model_type=value),
            ("background", "generate", "model_type"),
        )
        for name, value in [("unknown", "dall-e"), ("wrong_case", "Realistic"), ("number", 1)]
    ),
    ("description_number", text_to_image(description=5), ("background", "generate", "description")),
    (
        "description_list",
        text_to_image(description=["a"]),
        ("background", "generate", "description"),
    ),
    *(
        (
            f"sample_num_{name}",
            text_to_image(sample_num=value),
            ("background", "generate", "sample_num"),
        )
        for name, value in [
            ("huge", HUGE),
            ("float", 1.5),
            ("string", "1"),
            ("bool", True),
        ]
    ),
    (
        "adapter_type_unknown",
        with_generate(adapter_type="magic"),
        ("background", "generate", "adapter_type"),
    ),
    (
        "face_id_string",
        with_generate(adapter_type="face", face_id="true"),
        ("background", "generate", "face_id"),
    ),
    (
        "face_id_one",
        with_generate(adapter_type="face", face_id=1),
        ("background", "generate", "face_id"),
    ),
    *(
        (
            f"controlnet_scale_{name}",
            with_generate(controlnet_conditioning_scale=value),
            ("background", "generate", "controlnet_conditioning_scale"),
        )
        for name, value in [
            ("negative", -0.1),
            ("above_one", 1.1),
            ("nan", NAN),
            ("infinity", INF),
            ("bool", True),
            ("string", "0.5"),
            ("huge", HUGE),
        ]
    ),
    (
        "item_area_above_one",
        with_generate(item_area_percentage=1.01),
        ("background", "generate", "item_area_percentage"),
    ),
    (
        "negative_prompt_number",
        with_generate(negative_prompt=1),
        ("background", "generate", "negative_prompt"),
    ),
    (
        "inpainting_without_mask",
        with_generate(adapter_type="inpainting"),
        ("background", "generate", "ip_image2"),
    ),
    (
        "ip_image2_not_url",
        with_generate(ip_image2="mask.png"),
        ("background", "generate", "ip_image2"),
    ),
    (
        "context_images_bad_item",
        with_generate(adapter_type="img2img", context_images=[IMAGE, "x"]),
        ("background", "generate", "context_images", 1),
    ),
    (
        "context_images_string",
        with_generate(adapter_type="img2img", context_images=IMAGE),
        ("background", "generate", "context_images"),
    ),
    # adapters that read an input image need one (Deep-Image: "File or image url is required")
    *(
        (
            f"adapter_{adapter}_without_url",
            text_to_image(adapter_type=adapter, **companions),
            ("url",),
        )
        for adapter, companions in ADAPTER_COMPANIONS.items()
        if adapter not in ("img2img", "generate_background")
    ),
    (
        "img2img_without_url_or_context_images",
        text_to_image(adapter_type="img2img"),
        ("url",),
    ),
    (
        "img2img_without_url_and_empty_context_images",
        text_to_image(adapter_type="img2img", context_images=[]),
        ("url",),
    ),
    # upscale
    (
        "generative_upscale_without_url_or_generate",
        {"width": 2048, "generative_upscale": True},
        ("_schema",),
    ),
    ("generative_upscale_string", with_url(generative_upscale="true"), ("generative_upscale",)),
    ("generative_upscale_one", with_url(generative_upscale=1), ("generative_upscale",)),
    (
        "upscale_strength_zero",
        with_url(generative_upscale=True, upscale_strength=0),
        ("upscale_strength",),
    ),
    (
        "upscale_strength_ten",
        with_url(generative_upscale=True, upscale_strength=10),
        ("upscale_strength",),
    ),
    (
        "upscale_parameters_unknown_type",
        with_url(upscale_parameters={"type": "v3"}),
        ("upscale_parameters", "type"),
    ),
    (
        "upscale_parameters_unknown_field",
        with_url(upscale_parameters={"scale": 2}),
        ("upscale_parameters", "scale"),
    ),
    ("upscale_parameters_string", with_url(upscale_parameters="v1"), ("upscale_parameters",)),
    # enhancements
    ("enhancements_string", with_url(enhancements="denoise"), ("enhancements",)),
    ("enhancements_unknown", with_url(enhancements=["sharpen"]), ("enhancements", 0)),
    ("enhancements_number", with_url(enhancements=["light", 1]), ("enhancements", 1)),
    ("enhancements_nested_list", with_url(enhancements=[["light"]]), ("enhancements", 0)),
    ("enhancements_null", with_url(enhancements=None), ("enhancements",)),
    (
        "denoise_type_unknown",
        with_url(enhancements=["denoise"], denoise_parameters={"type": "v3"}),
        ("denoise_parameters", "type"),
    ),
    (
        "light_level_above_one",
        with_url(enhancements=["light"], light_parameters={"level": 1.5}),
        ("light_parameters", "level"),
    ),
    (
        "color_type_unknown",
        with_url(enhancements=["color"], color_parameters={"type": "vivid"}),
        ("color_parameters", "type"),
    ),
    (
        "white_balance_negative",
        with_url(enhancements=["white_balance"], white_balance_parameters={"level": -0.1}),
        ("white_balance_parameters", "level"),
    ),
    (
        "white_balance_unknown_field",
        with_url(enhancements=["white_balance"], white_balance_parameters={"type": "v1"}),
        ("white_balance_parameters", "type"),
    ),
    # output
    ("output_format_gif", with_url(output_format="gif"), ("output_format",)),
    ("output_format_upper_case", with_url(output_format="JPG"), ("output_format",)),
    ("quality_negative", with_url(quality=-1), ("quality",)),
    ("quality_above_100", with_url(quality=101), ("quality",)),
    ("quality_float", with_url(quality=85.0), ("quality",)),
    ("quality_string", with_url(quality="85"), ("quality",)),
    ("quality_null", with_url(quality=None), ("quality",)),
    *(
        (f"max_file_size_{name}", with_url(max_file_size=value), ("max_file_size",))
        for name, value in [
            ("zero", 0),
            ("negative", -1),
            ("zero_kb", "0kb"),
            ("space_before_unit", "500 kb"),
            ("terabytes", "5tb"),
            ("negative_string", "-1mb"),
            ("float", 1.5),
            ("bool", True),
            ("huge", HUGE),
            ("list", ["1MB"]),
        ]
    ),
    ("safe_one", with_url(safe=1), ("safe",)),
    ("safe_yes", with_url(safe="yes"), ("safe",)),
    ("safe_null", with_url(safe=None), ("safe",)),
    (
        "nsfw_threshold_above_one",
        with_url(nsfw_parameters={"threshold": 2}),
        ("nsfw_parameters", "threshold"),
    ),
    (
        "nsfw_docs_typo_thresold",
        with_url(nsfw_parameters={"thresold": 0.5}),
        ("nsfw_parameters", "thresold"),
    ),
    (
        "nsfw_image_url_not_url",
        with_url(nsfw_parameters={"image_url": "x"}),
        ("nsfw_parameters", "image_url"),
    ),
    # caption
    ("caption_without_url", with_url(caption={"position": "RB"}), ("caption", "url")),
    ("caption_string", with_url(caption=LOGO), ("caption",)),
    *(
        (f"caption_position_{name}", caption(position=value), ("caption", "position"))
        for name, value in [
            ("unknown_letters", "XX"),
            ("two_horizontal", "LR"),
            ("two_vertical", "TB"),
            ("lower_case", "rb"),
            ("three_letters", "RBX"),
            ("number", 1),
        ]
    ),
    (
        "caption_width_above_100",
        caption(target_width_percentage=101),
        ("caption", "target_width_percentage"),
    ),
    ("caption_padding_negative", caption(padding=-1), ("caption", "padding")),
    ("caption_padding_percent", caption(padding="5%"), ("caption", "padding")),
    ("caption_opacity_above_100", caption(opacity=101), ("caption", "opacity")),
    ("caption_unknown_field", caption(size=10), ("caption", "size")),
    # preset / print / target
    ("preset_list", with_url(preset=["real_estate"]), ("preset",)),
    ("preset_null", with_url(preset=None), ("preset",)),
    ("print_size_upper_case", with_url(print_size="A4"), ("print_size",)),
    ("print_size_a11", with_url(print_size="a11"), ("print_size",)),
    ("print_size_arch_f", with_url(print_size="arch-f"), ("print_size",)),
    *(
        (f"print_size_hyphenated_{size}", with_url(print_size=size), ("print_size",))
        for size in ("arch-a", "arch-b", "arch-c", "arch-d", "arch-e", "arch-e1")
    ),
    ("print_size_number", with_url(print_size=4), ("print_size",)),
    ("dpi_float", with_url(print_size="a4", dpi=300.0), ("dpi",)),
    ("dpi_huge", with_url(print_size="a4", dpi=HUGE), ("dpi",)),
    ("print_reorientation_string", with_url(print_reorientation="true"), ("print_reorientation",)),
    ("target_s3_url", with_url(target="s3://bucket/folder/"), ("target",)),
    ("target_without_name", with_url(target="storage://"), ("target",)),
    ("target_https", with_url(target="https://example.com/folder/"), ("target",)),
    # a trailing newline must not slip past a pattern ($ matches before it in Python)
    ("width_percent_newline", with_url(width="200%\n"), ("width",)),
    ("position_newline", caption(position="RB\n"), ("caption", "position")),
    ("max_file_size_newline", with_url(max_file_size="1MB\n"), ("max_file_size",)),
    ("target_newline", with_url(target="storage://s3/out/\n"), ("target",)),
    # webhooks are genrelay's
    ("webhooks_set", with_url(webhooks={"complete": "https://example.com/hook"}), ("webhooks",)),
    ("webhooks_null", with_url(webhooks=None), ("webhooks",)),
    ("webhooks_empty", with_url(webhooks={}), ("webhooks",)),
]


@pytest.mark.parametrize(
    ("payload", "path"), [pytest.param(p, path, id=name) for name, p, path in INVALID]
)
def test_invalid_request_is_refused_at_the_offending_field(
    payload: Any, path: tuple[Any, ...]
) -> None:
    with pytest.raises(ValidationError) as excinfo:
        load(payload)
    messages = messages_at(excinfo.value.messages, path)
    assert messages, f"empty error at {path}"


def test_invalid_table_names_are_unique() -> None:
    names = [name for name, _, _ in INVALID] + [name for name, _ in VALID]
    assert len(names) == len(set(names))


def test_empty_request_explains_what_is_needed() -> None:
    with pytest.raises(ValidationError) as excinfo:
        load({})
    (message,) = excinfo.value.messages["_schema"]
    assert "url" in message
    assert "background.generate" in message


@pytest.mark.parametrize("value", [{"complete": "https://example.com/hook"}, None, "x"])
def test_webhooks_are_refused_with_a_pointer_to_genrelay(value: Any) -> None:
    with pytest.raises(ValidationError) as excinfo:
        load(with_url(webhooks=value))
    assert excinfo.value.messages == {"webhooks": [WEBHOOKS_RESERVED_MESSAGE]}


def test_generative_upscale_adds_no_missing_image_reason_of_its_own() -> None:
    # Deep-Image documents generative upscale of a generated image; only the adapter needs url.
    payload = {**text_to_image(adapter_type="face"), "generative_upscale": True}
    with pytest.raises(ValidationError) as excinfo:
        load(payload)
    assert excinfo.value.messages == {
        "url": ['url (the input image) is required with adapter_type "face".']
    }


def test_generative_upscale_with_nothing_to_upscale_says_what_is_needed() -> None:
    with pytest.raises(ValidationError) as excinfo:
        load({"width": 2048, "generative_upscale": True})
    messages = excinfo.value.messages
    assert isinstance(messages, dict)
    (message,) = messages["_schema"]
    assert "url" in message
    assert "background.generate" in message


def test_a_hyphenated_paper_name_gets_the_vendor_spelling() -> None:
    with pytest.raises(ValidationError) as excinfo:
        load(with_url(print_size="arch-e1"))
    assert excinfo.value.messages == {"print_size": ['Deep-Image spells this paper size "arche1".']}


def test_unknown_fields_are_refused_with_the_reason() -> None:
    with pytest.raises(ValidationError) as excinfo:
        load(with_generate(seed=1))
    (message,) = excinfo.value.messages["background"]["generate"]["seed"]
    assert "misspell" in message
    assert "docs/compatibility.md" in message


def test_integers_beyond_json_precision_are_refused_with_the_reason() -> None:
    assert (
        load(text_to_image(sample_num=MAX_JSON_INTEGER))["background"]["generate"]["sample_num"]
        == MAX_JSON_INTEGER
    )
    with pytest.raises(ValidationError) as excinfo:
        load(text_to_image(sample_num=MAX_JSON_INTEGER + 1))
    (message,) = excinfo.value.messages["background"]["generate"]["sample_num"]
    assert "JSON" in message


@pytest.mark.parametrize("value", [1e16, -1e300, float(MAX_JSON_INTEGER + 2)])
def test_decimals_beyond_json_precision_are_refused_too(value: float) -> None:
    """PostgreSQL keeps 1e16 as 10000000000000000: it would go upstream as an integer."""
    assert load(text_to_image(strength=1e15))["background"]["generate"]["strength"] == 1e15
    with pytest.raises(ValidationError) as excinfo:
        load(text_to_image(strength=value))
    (message,) = excinfo.value.messages["background"]["generate"]["strength"]
    assert "JSON" in message


@pytest.mark.parametrize("value", [2.0, 1e3])
def test_an_integer_written_as_a_decimal_is_refused_saying_why(value: float) -> None:
    with pytest.raises(ValidationError) as excinfo:
        load(text_to_image(sample_num=value))
    (message,) = excinfo.value.messages["background"]["generate"]["sample_num"]
    assert "decimal point or an exponent" in message


def test_loading_does_not_mutate_the_input() -> None:
    payload = SEED_EXAMPLES["reference_full_example"]
    snapshot = copy.deepcopy(payload)
    load(payload)
    assert payload == snapshot


# --- Robustness: only ValidationError ever escapes -------------------------------------------

GARBAGE: list[Any] = [
    None,
    [],
    {},
    "",
    "x",
    "x" * 100_000,
    "9" * 5000 + "%",
    "9" * 5000 + "kb",
    "%",
    0,
    1,
    -1,
    1.5,
    True,
    False,
    float("nan"),
    float("inf"),
    10**400,
    10**5000,  # too many digits for str(); an error message must never format it
    b"bytes",
    {"a": 1},
    {"width": {"a": 1}},
    [[[]]],
    [{"a": [1]}],
    [None, 1, "x"],
    {"crop": {"crop": "item"}},
]


def _field_paths(schema: Schema, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every field path in the schema tree, nested schemas included."""
    for name, field in schema.fields.items():
        path = (*prefix, name)
        yield path
        if isinstance(field, fields.Nested):
            yield from _field_paths(field.schema, path)


FIELD_PATHS = list(_field_paths(ProcessRequestSchema()))


def _set_path(payload: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    node = payload
    for key in path[:-1]:
        child = node.get(key)
        node[key] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    node[path[-1]] = value
    return payload


def _load_only_raises_validation_error(payload: Any) -> None:
    with contextlib.suppress(ValidationError):
        load(payload)


def test_field_paths_cover_nested_schemas() -> None:
    assert ("background", "generate", "context_images") in FIELD_PATHS
    assert ("caption", "position") in FIELD_PATHS
    assert ("nsfw_parameters", "nsfw_image_url") in FIELD_PATHS


@pytest.mark.parametrize(
    "value", [pytest.param(v, id=f"garbage{i}") for i, v in enumerate(GARBAGE)]
)
def test_garbage_body_gives_only_validation_errors(value: Any) -> None:
    _load_only_raises_validation_error(value)
    _load_only_raises_validation_error([value])


@pytest.mark.parametrize(
    "value", [pytest.param(v, id=f"garbage{i}") for i, v in enumerate(GARBAGE)]
)
def test_garbage_in_any_field_gives_only_validation_errors(value: Any) -> None:
    for path in FIELD_PATHS:
        base = with_generate(adapter_type="img2img", context_images=[IMAGE])
        _load_only_raises_validation_error(_set_path(copy.deepcopy(base), path, value))
        _load_only_raises_validation_error(_set_path({}, path, value))
        # Inside lists too, where a field takes one.
        _load_only_raises_validation_error(_set_path(copy.deepcopy(base), path, [value]))


# --- Public helpers and OpenAPI rendering ----------------------------------------------------


def test_vocabularies_match_the_reference() -> None:
    assert len(MODEL_TYPES) == 9
    assert "realistic" in MODEL_TYPES
    assert set(ADAPTER_TYPES) == set(ADAPTER_COMPANIONS)
    assert len(PRINT_SIZES) == len(set(PRINT_SIZES)) == 74
    assert {"a0", "a10", "b10", "c0", "letter", "legal", "ledger", "archa", "arche1"} <= set(
        PRINT_SIZES
    )
    assert not any("-" in size for size in PRINT_SIZES)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(text_to_image(), "realistic", id="default_is_realistic"),
        pytest.param(text_to_image(model_type="fantasy"), "fantasy", id="explicit_model"),
        pytest.param(SEED_EXAMPLES["text_only_premium"], "premium", id="seed_premium"),
        pytest.param(with_url(), None, id="no_background"),
        pytest.param(with_background(remove="auto"), None, id="no_generate"),
        pytest.param({}, None, id="empty"),
        pytest.param({"background": None}, None, id="null_background"),
        pytest.param({"background": {"generate": None}}, None, id="null_generate"),
    ],
)
def test_model_type_of_returns_the_effective_model(
    payload: dict[str, Any], expected: str | None
) -> None:
    assert model_type_of(payload) == expected


def test_openapi_components_are_all_prefixed_and_carry_defaults() -> None:
    spec = APISpec(
        title="genrelay", version="1", openapi_version="3.0.3", plugins=[MarshmallowPlugin()]
    )
    spec.components.schema("DeepImageProcessRequest", schema=ProcessRequestSchema)
    components = spec.to_dict()["components"]["schemas"]

    assert all(name.startswith("DeepImage") for name in components)
    assert {"DeepImageBackground", "DeepImageGenerate", "DeepImageCaption"} <= set(components)
    model_type = components["DeepImageGenerate"]["properties"]["model_type"]
    assert model_type["default"] == "realistic"
    assert model_type["enum"] == list(MODEL_TYPES)
    request = components["DeepImageProcessRequest"]["properties"]
    assert request["quality"]["default"] == 85
    assert {"type": "integer", "minimum": 1, "maximum": MAX_JSON_INTEGER} in request["width"][
        "oneOf"
    ]
    assert request["print_size"]["enum"] == list(PRINT_SIZES)
    assert request["fit"]["default"] == "canvas"
