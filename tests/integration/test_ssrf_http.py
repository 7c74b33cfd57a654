"""The pinned session connects to the checked address over real HTTP and TLS on loopback.

`rebind.test` does not resolve for real: every request below that arrives proves the connection
went to the address the policy checked, not to a DNS answer of urllib3's own.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.notifications.ssrf import UnsafeURL, URLPolicy, pinned_session

TIMEOUT = 5.0


def loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


@dataclass(frozen=True)
class Seen:
    """One request as the server got it."""

    method: str
    path: str
    host: str | None
    body: bytes


class RecordingServer(ThreadingHTTPServer):
    """Records each request and, over TLS, the SNI name each handshake asked for."""

    daemon_threads = False  # server_close() joins the handler threads: no stray sockets

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.seen: list[Seen] = []
        self.sni: list[str | None] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def serve_tls(self, cert: Path, key: Path) -> None:
        """Answer over TLS with `cert`, recording the SNI of each handshake."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)

        def record_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
            with self.lock:
                self.sni.append(name)

        context.sni_callback = record_sni
        # The handshake runs in accept(); a failed one is an OSError the server just drops.
        self.socket = context.wrap_socket(self.socket, server_side=True)


class RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so pools are really reused
    timeout = TIMEOUT
    server: RecordingServer

    def do_POST(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.seen.append(Seen(self.command, self.path, self.headers["Host"], body))
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.port}/elsewhere")
        else:
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    with _running(RecordingServer()) as running:
        yield running


@contextlib.contextmanager
def _running(server: RecordingServer) -> Iterator[RecordingServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@dataclass
class Certificate:
    cert: Path
    key: Path


@dataclass
class Certificates:
    directory: Path
    made: dict[str, Certificate] = field(default_factory=dict)

    def for_name(self, name: str) -> Certificate:
        """A self-signed certificate (its own trust anchor) for the DNS name `name`."""
        if name not in self.made:
            self.made[name] = _self_signed(name, self.directory)
        return self.made[name]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


def _self_signed(name: str, directory: Path) -> Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert_path, key_path)


def test_rebind_test_does_not_resolve_for_real() -> None:
    # The premise of every test below: only the pinned address can take us there.
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("rebind.test", 80)


def test_the_request_goes_to_the_checked_address_with_the_hostname_in_host(
    server: RecordingServer,
) -> None:
    with pinned_session(URLPolicy(allow_private=True, resolver=loopback)) as session:
        response = session.post(
            f"http://rebind.test:{server.port}/hook",
            data=b'{"type":"generation.succeeded"}',
            headers={"Content-Type": "application/json"},
            timeout=TIMEOUT,
            allow_redirects=False,
        )
    assert response.status_code == 204
    assert server.seen == [
        Seen("POST", "/hook", f"rebind.test:{server.port}", b'{"type":"generation.succeeded"}')
    ]


def test_a_changing_dns_answer_cannot_move_the_connection_within_a_request(
    server: RecordingServer,
) -> None:
    answers = iter([["127.0.0.1"], ["192.0.2.1"]])
    asked: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    with pinned_session(URLPolicy(allow_private=True, resolver=rebinding)) as session:
        response = session.post(
            f"http://rebind.test:{server.port}/hook",
            data=b"{}",
            timeout=TIMEOUT,
            allow_redirects=False,
        )
    assert response.status_code == 204
    assert asked == ["rebind.test"]  # one resolution, and the connection used its answer
    assert [seen.host for seen in server.seen] == [f"rebind.test:{server.port}"]


def test_a_private_address_is_refused_before_any_connection(server: RecordingServer) -> None:
    with pinned_session(URLPolicy(allow_private=False, resolver=loopback)) as session:
        for url in (
            f"https://rebind.test:{server.port}/hook",
            f"https://127.0.0.1:{server.port}/hook",
        ):
            with pytest.raises(UnsafeURL) as refused:
                session.post(url, data=b"{}", timeout=TIMEOUT, allow_redirects=False)
            assert refused.value.reason
    assert server.seen == []


@pytest.mark.parametrize("allow_redirects", [False, True])
def test_a_redirect_is_returned_not_followed(
    server: RecordingServer, allow_redirects: bool
) -> None:
    with pinned_session(URLPolicy(allow_private=True, resolver=loopback)) as session:
        response = session.post(
            f"http://rebind.test:{server.port}/redirect",
            data=b"{}",
            timeout=TIMEOUT,
            allow_redirects=allow_redirects,
        )
    assert response.status_code == 302
    assert response.history == []
    assert [seen.path for seen in server.seen] == ["/redirect"]


def test_hostnames_sharing_an_address_each_keep_their_host_header(
    server: RecordingServer,
) -> None:
    with pinned_session(URLPolicy(allow_private=True, resolver=loopback)) as session:
        for host in ("rebind.test", "other.test", "rebind.test"):
            session.get(f"http://{host}:{server.port}/", timeout=TIMEOUT).close()
    assert [seen.host for seen in server.seen] == [
        f"rebind.test:{server.port}",
        f"other.test:{server.port}",
        f"rebind.test:{server.port}",
    ]


def test_every_request_gets_the_default_timeout_when_the_caller_gives_none() -> None:
    policy = URLPolicy(allow_private=True, resolver=loopback)
    with (
        socket.create_server(("127.0.0.1", 0)) as silent,  # the kernel accepts; nobody answers
        pinned_session(policy, timeout=(TIMEOUT, 0.2)) as session,
        pytest.raises(requests.exceptions.ReadTimeout),
    ):
        session.get(f"http://rebind.test:{silent.getsockname()[1]}/")


def _post_status(session: requests.Session, url: str, *, verify: str) -> int:
    # A live Response keeps its TLS socket open after the session closes (requests holds
    # the socket's file object), and the server's keep-alive read would then wait its
    # timeout out; so hold none past the call.
    with session.post(
        url, data=b"{}", timeout=TIMEOUT, allow_redirects=False, verify=verify
    ) as response:
        return response.status_code


@pytest.fixture
def start_tls_server(certificates: Certificates) -> Iterator[Callable[[str], RecordingServer]]:
    with contextlib.ExitStack() as servers:

        def start(cert_name: str) -> RecordingServer:
            server = RecordingServer()
            made = certificates.for_name(cert_name)
            server.serve_tls(made.cert, made.key)
            return servers.enter_context(_running(server))

        yield start


def test_https_connects_to_the_checked_address_and_verifies_the_hostname(
    start_tls_server: Callable[[str], RecordingServer], certificates: Certificates
) -> None:
    server = start_tls_server("rebind.test")
    with pinned_session(URLPolicy(allow_private=True, resolver=loopback)) as session:
        statuses = [
            _post_status(
                session,
                f"https://rebind.test:{server.port}/hook",
                verify=str(certificates.for_name("rebind.test").cert),
            )
            for _ in range(2)  # the second one reuses the verified connection
        ]
    assert statuses == [204, 204]
    assert server.sni == ["rebind.test"]
    assert [seen.host for seen in server.seen] == [f"rebind.test:{server.port}"] * 2


def test_https_refuses_a_certificate_for_another_name(
    start_tls_server: Callable[[str], RecordingServer], certificates: Certificates
) -> None:
    server = start_tls_server("other.test")
    with (
        pinned_session(URLPolicy(allow_private=True, resolver=loopback)) as session,
        pytest.raises(requests.exceptions.SSLError),
    ):
        _post_status(
            session,
            f"https://rebind.test:{server.port}/hook",
            # The other certificate is trusted; only its name is wrong.
            verify=str(certificates.for_name("other.test").cert),
        )
    assert server.sni == ["rebind.test"]
    assert server.seen == []
