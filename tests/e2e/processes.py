"""Running genrelay's commands as processes, for the end-to-end tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

GENRELAY = str(Path(sys.executable).parent / "genrelay")


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Stack:
    """Processes of one test, their logs kept for the failure report."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `genrelay ARGS` with its output in `<name>.log` (`env` replaces the default)."""
        log = (self.tmp_path / f"{name}.log").open("wb")
        process = subprocess.Popen([GENRELAY, *args], env=env or self.env, stdout=log, stderr=log)
        log.close()
        self.processes[name] = process
        return process

    def alive(self) -> bool:
        dead = [name for name, p in self.processes.items() if p.poll() is not None]
        if dead:
            raise AssertionError(f"{', '.join(dead)} exited early")
        return True

    def logs(self, tail: int | None = 3000) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-(tail or 0) :]}"
            for p in sorted(self.tmp_path.glob("*.log"))
        )

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
