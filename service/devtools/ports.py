"""A free loopback port for a server that starts a moment later (the dev stack, the tests, the
benchmarks).

The port is drawn below the kernel's ephemeral range. A port the kernel hands out for `bind(0)`
lies inside that range, which is also where every outgoing connection takes its local port: in
the seconds between choosing it and the server listening on it (a migration, a key created
first), a client connection may take it, and the server then fails with "Address already in
use". Below the range, only another server choosing at random can collide, and the bind checks
that nobody listens there now.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default when /proc cannot be read
_SPAN = 12000  # how many ports below the range to draw from
_TRIES = 200


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    return _DEFAULT_EPHEMERAL_LOW


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nobody listens on now, below the ephemeral range."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = ephemeral_low()
    rng = random.SystemRandom()  # leaves the global random state alone (Hypothesis checks it)
    for _ in range(_TRIES):
        port = rng.randrange(max(1024, low - _SPAN), low)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on {host} below {low} after {_TRIES} tries")
