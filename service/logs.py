r"""One JSON object per log line, in the shape Cloud Logging reads.

Fields: `severity`, `message`, `logger`, and where known `logging.googleapis.com/trace`
(from the request's X-Cloud-Trace-Context), `request_id` and `generation_id`. The context
comes from context variables set by the web layer per request and by the task runner per
task, so code that logs never has to pass it along.

Deep-Image's callbacks authenticate with a token in the URL path
(`/v1/callbacks/deepimage/{id}/{token}`). Every line is passed through `redact` once it is
formatted (message, exception and traceback included), here and in gunicorn's logs
(service/server/gunicorn_logging.py), so no log line carries a token. `redact` also drops the
query string of any absolute http(s) URL, written plainly, JSON-escaped (`https:\/\/`) or
percent-encoded (`https%3A%2F%2F`, as an upstream message may quote it), and of a request
target (`/path?query`, as in gunicorn's request lines): webhook, result and signed URLs may
carry credentials there, and a client may send one in a request's query (`?api_key=`,
`?token=`), read or not.

GENRELAY_LOG_LEVEL sets the level of genrelay's own loggers (`genrelay.*`) only. Other
libraries stay at INFO (or at the level, when it asks for less): at DEBUG, urllib3 would log
each outgoing request line with its query string, and google-auth its token exchanges.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from pythonjsonlogger.json import JsonFormatter

TRACE_FIELD = "logging.googleapis.com/trace"

# A callback URL's path, its slashes as they are, JSON-escaped (`\/`) or percent-encoded
# (`%2F`: a URL quoted inside another's query); the token is what follows the id.
_SLASH = r"(?:/|\\/|%2[Ff])"
# A path segment: its characters, or percent-escapes of any but the slash (the server decodes
# `%38...` in a request target before routing, so a token sent so is still the token).
_SEGMENT = r"(?:[^/\\\s?#\"'%&]|%(?!2[Ff])[0-9A-Fa-f]{2})+"
_CALLBACK_TOKEN = re.compile(
    rf"({_SLASH}v1{_SLASH}callbacks{_SLASH}deepimage{_SLASH}{_SEGMENT}{_SLASH}){_SEGMENT}"
)
# A word of plain text, as far as a URL in it can reach: up to a space, a quote or a bracket.
_WORD = re.compile(r"[^\s\"'<>]+")
# The start of an absolute http(s) URL, its `://` as it is, JSON-escaped (`:\/\/`) or
# percent-encoded (`%3A%2F%2F`), and where its query starts: `?`, or `%3F` once encoded.
_HTTP = re.compile(rf"https?(?::|%3A){_SLASH}{_SLASH}", re.IGNORECASE)
_QUERY = re.compile(r"\?|%3F", re.IGNORECASE)
# GENRELAY_LOG_LEVEL is the level of this logger and its children.
OWN_LOGGER = "genrelay"


def redact(text: str) -> str:
    """Replace the token of any callback path in `text`, and the query string of any absolute
    http(s) URL or request target (a word starting with `/`), with `***`. Linear in the length
    of `text`, whatever it holds (it may come from a client: a request line, a header)."""
    text = _CALLBACK_TOKEN.sub(r"\1***", text)
    # Most lines hold no `?` (nor `%3F`) at all: they are left as they are without splitting
    # them into words.
    return _WORD.sub(_without_query, text) if "?" in text or "%3" in text else text


def _without_query(word: re.Match[str]) -> str:
    """`word` with the query of the (first) http(s) URL in it replaced by `***`, or, for a word
    that is a request target in origin form (`GET /v1/generations?api_key=... HTTP/1.1`), the
    query of that target."""
    text = word.group()
    url = _HTTP.search(text)  # a start of bounded length: no backtracking over the word
    if url is not None:
        start = url.end()
    elif text.startswith("/"):
        start = 0
    else:
        return text
    query = _QUERY.search(text, start)
    if query is None:
        return text
    fragment = text.find("#", query.end())
    return text[: query.end()] + "***" + ("" if fragment < 0 else text[fragment:])


class RedactingFormatter(logging.Formatter):
    """Wraps another formatter and redacts what it produces."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "genrelay_log_context",
    default={},  # noqa: B039 - never mutated: replaced on update
)


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Add fields to every log record made inside the block (None values are skipped)."""
    token = push_context(**fields)
    try:
        yield
    finally:
        pop_context(token)


def push_context(**fields: str | None) -> contextvars.Token[dict[str, str]]:
    """Add fields until `pop_context(token)` (for hooks that open and close in two places)."""
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})


def pop_context(token: contextvars.Token[dict[str, str]]) -> None:
    _context.reset(token)


def trace_from_header(header: str | None, project: str | None) -> str | None:
    """`projects/P/traces/T` from `X-Cloud-Trace-Context: T/SPAN;o=1` (None without both)."""
    if not header or not project:
        return None
    trace_id = header.split("/", 1)[0].strip()
    if not trace_id or not all(c in "0123456789abcdefABCDEF" for c in trace_id):
        return None
    return f"projects/{project}/traces/{trace_id}"


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _Formatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        # The plain texts were redacted below, before JSON escaped them; the callback paths of
        # the other fields (an access line's URL) here.
        return _CALLBACK_TOKEN.sub(r"\1***", super().format(record))

    def add_fields(
        self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_record, record, message_dict)
        for key in ("message", "exc_info", "stack_info"):
            if isinstance(log_record.get(key), str):
                log_record[key] = redact(log_record[key])
        # Cloud Logging reads the trace under its documented key.
        if "trace" in log_record:
            log_record[TRACE_FIELD] = log_record.pop("trace")


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a record comes, not as it was when logging was set
    up: whoever swaps it (a test harness capturing output, then closing what it captured
    into) does not leave a background thread's records writing to a closed file."""

    def __init__(self) -> None:
        super().__init__()
        self.stream_of: Callable[[], Any] = lambda: sys.stderr  # tests may point it elsewhere

    @property
    def stream(self) -> Any:
        return self.stream_of()

    @stream.setter
    def stream(self, _: Any) -> None:
        pass  # always the current sys.stderr


def json_handler() -> logging.Handler:
    """A handler of JSON lines on stderr, with the log context and redaction: the one
    `setup_logging` installs, and gunicorn's logs use (service/server/gunicorn_logging.py)."""
    handler = _StderrHandler()
    handler.setFormatter(
        _Formatter(
            "%(levelname)s %(name)s %(message)s %(process)d",
            rename_fields={"levelname": "severity", "name": "logger", "process": "pid"},
            timestamp="time",  # RFC 3339, which Cloud Logging takes as the entry's time
        )
    )
    handler.addFilter(_ContextFilter())
    return handler


def setup_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines (stdout stays for command output):
    genrelay's at `level`, other libraries' at INFO or above (see the module's docstring)."""
    root = logging.getLogger()
    root.handlers[:] = [json_handler()]
    own = logging.getLevelNamesMapping()[level.upper()]
    root.setLevel(max(own, logging.INFO))
    # Below INFO only for genrelay's loggers; otherwise they follow the root like the rest.
    logging.getLogger(OWN_LOGGER).setLevel(own if own < logging.INFO else logging.NOTSET)
    # Alembic announces each of its plugins at INFO on every run: noise, not news.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
