"""Requests built the way Deep-Image's generated client builds them are accepted unchanged.

That client fills in every default of the vendor's OpenAPI description, so `dpi: 300` and
`print_reorientation: true` ride along on every request, and `background.remove: "auto"` on
every request with a background. tests/fixtures/vendor_client_payloads.json holds such
requests; VENDOR_DEFAULTS below says which defaults they must carry.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from schemas.deepimage import ProcessRequestSchema
from service.devtools.simulator.validation import validate_process_request

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vendor_client_payloads.json"
PAYLOADS: dict[str, dict[str, Any]] = {
    name: payload
    for name, payload in json.loads(FIXTURE.read_text(encoding="utf-8")).items()
    if not name.startswith("_")
}

# The defaults of the vendor's OpenAPI description, by the object that holds them. The client
# fills in those of every object it creates.
VENDOR_DEFAULTS: dict[tuple[str, ...], dict[str, Any]] = {
    (): {"fit": "canvas", "quality": 85, "dpi": 300, "print_reorientation": True},
    ("background",): {"remove": "auto"},
    ("background", "generate"): {"adapter_type": "generate_background", "item_area_percentage": 1},
    ("denoise_parameters",): {"type": "v1"},
    ("deblur_parameters",): {"type": "v1"},
    ("light_parameters",): {"level": 1},
    ("color_parameters",): {"level": 1},
    ("white_balance_parameters",): {"level": 1},
}


def _object_at(payload: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = payload
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, dict) else None


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_the_fixture_carries_every_default_of_the_objects_it_has(name: str) -> None:
    payload = PAYLOADS[name]
    for path, defaults in VENDOR_DEFAULTS.items():
        node = _object_at(payload, path)
        if node is None:
            continue
        for field, default in defaults.items():
            # A caller may set a value of its own (item_area_percentage 0.65); never leave it out.
            assert field in node, (name, path, field)
            if path == ():
                assert node[field] == default, (name, field)


def test_the_fixture_has_requests_without_print_size_and_without_url() -> None:
    assert any("print_size" not in p for p in PAYLOADS.values())
    assert any("url" not in p for p in PAYLOADS.values())
    assert any("print_size" in p for p in PAYLOADS.values())


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_intake_accepts_the_request_and_keeps_it_unchanged(name: str) -> None:
    payload = PAYLOADS[name]
    loaded = ProcessRequestSchema().load(copy.deepcopy(payload))
    assert loaded == payload
    assert json.dumps(loaded, sort_keys=True) == json.dumps(payload, sort_keys=True)


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_the_simulator_accepts_the_request(name: str) -> None:
    validate_process_request(copy.deepcopy(PAYLOADS[name]), None, max_pixels_side=8192)
