"""gunicorn logger that keeps credentials out of the access log.

Deep-Image's callbacks authenticate with a token in the URL path
(`/v1/callbacks/deepimage/{id}/{token}`); gunicorn would print it in every access line.
"""

from __future__ import annotations

import re
from typing import Any

from gunicorn.glogging import Logger

_CALLBACK_TOKEN = re.compile(r"(/v1/callbacks/deepimage/[^/\s?]+/)[^/\s?]+")


def redact(text: str) -> str:
    """Replace the token of any callback path in `text` with `***`."""
    return _CALLBACK_TOKEN.sub(r"\1***", text)


class RedactingLogger(Logger):
    """Access log atoms with callback tokens removed from the request line and path."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U"):
            if isinstance(atoms.get(key), str):
                atoms[key] = redact(atoms[key])
        return atoms
