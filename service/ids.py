"""Resource ids: a prefix and 32 hex digits of a UUIDv7 (RFC 9562), time-ordered.

The first 48 bits are the Unix time in milliseconds, the rest random (74 bits), so ids
created one after another sort together: a new row's primary-key entry lands at the right
edge of the B-tree instead of on a random leaf. On a large table random ids made every insert
touch (and, after each checkpoint, write to the WAL in full) a different cold page; see
bench/scale.md, "Large tables". An id tells when it was made, to the millisecond, as
`created_at` does already; it is no secret (access goes by API key and tenant), and tokens
that must be unguessable (claim tokens, callback tokens, keys) do not use this.
"""

from __future__ import annotations

import secrets
import time


def uuid7_hex(now_ms: int | None = None) -> str:
    """32 hex digits of a version-7 UUID for `now_ms` (default: the current time)."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand_a = secrets.randbits(12)
    rand_b = secrets.randbits(62)
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return f"{value:032x}"


def new_id(prefix: str) -> str:
    """`prefix` followed by a time-ordered UUIDv7 in hex, e.g. gen_019a8f2c4e1b7c3a9d...."""
    return prefix + uuid7_hex()
