"""Webhook URLs are refused unless https and public, checked by syntax and after resolution."""

from __future__ import annotations

import socket
from ipaddress import ip_address
from typing import Any

import pytest
import requests

from service.notifications.ssrf import (
    MAX_URL_LENGTH,
    NoSuchHost,
    Unresolvable,
    UnsafeURL,
    URLPolicy,
    host_allowed,
    pinned_session,
    timed_resolver,
)

FAKE_DNS = {
    "hooks.example.com": ["93.184.216.34"],
    "public.example.com": ["93.184.216.34"],
    "x.com": ["93.184.216.34"],
    "internal.example.com": ["10.1.2.3"],
    "mixed.example.com": ["93.184.216.34", "2606:4700::1111", "192.168.0.7"],
    "dual.example.com": ["2606:4700::1111", "93.184.216.34"],
    "metadata.google.internal": ["93.184.216.34"],  # even if it resolved publicly
    "mapped.example.com": ["::ffff:127.0.0.1"],
    "rebind-to-metadata.example.com": ["169.254.169.254"],
    "aws-v6-metadata.example.com": ["fd00:ec2::254"],
}


def fake_resolver(host: str, port: int) -> list[str]:
    try:
        return FAKE_DNS[host]
    except KeyError:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"check_syntax must not resolve {host}")


REFUSED = [
    "http://10.0.0.1/",
    "https://10.0.0.1/",
    "https://127.0.0.1/",
    "https://[::1]/",
    "https://169.254.169.254/latest/meta-data",
    "https://[::ffff:169.254.169.254]/",
    "https://[::ffff:10.0.0.1]/",
    "https://0.0.0.0/",
    "https://0.1.2.3/",
    "https://[::]/",
    "https://224.0.0.1/",
    "https://[ff02::1]/",
    "https://100.64.0.1/",
    "https://192.168.1.1/",
    "https://172.16.0.1/",
    "https://[fe80::1]/",
    "https://[fe80::1%25eth0]/",
    "https://[fc00::1]/",
    "https://[fec0::1]/",
    "https://[2002:a00:1::1]/",  # 6to4 around 10.0.0.1
    "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
    "https://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "https://240.0.0.1/",
    "https://255.255.255.255/",
    "https://metadata.google.internal/",
    "https://METADATA.google.internal./computeMetadata/v1/",
    "https://metadata/",
    "https://internal.example.com/",
    "https://mixed.example.com/",
    "https://mapped.example.com/",
    "https://does-not-resolve.example.com/",
    "ftp://x.com/",
    "file:///etc/passwd",
    "gopher://x.com/",
    "x.com/hook",
    "https://user:pw@x.com/",
    "https://user@x.com/",
    "http://public.example.com/",
    "https://x.com/" + "a" * MAX_URL_LENGTH,
    "https:///hook",
    "https://",
    "https://x.com:0/",
    "https://x.com:65536/",
    "https://x.com\\@10.0.0.1/",
    "https://x.com/ hook",
    "https://x.com/\r\nHost: 10.0.0.1",
    "https://[::1/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_unsafe_urls_are_refused_with_a_reason(url: str) -> None:
    with pytest.raises(UnsafeURL) as refused:
        URLPolicy(resolver=fake_resolver).check(url)
    assert refused.value.reason
    assert str(refused.value) == refused.value.reason


@pytest.mark.parametrize(
    ("url", "addresses"),
    [
        ("https://93.184.216.34/", ["93.184.216.34"]),
        ("https://hooks.example.com/", ["93.184.216.34"]),
        ("https://hooks.example.com:8443/path?q=1#frag", ["93.184.216.34"]),
        ("HTTPS://Hooks.Example.COM/", ["93.184.216.34"]),
        ("https://dual.example.com/", ["2606:4700::1111", "93.184.216.34"]),
        ("https://[2606:4700::1111]/", ["2606:4700::1111"]),
        ("https://[::ffff:93.184.216.34]/", ["::ffff:93.184.216.34"]),
        ("https://[2002:5db8:d822::1]/", ["2002:5db8:d822::1"]),  # 6to4 around a public one
    ],
)
def test_public_https_urls_are_allowed_and_return_the_checked_addresses(
    url: str, addresses: list[str]
) -> None:
    checked = URLPolicy(resolver=fake_resolver).check(url)
    assert [ip_address(a) for a in checked] == [ip_address(a) for a in addresses]


@pytest.mark.parametrize(
    ("url", "addresses"),
    [
        ("http://127.0.0.1:8080/x", ["127.0.0.1"]),
        ("https://10.0.0.1/", ["10.0.0.1"]),
        ("http://[::1]:9/", ["::1"]),
        ("http://internal.example.com/", ["10.1.2.3"]),
        ("https://mixed.example.com/", ["93.184.216.34", "2606:4700::1111", "192.168.0.7"]),
    ],
)
def test_allow_private_allows_http_and_every_address(url: str, addresses: list[str]) -> None:
    assert URLPolicy(allow_private=True, resolver=fake_resolver).check(url) == addresses


@pytest.mark.parametrize(
    "url",
    [
        "https://metadata.google.internal/",
        "http://metadata/computeMetadata/v1/",
        "ftp://x.com/",
        "https://user:pw@x.com/",
        "https://does-not-resolve.example.com/",
        # The metadata service by address: dev mode opens private networks, never this.
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.170.2/v2/credentials",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 (RFC 6052)
        "http://[64:ff9b:1::a9fe:a9fe]/",  # local-use NAT64 (RFC 8215)
        "http://[::ffff:0:a9fe:a9fe]/",  # IPv4-translated (SIIT)
        "http://[2002:a9fe:a9fe::]/",  # 6to4
        "http://[::a9fe:a9fe]/",  # IPv4-compatible
        "http://[2001:0:4136:e378:8000:63bf:5601:5601]/",  # Teredo, client 169.254.169.254
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://rebind-to-metadata.example.com/",
        "http://aws-v6-metadata.example.com/",
    ],
)
def test_allow_private_still_refuses_metadata_names_bad_syntax_and_unresolvable_hosts(
    url: str,
) -> None:
    with pytest.raises(UnsafeURL) as refused:
        URLPolicy(allow_private=True, resolver=fake_resolver).check(url)
    assert refused.value.reason


@pytest.mark.parametrize(
    ("url", "reason_mentions"),
    [
        ("http://hooks.example.com/", "https"),
        ("ftp://hooks.example.com/", "https"),
        ("https://u:p@hooks.example.com/", "user name or password"),
        ("https://hooks.example.com:0/", "port"),
        ("https:///x", "no host"),
        ("https://metadata.google.internal/", "metadata"),
        ("https://hooks.example.com/" + "a" * MAX_URL_LENGTH, "longer than"),
    ],
)
def test_check_syntax_refuses_without_resolving(url: str, reason_mentions: str) -> None:
    with pytest.raises(UnsafeURL) as refused:
        URLPolicy(resolver=no_dns).check_syntax(url)
    assert reason_mentions in refused.value.reason


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/x",
        "https://internal.example.com/",  # only `check` resolves, at send time
        "https://10.0.0.1/",  # addresses are judged by `check`, not by syntax
        "https://" + "h" * 50 + ".example.com/" + "a" * (MAX_URL_LENGTH - 75),
    ],
)
def test_check_syntax_accepts_well_formed_https_urls(url: str) -> None:
    URLPolicy(resolver=no_dns).check_syntax(url)


def test_the_resolver_gets_the_host_and_the_effective_port() -> None:
    seen: list[tuple[str, int]] = []

    def recording(host: str, port: int) -> list[str]:
        seen.append((host, port))
        return ["93.184.216.34"]

    policy = URLPolicy(resolver=recording)
    policy.check("https://hooks.example.com/")
    policy.check("https://hooks.example.com:8443/")
    assert seen == [("hooks.example.com", 443), ("hooks.example.com", 8443)]


def test_an_ip_literal_is_not_resolved() -> None:
    assert URLPolicy(resolver=no_dns).check("https://93.184.216.34/") == ["93.184.216.34"]


def test_a_resolver_answer_that_is_not_an_address_is_refused() -> None:
    policy = URLPolicy(resolver=lambda host, port: ["not-an-ip"])
    with pytest.raises(UnsafeURL, match="does not resolve"):
        policy.check("https://hooks.example.com/")


@pytest.mark.parametrize(
    "host",
    [
        ".".join(["a" * 63] * 4) + ".com",  # 256 characters: a DNS name has at most 253
        "a" * 64 + ".example.com",  # a label has at most 63
        "999.1.1.1",  # no address, and a name's last label is never all digits
        "127.1",  # an address only to inet_aton, which getaddrinfo would take
    ],
)
def test_a_host_that_is_no_address_and_no_dns_name_is_refused_without_a_lookup(host: str) -> None:
    with pytest.raises(UnsafeURL, match="neither an IP address nor a valid DNS name") as refused:
        URLPolicy(resolver=no_dns).check(f"https://{host}/hook")
    assert not isinstance(refused.value, Unresolvable)  # lasting: nothing to try again


def test_a_name_the_dns_says_does_not_exist_is_told_from_a_lookup_that_failed_for_now() -> None:
    def answer(errno: int) -> Any:
        def resolver(host: str, port: int) -> list[str]:
            raise socket.gaierror(errno, "from the resolver")

        return resolver

    with pytest.raises(NoSuchHost, match="does not exist"):
        URLPolicy(resolver=answer(socket.EAI_NONAME)).check("https://gone.example.com/")
    with pytest.raises(Unresolvable, match="does not resolve") as for_now:
        URLPolicy(resolver=answer(socket.EAI_AGAIN)).check("https://hooks.example.com/")
    assert not isinstance(for_now.value, NoSuchHost)


def test_an_empty_resolver_answer_is_refused() -> None:
    with pytest.raises(UnsafeURL, match="does not resolve"):
        URLPolicy(resolver=lambda host, port: []).check("https://hooks.example.com/")


def test_the_system_resolver_is_the_default_and_refuses_localhost() -> None:
    with pytest.raises(UnsafeURL):
        URLPolicy().check("https://localhost/")


def test_pinned_session_follows_no_redirects_and_ignores_the_environment() -> None:
    with pinned_session(URLPolicy()) as session:
        assert session.max_redirects == 0
        assert session.trust_env is False
        assert session.get_adapter("https://x.com/") is session.get_adapter("http://x.com/")


def test_pinned_session_refuses_an_unsafe_url_before_any_connection() -> None:
    with (
        pinned_session(URLPolicy(resolver=fake_resolver)) as session,
        pytest.raises(UnsafeURL, match="not public"),
    ):
        session.post("https://internal.example.com/hook", data=b"{}", timeout=1)


def test_pinned_session_refuses_proxies() -> None:
    with (
        pinned_session(URLPolicy(resolver=fake_resolver)) as session,
        pytest.raises(ValueError, match="proxies"),
    ):
        session.get(
            "https://hooks.example.com/",
            proxies={"https": "http://proxy.example.com:3128"},
            timeout=1,
        )


def test_pinned_session_does_not_mount_other_schemes() -> None:
    with (
        pinned_session(URLPolicy(allow_private=True)) as session,
        pytest.raises(requests.exceptions.InvalidSchema),
    ):
        session.get("ftp://x.com/", timeout=1)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("deep-image.ai", True),
        ("DEEP-IMAGE.AI.", True),
        ("images.deep-image.ai", False),  # exact names are exact
        ("evil-deep-image.ai", False),
        ("neuroapi-store.s3.eu-central-1.amazonaws.com", True),  # via *.amazonaws.com
        ("amazonaws.com", False),  # *.suffix is for subdomains only
        ("evilamazonaws.com", False),
        ("127.0.0.1", False),
    ],
)
def test_host_allow_lists_match_exact_names_and_star_suffixes(host: str, allowed: bool) -> None:
    assert host_allowed(host, ("deep-image.ai", "*.amazonaws.com")) is allowed


def test_a_policy_with_allowed_hosts_refuses_other_hosts_before_resolving() -> None:
    policy = URLPolicy(resolver=no_dns, allowed_hosts=("hooks.example.com",))
    policy.check_syntax("https://hooks.example.com/a.png")
    with pytest.raises(UnsafeURL, match="allowed hosts"):
        policy.check_syntax("https://x.com/a.png")


def test_the_request_path_resolver_gives_up_after_its_timeout() -> None:
    import threading
    import time

    release = threading.Event()

    def hanging(host: str, port: int) -> list[str]:
        release.wait(10)
        return ["93.184.216.34"]

    policy = URLPolicy(resolver=timed_resolver(0.2, hanging))
    started = time.monotonic()
    try:
        with pytest.raises(UnsafeURL, match="does not resolve"):
            policy.check("https://hooks.example.com/")
        assert time.monotonic() - started < 2
    finally:
        release.set()
    assert URLPolicy(resolver=timed_resolver(2, fake_resolver)).check("https://x.com/") == [
        "93.184.216.34"
    ]


def test_a_result_hosts_lookup_is_timed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The download's deadline cannot cut getaddrinfo: its lookup goes through the timed
    lookups, with DOWNLOAD_DNS_TIMEOUT."""
    from service.config import Config
    from service.generations import store
    from service.notifications import ssrf

    asked: list[tuple[str, float]] = []

    class Lookups:
        def resolve(self, resolve: Any, host: str, port: int, timeout: float) -> list[str]:
            asked.append((host, timeout))
            return ["93.184.216.34"]

    monkeypatch.setattr(ssrf, "_LOOKUPS", Lookups())
    config = Config(database_url="sqlite://", result_hosts=("results.example",))
    policy = store.result_url_policy(config)
    assert policy.check("https://results.example/job/1.png") == ["93.184.216.34"]
    assert asked == [("results.example", store.DOWNLOAD_DNS_TIMEOUT)]
