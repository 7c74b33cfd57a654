"""One delivery attempt on loopback: bounded in all however the target answers, and what it
records always storable."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from service.notifications import deliver, ssrf
from service.notifications.deliver import DeliverHandler, Verdict, classify, storable_text
from service.notifications.ssrf import DEADLINE_TICK, Deadline, URLPolicy, pinned_session

DEADLINE = 1.0  # SEND_TIMEOUT in these tests
DRIP = 0.2  # seconds between the bytes a slow target sends, well within each read's timeout
DRIP_FOR = 8.0  # how long it keeps sending them (the attempt took this long before)


class RawServer:
    """A TCP server on loopback that runs `serve(connection)` for each connection made."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.connections = 0
        self._serve = serve
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(connection,), daemon=True).start()

    def _run(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):  # OSError: the client cut it
            self._serve(connection)

    def close(self) -> None:
        self._listener.close()


def read_request(connection: socket.socket) -> None:
    """Read one request with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(65536)


def drip(connection: socket.socket, byte: bytes = b"X") -> None:
    """One byte every DRIP seconds, for DRIP_FOR seconds."""
    end = time.monotonic() + DRIP_FOR
    while time.monotonic() < end:
        connection.sendall(byte)
        time.sleep(DRIP)


@pytest.fixture
def servers() -> Iterator[list[RawServer]]:
    made: list[RawServer] = []
    yield made
    for server in made:
        server.close()


@pytest.fixture
def serve(servers: list[RawServer]) -> Callable[[Callable[[socket.socket], None]], RawServer]:
    def make(script: Callable[[socket.socket], None]) -> RawServer:
        server = RawServer(script)
        servers.append(server)
        return server

    return make


@pytest.fixture
def handler(monkeypatch: pytest.MonkeyPatch) -> DeliverHandler:
    monkeypatch.setattr(deliver, "SEND_TIMEOUT", DEADLINE)
    return DeliverHandler(store=None, http=pinned_session(URLPolicy(allow_private=True)))  # type: ignore[arg-type]


def send(handler: DeliverHandler, url: str) -> tuple[deliver.Attempt, float]:
    started = time.monotonic()
    attempt = handler._send(url, {"content-type": "application/json"}, b"{}")
    return attempt, time.monotonic() - started


def assert_timed_out(attempt: deliver.Attempt, took: float) -> None:
    assert took < DEADLINE + 1.5, f"the attempt took {took:.1f} s"
    assert attempt.status_code is None
    assert attempt.error is not None and attempt.error.startswith("Timeout")
    assert classify(attempt.status_code) is Verdict.RETRY  # retried on the schedule


def test_headers_sent_a_byte_at_a_time_end_at_the_deadline(
    handler: DeliverHandler, serve: Callable[..., RawServer]
) -> None:
    def script(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\n")
        drip(connection)  # a header line that never ends
        connection.sendall(b": y\r\nContent-Length: 0\r\n\r\n")

    server = serve(script)
    assert_timed_out(*send(handler, f"http://127.0.0.1:{server.port}/hook"))


def test_a_kept_alive_connection_is_cut_at_the_deadline_too(
    handler: DeliverHandler, serve: Callable[..., RawServer]
) -> None:
    def script(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        read_request(connection)  # the second attempt, on the same connection
        connection.sendall(b"HTTP/1.1 200 OK\r\n")
        drip(connection)

    server = serve(script)
    url = f"http://127.0.0.1:{server.port}/hook"
    first, _ = send(handler, url)
    assert first.status_code == 204
    assert_timed_out(*send(handler, url))
    assert server.connections == 1


def test_a_tls_handshake_sent_a_byte_at_a_time_ends_at_the_deadline(
    handler: DeliverHandler, serve: Callable[..., RawServer]
) -> None:
    def script(connection: socket.socket) -> None:
        connection.recv(65536)  # the ClientHello
        connection.sendall(b"\x16\x03\x03\x40\x00")  # a 16 KiB handshake record follows...
        drip(connection)  # ...slowly

    server = serve(script)
    assert_timed_out(*send(handler, f"https://127.0.0.1:{server.port}/hook"))


def test_a_status_in_time_counts_though_the_body_comes_slowly(
    handler: DeliverHandler, serve: Callable[..., RawServer]
) -> None:
    def script(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\nok")
        drip(connection)

    server = serve(script)
    attempt, took = send(handler, f"http://127.0.0.1:{server.port}/hook")
    assert took < DEADLINE + 1.5
    assert (attempt.status_code, attempt.error) == (200, None)  # the body cut short: no matter


def test_a_quick_answer_is_not_cut_and_starts_no_thread_of_its_own(
    handler: DeliverHandler, serve: Callable[..., RawServer]
) -> None:
    def script(connection: socket.socket) -> None:
        read_request(connection)
        # Closed after one answer, so it says so: a client may otherwise reuse the connection
        # before it sees the close, and fail.
        connection.sendall(
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )

    server = serve(script)
    url = f"http://127.0.0.1:{server.port}/hook"
    send(handler, url)  # the process's one watchdog thread runs from the first deadline on
    before = {thread.ident for thread in threading.enumerate()}
    for _ in range(3):
        attempt, _ = send(handler, url)
        assert (attempt.status_code, attempt.excerpt, attempt.error) == (202, "ok", None)
    time.sleep(0.1)  # the test server's handler threads end
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert left == []  # no thread per attempt
    # Every attempt's deadline is over: the watchdog will cut nothing of theirs.
    assert all(deadline.over for _, _, deadline in ssrf._WATCHDOG._due)


def test_a_deadline_with_no_connection_only_tells_the_time_is_up() -> None:
    with Deadline(0.05) as deadline:
        assert not deadline.expired
        time.sleep(0.05 + DEADLINE_TICK + 0.2)  # expired within a tick of its time
        assert deadline.expired


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("OK", "OK"),
        ("O\x00K\x00", "O\ufffdK\ufffd"),
        ("a\ud800b\udfffc", "a\ufffdb\ufffdc"),
        ("caf\u00e9 \U0001f600", "caf\u00e9 \U0001f600"),  # astral characters stay
    ],
)
def test_an_excerpt_is_made_storable(text: str, stored: str) -> None:
    assert storable_text(text) == stored
