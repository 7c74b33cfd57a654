"""Token bucket per API key, and the limit on invalid keys per address."""

from __future__ import annotations

from service.ratelimit import MAX_BUCKETS, BadKeyLimiter, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_allowed_then_requests_wait_for_tokens() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.retry_after("k") for _ in range(3)] == [None, None, None]
    wait = limiter.retry_after("k")
    assert wait is not None and 0.49 < wait <= 0.5
    clock.now += 0.5
    assert limiter.retry_after("k") is None
    assert limiter.retry_after("k") is not None


def test_keys_have_their_own_buckets_and_zero_turns_it_off() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=Clock())
    assert limiter.retry_after("a") is None
    assert limiter.retry_after("a") is not None
    assert limiter.retry_after("b") is None
    off = RateLimiter(rate=0, burst=1)
    assert all(off.retry_after("a") is None for _ in range(1000))


def test_full_buckets_are_forgotten_so_memory_stays_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10.0, burst=1, clock=clock)
    for n in range(MAX_BUCKETS):
        limiter.retry_after(f"key-{n}")
    clock.now += 1.0  # every bucket has refilled
    limiter.retry_after("one more")
    assert len(limiter._buckets) == 1


def test_a_recently_valid_key_is_spared_the_invalid_key_limit_until_it_fails() -> None:
    limiter = BadKeyLimiter(rate=0.01, burst=2, clock=Clock())
    limiter.succeeded("ours")
    limiter.failed("10.0.0.1", "guess-1")
    limiter.failed("10.0.0.1", "guess-2")
    assert limiter.refuse("10.0.0.1", "guess-3") is not None  # the address is over its limit
    assert limiter.refuse("10.0.0.1", "ours") is None  # a client sharing it still gets in
    limiter.failed("10.0.0.1", "ours")  # revoked: the lookup found no key
    assert limiter.refuse("10.0.0.1", "ours") is not None
