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

gunicorn's warning about a request it cannot parse quotes what the client sent: a header line
without a colon (`Authorization Bearer <API key>`), a header's name or value, a request line.
Only the first words of it that cannot be a credential are kept (`'Authorization ***'`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from gunicorn.glogging import Logger
from gunicorn.http.errors import NoMoreData

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

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        # gunicorn's line for a request it could not parse (workers/base.py, handle_error):
        # "Invalid request from ip=...: " and the exception's text, formatted already.
        if isinstance(msg, str) and msg.startswith("Invalid request from ip="):
            msg = _without_request_bytes(msg)
        super().warning(msg, *args, **kwargs)

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        # "Ignored premature client disconnection. %s" with a NoMoreData, whose text quotes
        # the part of the head read before the client went away: its headers included.
        args = tuple(
            _without_request_bytes(str(arg)) if isinstance(arg, NoMoreData) else arg for arg in args
        )
        super().debug(msg, *args, **kwargs)

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


# Where the text of a gunicorn parse error (gunicorn/http/errors.py) starts quoting the
# client's bytes: `Invalid HTTP Header: 'Authorization Bearer gr_...'`, `No more data after:
# b'...'`. The quoted text runs to the end.
_QUOTED = re.compile(r": b?(['\"])")
# A header's name or a method: letters and hyphens. An API key or a token has digits, `_` or
# `.` as well (and a name with them is left out too: a loss of detail, not of a secret).
_NAME = re.compile(r"[A-Za-z][A-Za-z-]*")
_VERSION = re.compile(r"HTTP/\d\.\d")
# Texts of gunicorn's own that it quotes where it has no request bytes to show.
_GUNICORN_TEXTS = frozenset({"bare LF as line terminator"})


def _without_request_bytes(text: str) -> str:
    """`text` with the request bytes it quotes cut after their first words that cannot be a
    credential: a header's name or a method first, then a request target without its query
    and an HTTP version. The rest becomes `***`."""
    quoted = _QUOTED.search(text)
    quote = quoted.group(1) if quoted else ""
    if quoted is None or len(text) <= quoted.end() or not text.endswith(quote):
        return text
    words = text[quoted.end() : -1]
    if words in _GUNICORN_TEXTS:
        return text
    kept: list[str] = []
    for word in words.split(" "):
        if not _harmless(word, first=not kept):
            kept.append("***")
            break
        kept.append(redact(word))  # a request target loses its query
    return text[: quoted.end()] + " ".join(kept) + quote


def _harmless(word: str, *, first: bool) -> bool:
    """Whether `word` is a method or a header's name (first), a request target (after the
    first), or an HTTP version."""
    if _VERSION.fullmatch(word):
        return True
    return bool(_NAME.fullmatch(word)) if first else word.startswith("/")


def _console(handler: logging.Handler) -> bool:
    """Whether `handler` is the one gunicorn sets up for a log going to `-` (the console)."""
    return getattr(handler, "_gunicorn", False) and type(handler) is logging.StreamHandler


def _json_console_handler() -> logging.Handler:
    handler = json_handler()
    # gunicorn's mark of its own handlers: a configuration reload removes them before adding
    # new ones, which this logger then replaces again.
    handler._gunicorn = True  # type: ignore[attr-defined]
    return handler
