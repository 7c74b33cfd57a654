"""The whole stack as separate processes: `genrelay serve` (gunicorn), `genrelay worker` and
`genrelay simulator`, set up with `genrelay migrate` and `genrelay keys create`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from service.callbacks import callback_token, callback_url
from service.dev import free_port
from tests.helpers import seed_examples, set_simulator

pytestmark = pytest.mark.e2e

GENRELAY = str(Path(sys.executable).parent / "genrelay")
CALLBACK_SECRET = "e2e-callback-secret-0123456789"


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

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{name}.log").open("wb")
        process = subprocess.Popen([GENRELAY, *args], env=self.env, stdout=log, stderr=log)
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


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    sim_port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "GENRELAY_DATABASE_URL": database_url,
        "GENRELAY_DEEPIMAGE_URL": f"http://127.0.0.1:{sim_port}",
        "GENRELAY_DEEPIMAGE_API_KEY": "sim-key",
        # Callbacks reach the web process (its endpoint arrives with the completion path).
        "GENRELAY_PUBLIC_URL": f"http://127.0.0.1:{web_port}",
        "GENRELAY_CALLBACK_SECRET": CALLBACK_SECRET,
        "GENRELAY_WEB_PROCESSES": "2",
        "PORT": str(web_port),
    }
    stack = Stack(tmp_path, env)
    try:
        migrate = subprocess.run([GENRELAY, "migrate"], env=env, capture_output=True, timeout=60)
        assert migrate.returncode == 0, migrate.stderr.decode()
        keys = subprocess.run(
            [GENRELAY, "keys", "create", "acme"],
            env=env,
            capture_output=True,
            timeout=60,
            text=True,
        )
        assert keys.returncode == 0, keys.stderr
        api_key = keys.stdout.strip()
        assert keys.stdout == api_key + "\n"  # the key alone on stdout
        stack.start("simulator", "simulator", "--port", str(sim_port), "--processing-time", "0.3")
        stack.start("serve", "serve")
        stack.start("worker", "worker", "--threads", "2", "--poll-interval", "0.1")
        base = f"http://127.0.0.1:{web_port}"
        sim = f"http://127.0.0.1:{sim_port}"
        wait_for(
            lambda: stack.alive() and requests.get(f"{sim}/_sim/stats", timeout=1).ok,
            20,
            "the simulator",
        )
        wait_for(
            lambda: stack.alive() and requests.get(f"{base}/readyz", timeout=1).ok,
            30,
            "genrelay serve",
        )
        yield {
            "base": base,
            "sim": sim,
            "auth": {"Authorization": f"Bearer {api_key}"},
            "stack": stack,
        }
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop_all()


def test_every_seed_example_goes_through_gunicorn_to_the_simulator(stack: dict[str, Any]) -> None:
    base, auth = stack["base"], stack["auth"]
    for name, example in seed_examples().items():
        response = requests.post(
            f"{base}/v1/generations", json={"input": example}, headers=auth, timeout=30
        )
        assert response.status_code == 202, (name, response.text)
        body = response.json()
        assert body["status"] == "processing", name
        job = requests.get(f"{stack['sim']}/_sim/jobs/{body['upstream']['job']}", timeout=5).json()
        sent = dict(job["request"])
        assert sent.pop("webhooks") == {
            "complete": callback_url(stack["base"], CALLBACK_SECRET, body["id"])
        }
        assert sent == example
    listed = requests.get(f"{base}/v1/generations?limit=100", headers=auth, timeout=10).json()
    assert len(listed["data"]) == len(seed_examples())


def test_the_worker_process_submits_what_the_inline_attempt_could_not(
    stack: dict[str, Any],
) -> None:
    base, auth = stack["base"], stack["auth"]
    set_simulator(stack["sim"], upstream_error_rate=1.0)
    body = requests.post(
        f"{base}/v1/generations",
        json={"input": seed_examples()["text_only"]},
        headers=auth,
        timeout=30,
    ).json()
    assert body["status"] == "queued"
    set_simulator(stack["sim"], upstream_error_rate=0.0)

    def processing() -> bool:
        current = requests.get(f"{base}/v1/generations/{body['id']}", headers=auth, timeout=5)
        return bool(current.json()["status"] == "processing")

    wait_for(processing, 30, "the worker to submit the generation")


def test_worker_and_web_stop_cleanly_on_sigterm(stack: dict[str, Any]) -> None:
    processes = stack["stack"].processes
    for name in ("worker", "serve"):
        processes[name].send_signal(signal.SIGTERM)
        assert processes[name].wait(timeout=30) == 0, stack["stack"].logs()


def test_no_secret_reaches_the_logs(stack: dict[str, Any]) -> None:
    base, auth = stack["base"], stack["auth"]
    ids = []
    for _ in range(3):
        body = requests.post(
            f"{base}/v1/generations",
            json={"input": seed_examples()["face"]},
            headers=auth,
            timeout=30,
        ).json()
        ids.append(body["id"])

    def called_back() -> bool:
        stats = requests.get(f"{stack['sim']}/_sim/stats", timeout=5).json()
        return bool(stats["callbacks_sent"] >= 3)

    wait_for(called_back, 30, "the simulator's callbacks")
    stack["stack"].stop_all()
    logs = stack["stack"].logs(tail=None)
    assert "/v1/callbacks/deepimage/" in logs  # the callbacks were logged...
    secrets = [CALLBACK_SECRET, auth["Authorization"].split()[1], "sim-key"]
    secrets += [callback_token(CALLBACK_SECRET, gen_id) for gen_id in ids]
    for secret in secrets:  # ...without any credential
        assert secret not in logs
