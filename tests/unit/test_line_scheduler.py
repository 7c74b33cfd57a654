"""The line's scheduler and limit rules, without a database: deterministic by construction."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter

import pytest

from service.generations.line import (
    PAUSE_FIRST,
    PAUSE_MAX,
    Candidate,
    FairClock,
    TenantLine,
    adapted_limit,
    choose,
    pause_after,
)
from service.models import UpstreamAccount

T0 = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)


def backlog(tenant: str, count: int, *, start: int = 0) -> list[Candidate]:
    """`count` waiting generations of `tenant`, one second apart from T0 + start seconds."""
    return [Candidate(f"{tenant}-{n}", T0 + dt.timedelta(seconds=start + n)) for n in range(count)]


def owners(picks: list[str]) -> Counter[str]:
    return Counter(pick.split("-")[0] for pick in picks)


def test_a_single_request_is_not_behind_another_tenants_ten_thousand() -> None:
    catalog = TenantLine("big", in_flight=10, heads=backlog("big", 10_000))
    one = TenantLine("small", in_flight=0, heads=backlog("small", 1, start=20_000))
    assert choose(1, [catalog, one]) == ["small-0"]


def test_free_slots_alternate_between_equal_tenants() -> None:
    a = TenantLine("a", in_flight=0, heads=backlog("a", 5))
    b = TenantLine("b", in_flight=0, heads=backlog("b", 5, start=100))
    # a's head waited longer, so a goes first; then turns alternate.
    assert choose(4, [b, a]) == ["a-0", "b-0", "a-1", "b-1"]


class OneSlot:
    """The account's one slot, freed again and again: each time, every tenant holds none."""

    def __init__(self, *tenants: TenantLine) -> None:
        self.clock = FairClock()
        self.lines = {t.tenant_id: t for t in tenants}
        self.picks: list[str] = []

    def frees(self, times: int) -> Counter[str]:
        """Who got the slot each of `times` times."""
        for _ in range(times):
            [pick] = choose(1, list(self.lines.values()), self.clock)
            self.picks.append(pick)
            owner = self.lines[pick.split("-")[0]]
            self.lines[owner.tenant_id] = dataclasses.replace(owner, heads=owner.heads[1:])
        return owners(self.picks[-times:])


def test_with_one_slot_a_single_request_goes_next_whatever_its_age() -> None:
    clock = FairClock()
    catalog = TenantLine("big", in_flight=0, heads=backlog("big", 10_000))
    assert choose(1, [catalog], clock) == ["big-0"]  # the catalog alone, first
    catalog = dataclasses.replace(catalog, heads=catalog.heads[1:])
    one = TenantLine("small", in_flight=0, heads=backlog("small", 1, start=20_000))
    # The catalog's job ended: both hold nothing, and its next item is far older.
    assert choose(1, [catalog, one], clock) == ["small-0"]


@pytest.mark.parametrize(("weight_a", "weight_b", "share_a"), [(1, 1, 20), (3, 1, 30), (1, 3, 10)])
def test_with_one_slot_the_tags_share_it_by_weight(
    weight_a: int, weight_b: int, share_a: int
) -> None:
    a = TenantLine("a", in_flight=0, heads=backlog("a", 100), weight=weight_a)
    b = TenantLine("b", in_flight=0, heads=backlog("b", 100, start=500), weight=weight_b)
    assert OneSlot(a, b).frees(40) == {"a": share_a, "b": 40 - share_a}


def test_an_idle_tenant_banks_no_slots() -> None:
    slot = OneSlot(TenantLine("a", in_flight=0, heads=backlog("a", 100)))
    slot.frees(10)  # a alone
    slot.lines["b"] = TenantLine("b", in_flight=0, heads=backlog("b", 100, start=500))
    # b starts at the clock, not at 0: turn about from there, no run of ten slots for b.
    assert slot.frees(10) == {"a": 5, "b": 5}
    assert slot.picks[10] == "b-0"


def test_the_slots_held_come_before_the_tags() -> None:
    clock = FairClock(now=5.0, tags={"a": 5.0, "b": 9.0})
    a = TenantLine("a", in_flight=2, heads=backlog("a", 5))
    b = TenantLine("b", in_flight=0, heads=backlog("b", 5))
    assert choose(2, [a, b], clock) == ["b-0", "b-1"]  # b holds fewer, whatever its tag


def test_the_tenant_holding_fewer_slots_goes_first() -> None:
    a = TenantLine("a", in_flight=3, heads=backlog("a", 5))
    b = TenantLine("b", in_flight=0, heads=backlog("b", 5, start=100))
    assert owners(choose(3, [a, b])) == {"b": 3}


@pytest.mark.parametrize(("weight_a", "weight_b", "share_a"), [(2, 1, 20), (3, 1, 22), (1, 1, 15)])
def test_weights_divide_the_slots_in_proportion(weight_a: int, weight_b: int, share_a: int) -> None:
    a = TenantLine("a", in_flight=0, heads=backlog("a", 100), weight=weight_a)
    b = TenantLine("b", in_flight=0, heads=backlog("b", 100), weight=weight_b)
    assert owners(choose(30, [a, b]))["a"] == share_a


def test_max_in_flight_caps_a_tenant_and_leaves_the_rest_to_others() -> None:
    a = TenantLine("a", in_flight=1, heads=backlog("a", 10), max_in_flight=3)
    b = TenantLine("b", in_flight=5, heads=backlog("b", 10))
    picks = choose(6, [a, b])
    assert owners(picks) == {"a": 2, "b": 4}


def test_a_capped_tenant_alone_leaves_slots_free() -> None:
    a = TenantLine("a", in_flight=2, heads=backlog("a", 10), max_in_flight=2)
    assert choose(5, [a]) == []


def test_within_a_tenant_the_given_order_is_kept() -> None:
    # The database hands the heads over in line order (priority, then age).
    heads = [Candidate("urgent", T0 + dt.timedelta(hours=1)), *backlog("batch", 3)]
    assert choose(2, [TenantLine("t", in_flight=0, heads=heads)]) == ["urgent", "batch-0"]


def test_no_more_picks_than_free_slots_or_waiting_generations() -> None:
    a = TenantLine("a", in_flight=0, heads=backlog("a", 2))
    assert choose(0, [a]) == []
    assert choose(5, [a]) == ["a-0", "a-1"]
    assert choose(3, []) == []


def test_the_result_does_not_depend_on_the_order_tenants_are_listed() -> None:
    lines = [
        TenantLine(name, in_flight=n % 3, heads=backlog(name, 4, start=n))
        for n, name in enumerate("abcdef")
    ]
    assert choose(9, lines) == choose(9, list(reversed(lines)))


def account(limit: int, source: str) -> UpstreamAccount:
    return UpstreamAccount(id="deepimage", limit=limit, limit_source=source)


@pytest.mark.parametrize(
    ("limit", "source", "stated", "in_flight", "expected"),
    [
        (2, "probing", 10, 2, (10, "stated")),  # a 429 that states the limit: adopt it
        (10, "stated", 8, 10, (8, "stated")),  # the plan changed: follow it
        (8, "probing", None, 8, (4, "probing")),  # unstated: halve
        (8, "probing", None, 3, (1, "probing")),  # halve what was really in flight
        (1, "probing", None, 1, (1, "probing")),  # never below one
        (5, "configured", 2, 5, (5, "configured")),  # configured wins
    ],
)
def test_a_429_adapts_a_learned_limit(
    limit: int, source: str, stated: int | None, in_flight: int, expected: tuple[int, str]
) -> None:
    assert adapted_limit(account(limit, source), stated=stated, in_flight=in_flight) == expected


def test_pauses_after_unexplained_429s_double_up_to_a_cap() -> None:
    pauses = [pause_after(n) for n in range(1, 12)]
    assert pauses[0] == PAUSE_FIRST
    assert pauses[1] == 2 * PAUSE_FIRST
    assert pauses == sorted(pauses)
    assert pauses[-1] == PAUSE_MAX
