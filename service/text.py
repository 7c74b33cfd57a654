"""Text no database column can hold, found before it is stored.

NUL (PostgreSQL's text and JSONB refuse it) and lone surrogates (`\\ud800` is valid JSON, yet
no UTF-8 encodes it: PostgreSQL and SQLite both refuse it in a text column). The API refuses
them where requests are parsed (handlers/problems.py); what arrives by another road, such as
a trigger's push, is checked with the same functions before it is written.
"""

from __future__ import annotations

import math
import re
from typing import Any

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
UNSTORABLE_MESSAGE = "Contains a NUL character or invalid Unicode (a lone surrogate)."
NONFINITE_MESSAGE = "Must be a finite number."
# Objects and lists inside one another, at most, in a value kept as sent: Python's JSON
# encoder gives up at about 900 levels, which the parser reads, so a deeper value could be
# read and then not written. A Deep-Image request nests 4 levels.
MAX_NESTING = 64
NESTING_MESSAGE = f"Nested deeper than {MAX_NESTING} levels of objects and lists."


def has_unstorable(text: str) -> bool:
    """Whether `text` holds a NUL or a lone surrogate."""
    return UNSTORABLE.search(text) is not None


def escape_unstorable(text: str) -> str:
    """`text` with each NUL or lone surrogate written as its escape (`\\x00`, `\\ud800`), so
    it may be stored and shown."""
    return UNSTORABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def unstorable_fields(data: Any, limit: int = 10) -> list[str]:
    """Dotted paths (`metadata.order`, `a.0.b`) of strings in `data` no database can store;
    a bad key names its object."""
    found = _unstorable(data, "", limit, as_sent=False)
    return sorted(found)


def unstorable_values(data: Any, prefix: str = "", limit: int = 10) -> list[dict[str, str]]:
    """`[{field, message}]` for what in parsed JSON `data` no database can store, for a value
    kept as sent (a batch's `template`, say): the strings `unstorable_fields` finds, and
    numbers out of a double's range (`1e999` parses to infinity, which PostgreSQL's JSON has
    no spelling for). Fields are named under `prefix` (`items[3]` gives `items[3].custom_id`);
    a bad key names its object. So are objects and lists nested deeper than MAX_NESTING, by
    the path of the deepest one kept."""
    found = _unstorable(data, prefix, limit, as_sent=True)
    return [{"field": field, "message": found[field]} for field in sorted(found)]


def _unstorable(data: Any, prefix: str, limit: int, *, as_sent: bool) -> dict[str, str]:
    """{dotted path: message} of the unstorable values in `data`, at most about `limit`; with
    `as_sent` (a value kept as sent, not validated field by field), non-finite numbers and
    nesting past MAX_NESTING too."""
    found: dict[str, str] = {}
    stack: list[tuple[str, Any, int]] = [(prefix, data, 0)]
    while stack and len(found) < limit:
        path, value, depth = stack.pop()
        if as_sent and depth >= MAX_NESTING and isinstance(value, dict | list) and value:
            found[path or "(body)"] = NESTING_MESSAGE
        elif isinstance(value, str):
            if UNSTORABLE.search(value):
                found[path or "(body)"] = UNSTORABLE_MESSAGE
        elif isinstance(value, float):
            if as_sent and not math.isfinite(value):
                found[path or "(body)"] = NONFINITE_MESSAGE
        elif isinstance(value, dict):
            for key, item in value.items():
                if UNSTORABLE.search(key):
                    found[path or "(body)"] = UNSTORABLE_MESSAGE
                    continue
                stack.append((f"{path}.{key}" if path else key, item, depth + 1))
        elif isinstance(value, list):
            stack.extend(
                (f"{path}.{i}" if path else str(i), item, depth + 1) for i, item in enumerate(value)
            )
    return found
