"""gunicorn logger: JSON access lines in Cloud Logging's shape, with credentials removed.

Deep-Image's callbacks authenticate with a token in the URL path
(`/v1/callbacks/deepimage/{id}/{token}`); gunicorn would print it in every access line, and
in its error log ("Error handling request ..."). Both logs' lines go through `redact`.
"""

from __future__ import annotations

import json
from typing import Any

from gunicorn.glogging import Logger

from service.logs import RedactingFormatter, redact

__all__ = ["RedactingLogger", "redact"]


class RedactingLogger(Logger):
    """One JSON object per request (`httpRequest` as Cloud Logging reads it), token-free."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                if not isinstance(handler.formatter, RedactingFormatter):
                    handler.setFormatter(RedactingFormatter(handler.formatter))

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
