"""`genrelay dev` (`make run`) says what went wrong instead of announcing a stack that is not
up: its port held by another server, or one of its processes gone."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.devtools.ports import free_port
from service.devtools.stack import _wait_until_up, exited

GENRELAY = str(Path(sys.executable).parent / "genrelay")


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[int]:
    """Another server on a port, answering 200 to everything (/healthz included)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_dev_refuses_a_port_another_server_holds(other_server: int, tmp_path: Path) -> None:
    var = tmp_path / "var"
    process = subprocess.Popen(
        [GENRELAY, "dev", "--port", str(other_server), "--var", str(var)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a stack it did start can be stopped whole
    )
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        pytest.fail(f"genrelay dev kept running on a port it does not hold:\n{out}")
    assert process.returncode == 1
    assert "stack is up" not in out
    [line] = err.splitlines()
    assert line.startswith(f"genrelay dev: port {other_server} is in use by another process")
    assert not (var / "genrelay-dev.db").exists()  # nothing done: no dev key made


def test_a_dev_process_that_exits_is_named() -> None:
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        gone.wait(timeout=30)
        assert exited({"simulator": running}) is None
        assert exited({"simulator": running, "worker": gone}) == (
            "`genrelay worker` exited with status 3"
        )
        with pytest.raises(RuntimeError, match="`genrelay worker` exited with status 3 during"):
            _wait_until_up(f"http://127.0.0.1:{free_port()}/healthz", {"worker": gone}, 10)
    finally:
        running.kill()
        running.wait()
