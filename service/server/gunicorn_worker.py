"""gunicorn's gthread worker, with requests read before a thread is given to them.

gthread hands a connection to a thread as soon as its first bytes arrive, and the thread then
blocks until the request is complete: with `timeout = 0`, a client that sends half a request
and stalls holds that thread for good, and as many such clients as threads stall the process
(`/healthz` included). Here the worker's event loop reads each request first, without a thread:

- the request line, the headers and a body announced by Content-Length are read from
  non-blocking sockets by the event loop; a thread gets the connection only once all of it is
  there. What has not arrived within GENRELAY_REQUEST_TIMEOUT seconds (default 15; from the
  accept, or from the first byte of a request on a kept-alive connection) is cut off: the
  connection is closed. Bodies wait in memory up to BUFFER_BUDGET bytes per process in all
  (the app would hold each one whole anyway, to parse its JSON);
- a chunked body, one sent only after `Expect: 100-continue`, or one past the budget is read
  by the thread: each read waits at most IDLE_TIMEOUT seconds and the whole body at most
  BODY_TIMEOUT seconds; then the read fails (`ClientTooSlow`, answered 408) and the
  connection is closed. Once answered, such a request's connection is closed, not drained of
  what the app left unread.

So a stalled client costs a socket and its bytes, not a thread. (Plain HTTP only: gunicorn's
own TLS, unused here, would wrap the socket before these limits apply.)
"""

from __future__ import annotations

import contextlib
import errno
import re
import selectors
import socket
import threading
import time
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

from service.config import ProcessSettings
from service.errors import ClientTooSlow

# Validated (with every other setting) when `genrelay serve` starts, before gunicorn loads this.
READ_TIMEOUT = ProcessSettings.from_env().request_timeout
IDLE_TIMEOUT = 15.0
BODY_TIMEOUT = 120.0
# Larger than any body the app accepts (GENRELAY's 25 MiB limit): such bodies still wait here.
BUFFERED_BODY_MAX = 32 * 1024 * 1024
BUFFER_BUDGET = 256 * 1024 * 1024
# gunicorn's own limits (request line 4094, 100 header fields of 8190) fit well inside; past
# this the parser gets the bytes and refuses them itself.
HEAD_MAX = 1024 * 1024
# After a response that ends its connection: how long what the client still sends is read
# (and dropped) before the socket is closed, so the kernel does not answer it with a reset
# that could cut the response short (RFC 9112, 9.6). gunicorn's own wait, in the event loop.
LINGER = 2.0
_RECV = 256 * 1024

_END_OF_HEAD = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d{1,18})[ \t]*\r?$", re.I | re.M)
_STREAMED = re.compile(rb"^(transfer-encoding|expect)[ \t]*:", re.I | re.M)


class _RequestSocket(socket.socket):
    """A client socket whose blocking reads are bounded (idle time, and a deadline)."""

    read_deadline: float | None = None

    def setblocking(self, flag: bool) -> None:
        # gthread puts sockets in blocking mode before a thread reads: never unbounded here.
        if flag:
            self.settimeout(IDLE_TIMEOUT)
        else:
            super().setblocking(False)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        deadline = self.read_deadline
        if self.gettimeout() == 0.0:
            return super().recv(bufsize, flags)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientTooSlow("the request did not arrive in time")
            # Never longer than a timeout the caller set itself (gunicorn's, shorter).
            self.settimeout(min(self.gettimeout() or IDLE_TIMEOUT, IDLE_TIMEOUT, remaining))
        try:
            return super().recv(bufsize, flags)
        except TimeoutError:
            raise ClientTooSlow("the request did not arrive in time") from None


class _Conn(TConn):
    """gunicorn's connection, whose graceful close lingers in the event loop, not in a wait."""

    linger: Any = None  # BoundedThreadWorker._linger

    def close(self, graceful: bool = False) -> None:
        if graceful and self.linger is not None:
            self.linger(self.sock)  # gunicorn's waits up to 2 s, blocking every connection
        else:
            super().close(graceful)


class BoundedThreadWorker(ThreadWorker):
    """gthread, reading each request in the event loop before a thread takes it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reading: dict[Any, float] = {}  # connection -> deadline
        self.lingering: dict[Any, float] = {}  # half-closed socket -> when it is closed
        # Bytes of bodies buffered, from the decision to buffer one until its request's thread
        # is done with it (a request waiting for a thread holds its body too); the loop adds,
        # threads take away.
        self.reserved = 0
        self._budget = threading.Lock()

    def accept(self, listener: Any) -> None:
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        wrapped = _RequestSocket(client.family, client.type, client.proto, fileno=client.detach())
        self.nr_conns += 1
        conn = _Conn(self.cfg, wrapped, address, listener.getsockname())
        conn.linger = self._linger
        self._read_request(conn)

    def enqueue_req(self, conn: Any) -> None:
        """Every path to a thread (new, kept-alive, read-ahead) goes through the reader."""
        if getattr(conn, "request_buffer", None) is not None:
            super().enqueue_req(conn)
        else:
            self._read_request(conn)

    def _read_request(self, conn: Any) -> None:
        buffered = b""
        if conn.parser is not None:
            buffered = conn.parser.unreader.take_buffered()  # pipelined bytes
        conn.pending_bytes = bytearray(buffered)
        conn.scanned = 0  # how much of it was searched for the end of the head
        conn.head_end = None  # where the head ends, once found
        conn.body_reserved = None  # bytes of body reserved in the budget, once decided
        conn.sock.setblocking(False)
        self.reading[conn] = time.monotonic() + READ_TIMEOUT
        if buffered and self._ready(conn):
            self._dispatch(conn, registered=False)
            return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _ready(self, conn: Any) -> bool:
        """Whether the request is all here (or the rest is for the thread to read)."""
        buffer = conn.pending_bytes
        end = conn.head_end
        if end is None:
            # Search only what arrived since the last look (each byte is looked at once).
            end = buffer.find(_END_OF_HEAD, max(0, conn.scanned - len(_END_OF_HEAD) + 1))
            conn.scanned = len(buffer)
            if end < 0:
                return len(buffer) > HEAD_MAX  # the parser refuses it at once
            conn.head_end = end
        if conn.body_reserved is None:
            head = bytes(buffer[:end])
            lengths = _CONTENT_LENGTH.findall(head)
            length = int(lengths[0]) if lengths else 0
            with self._budget:
                if (
                    _STREAMED.search(head)
                    or length > BUFFERED_BODY_MAX
                    or self.reserved + length > BUFFER_BUDGET
                ):
                    length = -1  # the thread reads the body, within IDLE and BODY timeouts
                else:
                    self.reserved += length
            conn.body_reserved = length
        if conn.body_reserved < 0:
            return True
        return len(buffer) - (end + len(_END_OF_HEAD)) >= conn.body_reserved

    def _on_readable(self, conn: Any, _sock: Any) -> None:
        try:
            data = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_reading(conn)
            return
        conn.pending_bytes += data
        if self._ready(conn):
            self._dispatch(conn, registered=True)

    def _release(self, conn: Any) -> None:
        """The connection is no longer read by the loop: its body's share of the budget goes
        back (a closed one), or on with the request to its thread (a dispatched one)."""
        self.reading.pop(conn, None)
        self._give_back(max(0, conn.body_reserved or 0))
        conn.body_reserved = None

    def _give_back(self, reserved: int) -> None:
        if reserved:
            with self._budget:
                self.reserved -= reserved

    def _dispatch(self, conn: Any, *, registered: bool) -> None:
        if registered:
            self.poller.unregister(conn.sock)
        conn.body_streamed = conn.body_reserved is not None and conn.body_reserved < 0
        conn.body_held = max(0, conn.body_reserved or 0)  # given back when the thread is done
        conn.body_reserved = None
        self._release(conn)
        conn.request_buffer = bytes(conn.pending_bytes)
        conn.pending_bytes = None
        conn.data_ready = True
        super().enqueue_req(conn)

    def _close_reading(self, conn: Any) -> None:
        self._release(conn)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """Also close connections whose request did not arrive in time, and lingering sockets
        whose time is up (each loop turn)."""
        super().murder_pending()
        now = time.monotonic()
        for conn, deadline in list(self.reading.items()):
            if deadline <= now:
                self.log.debug("closing %s: no complete request in %g s", conn.client, READ_TIMEOUT)
                self._close_reading(conn)
        for sock, deadline in list(self.lingering.items()):
            if deadline <= now:
                self._end_linger(sock)

    def _linger(self, sock: socket.socket) -> None:
        """Close `sock` gracefully without blocking the loop (called on the loop's thread):
        send our FIN now, drop what still comes, close at its EOF or after LINGER seconds."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, partial(self._on_lingering, sock))
        except (OSError, ValueError, KeyError):
            sock.close()
            return
        self.lingering[sock] = time.monotonic() + LINGER

    def _on_lingering(self, sock: socket.socket, _sock: Any) -> None:
        try:
            data = sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end_linger(sock)

    def _end_linger(self, sock: socket.socket) -> None:
        self.lingering.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(sock)
        sock.close()

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        """A request whose body the thread was to read closes its connection once answered.
        gunicorn would drain what the app left unread (a request refused for want of a key,
        say) to keep the connection, and a client trickling it would hold the thread as long;
        such bodies are rare enough that a new connection costs nothing to speak of."""
        if getattr(conn, "body_streamed", False):
            return False
        return bool(super()._keepalive_after(conn, keepalive))

    def handle(self, conn: Any) -> Any:
        """Runs in a thread: give the parser what the event loop read, then serve."""
        buffered = conn.request_buffer
        conn.request_buffer = None
        conn.sock.setblocking(True)
        conn.init()
        if buffered and conn.parser is not None and not conn.is_http2:
            conn.parser.unreader.unread(buffered)
        conn.sock.read_deadline = time.monotonic() + BODY_TIMEOUT
        try:
            return super().handle(conn)
        finally:
            conn.sock.read_deadline = None
            held, conn.body_held = getattr(conn, "body_held", 0), 0
            self._give_back(held)
