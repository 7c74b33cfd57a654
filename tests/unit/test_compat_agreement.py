# ruff: noqa: E501  (one table row per line reads better than wrapped rows)
"""Intake and the simulator give the same verdict on one table of payloads.

The table covers each kind of request issue 12 found refused for no documented reason, each
refusal Deep-Image documents, and each deliberate difference of docs/compatibility.md. A row
either gets the same verdict from both, or names the difference (a section of
docs/compatibility.md) that explains why genrelay and Deep-Image disagree on it.
"""

from __future__ import annotations

import base64
import copy
import io
import re
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError
from PIL import Image

from schemas.deepimage import ProcessRequestSchema
from service.devtools.simulator.errors import SimulatorError
from service.devtools.simulator.validation import validate_process_request

COMPATIBILITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"

IMAGE = "https://deep-image.ai/api-example.png"
STORAGE_IMAGE = "storage://my-s3/photos/a.jpg"


def _png_base64() -> str:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 128, 255)).save(out, "PNG")
    return "base64," + base64.b64encode(out.getvalue()).decode()


BASE64_IMAGE = _png_base64()
PNG_BASE64 = BASE64_IMAGE.removeprefix("base64,")


def url(**fields: Any) -> dict[str, Any]:
    return {"url": IMAGE, **fields}


def generate(top: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {**(top or {}), "background": {"generate": fields}}


ACCEPT = "accept"
# Differences: genrelay refuses what Deep-Image takes ...
RESERVED = "webhooks"
UNKNOWN = "unknown-fields"
JSON_INTEGERS = "json-integers"
# ... and genrelay takes what Deep-Image may refuse, depending on things genrelay cannot see.
UPSTREAM_DECIDES = "decided-by-deep-image"
SIDE_OF_GENRELAY = {RESERVED: "refuses", UNKNOWN: "refuses", JSON_INTEGERS: "refuses"}

# (name, payload, intake's verdict: ACCEPT or the field it names, difference or None)
Row = tuple[str, Any, str | tuple[Any, ...], str | None]
ROWS: list[Row] = [
    # -- issue 12: print_size (the vendor's 74 names, archa not arch-a)
    *((f"print_size_{s}", url(print_size=s), ACCEPT, None) for s in ("a4", "archa", "arche1")),
    *(
        (f"print_size_{s}", url(print_size=s), ACCEPT, None)
        for s in ("c5", "11x17", "governmentlegal", "sob5extra", "arch6", "supera3", "note")
    ),
    *(
        (f"print_size_hyphenated_{s}", url(print_size=s), ("print_size",), None)
        for s in ("arch-a", "arch-e1")
    ),
    ("print_size_upper_case", url(print_size="A4"), ("print_size",), None),
    # -- issue 12: the vendor client's defaults without print_size
    ("dpi_without_print_size", url(dpi=300), ACCEPT, None),
    ("print_reorientation_without_print_size", url(print_reorientation=True), ACCEPT, None),
    ("dpi_any_integer", url(print_size="a4", dpi=5000), ACCEPT, None),
    ("dpi_float", url(print_size="a4", dpi=300.5), ("dpi",), None),
    # -- issue 12: background.replace is an ImageUrl
    *(
        (f"replace_{kind}", url(background={"replace": ref}), ACCEPT, None)
        for kind, ref in (("http", IMAGE), ("storage", STORAGE_IMAGE), ("base64", BASE64_IMAGE))
    ),
    ("replace_ftp", url(background={"replace": "ftp://x/y.png"}), ("background", "replace"), None),
    ("replace_storage_folder", url(background={"replace": "storage://s/dir/"}), ("background", "replace"), None),
    # -- issue 12: text-to-image without a size (the vendor's own example)
    ("text_to_image_no_size", generate(description="happy apple"), ACCEPT, None),
    ("text_to_image_one_side", generate({"width": 640}, description="x"), ACCEPT, None),
    ("text_to_image_percent", generate({"width": "50%", "height": "50%"}, description="x"), ACCEPT, None),
    ("text_to_image_no_description", generate({"width": 512, "height": 512}, model_type="fantasy"), ACCEPT, None),
    ("text_to_image_empty_description", generate(description=""), ACCEPT, None),
    # -- issue 12: naming the default changes nothing
    ("explicit_generate_background_no_url", generate(description="x", adapter_type="generate_background"), ACCEPT, None),
    ("explicit_defaults_everywhere", {"fit": "canvas", "quality": 85, "background": {"remove": "auto", "generate": {"description": "x", "adapter_type": "generate_background", "item_area_percentage": 1, "model_type": "realistic"}}}, ACCEPT, None),
    # -- issue 12: bounds and dependent-field rules the vendor does not have
    ("width_above_16384", url(width=20000), ACCEPT, None),
    ("width_percent_above_1000", url(width="1200%"), ACCEPT, None),
    ("width_digit_string", url(width="1024"), ACCEPT, None),
    ("padding_large", url(padding=20000), ACCEPT, None),
    ("padding_percent_large", url(padding="150%"), ACCEPT, None),
    ("min_length_large", url(min_length=20000), ACCEPT, None),
    ("url_long", {"url": IMAGE + "?q=" + "a" * 5000}, ACCEPT, None),
    ("description_long", generate(description="x" * 10_000), ACCEPT, None),
    ("sample_num_negative", generate(description="x", sample_num=-7), ACCEPT, None),
    ("sample_num_above_32_bits", generate(description="x", sample_num=2**40), ACCEPT, None),
    ("item_area_zero", url(background={"generate": {"item_area_percentage": 0}}), ACCEPT, None),
    ("strength_above_one", url(background={"generate": {"adapter_type": "face", "strength": 2.5}}), ACCEPT, None),
    ("face_id_with_control", url(background={"generate": {"adapter_type": "control", "face_id": True}}), ACCEPT, None),
    ("prompt_without_generative", url(background={"remove": "auto", "prompt": "the chair"}), ACCEPT, None),
    ("upscale_strength_alone", url(upscale_strength=5), ACCEPT, None),
    ("parameters_without_enhancement", url(light_parameters={"type": "hdr_light", "level": 0.5}), ACCEPT, None),
    ("enhancements_repeated", url(enhancements=["denoise", "denoise"]), ACCEPT, None),
    ("max_file_size_with_png", url(output_format="png", max_file_size="1MB"), ACCEPT, None),
    ("max_file_size_bytes_string", url(max_file_size="500000"), ACCEPT, None),
    ("max_file_size_above_10gb", url(max_file_size="20gb"), ACCEPT, None),
    ("color_any_string", url(background={"color": "rgb(red, green, blue)"}), ACCEPT, None),
    ("generate_color_any_string", url(background={"generate": {"color": "warm"}}), ACCEPT, None),
    ("context_images_many", url(background={"generate": {"adapter_type": "img2img", "context_images": [IMAGE] * 20}}), ACCEPT, None),
    ("img2img_with_url_only", url(background={"generate": {"adapter_type": "img2img"}}), ACCEPT, None),
    ("nsfw_both_image_urls", url(nsfw_parameters={"image_url": IMAGE, "nsfw_image_url": IMAGE}), ACCEPT, None),
    ("caption_small_width", url(caption={"url": IMAGE, "target_width_percentage": 0.5}), ACCEPT, None),
    ("target_storage_root", url(target="storage://dropbox/"), ACCEPT, None),
    # -- fields the docs add to the spec
    *(
        (f"remove_{mode}", url(background={"remove": mode}), ACCEPT, None)
        for mode in ("v2", "generative")
    ),
    *(
        (f"adapter_{a}", url(background={"generate": {"adapter_type": a}}), ACCEPT, None)
        for a in ("control2", "upscale")
    ),
    ("model_type_newest", generate(description="x", model_type="z-image-turbo"), ACCEPT, None),
    ("generative_upscale", url(width=3000, generative_upscale=True), ACCEPT, None),
    # the vendor's "generate in high resolution" example: generative upscale of a generated image
    ("generative_upscale_text_to_image", generate({"width": 2048, "height": 1024, "generative_upscale": True}, description="small cottage and cows eating grass"), ACCEPT, None),
    ("generative_upscale_text_to_image_no_size", generate({"generative_upscale": True}, description="x"), ACCEPT, None),
    # -- inline images: base64,… or data:image/…;base64,…, the base64 alphabets and line breaks
    ("url_data_image", {"url": "data:image/png;base64," + PNG_BASE64}, ACCEPT, None),
    ("url_base64_line_breaks", {"url": "base64," + PNG_BASE64[:76] + "\r\n" + PNG_BASE64[76:] + "\n"}, ACCEPT, None),
    ("url_base64_url_safe", {"url": "base64," + PNG_BASE64.replace("+", "-").replace("/", "_")}, ACCEPT, None),
    ("replace_data_image", url(background={"replace": "data:image/png;base64," + PNG_BASE64}), ACCEPT, None),
    # -- what Deep-Image refuses: "File or image url is required" and other documented errors
    ("nothing_to_do", {"width": 100}, ("_schema",), None),
    ("empty", {}, ("_schema",), None),
    ("remove_without_image", {"background": {"remove": "auto"}}, ("_schema",), None),
    *(
        (f"adapter_{a}_without_url", generate(description="x", adapter_type=a, ip_image2=IMAGE), ("url",), None)
        for a in ("face", "control", "control2", "upscale", "inpainting")
    ),
    ("img2img_without_any_image", generate(description="x", adapter_type="img2img"), ("url",), None),
    ("generative_upscale_without_url_or_generate", {"width": 2048, "generative_upscale": True}, ("_schema",), None),
    ("inpainting_without_mask", url(background={"generate": {"adapter_type": "inpainting"}}), ("background", "generate", "ip_image2"), None),
    ("url_not_an_image_reference", {"url": "ftp://x/y.png"}, ("url",), None),
    ("url_storage_without_file", {"url": "storage://my-s3"}, ("url",), None),
    ("url_storage_folder", {"url": "storage://my-s3/photos/"}, ("url",), None),
    ("url_with_space", {"url": "https://exa mple.com/a.png"}, ("url",), None),
    ("url_empty", {"url": ""}, ("url",), None),
    ("url_data_not_image", {"url": "data:application/octet-stream;base64," + PNG_BASE64}, ("url",), None),
    ("url_data_no_media_type", {"url": "data:;base64," + PNG_BASE64}, ("url",), None),
    ("url_data_image_with_parameter", {"url": "data:image/png;charset=utf-8;base64," + PNG_BASE64}, ("url",), None),
    ("url_base64_with_space", {"url": "base64," + PNG_BASE64[:40] + " " + PNG_BASE64[40:]}, ("url",), None),
    ("url_base64_with_stray_character", {"url": "base64," + PNG_BASE64[:40] + "*" + PNG_BASE64[40:]}, ("url",), None),
    ("url_base64_leading_blank", {"url": " " + BASE64_IMAGE}, ("url",), None),
    ("url_base64_trailing_blank", {"url": BASE64_IMAGE + " "}, ("url",), None),
    ("url_data_image_leading_blank", {"url": " data:image/png;base64," + PNG_BASE64}, ("url",), None),
    ("replace_data_not_image", url(background={"replace": "data:application/octet-stream;base64," + PNG_BASE64}), ("background", "replace"), None),
    ("replace_base64_with_space", url(background={"replace": "base64," + PNG_BASE64[:40] + " " + PNG_BASE64[40:]}), ("background", "replace"), None),
    ("replace_base64_leading_blank", url(background={"replace": " " + BASE64_IMAGE}), ("background", "replace"), None),
    ("target_not_storage", url(target="s3://bucket/out/"), ("target",), None),
    ("model_type_unknown", generate(description="x", model_type="dall-e"), ("background", "generate", "model_type"), None),
    ("adapter_type_unknown", url(background={"generate": {"adapter_type": "sketch"}}), ("background", "generate", "adapter_type"), None),
    ("remove_unknown", url(background={"remove": "magic"}), ("background", "remove"), None),
    ("controlnet_above_one", url(background={"generate": {"controlnet_conditioning_scale": 1.5}}), ("background", "generate", "controlnet_conditioning_scale"), None),
    ("item_area_above_one", url(background={"generate": {"item_area_percentage": 1.5}}), ("background", "generate", "item_area_percentage"), None),
    ("width_zero", url(width=0), ("width",), None),
    ("width_zero_percent", url(width="0%"), ("width",), None),
    ("width_float", url(width=1.5), ("width",), None),
    ("width_spaced_percent", url(width="50 %"), ("width",), None),
    ("padding_negative", url(padding=-1), ("padding",), None),
    ("min_length_zero", url(min_length=0), ("min_length",), None),
    ("fit_unknown", url(fit="stretch"), ("fit",), None),
    ("fit_crop_unknown", url(fit={"crop": "face"}), ("fit",), None),
    ("enhancement_unknown", url(enhancements=["sharpen"]), ("enhancements",), None),
    ("denoise_type_unknown", url(denoise_parameters={"type": "v3"}), ("denoise_parameters", "type"), None),
    ("level_above_one", url(white_balance_parameters={"level": 2}), ("white_balance_parameters", "level"), None),
    ("output_format_gif", url(output_format="gif"), ("output_format",), None),
    ("output_format_upper_case", url(output_format="PNG"), ("output_format",), None),
    ("quality_above_100", url(quality=101), ("quality",), None),
    ("upscale_strength_ten", url(upscale_strength=10), ("upscale_strength",), None),
    ("upscale_type_unknown", url(upscale_parameters={"type": "v3"}), ("upscale_parameters", "type"), None),
    ("max_file_size_zero", url(max_file_size=0), ("max_file_size",), None),
    ("max_file_size_terabytes", url(max_file_size="5tb"), ("max_file_size",), None),
    ("safe_not_boolean", url(safe="yes"), ("safe",), None),
    ("threshold_above_one", url(nsfw_parameters={"threshold": 2}), ("nsfw_parameters", "threshold"), None),
    ("caption_without_url", url(caption={"position": "RB"}), ("caption", "url"), None),
    ("caption_bad_position", url(caption={"url": IMAGE, "position": "XX"}), ("caption", "position"), None),
    ("caption_opacity_above_100", url(caption={"url": IMAGE, "opacity": 101}), ("caption", "opacity"), None),
    ("ip_image2_not_url", url(background={"generate": {"ip_image2": "mask.png"}}), ("background", "generate", "ip_image2"), None),
    ("context_image_not_url", url(background={"generate": {"context_images": ["x"]}}), ("background", "generate", "context_images"), None),
    ("null_field", url(quality=None), ("quality",), None),
    ("null_nested_field", url(background={"remove": None}), ("background", "remove"), None),
    ("background_not_object", url(background="white"), ("background",), None),
    ("sample_num_float", generate(description="x", sample_num=1.5), ("background", "generate", "sample_num"), None),
    ("description_not_string", generate(description=5), ("background", "generate", "description"), None),
    # a trailing newline must not slip past a pattern ($ matches before it in Python)
    ("width_percent_newline", url(width="200%\n"), ("width",), None),
    ("width_digits_newline", url(width="200\n"), ("width",), None),
    ("target_newline", url(target="storage://s3/out/\n"), ("target",), None),
    ("position_newline", url(caption={"url": IMAGE, "position": "RB\n"}), ("caption", "position"), None),
    ("max_file_size_newline", url(max_file_size="1MB\n"), ("max_file_size",), None),
    # -- deliberate differences (docs/compatibility.md)
    ("webhooks", url(webhooks={"complete": "https://example.com/hook"}), ("webhooks",), RESERVED),
    ("unknown_top_level_field", url(sharpen=True), ("sharpen",), UNKNOWN),
    ("unknown_nested_field", generate(description="x", seed=1), ("background", "generate", "seed"), UNKNOWN),
    ("docs_typo_thresold", url(nsfw_parameters={"thresold": 0.5}), ("nsfw_parameters", "thresold"), UNKNOWN),
    ("fit_crop_extra_key", url(fit={"crop": "item", "x": 1}), ("fit",), UNKNOWN),
    ("legacy_remove_background", url(remove_background={"type": "auto"}), ("remove_background",), UNKNOWN),
    ("sample_num_beyond_json", generate(description="x", sample_num=2**53), ("background", "generate", "sample_num"), JSON_INTEGERS),
    ("dpi_beyond_json", url(dpi=-(2**60)), ("dpi",), JSON_INTEGERS),
    ("custom_preset", url(preset="my_studio_look"), ACCEPT, UPSTREAM_DECIDES),
    ("base64_not_an_image", {"url": "base64,AAAA"}, ACCEPT, UPSTREAM_DECIDES),
]  # fmt: skip


def intake_verdict(payload: Any) -> str | tuple[Any, ...]:
    """ACCEPT, or the path of the first field intake names."""
    try:
        ProcessRequestSchema().load(copy.deepcopy(payload))
    except ValidationError as exc:
        node: Any = exc.messages
        path: list[Any] = []
        while isinstance(node, dict):
            key = sorted(node, key=str)[0]
            path.append(key)
            node = node[key]
        while len(path) > 1 and (isinstance(path[-1], int) or path[-1] == "_schema"):
            path.pop()  # a list item, or the nested object itself: that field is named
        return tuple(path)
    return ACCEPT


def simulator_accepts(payload: Any) -> bool:
    try:
        validate_process_request(copy.deepcopy(payload), None, max_pixels_side=50_000)
    except SimulatorError as exc:
        assert exc.status == 400
        return False
    return True


@pytest.mark.parametrize(
    ("payload", "expected", "difference"),
    [pytest.param(payload, expected, diff, id=name) for name, payload, expected, diff in ROWS],
)
def test_intake_and_the_simulator_agree_unless_a_documented_difference_says_otherwise(
    payload: Any, expected: str | tuple[Any, ...], difference: str | None
) -> None:
    verdict = intake_verdict(payload)
    assert verdict == expected
    intake_accepts = verdict == ACCEPT
    if difference is None:
        assert simulator_accepts(payload) == intake_accepts
    elif difference == UPSTREAM_DECIDES:
        assert intake_accepts
        assert not simulator_accepts(payload)
    else:
        assert SIDE_OF_GENRELAY[difference] == "refuses"
        assert not intake_accepts
        assert simulator_accepts(payload)


def test_row_names_are_unique() -> None:
    names = [name for name, *_ in ROWS]
    assert len(names) == len(set(names))


def test_every_difference_has_its_section_in_the_compatibility_page() -> None:
    text = COMPATIBILITY_DOC.read_text(encoding="utf-8")
    anchors = {match for match in re.findall(r'<a id="([a-z0-9-]+)"></a>', text)}
    used = {difference for *_, difference in ROWS if difference is not None}
    assert used <= anchors
