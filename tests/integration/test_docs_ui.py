"""/docs is Swagger UI served by genrelay itself: loaded in headless Chromium with every
outside host unreachable, it lists the API's operations."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.server.background_server import BackgroundServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_docs_page_loads_only_files_of_this_service(client: Any) -> None:
    page = client.get("/docs").get_data(as_text=True)
    assert "https://" not in page and "//cdn" not in page
    for name in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
        assert f"/docs/swagger-ui/{name}" in page
        with client.get(f"/docs/swagger-ui/{name}") as served:
            assert served.status_code == 200
            assert len(served.data) > 10_000
    assert client.get("/docs/swagger-ui/../../app.py").status_code == 404


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)",
)
def test_swagger_ui_lists_the_operations_in_headless_chromium(app: Any, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    with BackgroundServer(app, "127.0.0.1", 0, logger=logging.getLogger("test.docs")) as server:
        result = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}",
                # No internet: any host but this server's fails to resolve (a CDN would).
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"{server.url}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "opblock-summary" in dom, dom[-3000:]  # Swagger UI rendered operations
    for path in ("/v1/generations", "/v1/generations/{generation_id}", "/v1/subscriptions"):
        assert f'data-path="{path}"' in dom, path
    assert "Unable to render this definition" not in dom
