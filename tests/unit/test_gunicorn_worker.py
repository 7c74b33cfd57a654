"""The request socket of service/server/gunicorn_worker.py: a thread's blocking reads are
bounded."""

from __future__ import annotations

import socket
import time

import pytest

from service.errors import ClientTooSlow
from service.server.gunicorn_worker import _RequestSocket


def test_a_thread_reading_a_stalled_body_gives_up_at_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    wrapped = _RequestSocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    try:
        wrapped.setblocking(True)  # what gthread does before a thread reads
        assert wrapped.gettimeout() is not None  # never an unbounded wait
        theirs.sendall(b"abc")
        wrapped.read_deadline = time.monotonic() + 0.3
        assert wrapped.recv(10) == b"abc"  # what arrived is read
        started = time.monotonic()
        with pytest.raises(ClientTooSlow):
            wrapped.recv(10)  # nothing more comes
        assert time.monotonic() - started < 2
        with pytest.raises(ClientTooSlow):
            wrapped.recv(10)  # past the deadline: at once
    finally:
        wrapped.close()
        theirs.close()
