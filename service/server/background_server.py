"""A WSGI app served from a background thread, that stops without leaving threads behind.

Werkzeug's threaded server keeps HTTP/1.1 connections alive in threads and never waits for
them, so a plain ``shutdown()`` leaves threads running. `BackgroundServer` tracks every
connection, closes them on stop and joins their threads. The Deep-Image simulator and the
webhook inbox (dev tools and test doubles) are both served this way.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

from werkzeug.serving import BaseWSGIServer, ThreadedWSGIServer, WSGIRequestHandler, make_server

STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.1


class _Connections:
    """The sockets of open client connections, so stop() can wake idle keep-alive threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def shutdown_all(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            # OSError: the connection's own thread closed it meanwhile.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _handler_class(
    connections: _Connections, logger: logging.Logger, label: str
) -> type[WSGIRequestHandler]:
    class Handler(WSGIRequestHandler):
        def setup(self) -> None:
            super().setup()
            connections.add(self.connection)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                connections.discard(self.connection)

        def log(self, type: str, message: str, *args: Any) -> None:
            # Werkzeug would otherwise attach its own stderr handler and log every request.
            level = logging.DEBUG if type == "info" else logging.WARNING
            logger.log(level, f"{label} http: " + message, *args)

    return Handler


class BackgroundServer:
    """Serves `app` on ``host:port`` (0 = any free port) from a background thread."""

    label = "server"  # for thread names and log lines

    def __init__(self, app: Any, host: str, port: int, *, logger: logging.Logger) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.logger = logger
        self._connections = _Connections()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self._server.server_port}"

    def start(self) -> Self:
        """Bind, then serve in a background thread; returns once the socket is listening."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"a stopped {type(self).__name__} cannot be restarted")
            if self._server is not None:
                return self
            try:
                server = make_server(
                    self.host,
                    self.port,
                    self.app,
                    threaded=True,
                    request_handler=_handler_class(self._connections, self.logger, self.label),
                )
            except SystemExit as exc:
                # werkzeug exits the process when the port is taken; a library must not.
                raise OSError(f"cannot listen on {self.host}:{self.port}") from exc
            assert isinstance(server, ThreadedWSGIServer)
            # Track request threads so server_close() joins them instead of abandoning them.
            server.daemon_threads = False
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": POLL_INTERVAL},
                name=f"{self.label}-server-{server.server_port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def before_shutdown(self) -> None:
        """Hook: stop the app's own background work before the server stops."""

    def stop(self) -> None:
        """Stop serving, close open connections and join every thread; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            server, thread = self._server, self._thread
        self.before_shutdown()
        if server is None or thread is None:
            return
        server.shutdown()
        # serve_forever's own cleanup joins the request threads; keep closing connections
        # (idle keep-alive ones block on a read) until it is done.
        deadline = time.monotonic() + STOP_TIMEOUT
        while thread.is_alive() and time.monotonic() < deadline:
            self._connections.shutdown_all()
            thread.join(0.05)
        if thread.is_alive():
            self.logger.warning("%s server thread did not stop in time", self.label)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
