"""Time-ordered resource ids (UUIDv7)."""

from __future__ import annotations

import time
import uuid

from service.ids import new_id, uuid7_hex


def test_an_id_is_a_valid_version_7_uuid_carrying_its_millisecond() -> None:
    value = uuid.UUID(uuid7_hex(now_ms=1_763_726_400_123))
    assert (value.version, value.variant) == (7, uuid.RFC_4122)
    assert value.int >> 80 == 1_763_726_400_123


def test_ids_made_later_sort_after_earlier_ones_and_never_repeat() -> None:
    earlier = [new_id("gen_") for _ in range(1000)]
    time.sleep(0.002)
    later = [new_id("gen_") for _ in range(1000)]
    assert max(earlier) < min(later)
    assert len(set(earlier + later)) == 2000
    assert all(len(i) == len("gen_") + 32 and i.startswith("gen_") for i in earlier)
