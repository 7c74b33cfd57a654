"""Per-API-key rate limit: a token bucket per key, in this process's memory.

Each gunicorn process (and each Cloud Run instance) keeps its own buckets, so a deployment
lets through up to `rate x processes` per key: a guard against runaway clients, not billing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MAX_BUCKETS = 10_000


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
