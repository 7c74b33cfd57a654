"""A body the client sends too slowly (service/server/gunicorn_worker.py raises ClientTooSlow from
the
socket read) is answered 408, not a 500 with a traceback."""

from __future__ import annotations

import io
from typing import Any

from service.errors import ClientTooSlow


class _StalledBody(io.RawIOBase):
    """What the app reads from a socket whose body stopped arriving."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise ClientTooSlow("the request did not arrive in time")


def test_a_body_that_stops_arriving_is_408(client: Any, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/subscriptions",
        headers={**auth, "Content-Type": "application/json"},
        environ_overrides={
            "wsgi.input": io.BufferedReader(_StalledBody()),
            "CONTENT_LENGTH": "100",
        },
    )
    assert response.status_code == 408
    assert response.mimetype == "application/problem+json"
    assert response.headers["Connection"] == "close"
