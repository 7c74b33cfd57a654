"""Outgoing requests to subscriber URLs, guarded against SSRF and DNS rebinding.

Subscribers choose the URLs genrelay calls. Unchecked, that lets any tenant make our servers
reach what only they can reach (server-side request forgery): the cloud metadata service at
169.254.169.254 (and its credentials), databases and admin consoles on private addresses,
loopback services. Checking the host name once is not enough either: a host can resolve to a
public address when it is checked and to 127.0.0.1 a moment later when the connection is
made (DNS rebinding), or a public URL can redirect to a private one.

So, in two places:
- `URLPolicy.check_syntax` (creation time, no DNS): https only (http in dev), a host, no
  user:password, a valid port, at most 2048 characters, no cloud metadata host names, a host
  that is an IP address or could be a DNS name (`999.1.1.1` is neither).
- `URLPolicy.check` (send time): the same, then the host is resolved and *every* address must be
  public: not private, loopback, link-local, multicast, unspecified, reserved, shared
  (100.64.0.0/10) or "this network" (0.0.0.0/8), nor an IPv6 form that embeds such an IPv4
  address (IPv4-mapped, 6to4, Teredo).
- `pinned_session` connects to the first address `check` returned, never to a fresh DNS answer,
  while the Host header, TLS SNI and certificate verification keep the URL's host name. One
  resolution per request, and the connection goes where the check looked: no rebinding window.
  Redirects are never followed.
- `Deadline` bounds the whole of a request (connecting, TLS, the answer) made through a pinned
  session: read timeouts bound each read only, and a target sending a byte at a time would
  otherwise hold the caller for as long as it likes.

`GENRELAY_ALLOW_PRIVATE_WEBHOOKS=1` (`allow_private`) allows http and private addresses, for
development and tests; the cloud metadata service stays refused even then, by name
(metadata.google.internal) and by address (169.254.0.0/16, where every cloud puts it, and
AWS's fd00:ec2::254), also in IPv4-mapped form.

The same guard downloads results (service/generations/store.py), with `allowed_hosts` set to
GENRELAY_RESULT_HOSTS: a result URL names a host on that list, or it is never fetched.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import heapq
import ipaddress
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

MAX_URL_LENGTH = 2048
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Names that reach the cloud metadata server without going through a numeric address check
# (on GCE they resolve to 169.254.169.254, but only there; refuse them by name everywhere).
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata"})
# Not covered by every `ipaddress` flag on every Python version, so named explicitly.
_NON_PUBLIC_V4_NETWORKS = (
    ipaddress.IPv4Network("0.0.0.0/8"),  # "this network"; 0.0.0.0 reaches localhost on Linux
    ipaddress.IPv4Network("100.64.0.0/10"),  # shared address space (carrier-grade NAT)
)

# The cloud metadata service (instance credentials): never reachable, whatever the policy.
# 169.254.169.254 on GCP, AWS and Azure, 169.254.170.2 on ECS: all of link-local IPv4.
_METADATA_NETWORKS = (
    ipaddress.IPv4Network("169.254.0.0/16"),
    ipaddress.IPv6Network("fd00:ec2::254/128"),
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


log = logging.getLogger("genrelay.ssrf")


class UnsafeURL(ValueError):
    """The URL may not be called; `reason` is a short human sentence (safe to show a client)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unresolvable(UnsafeURL):
    """The host did not resolve (or not in time): may change, unlike the other refusals."""


class NoSuchHost(Unresolvable):
    """The DNS answered that the name does not exist (NXDOMAIN), or it is no DNS name at
    all. Still an Unresolvable (a delivery tries again: the name may be created), but what
    must be decided now, such as a trigger's event, can take it as the lasting answer."""


# getaddrinfo's "no such name" (NXDOMAIN; EAI_NODATA, "no address for the name", where the
# platform has it). A resolver that cannot be reached answers EAI_AGAIN instead.
_NO_SUCH_NAME = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


def _is_host_name(name: str) -> bool:
    """Whether `name` (no trailing dot) can be a DNS name: at most 253 characters, labels of
    1 to 63, and not all digits in the last (`999.1.1.1` is no address and no name)."""
    labels = name.split(".")
    fits = len(name) <= 253 and all(1 <= len(label) <= 63 for label in labels)
    return fits and not labels[-1].isdigit()


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve `host` with getaddrinfo (IPv4 and IPv6), in the system's preference order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


LOOKUPS_PER_HOST = 2  # lookups of one host name running at once (on different ports)
HUNG_PER_OWNER = 4  # lookups of one tenant's hosts still running after their callers gave up
MAX_LOOKUPS = 512  # lookups running at once, hung ones included (a thread each)

# Whose hosts the lookups made here are for (a tenant's id; None: genrelay's own).
_OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "genrelay_dns_owner", default=None
)


@contextlib.contextmanager
def lookups_for(owner: str | None) -> Iterator[None]:
    """The lookups made inside the block are for `owner`'s hosts (a tenant's webhook or
    subscription), and count towards its hung lookups (see _Lookups)."""
    token = _OWNER.set(owner)
    try:
        yield
    finally:
        _OWNER.reset(token)


@dataclasses.dataclass
class _Lookup:
    """One running lookup, and how many callers are waiting for its answer."""

    resolve: Callable[[str, int], list[str]]  # kept alive while it runs: its id is in the keys
    host: str
    port: int
    owner: str | None
    future: concurrent.futures.Future[list[str]] = dataclasses.field(
        default_factory=concurrent.futures.Future
    )
    waiters: int = 0
    hung: bool = False  # every caller gave up on it, and it still runs

    @property
    def key(self) -> tuple[int, str, int]:
        """Which callers may share it: the same resolver, host name and port."""
        return (id(self.resolve), self.host, self.port)

    @property
    def name(self) -> tuple[int, str]:
        """Which lookups count towards one host name's limit: any port, any spelling."""
        return (id(self.resolve), self.host.lower().rstrip("."))


class _Lookups:
    """Runs lookups with a deadline: getaddrinfo cannot be interrupted, so each runs in a
    thread of its own and its callers stop waiting when their time is up.

    A lookup that hangs (a name server that drops queries) keeps its thread after its callers
    gave up, until the system resolver gives up too, which takes longer than our timeouts.
    Any tenant can name such hosts, as many as it likes (every name under a zone whose name
    server drops queries hangs), so hung lookups are bounded by whose they are, and never
    take what other tenants' lookups need:
    - callers of a host name and port whose lookup is running wait for that lookup, rather
      than starting another (a hung lookup is remembered for as long as it hangs, and later
      callers wait for it, each for its own timeout, without taking another thread);
    - at most `per_host` lookups of one host name run at once (different ports);
    - while `hung_per_owner` lookups of one owner (`lookups_for`: a tenant; None: genrelay's
      own, result downloads) hang, its new lookups fail at once, and other owners' are not
      affected (lookups that were waiting when those began to hang may hang too: as many as
      the owner's callers, threads of their own);
    - `max_running` bounds the threads of every lookup together, a safety net far above
      what the callers' own threads and the owners' hung lookups can hold.
    A lookup refused by a limit fails at once with OSError, as not resolving: a delivery is
    retried on its schedule, an API request answers that the host does not resolve now.
    """

    def __init__(
        self,
        max_running: int = MAX_LOOKUPS,
        per_host: int = LOOKUPS_PER_HOST,
        hung_per_owner: int = HUNG_PER_OWNER,
    ) -> None:
        self._max_running = max_running
        self._per_host = per_host
        self._hung_per_owner = hung_per_owner
        self._reset()
        # A forked child has none of the parent's threads: its lookups would never end.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[tuple[int, str, int], _Lookup] = {}
        self._count = 0  # lookups running, hung ones included
        self._hosts: dict[tuple[int, str], int] = {}  # lookups running, by host name
        self._hung: dict[str | None, int] = {}  # hung lookups, by owner

    def resolve(
        self, resolve: Callable[[str, int], list[str]], host: str, port: int, timeout: float
    ) -> list[str]:
        """`resolve(host, port)`, or OSError once `timeout` seconds have passed."""
        lookup = _Lookup(resolve, host, port, _OWNER.get())
        with self._lock:
            running = self._running.get(lookup.key)
            if running is not None:
                lookup = running
            else:
                self._refuse_past_limits(lookup)
                self._start(lookup)
            lookup.waiters += 1
        try:
            return lookup.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise OSError(f"no DNS answer within {timeout:g} s") from None
        finally:
            with self._lock:
                lookup.waiters -= 1
                if not lookup.waiters and not lookup.future.done() and not lookup.hung:
                    lookup.hung = True
                    self._hung[lookup.owner] = self._hung.get(lookup.owner, 0) + 1

    def _refuse_past_limits(self, lookup: _Lookup) -> None:
        """OSError if `lookup` may not start now; under the lock."""
        if self._hosts.get(lookup.name, 0) >= self._per_host:
            raise OSError("earlier lookups of this host have had no DNS answer yet")
        if self._hung.get(lookup.owner, 0) >= self._hung_per_owner:
            whose = "this tenant's hosts" if lookup.owner is not None else "these hosts"
            raise OSError(f"earlier lookups of {whose} have had no DNS answer yet")
        if self._count >= self._max_running:
            raise OSError("too many DNS lookups are running")

    def _start(self, lookup: _Lookup) -> None:
        """Run `lookup` on a thread of its own; under the lock."""
        thread = threading.Thread(target=self._run, args=(lookup,), name="dns", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: nothing is counted
            raise OSError("no thread for a DNS lookup") from None
        self._running[lookup.key] = lookup
        self._count += 1
        self._hosts[lookup.name] = self._hosts.get(lookup.name, 0) + 1

    def _run(self, lookup: _Lookup) -> None:
        try:
            answer = lookup.resolve(lookup.host, lookup.port)
        except BaseException as exc:
            lookup.future.set_exception(exc)
        else:
            lookup.future.set_result(answer)
        finally:
            with self._lock:
                self._forget(lookup)

    def _forget(self, lookup: _Lookup) -> None:
        """`lookup` is over; under the lock."""
        if self._running.get(lookup.key) is lookup:
            del self._running[lookup.key]
        self._count -= 1
        _decrement(self._hosts, lookup.name)
        if lookup.hung:
            _decrement(self._hung, lookup.owner)


def _decrement(counts: dict[Any, int], key: Any) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


_LOOKUPS = _Lookups()


def timed_resolver(
    timeout: float, resolve: Callable[[str, int], list[str]] = system_resolver
) -> Callable[[str, int], list[str]]:
    """`resolve`, giving up after `timeout` seconds with OSError (for the request path).

    Whatever `resolve` raises is raised as it is; so is OSError when a limit on hung lookups
    refuses the lookup (see _Lookups): one tenant's host names whose name servers do not
    answer do not delay, or refuse, the lookups of another's.
    """

    def resolver(host: str, port: int) -> list[str]:
        return _LOOKUPS.resolve(resolve, host, port, timeout)

    return resolver


def host_allowed(hostname: str, patterns: Iterable[str]) -> bool:
    """Whether `hostname` is on the list: exact names, or `*.suffix` for any subdomain."""
    name = hostname.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


def is_metadata_address(address: IPAddress) -> bool:
    """Whether `address` reaches the cloud metadata service, also through an IPv6 address
    that embeds an IPv4 one (mapped, compatible, 6to4, Teredo, NAT64): with
    GENRELAY_ALLOW_PRIVATE_WEBHOOKS such an address is not refused as non-public, and on a
    host that routes NAT64, 64:ff9b::a9fe:a9fe is 169.254.169.254."""
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        candidates += _embedded_ipv4(address)
    return any(a in network for a in candidates for network in _METADATA_NETWORKS)


# IPv6 prefixes whose last 32 bits are an IPv4 address a packet may end up at: NAT64's
# (RFC 6052), SIIT's, and IPv4-compatible addresses (::a.b.c.d, deprecated).
_IPV4_SUFFIX_NETWORKS = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 7915)
    ipaddress.IPv6Network("::/96"),
)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, by every translation that may reach them."""
    found = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if any(address in network for network in _IPV4_SUFFIX_NETWORKS):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


@dataclasses.dataclass(frozen=True)
class _Target:
    """The parts of a checked URL the connection needs."""

    scheme: str
    host: str  # as parse_url gives it: lower case, IDNA-encoded, IPv6 in brackets
    port: int  # explicit or the scheme's default
    explicit_port: bool

    @property
    def hostname(self) -> str:
        """The host without brackets, IPv6 zone id or trailing dot: for SNI and the cert."""
        name = self.host.strip("[]").split("%", 1)[0]
        return name.rstrip(".")

    @property
    def ip_literal(self) -> IPAddress | None:
        """The host as an address when the URL names one."""
        try:
            return ipaddress.ip_address(self.host.strip("[]"))
        except ValueError:
            return None

    @property
    def host_header(self) -> str:
        """What the Host header would be had we connected by name."""
        host = self.host.split("%", 1)[0] + ("]" if "%" in self.host else "")
        return f"{host}:{self.port}" if self.explicit_port else host


@dataclasses.dataclass(frozen=True)
class URLPolicy:
    """Which URLs may be called; `allow_private` is GENRELAY_ALLOW_PRIVATE_WEBHOOKS.

    `allowed_hosts` (None: any host) restricts the host names, e.g. to GENRELAY_RESULT_HOSTS.
    """

    allow_private: bool = False
    resolver: Callable[[str, int], list[str]] = system_resolver
    allowed_hosts: tuple[str, ...] | None = None

    def check_syntax(self, url: str) -> None:
        """Refuse a URL that is malformed or may never be called; no DNS (creation time)."""
        self._parse(url)

    def check(self, url: str) -> list[str]:
        """Refuse `url` unless every address its host resolves to is public; return them."""
        return self._resolve(self._parse(url))

    def _parse(self, url: str) -> _Target:
        if len(url) > MAX_URL_LENGTH:
            raise UnsafeURL(f"the URL is longer than {MAX_URL_LENGTH} characters")
        # Parsers disagree about backslashes and stray whitespace (`https://a.com\@10.0.0.1`);
        # no legitimate webhook URL needs them, so there is nothing for them to disagree on.
        if any(ch.isspace() or ch == "\\" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
            raise UnsafeURL("the URL contains whitespace, control characters or backslashes")
        try:
            # The parser requests itself uses, so the check sees the host the connection uses.
            parsed = parse_url(url)
        except LocationParseError:
            raise UnsafeURL("the URL is not valid (check the host and the port)") from None
        scheme = parsed.scheme or ""
        allowed = ("https", "http") if self.allow_private else ("https",)
        if scheme not in allowed:
            raise UnsafeURL(
                "the URL must use http or https" if self.allow_private else "the URL must use https"
            )
        if parsed.auth is not None:
            raise UnsafeURL("the URL must not contain a user name or password")
        if not parsed.host:
            raise UnsafeURL("the URL has no host")
        if parsed.port is not None and not 1 <= parsed.port <= 65535:
            raise UnsafeURL("the port must be between 1 and 65535")
        default_port = _DEFAULT_PORTS[scheme]
        target = _Target(
            scheme=scheme,
            host=parsed.host,
            port=parsed.port or default_port,
            explicit_port=parsed.port not in (None, default_port),
        )
        if target.hostname in _METADATA_HOSTS:
            raise UnsafeURL("the host is a cloud metadata service")
        if target.ip_literal is None and not _is_host_name(target.hostname):
            raise UnsafeURL("the host is neither an IP address nor a valid DNS name")
        if self.allowed_hosts is not None and not host_allowed(target.hostname, self.allowed_hosts):
            raise UnsafeURL("the host is not on the list of allowed hosts")
        return target

    def _resolve(self, target: _Target) -> list[str]:
        literal = target.ip_literal
        if literal is not None:
            if is_metadata_address(literal):
                raise UnsafeURL("the host is a cloud metadata service")
            if not self.allow_private and not is_public_address(literal):
                raise UnsafeURL("the host is not a public internet address")
            return [str(literal)]
        try:
            answers = self.resolver(target.host, target.port)
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_NAME:
                raise NoSuchHost("the host does not exist (the DNS has no such name)") from None
            raise Unresolvable("the host does not resolve") from None
        except UnicodeError:  # a name IDNA cannot encode: no DNS name at all
            raise NoSuchHost("the host is not a valid DNS name") from None
        except OSError:
            raise Unresolvable("the host does not resolve") from None
        addresses: list[IPAddress] = []
        for answer in answers:
            try:
                addresses.append(ipaddress.ip_address(answer))
            except ValueError:
                raise Unresolvable("the host does not resolve") from None
        if not addresses:
            raise Unresolvable("the host does not resolve")
        if any(is_metadata_address(a) for a in addresses):
            raise UnsafeURL("the host resolves to a cloud metadata service")
        # Any private answer refuses the URL: which address a client ends up using is not ours
        # to predict, and a name that mixes public and private addresses is a probe anyway.
        if not self.allow_private and not all(is_public_address(a) for a in addresses):
            raise UnsafeURL("the host resolves to an address that is not public")
        return list(dict.fromkeys(str(a) for a in addresses))


def is_public_address(address: IPAddress) -> bool:
    """Whether `address` is an ordinary public unicast address (also judging embedded IPv4)."""
    if isinstance(address, ipaddress.IPv6Address):
        # ::ffff:a.b.c.d is a socket to a.b.c.d: judge it as that address.
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
        if any(not is_public_address(v4) for v4 in _embedded_ipv4(address)):
            return False
        if address.is_site_local:
            return False
    elif any(address in network for network in _NON_PUBLIC_V4_NETWORKS):
        return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    )


@dataclasses.dataclass(frozen=True)
class _Pin:
    """The address checked for one request, and the URL it was checked for."""

    url: str
    target: _Target
    address: str


class _PinnedAdapter(HTTPAdapter):
    """Checks each request's URL and connects to the checked address, keeping the host name.

    `send` runs the policy (so a refusal happens before anything else, and even when a test
    library replaces `HTTPAdapter.send`), then hands the checked address to
    `get_connection_with_tls_context` through a thread-local slot, because requests gives
    that hook no way to receive it. The pool it returns is keyed by the address, and for
    https by `server_hostname` / `assert_hostname` = the URL's host name too (urllib3 makes
    both part of the pool key), so SNI and certificate checks use the name, never the address.
    """

    def __init__(self, policy: URLPolicy, timeout: tuple[float, float]) -> None:
        super().__init__(max_retries=0)
        self._policy = policy
        self._timeout = timeout
        self._pins = threading.local()

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        """Check the URL, pin its first address, and send with a timeout always set."""
        url = request.url or ""
        if select_proxy(url, proxies):
            # A proxy resolves the name itself: the address we checked would mean nothing.
            raise ValueError("pinned sessions do not use proxies")
        pin = self._pin(url)
        # urllib3 would put the address it connects to into Host; the server wants the name.
        request.headers.setdefault("Host", pin.target.host_header)
        self._pins.current = pin
        try:
            return super().send(
                request,
                stream=stream,
                timeout=self._timeout if timeout is None else timeout,
                verify=verify,
                cert=cert,
                proxies=proxies,
            )
        finally:
            self._pins.current = None

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """requests' pool manager, making connections a Deadline can cut."""
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPPool,
            "https": _WatchedHTTPSPool,
        }

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Any = None,
        cert: Any = None,
    ) -> HTTPConnectionPool:
        """A pool connected to the pinned address, verifying TLS against the URL's host."""
        url = request.url or ""
        pin: _Pin | None = getattr(self._pins, "current", None)
        if pin is None or pin.url != url:
            pin = self._pin(url)  # called outside `send`: check here, still exactly once
        target = pin.target
        # requests' own verify/cert handling (CA bundle, client certificate), then our pinning.
        _, tls_kwargs = self.build_connection_pool_key_attributes(
            request, True if verify is None else verify, cert
        )
        pool_kwargs: dict[str, Any] = dict(tls_kwargs)
        if target.scheme == "https":
            pool_kwargs["server_hostname"] = target.hostname
            pool_kwargs["assert_hostname"] = target.hostname
        return self.poolmanager.connection_from_host(
            host=pin.address, port=target.port, scheme=target.scheme, pool_kwargs=pool_kwargs
        )

    def _pin(self, url: str) -> _Pin:
        target = self._policy._parse(url)
        addresses = self._policy._resolve(target)
        return _Pin(url=url, target=target, address=addresses[0])


class Deadline:
    """Cuts the connections of the requests made in its `with` block (in this thread, through
    a pinned session) once `seconds` have passed since it began; `expired` then says so, and
    whatever the request returned or raised is no answer.

    Read timeouts bound each read only: a target that sends its answer a byte at a time, each
    within the timeout, holds a request as long as it likes. The watchdog thread shuts the
    sockets down instead (a blocked read then ends at once); it reaches them through
    duplicates of their descriptors, taken when a connection is made (before TLS) and when a
    kept-alive one is reused, and closed when the block ends (a shutdown acts on the
    connection itself, through any descriptor). Resolving the host name is not covered:
    getaddrinfo cannot be cut short.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = 0.0
        self.expired = False
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self._over = False

    def __enter__(self) -> Deadline:
        _DEADLINES.current = self
        self.at = time.monotonic() + self.seconds
        _WATCHDOG.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _DEADLINES.current = None
        with self._lock:
            self._over = True
            watched, self._watched = self._watched, []
        for copy in watched:
            copy.close()

    @property
    def over(self) -> bool:
        return self._over

    def watch(self, sock: socket.socket) -> None:
        """Cut `sock`'s connection too when the time is up (at once if it is up already)."""
        try:
            copy = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except OSError:  # closed meanwhile: nothing left to cut
            return
        with self._lock:
            if not self._over:
                self._watched.append(copy)
                if self.expired:
                    _cut(copy)
                return
        copy.close()

    def expire(self) -> None:
        with self._lock:
            if self._over:
                return
            self.expired = True
            for copy in self._watched:
                _cut(copy)


DEADLINE_TICK = 0.5  # seconds: how late a Deadline may cut, at most


class _Watchdog:
    """One thread for every Deadline of the process (a thread per request would cost more
    CPU than the request): expires each whose time is up, earliest first, within
    DEADLINE_TICK seconds of it. It wakes at most every DEADLINE_TICK: a busy sender makes
    many deadlines, most of them over before their time, and waking for each would cost CPU
    for nothing."""

    def __init__(self) -> None:
        self._reset()
        # A forked child (gunicorn's workers) has no copy of the parent's thread.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._due: list[tuple[float, int, Deadline]] = []
        self._count = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
        with self._changed:
            heapq.heappush(self._due, (deadline.at, next(self._count), deadline))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="genrelay-deadlines", daemon=True
                )
                self._thread.start()
            elif self._due[0][2] is deadline:
                self._changed.notify()  # earlier than the one it sleeps for

    def _run(self) -> None:
        while True:
            try:
                self._pass()
            except Exception:  # never a dead watchdog: every deadline would stop expiring
                log.exception("the deadline watchdog failed")
                time.sleep(DEADLINE_TICK)

    def _pass(self) -> None:
        """Forever: wait for the earliest deadline (at least a tick), then expire what is due."""
        while True:
            with self._changed:
                now = time.monotonic()
                expired = []
                while self._due and (self._due[0][0] <= now or self._due[0][2].over):
                    expired.append(heapq.heappop(self._due)[2])
                wait = max(DEADLINE_TICK, self._due[0][0] - now) if self._due else None
                if not expired:
                    self._changed.wait(wait)
                    continue
            for deadline in expired:
                deadline.expire()


_WATCHDOG = _Watchdog()


_DEADLINES = threading.local()


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watch(sock: socket.socket | None) -> None:
    """Hand `sock` to this thread's Deadline, if one is running."""
    deadline: Deadline | None = getattr(_DEADLINES, "current", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


class _WatchedHTTPConnection(HTTPConnection):
    """A connection whose socket the running Deadline (if any) can cut."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self.sock)  # a kept-alive connection, reused (None: connecting comes next)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    """As _WatchedHTTPConnection, for https: the plain socket is watched before TLS (its
    methods come first, then HTTPSConnection's)."""


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _NoRedirectSession(requests.Session):
    """A session that never follows a redirect, whatever `allow_redirects` says."""

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        """No redirect target, ever: a 3xx is returned to the caller as it came."""
        return None


def pinned_session(
    policy: URLPolicy, *, timeout: tuple[float, float] = DEFAULT_TIMEOUT
) -> requests.Session:
    """A session that checks every URL with `policy` and connects only to checked addresses."""
    session = _NoRedirectSession()
    # No proxies or .netrc credentials from the environment: neither belongs on a webhook.
    session.trust_env = False
    session.max_redirects = 0
    for default_adapter in session.adapters.values():
        default_adapter.close()
    session.adapters.clear()
    adapter = _PinnedAdapter(policy, timeout)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session
