"""gunicorn logger: JSON access lines in Cloud Logging's shape, with credentials removed.

Deep-Image's callbacks authenticate with a token in the URL path
(`/v1/callbacks/deepimage/{id}/{token}`); gunicorn would print it in every access line.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gunicorn.glogging import Logger

_CALLBACK_TOKEN = re.compile(r"(/v1/callbacks/deepimage/[^/\s?]+/)[^/\s?]+")


def redact(text: str) -> str:
    """Replace the token of any callback path in `text` with `***`."""
    return _CALLBACK_TOKEN.sub(r"\1***", text)


class RedactingLogger(Logger):
    """One JSON object per request (`httpRequest` as Cloud Logging reads it), token-free."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U"):
            if isinstance(atoms.get(key), str):
                atoms[key] = redact(atoms[key])
        return atoms

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        status = str(atoms.get("s", "-"))
        entry = {
            "severity": "WARNING" if status.startswith("5") else "INFO",
            "message": atoms.get("r", ""),
            "logger": "gunicorn.access",
            "httpRequest": {
                "requestMethod": atoms.get("m"),
                "requestUrl": atoms.get("U"),
                "status": int(status) if status.isdigit() else None,
                "responseSize": atoms.get("B"),
                "userAgent": atoms.get("a"),
                "remoteIp": atoms.get("h"),
                "latency": f"{request_time.total_seconds():.6f}s",
            },
        }
        request_id = environ.get("HTTP_X_REQUEST_ID")
        if request_id:
            entry["request_id"] = request_id
        self.access_log.info(json.dumps(entry))
