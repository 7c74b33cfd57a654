"""The request socket of service/server/gunicorn_worker.py: a thread's blocking reads are
bounded."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

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


class _Sock:
    """What the worker uses of a client socket: one recv hands over the whole request."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.read_deadline: float | None = None

    def setblocking(self, flag: bool) -> None:
        pass

    def recv(self, size: int) -> bytes:
        data, self.data = self.data[:size], self.data[size:]
        return data


class _Poller:
    def register(self, sock: Any, events: int, callback: Any) -> None:
        self.callback = callback

    def unregister(self, sock: Any) -> None:
        pass


class _Conn:
    """What the worker uses of gunicorn's connection (hashable, as the loop's keys are)."""

    def __init__(self, data: bytes) -> None:
        self.parser = None
        self.sock = _Sock(data)
        self.is_http2 = False

    def init(self) -> None:
        pass


def _post(body_bytes: int) -> Any:
    request = (
        b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(body_bytes).encode()
        + b"\r\n\r\n"
        + b"x" * body_bytes
    )
    return _Conn(request)


def test_a_buffered_body_counts_against_the_budget_until_its_thread_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gunicorn.workers.gthread import ThreadWorker

    from service.server import gunicorn_worker
    from service.server.gunicorn_worker import BoundedThreadWorker

    queued: list[Any] = []  # requests waiting for a thread
    monkeypatch.setattr(ThreadWorker, "enqueue_req", lambda self, conn: queued.append(conn))
    monkeypatch.setattr(ThreadWorker, "handle", lambda self, conn: False)
    monkeypatch.setattr(gunicorn_worker, "BUFFER_BUDGET", 250)
    worker = BoundedThreadWorker.__new__(BoundedThreadWorker)  # no gunicorn arbiter here
    worker.reading, worker.lingering, worker.poller = {}, {}, _Poller()
    worker.reserved, worker._budget = 0, threading.Lock()

    def arrives(conn: Any) -> None:
        worker._read_request(conn)
        worker.poller.callback(conn.sock)  # readable: the loop reads it

    first, second, third = _post(100), _post(100), _post(100)
    for conn in (first, second):
        arrives(conn)
    assert queued == [first, second] and worker.reserved == 200  # waiting, bodies held
    arrives(third)  # over the budget: its thread will read its body from the socket
    assert queued[-1] is third and third.body_streamed and worker.reserved == 200
    worker.handle(first)  # a thread serves the first: its body's share goes back
    assert worker.reserved == 100
