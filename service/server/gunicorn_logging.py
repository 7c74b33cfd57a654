"""gunicorn logger: its lines are JSON on stderr like the service's own, credentials removed.

Left alone, gunicorn writes its error log ("Starting gunicorn", "Worker failed to boot",
"Error handling request ...") as plain text on stderr and its access log on stdout. Here both
logs, when they go to the console (`-`), use the service's handler (service/logs.py): one JSON
line per record on stderr with `severity`, `message`, `logger` (`gunicorn.error` or
`gunicorn.access`), `time` and `pid`; an access line adds `httpRequest` as Cloud Logging reads
it, and `request_id` when the request had one.

Deep-Image's callbacks authenticate with a token in the URL path
(`/v1/callbacks/deepimage/{id}/{token}`), and a client may send a credential in the query
(`?api_key=`, `?token=`); gunicorn would print both in every access line, and in its error log.
Both logs' lines go through `redact`, which replaces the token and the query with `***`.
"""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.glogging import Logger

from service.logs import RedactingFormatter, json_handler, redact

__all__ = ["RedactingLogger", "redact"]


class RedactingLogger(Logger):
    """gunicorn's logs as JSON lines on stderr (`httpRequest` in access lines), token-free."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers[:]:
                if _console(handler):
                    logger.removeHandler(handler)
                    logger.addHandler(_json_console_handler())
                elif not isinstance(handler.formatter, RedactingFormatter):
                    handler.setFormatter(RedactingFormatter(handler.formatter))

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        """gunicorn's atoms, with the callback token and the query of the request target
        redacted wherever they hold it (a client may send a credential in the query). The
        request line keeps its method, path and version."""
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "{raw_uri}e", "{path_info}e"):
            if isinstance(atoms.get(key), str):
                atoms[key] = redact(atoms[key])
        for key in ("q", "{query_string}e"):
            if atoms.get(key):
                atoms[key] = "***"
        return atoms

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        status = str(atoms.get("s", "-"))
        extra: dict[str, Any] = {
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
        # The id the app used and answered with (it makes one up for a client's that is not a
        # plain token), not the client's header as sent.
        request_id = next(
            (value for name, value in resp.headers if name.lower() == "x-request-id"), None
        )
        if request_id:
            extra["request_id"] = request_id
        level = logging.WARNING if status.startswith("5") else logging.INFO
        self.access_log.log(level, "%s", atoms.get("r", ""), extra=extra)


def _console(handler: logging.Handler) -> bool:
    """Whether `handler` is the one gunicorn sets up for a log going to `-` (the console)."""
    return getattr(handler, "_gunicorn", False) and type(handler) is logging.StreamHandler


def _json_console_handler() -> logging.Handler:
    handler = json_handler()
    # gunicorn's mark of its own handlers: a configuration reload removes them before adding
    # new ones, which this logger then replaces again.
    handler._gunicorn = True  # type: ignore[attr-defined]
    return handler
