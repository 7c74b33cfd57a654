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


class _Lowest(random.Random):
    """Every jitter at its lowest: the shortest schedule a policy can give."""

    def random(self) -> float:
        return 0.0


@pytest.mark.parametrize("max_age", [None, 600.0, 21600.0, 3 * 86400.0])
def test_a_submit_is_retried_until_its_max_age_whatever_its_attempts(
    max_age: float | None,
) -> None:
    # GENRELAY_SUBMIT_MAX_AGE is how long a submit keeps retrying: its attempts must not run
    # out first, even with every wait at its shortest (10 attempts used to end it in ~10 min).
    from service.config import Config
    from service.runtime.kinds import SUBMIT, retry_policies

    policy = retry_policies(Config(submit_max_age=max_age))[SUBMIT]
    assert policy.max_age is not None
    rng = _Lowest()
    shortest = sum(policy.backoff(n, rng) for n in range(1, policy.max_attempts))
    assert shortest >= policy.max_age


def test_a_schedules_delays_are_jittered_by_20_percent_either_way() -> None:
    # GENRELAY_WEBHOOK_RETRY_SCHEDULE: each entry's delay, ±20 % (README, Config).
    policy = RetryPolicy.from_schedule((0, 100))
    rng = random.Random(7)
    delays = [policy.backoff(1, rng) for _ in range(200)]
    assert all(80.0 <= d <= 120.0 for d in delays)
    assert len(set(delays)) > 100  # jittered, not constant
    # Spread over the whole band, on both sides of the entry.
    assert min(delays) < 85.0
    assert max(delays) > 115.0
    # Past the schedule's end the last entry repeats; the first, 0, stays 0.
    assert all(80.0 <= policy.backoff(5, rng) <= 120.0 for _ in range(50))
    assert policy.backoff(0, rng) == 0.0
