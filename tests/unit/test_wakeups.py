"""Worker wake-ups: one idle thread per signal, signals kept for the next waiter."""

from __future__ import annotations

import threading
import time

from service.runtime.worker import Wakeups


def test_a_signal_with_no_thread_waiting_is_kept_for_the_next_one() -> None:
    wakeups = Wakeups(limit=2)
    for _ in range(5):
        wakeups.signal()
    assert [wakeups.wait(0) for _ in range(3)] == [True, True, False]  # kept up to the limit


def test_a_signal_wakes_one_waiting_thread_and_signal_all_wakes_every_one() -> None:
    wakeups = Wakeups(limit=3)
    woken: list[bool] = []
    threads = [threading.Thread(target=lambda: woken.append(wakeups.wait(5))) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # all three are waiting
    wakeups.signal()
    time.sleep(0.2)
    assert woken == [True]
    wakeups.signal_all()
    for thread in threads:
        thread.join(timeout=5)
    assert woken == [True, True, True]


def test_wait_times_out_without_a_signal() -> None:
    started = time.monotonic()
    assert Wakeups(limit=1).wait(0.1) is False
    assert time.monotonic() - started >= 0.1
