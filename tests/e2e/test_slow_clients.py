"""Slow clients against a real `genrelay serve` (gunicorn, one process of 4 threads): half-sent
requests, over real sockets, must neither stall the process nor be held open for long."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from service.devtools.ports import free_port
from tests.e2e.processes import GENRELAY, Stack, wait_for

# `serial`: it asserts how soon the server answers or cuts a connection off (1-6 s bounds),
# which another test loading the machine could stretch.
pytestmark = [pytest.mark.e2e, pytest.mark.serial]

REQUEST_TIMEOUT = 3  # GENRELAY_REQUEST_TIMEOUT for this server: short, to see the cut-off


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, gcs_server: Any) -> dict[str, str]:
    tmp_path = tmp_path_factory.mktemp("slow-clients")
    gcs_bucket = f"genrelay-test-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(gcs_bucket)
    return {
        **os.environ,
        "GENRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'genrelay.db'}",
        "GENRELAY_DEEPIMAGE_API_KEY": "unused",
        "GENRELAY_DEEPIMAGE_URL": "http://127.0.0.1:9",
        "GENRELAY_GCS_BUCKET": gcs_bucket,
        "STORAGE_EMULATOR_HOST": gcs_server.url,
        "GENRELAY_WEB_PROCESSES": "1",
        "GENRELAY_WEB_THREADS": "4",
        "GENRELAY_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        "PORT": str(free_port()),
    }


@pytest.fixture(scope="module")
def server(env: dict[str, str]) -> Iterator[str]:
    """One server for the module's tests: each closes every connection it opened."""
    tmp_path = Path(env["GENRELAY_DATABASE_URL"].removeprefix("sqlite:///")).parent
    port = int(env["PORT"])
    migrate = subprocess.run([GENRELAY, "migrate"], env=env, capture_output=True, timeout=60)
    assert migrate.returncode == 0, migrate.stderr.decode()
    stack = Stack(tmp_path, env)
    base = f"http://127.0.0.1:{port}"
    try:
        stack.start("serve", "serve")
        wait_for(
            lambda: stack.alive() and requests.get(f"{base}/healthz", timeout=1).ok,
            30,
            "genrelay serve",
        )
        yield base
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop_all()


def _half_sent(base: str) -> list[socket.socket]:
    """Twelve connections, each stalled partway through its request."""
    port = int(base.rsplit(":", 1)[1])
    parts = [
        b"",  # connected, nothing sent
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # inside the headers
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # the blank line never comes
        b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"input":',  # a tenth of the body
        b"POST /v1/subscriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n{",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost:",  # pipelined
        b"G",
        b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n",
        # Leading zeros, which gunicorn takes: as many as the threads (the body was left to
        # a thread, which waited for it).
        *[
            b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 0000000000000000000100"
            b"\r\n\r\n{"
        ]
        * 4,
    ]
    sockets = []
    for part in parts:
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        if part:
            client.sendall(part)
        sockets.append(client)
    return sockets


def test_healthz_answers_while_slow_clients_hold_connections(server: str) -> None:
    slow = _half_sent(server)
    try:
        time.sleep(0.5)  # let the server take them all
        with requests.Session() as session:
            for _ in range(10):  # more than the threads, each at once
                started = time.monotonic()
                response = session.get(f"{server}/healthz", timeout=5)
                assert response.status_code == 200
                assert time.monotonic() - started < 1.0
        # Fresh connections too, several at a time.
        for _ in range(6):
            assert requests.get(f"{server}/healthz", timeout=5).status_code == 200
    finally:
        for client in slow:
            client.close()


def test_a_request_that_does_not_arrive_in_time_is_cut_off(server: str) -> None:
    slow = _half_sent(server)
    try:
        deadline = time.monotonic() + REQUEST_TIMEOUT + 5
        for client in slow:
            client.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                rest = b""
                while chunk := client.recv(65536):  # until the server closes the connection
                    rest += chunk
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail("a stalled connection is still open after the request timeout")
    finally:
        for client in slow:
            client.close()
    assert requests.get(f"{server}/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("streamed", ["Transfer-Encoding: chunked", "Expect: 100-continue"])
def test_a_streamed_body_refused_unread_closes_the_connection_at_once(
    server: str, streamed: str
) -> None:
    # As many connections as the server has threads, each with a body that a thread reads,
    # trickled: refused for want of a key, none holds a thread while it trickles on.
    port = int(server.rsplit(":", 1)[1])
    head = (
        b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + streamed.encode()
        + (b"" if "chunked" in streamed else b"\r\nContent-Length: 1000")
        + b"\r\n\r\n"
    )
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        for client in clients:
            client.sendall(head + (b'5\r\n{"a":' if "chunked" in streamed else b""))
        started = time.monotonic()
        for client in clients:
            answer, reset = b"", False
            try:
                while chunk := client.recv(65536):  # until the server closes the connection
                    answer += chunk
            except ConnectionResetError:  # closed with our bytes unread: the answer may be lost
                reset = True
            assert b"HTTP/1.1 401 " in answer or reset  # (after a 100 Continue, for one)
            if not reset:  # it says it ends the connection, as it does
                assert b"\r\nConnection: close\r\n" in answer, answer
        assert time.monotonic() - started < 2.0
        healthz = time.monotonic()
        assert requests.get(f"{server}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - healthz < 1.0
    finally:
        for client in clients:
            client.close()


def test_connections_the_client_leaves_open_after_a_close_do_not_stall_the_others(
    server: str,
) -> None:
    # Each answer ends its connection; the clients neither read nor close. Closing such a
    # connection must not keep the process from answering others meanwhile.
    port = int(server.rsplit(":", 1)[1])
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]
    try:
        for client in clients:
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.3)  # all answered, their connections closing
        for _ in range(3):
            started = time.monotonic()
            assert requests.get(f"{server}/healthz", timeout=5).status_code == 200
            assert time.monotonic() - started < 1.0
        for client in clients:  # each got its answer, then the server's end of it
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        for client in clients:
            client.close()


def test_requests_sent_in_pieces_within_the_time_are_served(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    body = b'{"url": "http://127.0.0.1:9/"}'
    request = (
        b"POST /v1/subscriptions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        for i in range(0, len(request), 16):
            client.sendall(request[i : i + 16])
            time.sleep(0.02)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ")  # read whole, and refused for want of a key


def test_a_large_body_is_read_whole_and_parsed(server: str, env: dict[str, str]) -> None:
    keys = subprocess.run(
        [GENRELAY, "keys", "create", "acme"], env=env, capture_output=True, text=True, timeout=60
    )
    assert keys.returncode == 0, keys.stderr
    auth = {"Authorization": f"Bearer {keys.stdout.strip()}"}
    # 5 MB of JSON: buffered by the event loop, then handed to the app intact.
    body = {"input": {"width": 1, "height": 1}, "metadata": {"blob": "a" * 5_000_000}}
    response = requests.post(f"{server}/v1/generations", json=body, headers=auth, timeout=30)
    assert response.status_code == 422, response.text[:500]
    fields = {e["field"] for e in response.json()["errors"]}
    assert fields and all(f.startswith(("input", "metadata")) for f in fields), fields


def _until_closed(client: socket.socket) -> bytes:
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := client.recv(65536):
            answer += chunk
    return answer


def _one_answer(client: socket.socket) -> bytes:
    """One whole answer (its head and Content-Length bytes of body), the connection kept."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += client.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += client.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_request_head_too_large_is_answered_431_at_once(server: str) -> None:
    """Past the loop's limit with no end in sight, the head went to a thread, which waited
    15 s for the rest and answered nothing."""
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000)
        started = time.monotonic()
        answer = _until_closed(client)
    assert time.monotonic() - started < 2.0
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"application/problem+json" in answer
    # Within the limit, a large head is still the parser's to judge (and gunicorn's 8190
    # bytes a field refuse this one).
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        answer = _until_closed(client)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"Content-Type: application/problem+json" in answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization Bearer gr_secret_key\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuth(gr_secret_key): y\r\n\r\n",
        b"GET /healthz?gr_secret_key HTTP/9.9\r\nHost: x\r\n\r\n",
        b"\x00\x01gr_secret_key\r\n\r\n",
    ],
    ids=["header without a colon", "bad header name", "bad version", "bad request line"],
)
def test_a_request_the_parser_refuses_is_answered_as_a_problem_that_quotes_nothing(
    server: str, request_bytes: bytes
) -> None:
    """gunicorn answered these with an HTML page quoting the bytes it refused."""
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(request_bytes)
        answer = _until_closed(client)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"Content-Type: application/problem+json" in head
    problem = json.loads(body)
    assert problem["status"] == 400 and problem["detail"]
    assert b"gr_secret_key" not in answer


@pytest.mark.parametrize(
    "chunks",
    [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n", b"-2\r\n{}\r\n0\r\n\r\n"],
    ids=["bad size", "missing CRLF", "negative size"],
)
def test_a_malformed_chunked_body_is_a_400_not_a_500(
    server: str, env: dict[str, str], chunks: bytes
) -> None:
    keys = subprocess.run(
        [GENRELAY, "keys", "create", "acme"], env=env, capture_output=True, text=True, timeout=60
    )
    assert keys.returncode == 0, keys.stderr
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(
            b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + keys.stdout.strip().encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks
        )
        answer = _until_closed(client)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"application/problem+json" in answer


def test_credentials_in_a_query_or_a_malformed_header_stay_out_of_the_logs(
    server: str, env: dict[str, str]
) -> None:
    """An API key in a request's query, or in a header line without its colon (which gunicorn
    refuses, quoting it): neither reaches gunicorn's access or error lines."""
    key = "gr_" + uuid.uuid4().hex
    assert requests.get(f"{server}/healthz?api_key={key}", timeout=5).status_code == 200
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(
            b"GET /v1/generations HTTP/1.1\r\nHost: x\r\nAuthorization Bearer "
            + key.encode()
            + b"\r\n\r\n"
        )
        assert _until_closed(client).startswith(b"HTTP/1.1 400 ")
    log = Path(env["GENRELAY_DATABASE_URL"].removeprefix("sqlite:///")).parent / "serve.log"
    wait_for(lambda: "'Authorization ***'" in log.read_text(), 5, "the warning logged")
    text = log.read_text()
    assert key not in text
    assert '"message": "GET /healthz?*** HTTP/1.1"' in text


def test_a_stopping_server_does_not_wait_for_requests_that_are_not_coming(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A connection that sent nothing kept a stopping worker for GENRELAY_REQUEST_TIMEOUT
    (15 s by default): past the 10 s a platform gives a process after SIGTERM."""
    port = free_port()
    slow_env = {**env, "GENRELAY_REQUEST_TIMEOUT": "15", "PORT": str(port)}
    stack = Stack(tmp_path, slow_env)
    try:
        serve = stack.start("serve", "serve")
        wait_for(
            lambda: (
                stack.alive() and requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
            ),
            30,
            "genrelay serve",
        )
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        trickling = socket.create_connection(("127.0.0.1", port), timeout=5)
        trickling.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        kept = socket.create_connection(("127.0.0.1", port), timeout=5)
        healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        kept.sendall(healthz)
        assert _one_answer(kept).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.3)
        started = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        # A request on a kept-alive connection, arriving as the worker stops, is answered
        # (it was closed unread, its bytes still in the kernel's buffer: a reset).
        kept.sendall(healthz)
        assert _until_closed(kept).startswith(b"HTTP/1.1 200 ")
        serve.wait(timeout=30)
        assert time.monotonic() - started < 6.0, stack.logs()
        for client in (idle, trickling, kept):
            client.close()
    finally:
        stack.stop_all()


def test_a_worker_out_of_file_descriptors_pauses_instead_of_dying(
    env: dict[str, str], tmp_path: Path
) -> None:
    """accept() raising EMFILE ended the worker process, and every connection it held."""
    port = free_port()
    stack = Stack(tmp_path, {**env, "PORT": str(port)})
    clients: list[socket.socket] = []
    try:
        serve = stack.start("serve", "serve")
        base = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: stack.alive() and requests.get(f"{base}/healthz", timeout=1).ok,
            30,
            "genrelay serve",
        )
        [worker] = Path(f"/proc/{serve.pid}/task/{serve.pid}/children").read_text().split()
        opened = len(os.listdir(f"/proc/{worker}/fd"))
        limit = opened + 20
        subprocess.run(["prlimit", "--pid", worker, f"--nofile={limit}:{limit}"], check=True)
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        for _ in range(40):  # more than the worker has descriptors left
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        first.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _until_closed(first).startswith(b"HTTP/1.1 200 ")
        first.close()
        for client in clients:
            client.close()
        clients = []
        wait_for(lambda: requests.get(f"{base}/healthz", timeout=1).ok, 10, "healthz again")
        after = Path(f"/proc/{serve.pid}/task/{serve.pid}/children").read_text().split()
        assert after == [worker], stack.logs()  # the same process: it did not die
        assert "pausing" in stack.logs()
    finally:
        for client in clients:
            client.close()
        stack.stop_all()
