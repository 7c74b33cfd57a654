"""Timed DNS lookups: hosts whose name server never answers must not starve the others.

getaddrinfo cannot be interrupted, so a lookup whose caller gave up keeps its thread until
the system resolver gives up too. These tests hang the lookups of every name under one zone
on an Event (standing in for a name server that drops queries) and check that other hosts,
and other tenants' hosts, still resolve; every test releases the hung lookups and waits for
their threads before it ends.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from service.notifications.ssrf import (
    Unresolvable,
    URLPolicy,
    _Lookups,
    lookups_for,
    timed_resolver,
)

DEAD_ZONE = ".blackhole.example"  # every name under it hangs
HUNG = "hooks" + DEAD_ZONE
GOOD = "hooks.good-tenant.example"


class HangingDNS:
    """A resolver stub: names under DEAD_ZONE block until `release`, every other host answers
    at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.calls: list[tuple[str, int]] = []
        self.hanging = 0

    def __call__(self, host: str, port: int) -> list[str]:
        with self._lock:
            self.calls.append((host, port))
        if not host.lower().rstrip(".").endswith(DEAD_ZONE):
            return ["93.184.216.34"]
        with self._lock:
            self.hanging += 1
        try:
            self.release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        finally:
            with self._lock:
                self.hanging -= 1

    def calls_of(self, host: str) -> int:
        with self._lock:
            return sum(1 for called, _ in self.calls if called == host)

    def finish(self) -> None:
        """Let the hung lookups end, and wait until none is still running, nor counted by the
        process's lookups (the next test would meet its counts)."""
        from service.notifications import ssrf

        self.release.set()
        give_up = time.monotonic() + 10
        while (self.hanging or ssrf._LOOKUPS._count) and time.monotonic() < give_up:
            time.sleep(0.01)
        assert self.hanging == 0, "hung lookups still hold their threads"
        assert ssrf._LOOKUPS._count == 0, "lookups still counted after their threads ended"


@pytest.fixture
def dns() -> Iterator[HangingDNS]:
    stub = HangingDNS()
    try:
        yield stub
    finally:
        stub.finish()


def _refused(check: Callable[[str], list[str]], url: str) -> bool:
    try:
        check(url)
    except Unresolvable:
        return True
    return False


def test_ssrf_hung_lookups_of_one_host_leave_threads_for_the_others(dns: HangingDNS) -> None:
    """The reviewer's reproduction: a bad tenant's lookups time out, one after another (the
    same URL, and on other ports too); then a good tenant's host resolves, and at once."""
    deliveries = URLPolicy(allow_private=True, resolver=timed_resolver(0.05, dns))
    for i in range(12):
        assert _refused(deliveries.check, f"https://{HUNG}/x")
        assert _refused(deliveries.check, f"https://{HUNG}:{8000 + i}/x")

    requests_path = URLPolicy(allow_private=True, resolver=timed_resolver(2, dns))
    for _ in range(3):
        started = time.monotonic()
        assert deliveries.check(f"https://{GOOD}/x") == ["93.184.216.34"]
        assert requests_path.check(f"https://{GOOD}:8443/x") == ["93.184.216.34"]
        assert time.monotonic() - started < 1


def test_ssrf_concurrent_hung_lookups_leave_threads_for_the_others(dns: HangingDNS) -> None:
    """As above, with the bad tenant's checks all waiting at once (many worker threads)."""
    policy = URLPolicy(allow_private=True, resolver=timed_resolver(0.3, dns))
    urls = [f"https://{HUNG}/x"] * 8 + [f"https://{HUNG}:{9000 + i}/x" for i in range(8)]
    threads = [threading.Thread(target=_refused, args=(policy.check, url)) for url in urls]
    for thread in threads:
        thread.start()
    time.sleep(0.05)  # all of them waiting
    started = time.monotonic()
    assert policy.check(f"https://{GOOD}/x") == ["93.184.216.34"]
    assert time.monotonic() - started < 0.25  # before the bad ones even time out
    for thread in threads:
        thread.join(5)


def test_ssrf_callers_of_one_hung_host_share_a_lookup(dns: HangingDNS) -> None:
    """Lookups of one host name (and port) already running are joined, not repeated; so are
    the later ones, while the first still hangs: one thread for all of them."""
    policy = URLPolicy(allow_private=True, resolver=timed_resolver(0.05, dns))
    threads = [
        threading.Thread(target=_refused, args=(policy.check, f"https://{HUNG}/x"))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert _refused(policy.check, f"https://{HUNG}/other-path")
    assert dns.calls_of(HUNG) == 1


def test_ssrf_a_host_with_hung_lookups_is_refused_at_once(dns: HangingDNS) -> None:
    """Past the hung lookups one host may have, a lookup of it (another port: no lookup to
    join) is refused at once, as not resolving, without waiting for its timeout."""
    policy = URLPolicy(allow_private=True, resolver=timed_resolver(0.05, dns))
    assert _refused(policy.check, f"https://{HUNG}:1/x")
    assert _refused(policy.check, f"https://{HUNG}:2/x")
    slow = URLPolicy(allow_private=True, resolver=timed_resolver(5, dns))
    started = time.monotonic()
    with pytest.raises(Unresolvable, match="does not resolve"):
        slow.check(f"https://{HUNG.upper()}.:3/x")  # the same name, spelt otherwise
    assert time.monotonic() - started < 1
    assert dns.calls_of(HUNG) == 2


def test_ssrf_a_host_resolves_again_once_its_lookups_end(dns: HangingDNS) -> None:
    """Nothing is refused for longer than the hung lookups last: once they end, the host is
    looked up afresh."""
    policy = URLPolicy(allow_private=True, resolver=timed_resolver(0.05, dns))
    assert _refused(policy.check, f"https://{HUNG}/x")
    dns.finish()
    assert _refused(policy.check, f"https://{HUNG}/x")  # the stub fails at once now
    assert dns.calls_of(HUNG) == 2


def test_ssrf_a_shared_lookup_gives_each_caller_its_answer_or_error() -> None:
    """Callers joining a lookup get what it returned or raised (the resolver's own error)."""
    gate = threading.Event()
    answers = {"ok.example": ["93.184.216.34"]}

    def resolve(host: str, port: int) -> list[str]:
        gate.wait(5)
        if host in answers:
            return answers[host]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    resolver = timed_resolver(5, resolve)
    results: list[object] = []

    def call(host: str) -> None:
        try:
            results.append(resolver(host, 443))
        except OSError as exc:
            results.append(type(exc))

    threads = [threading.Thread(target=call, args=(host,)) for host in ["ok.example"] * 3]
    threads += [threading.Thread(target=call, args=(host,)) for host in ["no.example"] * 3]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert sorted(map(str, results)) == sorted(
        [str(["93.184.216.34"])] * 3 + [str(socket.gaierror)] * 3
    )


def test_ssrf_many_hung_hosts_of_one_tenant_leave_the_others_lookups_alone(
    dns: HangingDNS,
) -> None:
    """The reviewer's reproduction: a tenant names 40 hosts under a zone whose name server
    drops queries, its deliveries looking them up one after another and all at once. Another
    tenant's lookups still run at once; the first tenant's new ones fail at once while
    HUNG_PER_OWNER of its lookups hang."""
    policy = URLPolicy(allow_private=True, resolver=timed_resolver(0.05, dns))
    with lookups_for("ten_bad"):
        for i in range(20):
            assert _refused(policy.check, f"https://h{i}{DEAD_ZONE}/x")
    threads = [
        threading.Thread(target=_at_once_for, args=("ten_bad", policy, f"https://c{i}{DEAD_ZONE}/"))
        for i in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert dns.hanging == 4  # HUNG_PER_OWNER: the rest were refused without a lookup
    assert sum(dns.calls_of(f"h{i}{DEAD_ZONE}") for i in range(20)) == 4

    started = time.monotonic()
    with lookups_for("ten_good"):
        assert policy.check(f"https://{GOOD}/x") == ["93.184.216.34"]
    assert policy.check(f"https://{GOOD}:8443/x") == ["93.184.216.34"]  # genrelay's own
    assert time.monotonic() - started < 0.5

    slow = URLPolicy(allow_private=True, resolver=timed_resolver(5, dns))
    with lookups_for("ten_bad"), pytest.raises(Unresolvable, match="does not resolve"):
        slow.check("https://hooks.another-of-its-hosts.example/x")
    assert time.monotonic() - started < 1
    assert dns.calls_of("hooks.another-of-its-hosts.example") == 0


def _at_once_for(owner: str, policy: URLPolicy, url: str) -> None:
    with lookups_for(owner):
        _refused(policy.check, url)


def test_ssrf_a_tenant_looks_up_again_once_its_hung_lookups_end(dns: HangingDNS) -> None:
    lookups = _Lookups(hung_per_owner=1)
    with lookups_for("ten_bad"):
        with pytest.raises(OSError, match="no DNS answer within"):
            lookups.resolve(dns, HUNG, 443, 0.05)
        with pytest.raises(OSError, match="this tenant's hosts have had no DNS answer"):
            lookups.resolve(dns, GOOD, 443, 1)
        dns.finish()
        assert lookups.resolve(dns, GOOD, 443, 1) == ["93.184.216.34"]


def test_ssrf_lookups_running_at_once_have_a_ceiling(dns: HangingDNS) -> None:
    """MAX_LOOKUPS, over every owner: a safety net, each lookup being a thread."""
    lookups = _Lookups(max_running=2)
    for owner in ("ten_a", "ten_b"):
        with lookups_for(owner), pytest.raises(OSError, match="no DNS answer within"):
            lookups.resolve(dns, f"{owner}{DEAD_ZONE}", 443, 0.05)
    with lookups_for("ten_c"), pytest.raises(OSError, match="too many DNS lookups"):
        lookups.resolve(dns, GOOD, 443, 1)
    dns.finish()
    with lookups_for("ten_c"):
        assert lookups.resolve(dns, GOOD, 443, 1) == ["93.184.216.34"]
