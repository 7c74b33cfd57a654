"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

FIXTURES = Path(__file__).parent / "fixtures"


def seed_examples() -> dict[str, dict[str, Any]]:
    """The JSON examples of the seed's "Image generation" page (and two more), by name."""
    return json.loads((FIXTURES / "seed_examples.json").read_text())  # type: ignore[no-any-return]


def set_simulator(simulator_url: str, **knobs: Any) -> None:
    """Change the simulator's fault knobs at run time, over HTTP like any other client."""
    response = requests.post(f"{simulator_url}/_sim/settings", json=knobs, timeout=5)
    response.raise_for_status()
