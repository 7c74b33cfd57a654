"""Exponential backoff with jitter, capped."""

from __future__ import annotations

import random

import pytest

from service.runtime.queue import RetryPolicy


@pytest.mark.parametrize(
    ("attempts", "full"), [(1, 2.0), (2, 4.0), (3, 8.0), (6, 64.0), (20, 100.0)]
)
def test_backoff_doubles_per_attempt_up_to_the_cap_with_jitter_in_the_upper_half(
    attempts: int, full: float
) -> None:
    policy = RetryPolicy(base_delay=2.0, max_delay=100.0)
    rng = random.Random(7)
    delays = [policy.backoff(attempts, rng) for _ in range(200)]
    assert min(delays) >= full / 2
    assert max(delays) <= full
    assert len(set(delays)) > 100  # jittered, not constant
