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
  (the app would hold each one whole anyway, to parse its JSON); a head past HEAD_MAX is
  answered 431 by the loop;
- a chunked body, one sent only after `Expect: 100-continue`, or one past the budget is read
  by the thread: each read waits at most IDLE_TIMEOUT seconds and the whole body at most
  BODY_TIMEOUT seconds; then the read fails (`ClientTooSlow`, answered 408) and the
  connection is closed. Once answered, such a request's connection is closed, not drained of
  what the app left unread.

A request gunicorn's parser refuses (a malformed request line or header, headers too large)
is answered as application/problem+json like every other error of the API, not with
gunicorn's HTML page, which quoted the offending bytes (a header line, a key in it).

So a stalled client costs a socket and its bytes, not a thread. (Plain HTTP only: gunicorn's
own TLS, unused here, would wrap the socket before these limits apply.) Sockets closing after
their answer count as connections until closed, and a process out of file descriptors stops
accepting for a moment instead of failing. A stopping worker waits STOP_READ seconds at most
for requests still being read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import selectors
import socket
import threading
import time
from functools import partial
from typing import Any

from gunicorn import util as gunicorn_util
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
# A request line and headers past this, their end not yet seen, are answered 431 by the loop
# and the connection closed. (gunicorn's parser would take up to about 800 KiB, but only once
# it has read the head's end: handed more than this without it, its thread would wait.) Every
# connection being read holds its head in memory: 1000 of them at most hold 64 MiB.
HEAD_MAX = 64 * 1024
# After a response that ends its connection: how long what the client still sends is read
# (and dropped) before the socket is closed, so the kernel does not answer it with a reset
# that could cut the response short (RFC 9112, 9.6). gunicorn's own wait, in the event loop.
LINGER = 2.0
# Out of file descriptors (EMFILE): how long the listener is left alone.
ACCEPT_PAUSE = 1.0
# A stopping worker still waits this long for requests being read (GENRELAY_REQUEST_TIMEOUT's
# default 15 s is past the 10 s platforms give a process after SIGTERM).
STOP_READ = 2.0
# Between the end of a stopping worker's drain and the arbiter's kill, besides EXIT_WAIT.
DRAIN_MARGIN = 0.5
_RECV = 256 * 1024

_END_OF_HEAD = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(.*?)[ \t]*\r?$", re.I | re.M)
_DIGITS = re.compile(rb"\d+")
_STREAMED = re.compile(rb"^(transfer-encoding|expect)[ \t]*:", re.I | re.M)
# What a refusal of gunicorn's parser says, by status; never the request's own bytes.
_PARSE_REFUSALS = {
    400: "The request line or a header is malformed.",
    403: "Request forbidden.",
    414: "The request line is too long.",
    417: "The Expect header asks for what this server does not do.",
    431: "The request has too many headers, or one too large.",
    501: "The request's Transfer-Encoding is not supported.",
}


def problem_answer(status: int, reason: str, detail: str) -> bytes:
    """A whole HTTP answer with an application/problem+json body; the connection ends."""
    problem = {"type": "about:blank", "title": reason, "status": status, "detail": detail}
    body = json.dumps(problem).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/problem+json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


_HEAD_TOO_LARGE = problem_answer(
    431,
    "Request Header Fields Too Large",
    f"the request line and headers are over {HEAD_MAX} bytes",
)


def write_problem(sock: socket.socket, status: int, reason: str, _message: str) -> None:
    """gunicorn's `util.write_error`, as application/problem+json. gunicorn's message is left
    out: it quotes what the client sent (`Invalid HTTP Header: 'Authorization Bearer …'`)."""
    detail = _PARSE_REFUSALS.get(status, "The request could not be handled.")
    gunicorn_util.write_nonblock(sock, problem_answer(status, reason, detail))


def declared_length(head: bytes) -> int | None:
    """The body's length as the head's Content-Length says it, 0 without one; None when the
    loop cannot tell (a value that is not plain digits, or several), so that the thread reads
    the body and gunicorn's parser judges the header. gunicorn takes leading zeros
    (`0000000000000000000100`): so does this, or such a request would reach a thread with
    its body unread."""
    values = _CONTENT_LENGTH.findall(head)
    if not values:
        return 0
    if len(set(values)) != 1 or not _DIGITS.fullmatch(values[0]):
        return None
    digits = values[0].lstrip(b"0") or b"0"
    return int(digits) if len(digits) <= 18 else None


def _waiting(sock: socket.socket) -> bool:
    """Whether bytes the loop has not read yet wait on `sock` (a request on a kept-alive
    connection, say, arrived in the loop turn that stops the worker)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing there (EAGAIN), or the connection is gone
        return False


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
        self.accept_paused_until = 0.0
        self.stop_reads_by: float | None = None  # set once the worker is stopping

    def init_process(self) -> None:
        """In the worker process: its drain at stop ends EXIT_WAIT + DRAIN_MARGIN seconds
        before the arbiter's kill (both read `graceful_timeout`), so that the inline stores
        still running are handed back (service/runtime/inline.py) before it."""
        # Imported here, in the worker: the arbiter loads this module too, and need not load
        # the task runtime (nor create its metrics in the arbiter's process).
        from service.runtime.inline import EXIT_WAIT

        drain = int(self.cfg.graceful_timeout - EXIT_WAIT - DRAIN_MARGIN)  # whole seconds
        self.cfg.set("graceful_timeout", max(1, drain))
        # gunicorn's `handle_error` answers what its parser refuses through this function of
        # its `util` module, with an HTML page; in this worker process, a problem+json.
        gunicorn_util.write_error = write_problem
        super().init_process()

    def accept(self, listener: Any) -> None:
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._pause_accepting(exc)
                return
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        wrapped = _RequestSocket(client.family, client.type, client.proto, fileno=client.detach())
        self.nr_conns += 1
        conn = _Conn(self.cfg, wrapped, address, listener.getsockname())
        conn.linger = self._linger
        self._read_request(conn)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of file descriptors: accept nothing for ACCEPT_PAUSE seconds (connections
        being served close meanwhile), rather than let the error end the process and every
        connection it holds. Logged once per pause."""
        self.log.warning(
            "cannot accept connections (%s): pausing for %g s", exc.strerror, ACCEPT_PAUSE
        )
        self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE
        self.set_accept_enabled(False)

    def set_accept_enabled(self, enabled: bool) -> None:
        """gunicorn's loop turns accepting back on each turn there is room: not while paused."""
        if enabled and time.monotonic() < self.accept_paused_until:
            return
        super().set_accept_enabled(enabled)

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
                return False
            conn.head_end = end
        if conn.body_reserved is None:
            head = bytes(buffer[:end])
            length = declared_length(head)
            with self._budget:
                if (
                    length is None
                    or _STREAMED.search(head)
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
        elif conn.head_end is None and len(conn.pending_bytes) > HEAD_MAX:
            self._refuse_head(conn)

    def _refuse_head(self, conn: Any) -> None:
        """431 for a head past HEAD_MAX, from the loop (a fresh socket's buffer takes it
        without blocking), then the connection ends."""
        self.log.info("closing %s: a request head over %d bytes", conn.client, HEAD_MAX)
        with contextlib.suppress(OSError):
            conn.sock.send(_HEAD_TOO_LARGE)
        self._release(conn)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close(graceful=True)  # lingers: what the client still sends does not reset it

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
        whose time is up (each loop turn). Once the worker is stopping, a connection that has
        sent nothing is closed at once and the others get STOP_READ seconds at most: waiting
        GENRELAY_REQUEST_TIMEOUT for them ran past the platform's kill."""
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and self.stop_reads_by is None:
            self.stop_reads_by = now + STOP_READ
        for conn, deadline in list(self.reading.items()):
            if self.stop_reads_by is not None:
                silent = not conn.pending_bytes and not _waiting(conn.sock)
                deadline = min(deadline, now if silent else self.stop_reads_by)
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
        # Still a descriptor: counted with the connections (worker_connections bounds both),
        # or clients that never close would make a process run out of them.
        self.nr_conns += 1

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
        if self.lingering.pop(sock, None) is not None:
            self.nr_conns -= 1
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

    def handle_request(self, req: Any, conn: Any) -> Any:
        """A connection `_keepalive_after` will end says so in its answer (`Connection:
        close`), rather than announcing keep-alive and closing: a client that sent its next
        request on it meanwhile would see it go unanswered."""
        if getattr(conn, "body_streamed", False):
            req.must_close = True
        return super().handle_request(req, conn)

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
