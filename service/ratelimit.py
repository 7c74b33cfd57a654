"""Per-API-key rate limit: a token bucket per key, in this process's memory.

Each gunicorn process (and each Cloud Run instance) keeps its own buckets, so a deployment
lets through up to `rate x processes` per key: a guard against runaway clients, not billing.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_BUCKETS = 10_000
# Invalid API keys per client address (and per process): a burst of 20, then one a second.
BAD_KEY_RATE = 1.0
BAD_KEY_BURST = 20
# A key that was valid within this many seconds is still looked up from an address that is
# out of attempts (several clients behind one address, one of them misconfigured).
RECENTLY_VALID_SECONDS = 3600.0


class RateLimiter:
    """`rate` requests per second per key, with bursts of up to `burst`."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def peek(self, key: str) -> float | None:
        """Like `retry_after`, without taking the token."""
        if self.rate <= 0:
            return None
        now = self.clock()
        with self._lock:
            tokens, when = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        return None if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def retry_after(self, key: str) -> float | None:
        """Take a token for `key`: None if allowed, else the seconds until one is free."""
        if self.rate <= 0:
            return None
        now = self.clock()
        with self._lock:
            tokens, when = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.rate
            if len(self._buckets) >= MAX_BUCKETS and key not in self._buckets:
                self._forget_full(now)
            self._buckets[key] = (tokens - 1.0, now)
            return None

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled (they hold no information)."""
        for key, (tokens, when) in list(self._buckets.items()):
            if tokens + (now - when) * self.rate >= self.burst:
                del self._buckets[key]


class BadKeyLimiter:
    """Requests with an invalid API key, per client address.

    Each invalid key costs a token of its address's bucket; once the bucket is empty, that
    address's requests are refused (429) *before* the database lookup, except those with a key
    that was valid recently (so a client sharing the address keeps working; its key is still
    looked up, so a revocation still counts at once).
    """

    def __init__(
        self,
        rate: float = BAD_KEY_RATE,
        burst: int = BAD_KEY_BURST,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.buckets = RateLimiter(rate, burst, clock=clock)
        self.clock = clock
        self._valid: OrderedDict[str, float] = OrderedDict()  # key hash -> last seen valid
        self._lock = threading.Lock()

    def refuse(self, address: str, key_hash: str) -> float | None:
        """Seconds to wait before trying again from `address`; None: look the key up."""
        wait = self.buckets.peek(address)
        if wait is None:
            return None
        with self._lock:
            seen = self._valid.get(key_hash)
        if seen is not None and self.clock() - seen < RECENTLY_VALID_SECONDS:
            return None
        return wait

    def failed(self, address: str, key_hash: str) -> None:
        """A lookup of `key_hash` from `address` found no valid key: it costs the address a
        token, and the key (revoked, if it was valid) is no longer spared the limit."""
        self.buckets.retry_after(address)
        with self._lock:
            self._valid.pop(key_hash, None)

    def succeeded(self, key_hash: str) -> None:
        with self._lock:
            self._valid[key_hash] = self.clock()
            self._valid.move_to_end(key_hash)
            while len(self._valid) > MAX_BUCKETS:
                self._valid.popitem(last=False)
