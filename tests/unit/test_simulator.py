"""Unit tests of the Deep-Image API simulator through the Flask test client.

A fake clock drives job progress, so status changes are exact and no test sleeps for them.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask.testing import FlaskClient
from PIL import Image

from service.devtools.simulator import SimulatorSettings, create_simulator_app, get_engine
from service.devtools.simulator.cli import build_parser, settings_from_args
from service.devtools.simulator.errors import FAILURE_MESSAGE

KEY = "sim-key"
AUTH = {"x-api-key": KEY}
TEXT_TO_IMAGE = {
    "width": 2048,
    "height": 1024,
    "background": {"generate": {"description": "a lighthouse at dusk"}},
}
URL_INPUT = {"url": "https://deep-image.ai/api-example.png"}

MakeClient = Callable[..., FlaskClient]


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client(clock: FakeClock) -> Iterator[MakeClient]:
    """Build simulator clients; jobs finish instantly unless processing_time is given."""
    apps = []

    def make(**knobs: Any) -> FlaskClient:
        settings = SimulatorSettings(**{"processing_time": 0.0, **knobs})
        app = create_simulator_app(settings, clock=clock)
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        get_engine(app).shutdown()


@pytest.fixture
def client(make_client: MakeClient) -> FlaskClient:
    return make_client()


def submit(client: FlaskClient, body: Any, endpoint: str = "process") -> Any:
    return client.post(f"/rest_api/{endpoint}", json=body, headers=AUTH)


def poll(client: FlaskClient, job: str) -> Any:
    return client.get(f"/rest_api/result/{job}", headers=AUTH)


def fetch_image(client: FlaskClient, result_url: str) -> Any:
    return client.get(urlsplit(result_url).path)


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


PNG_BASE64 = base64.b64encode(png_bytes(64, 48)).decode()


def result_image(client: FlaskClient, body: Any) -> tuple[Image.Image, Any]:
    done = submit(client, body, "process_result")
    assert done.status_code == 200, done.json
    assert done.json["status"] == "complete"
    response = fetch_image(client, done.json["result_url"])
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.data))
    image.load()
    return image, response


# -- authentication ----------------------------------------------------------------------------

REST_CALLS = [
    ("POST", "/rest_api/process"),
    ("POST", "/rest_api/process_result"),
    ("GET", "/rest_api/result/44d46e9a-c3d5-11ed-af64-0242ac1f000f"),
    ("DELETE", "/rest_api/result/44d46e9a-c3d5-11ed-af64-0242ac1f000f"),
    ("GET", "/rest_api/me"),
]


@pytest.mark.parametrize(("method", "path"), REST_CALLS)
def test_missing_api_key_is_403(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method, json=TEXT_TO_IMAGE)
    assert response.status_code == 403
    assert response.json == {"message": "No x-api-key header is provided"}


@pytest.mark.parametrize(("method", "path"), REST_CALLS)
def test_unknown_api_key_is_404(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method, json=TEXT_TO_IMAGE, headers={"x-api-key": "x"})
    assert response.status_code == 404
    assert response.json == {"message": "No user found for provided token"}


def test_api_key_header_name_is_case_insensitive(client: FlaskClient) -> None:
    response = client.post("/rest_api/process", json=TEXT_TO_IMAGE, headers={"X-API-KEY": KEY})
    assert response.status_code == 200


def test_jobs_of_another_key_are_not_found(make_client: MakeClient) -> None:
    client = make_client(api_keys=frozenset({KEY, "other-key"}))
    job = submit(client, TEXT_TO_IMAGE).json["job"]
    response = client.get(f"/rest_api/result/{job}", headers={"x-api-key": "other-key"})
    assert response.status_code == 404
    assert response.json == {"message": "Job not found"}


# -- validation --------------------------------------------------------------------------------

INVALID_BODIES = [
    pytest.param("not json", "Invalid JSON body", id="garbage"),
    pytest.param('{"width": NaN}', "Invalid JSON body", id="nan"),
    pytest.param('{"width": 1e999}', "Invalid JSON body", id="float-overflow"),
    pytest.param("[" * 50_000, "Invalid JSON body", id="deep-nesting"),
    pytest.param("[1, 2]", "Request body must be a JSON object", id="not-an-object"),
    pytest.param(
        {"background": {"generate": {"description": "x", "model_type": "dall-e"}}},
        "Unknown model_type",
        id="model-type",
    ),
    pytest.param(
        {"background": {"generate": {"model_type": ["realistic"]}}},
        "Unknown model_type",
        id="model-type-list",
    ),
    pytest.param(
        {**URL_INPUT, "background": {"generate": {"adapter_type": "sketch"}}},
        "Unknown adapter_type",
        id="adapter-type",
    ),
    pytest.param(
        {**URL_INPUT, "background": {"generate": {"controlnet_conditioning_scale": 1.5}}},
        "controlnet_conditioning_scale must be a number between 0 and 1",
        id="controlnet-high",
    ),
    pytest.param(
        {**URL_INPUT, "background": {"generate": {"controlnet_conditioning_scale": "0.5"}}},
        "controlnet_conditioning_scale must be a number between 0 and 1",
        id="controlnet-string",
    ),
    pytest.param(
        {"background": {"generate": {"description": "x", "sample_num": 1.5}}},
        "sample_num must be an integer",
        id="sample-num-float",
    ),
    pytest.param(
        {"background": {"generate": {"description": "x", "sample_num": True}}},
        "sample_num must be an integer",
        id="sample-num-bool",
    ),
    pytest.param(
        {"background": {"generate": {"description": "x", "adapter_type": "face"}}},
        "File or image url is required",
        id="face-needs-image",
    ),
    pytest.param(
        {"width": 3000, "generative_upscale": True},
        "File or image url is required",
        id="upscale-needs-image-or-generation",
    ),
    pytest.param(
        {"enhancements": ["denoise"]}, "File or image url is required", id="enhance-needs-image"
    ),
    pytest.param(
        {**URL_INPUT, "background": {"generate": {"adapter_type": "inpainting"}}},
        "ip_image2",
        id="inpainting-needs-mask",
    ),
    pytest.param(
        {"width": 9000, "height": 512, "background": {"generate": {"description": "x"}}},
        "Image cannot be upscaled above 8192 x 8192 pixels limit.",
        id="pixel-limit-text",
    ),
    pytest.param(
        {**URL_INPUT, "width": "1000%"},
        "Image cannot be upscaled above 8192 x 8192 pixels limit.",
        id="pixel-limit-percent",
    ),
    pytest.param(
        {**URL_INPUT, "width": 10**40},
        "Image cannot be upscaled above 8192 x 8192 pixels limit.",
        id="huge-number",
    ),
    pytest.param({**URL_INPUT, "preset": "vintage"}, "Preset vintage not found!", id="preset"),
    pytest.param({**URL_INPUT, "output_format": "gif"}, "output_format", id="output-format"),
    pytest.param({**URL_INPUT, "width": "wide"}, "width must be", id="width-string"),
    pytest.param({**URL_INPUT, "width": 0}, "width must be", id="width-zero"),
    pytest.param({**URL_INPUT, "height": True}, "height must be", id="height-bool"),
    pytest.param({**URL_INPUT, "quality": 101}, "quality", id="quality"),
    pytest.param({"url": "ftp://x/y.png"}, "Unidentified image", id="url-scheme"),
    pytest.param({"url": "http://x.com:99999/y.png"}, "Unidentified image", id="url-port"),
    pytest.param({"url": "http://x.com:0/y.png"}, "Unidentified image", id="url-port-zero"),
    pytest.param({"url": "base64,@@@not-an-image"}, "Unidentified image", id="inline-garbage"),
    # inline images: base64,… or data:image/…;base64,…, strictly decoded, as genrelay decides
    *(
        pytest.param({"url": value}, "Unidentified image", id=name)
        for name, value in (
            ("data-not-image", f"data:application/octet-stream;base64,{PNG_BASE64}"),
            ("data-no-media-type", f"data:;base64,{PNG_BASE64}"),
            ("data-image-with-parameter", f"data:image/png;charset=utf-8;base64,{PNG_BASE64}"),
            ("inline-space", f"base64,{PNG_BASE64[:40]} {PNG_BASE64[40:]}"),
            ("inline-stray-character", f"base64,{PNG_BASE64[:40]}*{PNG_BASE64[40:]}"),
            ("inline-leading-blank", f" base64,{PNG_BASE64}"),
            ("inline-trailing-blank", f"base64,{PNG_BASE64} "),
            ("data-leading-blank", f" data:image/png;base64,{PNG_BASE64}"),
        )
    ),
    pytest.param(
        {**URL_INPUT, "background": {"replace": f" base64,{PNG_BASE64}"}},
        "Unidentified image",
        id="replace-leading-blank",
    ),
    pytest.param(
        {**URL_INPUT, "background": {"replace": f"data:;base64,{PNG_BASE64}"}},
        "Unidentified image",
        id="replace-data-no-media-type",
    ),
    pytest.param(
        {**URL_INPUT, "webhooks": {"complete": "not a url"}}, "webhooks.complete", id="webhook"
    ),
    pytest.param({}, "Nothing to process", id="empty"),
    pytest.param({"output_format": "png"}, "Nothing to process", id="nothing-asked"),
]


@pytest.mark.parametrize(("body", "message"), INVALID_BODIES)
@pytest.mark.parametrize("endpoint", ["process", "process_result"])
def test_invalid_requests_are_400_bad_request(
    client: FlaskClient, body: Any, message: str, endpoint: str
) -> None:
    if isinstance(body, str):
        response = client.post(
            f"/rest_api/{endpoint}", data=body, headers=AUTH, content_type="application/json"
        )
    else:
        response = submit(client, body, endpoint)
    assert response.status_code == 400
    assert response.json["code"] == "BAD_REQUEST"
    assert message in response.json["message"]


def test_pixel_limit_follows_the_knob(make_client: MakeClient) -> None:
    client = make_client(max_pixels_side=2048)
    response = submit(client, {**URL_INPUT, "width": 3000})
    assert response.status_code == 400
    assert response.json == {
        "message": "Image cannot be upscaled above 2048 x 2048 pixels limit.",
        "code": "BAD_REQUEST",
    }
    assert submit(client, {**URL_INPUT, "width": 2048}).status_code == 200


@pytest.mark.parametrize(
    "preset", ["real_estate", "real_estate_upscaled", "ecommerce", "ecommerce_upscaled"]
)
def test_known_presets_are_accepted(client: FlaskClient, preset: str) -> None:
    assert submit(client, {**URL_INPUT, "preset": preset}).status_code == 200


def test_non_json_answers_stay_json(client: FlaskClient) -> None:
    assert client.get("/rest_api/process", headers=AUTH).status_code == 405
    assert client.get("/rest_api/process", headers=AUTH).json["code"] == "METHOD_NOT_ALLOWED"
    missing = client.get("/rest_api/nothing-here", headers=AUTH)
    assert missing.status_code == 404
    assert missing.is_json


def test_body_over_the_size_limit_is_a_json_413(client: FlaskClient) -> None:
    client.application.config["MAX_CONTENT_LENGTH"] = 1000
    response = client.post(
        "/rest_api/process",
        data={"parameters": json.dumps(URL_INPUT), "image": (io.BytesIO(b"x" * 5000), "a.png")},
        headers=AUTH,
        content_type="multipart/form-data",
    )
    assert response.status_code == 413
    assert response.is_json


def test_json_is_read_whatever_the_content_type(client: FlaskClient) -> None:
    response = client.post(
        "/rest_api/process", data=json.dumps(TEXT_TO_IMAGE), headers=AUTH, content_type="text/plain"
    )
    assert response.status_code == 200


# -- documented examples -----------------------------------------------------------------------

PROMPT = "woman in a futuristic suit holding a gun in her hand, looking at the camera"
SEED_EXAMPLES = [
    pytest.param(
        {"width": 2048, "height": 1024, "background": {"generate": {"description": PROMPT}}},
        (2048, 1024),
        id="text",
    ),
    pytest.param(
        {
            "width": 2048,
            "height": 1024,
            "background": {"generate": {"description": PROMPT, "model_type": "fantasy"}},
        },
        (2048, 1024),
        id="text-fantasy",
    ),
    pytest.param(
        {
            "width": 2048,
            "height": 1024,
            "background": {"generate": {"description": PROMPT, "model_type": "premium"}},
        },
        (2048, 1024),
        id="text-premium",
    ),
    pytest.param(
        {
            "url": "https://deep-image.ai/api-example.png",
            "width": 1024,
            "height": 1024,
            "background": {
                "generate": {
                    "description": "item on the beach",
                    "adapter_type": "generate_background",
                }
            },
        },
        (1024, 1024),
        id="generate-background",
    ),
    pytest.param(
        {
            "url": "https://deep-image.ai/api-example3.jpg",
            "width": 1024,
            "height": 1024,
            "background": {
                "generate": {"description": "model on the beach", "adapter_type": "face"}
            },
        },
        (1024, 1024),
        id="face",
    ),
    pytest.param(
        {
            "url": "https://deep-image.ai/api-example3.jpg",
            "background": {
                "generate": {"description": "model in the room", "adapter_type": "control"}
            },
        },
        (1024, 1024),
        id="control",
    ),
    pytest.param(
        {"url": "https://deep-image.ai/api-example.png", "width": 3000, "generative_upscale": True},
        (3000, 3000),
        id="generative-upscale",
    ),
    pytest.param(
        {
            "width": 2048,
            "height": 1024,
            "generative_upscale": True,
            "background": {"generate": {"description": "small cottage and cows eating grass"}},
        },
        (2048, 1024),
        id="generative-upscale-text-to-image",
    ),
]


@pytest.mark.parametrize(("body", "size"), SEED_EXAMPLES)
def test_documented_examples_are_accepted(
    client: FlaskClient, body: dict[str, Any], size: tuple[int, int]
) -> None:
    response = submit(client, body)
    assert response.status_code == 200
    assert response.json["status"] == "received"
    job = response.json["job"]
    debug = client.get(f"/_sim/jobs/{job}").json
    assert (debug["output"]["width"], debug["output"]["height"]) == size
    assert debug["request"] == body


@pytest.mark.parametrize(
    "generate",
    [
        {"model_type": m}
        for m in (
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
    ]
    + [{"adapter_type": "inpainting", "ip_image2": "https://x/mask.png"}]
    + [{"adapter_type": "img2img", "context_images": ["https://x/a.png"]}],
)
def test_documented_generation_options_are_accepted(
    client: FlaskClient, generate: dict[str, Any]
) -> None:
    body = {**URL_INPUT, "background": {"generate": {"description": "x", **generate}}}
    assert submit(client, body).status_code == 200


# -- job lifecycle -----------------------------------------------------------------------------


def test_status_goes_received_in_progress_complete(
    make_client: MakeClient, clock: FakeClock
) -> None:
    client = make_client(processing_time=1.0)
    created = submit(client, TEXT_TO_IMAGE)
    job = created.json["job"]
    assert created.json == {"job": job, "status": "received"}
    assert poll(client, job).json == {"job": job, "status": "received"}
    clock.advance(0.3)
    assert poll(client, job).json == {"job": job, "status": "in_progress"}
    clock.advance(0.69)
    assert poll(client, job).json["status"] == "in_progress"
    clock.advance(0.02)
    done = poll(client, job)
    assert done.status_code == 200
    assert done.json["status"] == "complete"
    assert done.json["result_url"].startswith("http://localhost/images/")


def test_job_ids_are_time_based_uuids(client: FlaskClient) -> None:
    job = submit(client, TEXT_TO_IMAGE).json["job"]
    assert len(job) == 36
    assert job[14] == "1"  # version nibble of a v1 UUID


def test_unknown_job_is_404(client: FlaskClient) -> None:
    response = poll(client, "44d46e9a-c3d5-11ed-af64-0242ac1f000f")
    assert response.status_code == 404
    assert response.json == {"message": "Job not found"}


def test_failed_job_answers_500_on_result_and_process_result(make_client: MakeClient) -> None:
    client = make_client(failure_rate=1.0)
    job = submit(client, TEXT_TO_IMAGE).json["job"]
    failed = poll(client, job)
    assert failed.status_code == 500
    assert failed.json == {"message": FAILURE_MESSAGE, "status": "failed", "job": job}
    sync = submit(client, TEXT_TO_IMAGE, "process_result")
    assert sync.status_code == 500
    assert sync.json["status"] == "failed"
    assert sync.json["message"] == FAILURE_MESSAGE


def test_process_result_returns_result_url_when_done(client: FlaskClient) -> None:
    response = submit(client, TEXT_TO_IMAGE, "process_result")
    assert response.status_code == 200
    assert set(response.json) == {"job", "status", "result_url"}
    assert response.json["status"] == "complete"


def test_process_result_gives_up_after_the_wait_window(make_client: MakeClient) -> None:
    client = make_client(processing_time=60.0, process_result_wait=0.05)
    started = time.monotonic()
    response = submit(client, TEXT_TO_IMAGE, "process_result")
    assert time.monotonic() - started < 2
    assert response.status_code == 200
    assert response.json["status"] in ("received", "in_progress")
    assert "result_url" not in response.json


def test_concurrency_limit_answers_429(make_client: MakeClient, clock: FakeClock) -> None:
    client = make_client(processing_time=5.0, concurrency_limit=2)
    assert submit(client, TEXT_TO_IMAGE).status_code == 200
    assert submit(client, TEXT_TO_IMAGE).status_code == 200
    refused = submit(client, TEXT_TO_IMAGE)
    assert refused.status_code == 429
    assert refused.json == {
        "message": "Image cannot be processed right now. Your rate limit is 2 and you are "
        "currently processing 2 images.",
        "code": "TOO_MANY_REQUESTS",
    }
    assert "Retry-After" not in refused.headers
    clock.advance(5.0)
    assert submit(client, TEXT_TO_IMAGE).status_code == 200


def test_peak_active_is_the_most_jobs_ever_running_at_once(
    make_client: MakeClient, clock: FakeClock
) -> None:
    client = make_client(processing_time=5.0, concurrency_limit=3)
    for _ in range(2):
        assert submit(client, TEXT_TO_IMAGE).status_code == 200
    clock.advance(5.0)  # both finish
    for _ in range(3):
        assert submit(client, TEXT_TO_IMAGE).status_code == 200
    assert submit(client, TEXT_TO_IMAGE).status_code == 429  # refused: never active
    clock.advance(5.0)
    assert submit(client, TEXT_TO_IMAGE).status_code == 200
    stats = client.get("/_sim/stats").json
    assert (stats["jobs_created"], stats["jobs_active"], stats["peak_active"]) == (6, 1, 3)
    assert list(stats["peak_active_by_account"].values()) == [3]
    client.post("/_sim/reset")
    assert client.get("/_sim/stats").json["peak_active"] == 0


def test_rate_limit_rate_answers_429_at_random(make_client: MakeClient) -> None:
    client = make_client(rate_limit_rate=1.0)
    for endpoint in ("process", "process_result"):
        response = submit(client, TEXT_TO_IMAGE, endpoint)
        assert response.status_code == 429
        assert response.json["code"] == "TOO_MANY_REQUESTS"
        message = response.json["message"]
        assert "Your rate limit is 100 and you are currently processing 0 images." in message
    assert client.get("/_sim/stats").json["injected_rate_limits"] == 2


def test_upstream_errors_are_5xx_without_job_failure(make_client: MakeClient) -> None:
    client = make_client(upstream_error_rate=1.0, seed=7)
    statuses = set()
    for _ in range(20):
        response = submit(client, TEXT_TO_IMAGE)
        statuses.add(response.status_code)
        assert set(response.json) == {"code", "message"}
    assert statuses <= {500, 502, 503}
    assert len(statuses) > 1
    stats = client.get("/_sim/stats").json
    assert stats["jobs_created"] == 0
    assert stats["responses_5xx"] == 20


def test_seeded_runs_repeat_the_same_faults(make_client: MakeClient) -> None:
    def outcomes() -> list[int]:
        client = make_client(failure_rate=0.5, seed=42)
        jobs = [submit(client, TEXT_TO_IMAGE).json["job"] for _ in range(12)]
        return [poll(client, job).status_code for job in jobs]

    first, second = outcomes(), outcomes()
    assert first == second
    assert set(first) == {200, 500}


def test_credits_run_out(make_client: MakeClient) -> None:
    client = make_client(credits=1)
    assert submit(client, TEXT_TO_IMAGE).status_code == 200
    refused = submit(client, TEXT_TO_IMAGE)
    assert refused.status_code == 400
    assert refused.json["code"] == "NOT_ENOUGH_CREDITS"


def test_latency_is_added_to_api_answers(make_client: MakeClient) -> None:
    client = make_client(latency=0.05)
    started = time.monotonic()
    client.get("/rest_api/me", headers=AUTH)
    assert time.monotonic() - started >= 0.05


def test_old_finished_jobs_are_forgotten_beyond_max_jobs(make_client: MakeClient) -> None:
    client = make_client(max_jobs=1)
    first = submit(client, TEXT_TO_IMAGE).json["job"]
    poll(client, first)
    second = submit(client, TEXT_TO_IMAGE).json["job"]
    assert poll(client, first).status_code == 404
    assert poll(client, second).status_code == 200


# -- result images -----------------------------------------------------------------------------

IMAGE_CASES = [
    pytest.param(TEXT_TO_IMAGE, (2048, 1024), "PNG", "image/png", id="text-to-image-png"),
    pytest.param({**URL_INPUT, "width": "200%"}, (2048, 2048), "JPEG", "image/jpeg", id="percent"),
    pytest.param(
        {**URL_INPUT, "width": 3000, "generative_upscale": True},
        (3000, 3000),
        "JPEG",
        "image/jpeg",
        id="generative-upscale",
    ),
    pytest.param({**URL_INPUT, "height": 300}, (300, 300), "JPEG", "image/jpeg", id="height-only"),
    pytest.param(
        {**URL_INPUT, "width": 640, "height": 480, "output_format": "jpeg"},
        (640, 480),
        "JPEG",
        "image/jpeg",
        id="canvas-jpeg",
    ),
    pytest.param(
        {**TEXT_TO_IMAGE, "width": 320, "height": 200, "output_format": "webp"},
        (320, 200),
        "WEBP",
        "image/webp",
        id="webp",
    ),
    pytest.param(
        {**URL_INPUT, "width": 200, "output_format": "png", "background": {"color": "transparent"}},
        (200, 200),
        "PNG",
        "image/png",
        id="transparent-png",
    ),
    pytest.param(
        {
            "url": "base64," + base64.b64encode(png_bytes(300, 100)).decode(),
            "width": 600,
        },
        (600, 200),
        "JPEG",
        "image/jpeg",
        id="inline-base64-keeps-aspect",
    ),
    pytest.param(
        {"url": "data:image/png;base64," + base64.b64encode(png_bytes(40, 80)).decode()},
        (40, 80),
        "JPEG",
        "image/jpeg",
        id="inline-data-url",
    ),
    pytest.param(
        {"url": "base64," + base64.encodebytes(png_bytes(30, 70)).decode().replace("\n", "\r\n")},
        (30, 70),
        "JPEG",
        "image/jpeg",
        id="inline-base64-with-line-breaks",
    ),
    pytest.param(
        {"url": "base64," + base64.urlsafe_b64encode(png_bytes(50, 20)).decode()},
        (50, 20),
        "JPEG",
        "image/jpeg",
        id="inline-base64-url-safe",
    ),
    pytest.param(
        {**URL_INPUT, "background": {"replace": f"data:image/png;base64,{PNG_BASE64}"}},
        (1024, 1024),
        "JPEG",
        "image/jpeg",
        id="replace-inline-data-url",
    ),
    pytest.param(
        {**URL_INPUT, "width": 400, "height": 200, "fit": "bounds"},
        (200, 200),
        "JPEG",
        "image/jpeg",
        id="fit-bounds",
    ),
]


@pytest.mark.parametrize(("body", "size", "pil_format", "content_type"), IMAGE_CASES)
def test_result_image_has_requested_size_and_format(
    client: FlaskClient,
    body: dict[str, Any],
    size: tuple[int, int],
    pil_format: str,
    content_type: str,
) -> None:
    image, response = result_image(client, body)
    assert image.size == size
    assert image.format == pil_format
    assert response.headers["Content-Type"] == content_type
    assert int(response.headers["Content-Length"]) == len(response.data)
    assert image.getextrema() != ((0, 0), (0, 0), (0, 0))  # not a blank picture


def test_transparent_background_keeps_alpha(client: FlaskClient) -> None:
    image, _ = result_image(client, {**URL_INPUT, "background": {"color": "transparent"}})
    assert image.mode == "RGBA"


@pytest.mark.parametrize(("output_format", "extension"), [("jpg", ".jpg"), ("jpeg", ".jpg")])
def test_jpeg_results_use_the_jpg_extension(
    client: FlaskClient, output_format: str, extension: str
) -> None:
    done = submit(client, {**URL_INPUT, "output_format": output_format}, "process_result")
    assert done.json["result_url"].endswith(extension)


@pytest.mark.parametrize("part", ["fileName", "image"])
def test_multipart_upload_uses_the_real_image_size(client: FlaskClient, part: str) -> None:
    response = client.post(
        "/rest_api/process_result",
        data={
            "parameters": json.dumps({"width": "50%", "output_format": "png"}),
            part: (io.BytesIO(png_bytes(40, 20)), "input.png"),
        },
        headers=AUTH,
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.json
    image = Image.open(io.BytesIO(fetch_image(client, response.json["result_url"]).data))
    assert image.size == (20, 10)
    debug = client.get(f"/_sim/jobs/{response.json['job']}").json
    assert debug["request"] == {"width": "50%", "output_format": "png"}
    assert debug["upload"]["part"] == part


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"image": (io.BytesIO(b"not an image"), "x.png")}, "parameters is required"),
        ({"parameters": "{broken"}, "Invalid JSON body"),
        (
            {"parameters": "{}", "image": (io.BytesIO(b"not an image"), "x.png")},
            "Unidentified image",
        ),
    ],
)
def test_bad_multipart_requests_are_400(
    client: FlaskClient, data: dict[str, Any], message: str
) -> None:
    response = client.post(
        "/rest_api/process", data=data, headers=AUTH, content_type="multipart/form-data"
    )
    assert response.status_code == 400
    assert response.json == {"message": message, "code": "BAD_REQUEST"}


def test_result_padding_bytes_grow_the_image(make_client: MakeClient) -> None:
    client = make_client(result_padding_bytes=100_000)
    image, response = result_image(client, {**URL_INPUT, "width": 64, "output_format": "png"})
    assert len(response.data) > 100_000
    assert image.size == (64, 64)


def test_public_url_sets_the_result_host(make_client: MakeClient) -> None:
    client = make_client(public_url="https://sim.example:8443/")
    done = submit(client, TEXT_TO_IMAGE, "process_result")
    assert done.json["result_url"].startswith("https://sim.example:8443/images/")


def test_result_image_expires_after_result_ttl(make_client: MakeClient, clock: FakeClock) -> None:
    client = make_client(result_ttl=60.0)
    url = submit(client, {**URL_INPUT, "width": 32}, "process_result").json["result_url"]
    assert fetch_image(client, url).status_code == 200
    clock.advance(61)
    assert fetch_image(client, url).status_code == 404


def test_unknown_image_is_404(client: FlaskClient) -> None:
    assert client.get("/images/2024-01-01/nothing.png").status_code == 404


# -- delete and account ------------------------------------------------------------------------


def test_delete_marks_the_result_deleted(client: FlaskClient) -> None:
    done = submit(client, {**URL_INPUT, "width": 32}, "process_result").json
    job, url = done["job"], done["result_url"]
    deleted = client.delete(f"/rest_api/result/{job}", headers=AUTH)
    assert deleted.status_code == 200
    assert deleted.json == {"message": "Image deleted", "job": job}
    gone = poll(client, job)
    assert gone.status_code == 404
    assert gone.json == {"message": "Image deleted", "status": "complete"}
    assert fetch_image(client, url).status_code == 404
    assert client.delete(f"/rest_api/result/{job}", headers=AUTH).status_code == 200


def test_delete_of_unknown_job_is_404(client: FlaskClient) -> None:
    response = client.delete("/rest_api/result/nope", headers=AUTH)
    assert response.status_code == 404
    assert response.json == {"message": "Job not found"}


def test_delete_cancels_a_pending_job(make_client: MakeClient, clock: FakeClock) -> None:
    client = make_client(processing_time=5.0)
    job = submit(client, TEXT_TO_IMAGE).json["job"]
    assert client.delete(f"/rest_api/result/{job}", headers=AUTH).status_code == 200
    clock.advance(10)
    assert poll(client, job).json == {"message": "Image deleted", "status": "complete"}
    stats = client.get("/_sim/stats").json
    assert (stats["jobs_completed"], stats["jobs_deleted"], stats["jobs_active"]) == (0, 1, 0)


def test_me_reports_account_and_credits(make_client: MakeClient) -> None:
    client = make_client(credits=10, account_webhook_url="https://hooks.example/deep")
    submit(client, TEXT_TO_IMAGE, "process_result")
    me = client.get("/rest_api/me", headers=AUTH)
    assert me.status_code == 200
    assert set(me.json) == {"username", "email", "credits", "rate_limit", "processing", "webhooks"}
    assert me.json["credits"] == 9
    assert me.json["webhooks"] == {"complete": "https://hooks.example/deep"}
    assert KEY not in json.dumps(me.json)


# -- control and introspection -----------------------------------------------------------------


def test_sim_settings_changes_knobs_at_run_time(client: FlaskClient) -> None:
    knobs = client.post("/_sim/settings", json={"failure_rate": 1, "processing_time": 0})
    assert knobs.status_code == 200
    assert knobs.json["failure_rate"] == 1.0
    assert "api_keys" not in knobs.json
    job = submit(client, TEXT_TO_IMAGE).json["job"]
    assert poll(client, job).status_code == 500
    assert client.get("/_sim/settings").json["failure_rate"] == 1.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"no_such_knob": 1},
        {"failure_rate": "high"},
        {"failure_rate": 2},
        {"concurrency_limit": 1.5},
        {"send_failure_callbacks": 1},
        {"api_keys": "sim-key"},
        [1, 2],
    ],
)
def test_sim_settings_rejects_bad_overrides(client: FlaskClient, overrides: Any) -> None:
    response = client.post("/_sim/settings", json=overrides)
    assert response.status_code == 400
    assert response.json["code"] == "BAD_REQUEST"
    assert client.get("/_sim/settings").json["failure_rate"] == 0.0


def test_sim_jobs_and_stats_show_what_upstream_saw(client: FlaskClient) -> None:
    body = {**TEXT_TO_IMAGE, "webhooks": {"complete": "http://127.0.0.1:9/hook"}}
    job = submit(client, body).json["job"]
    submit(client, {})
    debug = client.get(f"/_sim/jobs/{job}").json
    assert debug["request"] == body
    assert debug["endpoint"] == "process"
    assert debug["callback_url"] == "http://127.0.0.1:9/hook"
    assert debug["state"] == "complete"
    assert client.get("/_sim/jobs").json["jobs"] == [{"job": job, "state": "complete"}]
    stats = client.get("/_sim/stats").json
    assert stats["jobs_created"] == 1
    assert stats["jobs_completed"] == 1
    assert stats["responses_by_status"] == {"200": 1, "400": 1}
    assert client.get("/_sim/jobs/unknown").status_code == 404


def test_sim_reset_forgets_jobs_and_counters(client: FlaskClient) -> None:
    job = submit(client, TEXT_TO_IMAGE).json["job"]
    assert client.post("/_sim/reset").json == {"status": "reset"}
    assert poll(client, job).status_code == 404
    assert client.get("/_sim/stats").json["jobs_created"] == 0


# -- settings and CLI --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [
        {"failure_rate": 1.5},
        {"processing_time": -1},
        {"callback_timeout": 0},
        {"api_keys": frozenset()},
        {"public_url": "sim.example"},
    ],
)
def test_settings_reject_unsafe_values(knobs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulatorSettings(**knobs)


def test_settings_defaults_suit_fast_tests() -> None:
    settings = SimulatorSettings()
    assert settings.api_keys == frozenset({"sim-key"})
    assert (settings.latency, settings.failure_rate, settings.callback_delay) == (0, 0, 0)
    assert settings.processing_time <= 0.2
    assert settings.process_result_wait == 25
    assert settings.concurrency_limit == 100
    assert settings.seed is None


def test_cli_flags_map_to_knobs() -> None:
    args = build_parser().parse_args(
        [
            "--port", "8099",
            "--api-key", "a", "--api-key", "b",
            "--latency", "0.05", "--failure-rate", "0.1", "--rate-limit-rate", "0.05",
            "--duplicate-callback-rate", "0.1", "--lost-callback-rate", "0.1",
            "--callback-delay", "0.2", "--processing-time", "1.0",
            "--process-result-wait", "25", "--concurrency-limit", "50", "--seed", "1",
            "--send-failure-callbacks", "--public-url", "http://sim:8099",
        ]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert (args.host, args.port) == ("127.0.0.1", 8099)
    assert settings.api_keys == frozenset({"a", "b"})
    assert settings.failure_rate == 0.1
    assert settings.concurrency_limit == 50
    assert settings.seed == 1
    assert settings.send_failure_callbacks is True
    assert settings.public_url == "http://sim:8099"
    assert settings.callback_timeout == SimulatorSettings().callback_timeout


def test_cli_requires_a_port() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
