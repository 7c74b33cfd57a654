"""`genrelay inbox`: a local webhook receiver that verifies and prints what genrelay sends.

Point a subscription (or a generation's ``webhook``) at ``http://127.0.0.1:PORT/`` and every
notification appears on stdout as a short readable block, once its Standard Webhooks signature
checks out against one of the given secrets. Requests that fail verification are answered 401
with a one-line warning, and are still listed (``verified: false``) at ``GET /events`` next to
the good ones, so a wrong secret is easy to tell from a notification that never came.

Decisions worth knowing:
- Any path is accepted (``POST /``, ``POST /hooks/genrelay`` ...): subscribers' URLs vary.
- A correctly signed body that is not a JSON object is answered 400: the sender is broken and
  should hear so (and retry once fixed); it is listed as verified.
- The printed block and warnings only ever contain ASCII-safe text: header and body values are
  untrusted and must not be able to drive the terminal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Sequence
from types import FrameType
from typing import Any, TextIO

import standardwebhooks
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from service.server.background_server import BackgroundServer

logger = logging.getLogger("genrelay.inbox")

SECRETS_ENV = "GENRELAY_INBOX_SECRETS"
MAX_EVENTS = 100
# Generation resources are small, but their `input` may carry inline images.
MAX_BODY_BYTES = 32 * 1024 * 1024
# A rejected request is kept for diagnosis only; no need to hold megabytes of it.
_REJECTED_BODY_BYTES = 4096
_FIELD_CHARS = 200


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _safe(value: Any, limit: int = _FIELD_CHARS) -> str:
    """`value` as printable ASCII (other characters escaped), at most `limit` characters."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return "".join(
        ch if ch.isascii() and ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


class _EventLog:
    """The last `MAX_EVENTS` requests received, oldest first; safe across request threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)

    def add(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)


class _Printer:
    """Writes whole blocks to `out`, one at a time, so concurrent deliveries never interleave."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            try:
                self._out.write(text)
                self._out.flush()
            except (OSError, ValueError) as exc:
                # A closed or broken stdout must not turn a good delivery into a 500 (and a
                # retry storm); the event is still recorded at GET /events.
                logger.warning("inbox could not write to its output: %s", exc)


def _parse_json(body: bytes) -> Any:
    """The parsed body, or None when it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        return None


def _envelope(payload: Any) -> tuple[str | None, str | None, Any]:
    """(format, type, data) of a Standard Webhooks or structured CloudEvents payload."""
    if not isinstance(payload, dict):
        return None, None, None
    event_type = payload.get("type")
    event_type = event_type if isinstance(event_type, str) else None
    if "specversion" in payload:
        return "cloudevents", event_type, payload.get("data")
    return "standard", event_type, payload.get("data")


def _block(
    received_at: str, webhook_id: str, payload: dict[str, Any], path: str, timestamp: str
) -> str:
    """The readable block printed for one verified notification."""
    kind, event_type, data = _envelope(payload)
    lines = [f"[{received_at}] {_safe(event_type or '(no type)')}  (signature ok)"]
    lines.append(f"  webhook-id   {_safe(webhook_id)}")
    if kind == "cloudevents":
        lines.append(
            f"  cloudevent   id {_safe(payload.get('id'))}  source {_safe(payload.get('source'))}"
        )
    sent = payload.get("time") if kind == "cloudevents" else payload.get("timestamp")
    lines.append(f"  sent         {_safe(sent if sent is not None else timestamp)}")
    if path != "/":
        lines.append(f"  path         {_safe(path)}")
    if event_type is not None and event_type.startswith("generation.") and isinstance(data, dict):
        lines.append(f"  generation   {_safe(data.get('id'))}  status {_safe(data.get('status'))}")
        result = data.get("result")
        if isinstance(result, dict) and result.get("uri"):
            lines.append(f"  result       {_safe(result['uri'])}")
        error = data.get("error")
        if isinstance(error, dict) and (error.get("code") or error.get("message")):
            lines.append(
                f"  error        {_safe(error.get('code'))}: {_safe(error.get('message'))}"
            )
    return "\n".join(lines) + "\n\n"


def _webhooks(secrets: Sequence[str]) -> list[standardwebhooks.Webhook]:
    if isinstance(secrets, str):
        raise TypeError("secrets must be a sequence of secrets, not one string")
    if not secrets:
        raise ValueError("at least one secret is required")
    webhooks = []
    for position, secret in enumerate(secrets):
        try:
            webhooks.append(standardwebhooks.Webhook(secret))
        except (ValueError, standardwebhooks.webhooks.EmptyWebhookSecretError) as exc:
            # The position, never the secret: this message may be logged or shown.
            raise ValueError(f"secret #{position + 1} is not a valid whsec_ secret") from exc
    return webhooks


def _verify(
    webhooks: Sequence[standardwebhooks.Webhook], body: bytes, headers: dict[str, str]
) -> str | None:
    """None when one of the secrets verifies the request, else why none did."""
    reason = "no secret"
    for webhook in webhooks:
        # Besides its own error the library raises ValueError (binascii and Unicode errors
        # among them) on a malformed signature header or a non-UTF-8 body: all are one 401.
        try:
            webhook.verify(body, headers, json_parse=False)
        except UnicodeDecodeError:
            reason = "body is not UTF-8"
        except (standardwebhooks.WebhookVerificationError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
        else:
            return None
    return reason


def create_inbox_app(secrets: Sequence[str], *, out: TextIO | None = None) -> Flask:
    """The inbox WSGI app: verifies notifications with any of `secrets`, prints them to `out`."""
    webhooks = _webhooks(secrets)
    events = _EventLog()
    # Resolved per call, not at import: tests and the CLI may have swapped sys.stdout.
    printer = _Printer(out if out is not None else sys.stdout)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.post("/", defaults={"path": ""})
    @app.post("/<path:path>")
    def receive(path: str) -> tuple[Response | str, int]:
        body = request.get_data(cache=False)
        headers = {key.lower(): value for key, value in request.headers.items()}
        webhook_id = headers.get("webhook-id")
        received_at = _now_iso()
        payload = _parse_json(body)
        _, event_type, _ = _envelope(payload)
        reason = _verify(webhooks, body, headers)
        if reason is not None:
            events.add(
                {
                    "webhook_id": webhook_id,
                    "type": event_type,
                    "verified": False,
                    "received_at": received_at,
                    "body": body[:_REJECTED_BODY_BYTES].decode("utf-8", "replace"),
                }
            )
            printer.write(
                f"[{received_at}] ! rejected {_safe(webhook_id or '(no webhook-id)')}"
                f" from {_safe(request.remote_addr)}: {_safe(reason)}\n"
            )
            return jsonify(error=f"signature verification failed: {reason}"), 401
        assert webhook_id is not None  # verification requires the header
        events.add(
            {
                "webhook_id": webhook_id,
                "type": event_type,
                "verified": True,
                "received_at": received_at,
                "body": payload if payload is not None else body.decode("utf-8", "replace"),
            }
        )
        if not isinstance(payload, dict):
            printer.write(
                f"[{received_at}] ! {_safe(webhook_id)} is signed but its body is not a JSON"
                " object\n"
            )
            return jsonify(error="body is not a JSON object"), 400
        printer.write(
            _block(received_at, webhook_id, payload, "/" + path, headers["webhook-timestamp"])
        )
        return "", 204

    @app.get("/events")
    def list_events() -> Response:
        return jsonify(events.snapshot())

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        # JSON like every other answer here (404, 405, 413 ...) instead of werkzeug's HTML.
        response = jsonify(error=error.description)
        for name, value in error.get_headers():
            if name.lower() != "content-type":  # keeps Allow on a 405
                response.headers[name] = value
        return response, error.code or 500

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> tuple[Response, int]:
        logger.exception("inbox failed on %s %s", request.method, request.path)
        return jsonify(error="internal error in the inbox"), 500

    return app


class InboxServer(BackgroundServer):
    """The inbox served on ``host:port`` (0 = any free port) from a background thread."""

    label = "inbox"

    def __init__(
        self,
        secrets: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        out: TextIO | None = None,
    ) -> None:
        super().__init__(create_inbox_app(secrets, out=out), host, port, logger=logger)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: --port, --host, --secret (repeatable), --log-level."""
    parser = argparse.ArgumentParser(
        prog="genrelay inbox",
        description="Local webhook receiver: verifies genrelay's notifications and prints them.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0 = any)")
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        metavar="whsec_...",
        help=f"signing secret to accept; repeatable (default: ${SECRETS_ENV}, comma-separated)",
    )
    parser.add_argument("--log-level", default="INFO", help="default: INFO")
    return parser


def _secrets_from(args: argparse.Namespace) -> list[str]:
    if args.secrets:
        return list(args.secrets)
    return [part.strip() for part in os.environ.get(SECRETS_ENV, "").split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the inbox until SIGTERM/SIGINT; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    # A no-op when the caller (genrelay's own CLI) already configured logging.
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    secrets = _secrets_from(args)
    if not secrets:
        parser.error(f"give at least one --secret (or set {SECRETS_ENV})")
    try:
        server = InboxServer(secrets, host=args.host, port=args.port)
    except ValueError as exc:
        parser.error(str(exc))  # names the secret's position, never its value
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("inbox received signal %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        server.start()
        logger.info(
            "inbox listening on %s (GET %s/events lists what arrived)", server.url, server.url
        )
        # Short waits keep the main thread responsive to signals on every platform.
        while not stop.wait(0.5):
            pass
    except OSError as exc:
        logger.error("inbox could not start: %s", exc)
        return 1
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
