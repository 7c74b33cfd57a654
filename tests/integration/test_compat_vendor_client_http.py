"""Requests built by Deep-Image's generated client go through genrelay unchanged.

The payloads of tests/fixtures/vendor_client_payloads.json (the vendor's defaults filled in)
are posted as `input`; the simulator must receive exactly the same body.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from service.tenants import Tenants

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vendor_client_payloads.json"
PAYLOADS: dict[str, dict[str, Any]] = {
    name: payload
    for name, payload in json.loads(FIXTURE.read_text(encoding="utf-8")).items()
    if not name.startswith("_")
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_a_vendor_client_request_is_accepted_and_forwarded_unchanged(
    client: Any, auth: dict[str, str], services: Any, simulator: Any, name: str
) -> None:
    # The operator lets this tenant use the Deep-Image storage the examples name.
    Tenants(services.store).set("acme", storages=["my-storage"])
    payload = PAYLOADS[name]
    response = client.post("/v1/generations", json={"input": payload}, headers=auth)
    assert response.status_code == 202, response.json
    body = response.json
    assert body["input"] == payload
    assert body["status"] == "processing", body["error"]
    upstream = requests.get(f"{simulator.url}/_sim/jobs/{body['upstream']['job']}", timeout=5)
    upstream.raise_for_status()
    # Polling-only mode (no public URL): nothing is added, so the body is exactly the input.
    assert upstream.json()["request"] == payload
