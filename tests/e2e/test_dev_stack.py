"""`genrelay dev`, what `make run` starts: up with its embedded defaults, the banner's request
made and followed to `succeeded`, stopped by Ctrl-C (SIGINT) with every process gone.

Started from a directory holding another project's `service` package: the stack's children
are this installation's `genrelay`, not whatever `service` the current directory has."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import pytest
import requests

from service.devtools.ports import free_port
from tests.e2e.processes import GENRELAY, wait_for

pytestmark = pytest.mark.e2e

UP = "genrelay dev stack is up"


class _Lines:
    """The lines a process prints, read by a thread of their own: a selector on its buffered
    stdout would wait for bytes the buffer has taken already (the banner arrives in one
    piece with the lines around it)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.process, self.lines = process, queue.Queue[str | None]()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, marker: str, timeout: float) -> str:
        """What the process printed, once a line holds `marker`; fails at `timeout` or its
        exit."""
        deadline = time.monotonic() + timeout
        while not any(marker in line for line in self.seen):
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {marker!r} within {timeout:.0f} s:\n{''.join(self.seen)}")
            if line is None:
                pytest.fail(f"genrelay dev exited ({self.process.wait()}):\n{''.join(self.seen)}")
            self.seen.append(line)
        return "".join(self.seen)


def _listening_on(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port`, read from /proc/net/tcp
    and tcp6 (Linux): `0.0.0.0` or `::` for every interface."""
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    # The kernel prints each 32-bit word of the address in its own byte order.
                    raw = bytes.fromhex(address)
                    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
                    addresses.add(socket.inet_ntop(family, b"".join(words)))
    return addresses


def test_the_dev_stack_comes_up_serves_the_banners_request_and_stops(tmp_path: Path) -> None:
    shadow = tmp_path / "another-project"
    (shadow / "service").mkdir(parents=True)
    (shadow / "service" / "__init__.py").write_text(
        'raise ImportError("another project\'s service package")\n'
    )
    port = free_port()
    process = subprocess.Popen(
        [GENRELAY, "dev", "--port", str(port), "--var", str(tmp_path / "var")],
        cwd=shadow,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its children in its group: stopped whole if the test fails
    )
    try:
        printed = _Lines(process)
        printed.until(UP, 90)
        banner = printed.until("Press Ctrl-C to stop.", 10)
        key = re.search(r"Dev API key: (\S+)", banner)
        assert key is not None, banner
        headers = {"Authorization": f"Bearer {key[1]}"}
        body = re.search(r"-d '(\{.*\})'", banner)
        assert body is not None, banner
        base = f"http://127.0.0.1:{port}"
        created = requests.post(
            f"{base}/v1/generations",
            data=body[1],
            headers={**headers, "Content-Type": "application/json"},
            timeout=10,
        )
        assert created.status_code == 202, created.text
        link = f"{base}/v1/generations/{created.json()['id']}"

        def succeeded() -> bool:
            return requests.get(link, headers=headers, timeout=5).json()["status"] == "succeeded"

        wait_for(succeeded, 60, "the banner's generation to succeed")
        # On loopback only: the dev stack takes webhooks to private addresses.
        assert _listening_on(port) == {"127.0.0.1"}
        result = requests.get(f"{link}/result", headers=headers, timeout=10)
        assert result.status_code == 200  # the emulator's object, through the signed redirect
        assert result.content.startswith(b"\x89PNG")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    with pytest.raises(ProcessLookupError):  # no child of the stack is left running
        os.killpg(process.pid, 0)
