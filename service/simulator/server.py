"""Run the simulator on a real TCP port in a background thread.

Werkzeug's threaded server keeps HTTP/1.1 connections alive in daemon threads and never waits
for them, so a plain ``shutdown()`` leaves threads behind. `SimulatorServer` tracks every
connection, closes them on stop and joins their threads, so tests can check that stopping the
simulator leaves nothing running.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from types import TracebackType
from typing import Any

from werkzeug.serving import BaseWSGIServer, ThreadedWSGIServer, WSGIRequestHandler, make_server

from service.simulator.app import create_simulator_app, get_engine
from service.simulator.settings import SimulatorSettings

logger = logging.getLogger("genrelay.simulator")

_STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.1


class _Connections:
    """The sockets of open client connections."""

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
        """Wake every connection thread blocked on a read by shutting its socket down."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            # OSError: the connection's own thread closed it meanwhile.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _handler_class(connections: _Connections) -> type[WSGIRequestHandler]:
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
            logger.log(level, "simulator http: " + message, *args)

    return Handler


class SimulatorServer:
    """The simulator served on ``host:port`` (0 = any free port) from a background thread."""

    def __init__(
        self,
        settings: SimulatorSettings | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.settings = settings or SimulatorSettings()
        self.host = host
        self.port = port
        self.app = create_simulator_app(self.settings)
        self._connections = _Connections()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("SimulatorServer is not started")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self._server.server_port}"

    def start(self) -> SimulatorServer:
        """Bind, then serve in a background thread; returns once the socket is listening."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("a stopped SimulatorServer cannot be restarted")
            if self._server is not None:
                return self
            try:
                server = make_server(
                    self.host,
                    self.port,
                    self.app,
                    threaded=True,
                    request_handler=_handler_class(self._connections),
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
                kwargs={"poll_interval": _POLL_INTERVAL},
                name=f"sim-server-{server.server_port}",
                daemon=True,
            )
            self._thread.start()
        logger.info("Deep-Image simulator listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, close connections and stop job/callback threads; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            server, thread = self._server, self._thread
        # The engine first: it wakes handlers that wait (latency, process_result) so their
        # threads can end, stops the scheduler and waits for webhook deliveries in flight.
        get_engine(self.app).shutdown(_STOP_TIMEOUT)
        if server is not None and thread is not None:
            server.shutdown()
            # serve_forever's own cleanup joins the request threads; keep closing connections
            # (idle keep-alive ones block on a read) until it is done.
            deadline = time.monotonic() + _STOP_TIMEOUT
            while thread.is_alive() and time.monotonic() < deadline:
                self._connections.shutdown_all()
                thread.join(0.05)
            if thread.is_alive():
                logger.warning("simulator server thread did not stop in time")
        logger.info("Deep-Image simulator stopped")

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
