"""Output geometry and result-image rendering of the simulator.

The simulator fetches input URLs only with the `fetch_inputs` knob
(service/devtools/simulator/fetch.py)
and never reads their size from them: a remote input is assumed to be a nominal 1024x1024
image, while inline ``base64,``/``data:image/…;base64,`` images and uploaded files are decoded
to learn their real size. Output sizes follow the width/height rules of reference 2.4.
Result images are real, cheaply rendered pictures so clients can decode and check them.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import random
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

from service.devtools.simulator.errors import bad_request

OutputFormat = Literal["jpeg", "png", "webp"]

NOMINAL_SOURCE_SIZE = (1024, 1024)
CONTENT_TYPES: dict[OutputFormat, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
}
EXTENSIONS: dict[OutputFormat, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_PILLOW_FORMATS: dict[OutputFormat, str] = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass(frozen=True)
class Dimension:
    """A requested width or height: absolute pixels or a percentage of the source side."""

    pixels: int | None = None
    percent: float | None = None

    def resolve(self, source_side: int) -> float:
        """The requested length in pixels for a source side of ``source_side`` pixels."""
        if self.pixels is not None:
            return float(self.pixels)
        assert self.percent is not None
        return source_side * self.percent / 100.0


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height of encoded image bytes; 400 "Unidentified image" if not an image."""
    try:
        # Only the header is read: Image.open is lazy, so even large uploads are cheap here.
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception as exc:  # Pillow raises many types for garbage input
        raise bad_request("Unidentified image") from exc
    if width < 1 or height < 1:
        raise bad_request("Unidentified image")
    return width, height


# Decision (docs/simulator.md, "Validation"): an inline image is ``base64,`` or
# ``data:image/<type>;base64,`` followed by base64 text in the standard or URL-safe alphabet,
# with ``=`` padding and the CR/LF line breaks MIME encoders insert, nothing else: no blanks
# around the value, no other data: media type or parameter, no stray characters.
_DATA_IMAGE_PREFIX = re.compile(r"data:image/[A-Za-z0-9.+-]{1,32};base64,")


def inline_image_bytes(url: str) -> bytes | None:
    """Decode an inline ``base64,...`` or ``data:image/...;base64,...`` image.

    None for values that are not inline images at all (web and storage URLs); 400
    "Unidentified image" for a ``data:`` value of another shape and for text that does not
    decode strictly.
    """
    if url.startswith("base64,"):
        payload = url[len("base64,") :]
    elif url.startswith("data:"):
        prefix = _DATA_IMAGE_PREFIX.match(url)
        if prefix is None:
            raise bad_request("Unidentified image")
        payload = url[prefix.end() :]
    else:
        return None
    compact = payload.replace("\r", "").replace("\n", "")
    try:
        # altchars maps the URL-safe "-" and "_" to "+" and "/"; validate refuses any other
        # character (a blank included) and misplaced padding instead of dropping them.
        return base64.b64decode(compact, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request("Unidentified image") from exc


def output_size(
    source: tuple[int, int] | None,
    width: Dimension | None,
    height: Dimension | None,
    *,
    fit: str,
    min_length: int | None,
    generative_upscale: bool,
    max_side: int,
) -> tuple[int, int]:
    """Compute the output size per reference 2.4 and enforce the pixel limit."""
    # Text-to-image has no source; percentages and single sides then refer to the nominal square.
    src_w, src_h = source or NOMINAL_SOURCE_SIZE
    out_w: float
    out_h: float
    if width is not None and height is not None:
        target_w, target_h = width.resolve(src_w), height.resolve(src_h)
        if fit in ("bounds", "cover") and source is not None:
            pick = min if fit == "bounds" else max
            scale = pick(target_w / src_w, target_h / src_h)
            out_w, out_h = src_w * scale, src_h * scale
        else:
            # canvas (default) and crop both give exactly the requested canvas.
            out_w, out_h = target_w, target_h
    elif width is not None:
        out_w = width.resolve(src_w)
        out_h = src_h * out_w / src_w
    elif height is not None:
        out_h = height.resolve(src_h)
        out_w = src_w * out_h / src_h
    elif generative_upscale:
        # Decision: generative upscale without a target size doubles the image.
        out_w, out_h = src_w * 2.0, src_h * 2.0
    else:
        out_w, out_h = float(src_w), float(src_h)
    if min_length is not None and (width is None or height is None):
        shorter = min(out_w, out_h)
        if 0 < shorter < min_length:
            out_w, out_h = out_w * min_length / shorter, out_h * min_length / shorter
    if not (math.isfinite(out_w) and math.isfinite(out_h)) or max(out_w, out_h) > max_side + 0.5:
        raise bad_request(f"Image cannot be upscaled above {max_side} x {max_side} pixels limit.")
    final_w, final_h = math.floor(out_w + 0.5), math.floor(out_h + 0.5)
    if final_w < 1 or final_h < 1:
        raise bad_request("Output image would be smaller than 1 pixel")
    return final_w, final_h


def render_image(
    width: int,
    height: int,
    fmt: OutputFormat,
    *,
    seed: int,
    quality: int = 85,
    transparent: bool = False,
    padding_bytes: int = 0,
) -> bytes:
    """Render a real, deterministic image of the given size and format."""
    rng = random.Random(seed)  # noqa: S311 - picks shapes, not secrets
    # Draw at a small size and scale up: resizing is far cheaper than drawing megapixels, and a
    # gradient plus a few shapes is enough for a decodable, non-blank picture.
    base = Image.merge(
        "RGB",
        (
            Image.linear_gradient("L"),
            Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90),
            Image.radial_gradient("L"),
        ),
    )
    draw = ImageDraw.Draw(base)
    for _ in range(4):
        x0, y0 = rng.randrange(0, 192), rng.randrange(0, 192)
        x1, y1 = x0 + rng.randrange(16, 64), y0 + rng.randrange(16, 64)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
    img = base.resize((width, height), Image.Resampling.BILINEAR)
    if transparent and fmt in ("png", "webp"):
        alpha = Image.radial_gradient("L").point(lambda v: 255 - v)
        img.putalpha(alpha.resize((width, height), Image.Resampling.BILINEAR))
    out = io.BytesIO()
    if fmt == "png":
        # Fast compression: the simulator serves many images and size is not what is tested.
        img.save(out, _PILLOW_FORMATS[fmt], compress_level=1)
    elif fmt == "webp":
        img.save(out, _PILLOW_FORMATS[fmt], quality=quality, method=0)
    else:
        img.save(out, _PILLOW_FORMATS[fmt], quality=quality)
    if padding_bytes:
        # Appended after the end marker, where decoders stop reading: the image stays valid.
        out.write(b"\0" * padding_bytes)
    return out.getvalue()
