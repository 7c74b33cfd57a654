"""One JSON object per log line, in the shape Cloud Logging reads (`severity`, `message`)."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def setup_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines (stdout stays for command output)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "severity", "name": "logger"},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Alembic announces each of its plugins at INFO on every run: noise, not news.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
