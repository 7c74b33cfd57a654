"""What GENRELAY_OIDC_CERTS_URL may serve: Google's x509 certificates (JSON of key id -> PEM,
https://www.googleapis.com/oauth2/v1/certs) or a JWK Set (the v3 URL); anything else is
`CertificatesUnavailable` (the push answers 503 and is redelivered), never cached."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from service.adapters.oidc import CertificatesUnavailable, InvalidToken, TokenVerifier
from tests.gcp_helpers import OidcIssuer, issuer  # noqa: F401
from tests.helpers import LoopbackServer

AUDIENCE = "https://relay.example.com/v1/triggers/trg_1/push"
PUSHER = "pusher@acme-prod.iam.gserviceaccount.com"


class CertsServer(LoopbackServer):
    """Serves `body` (bytes) at a certificates URL on loopback, counting the requests."""

    def __init__(self) -> None:
        from werkzeug.wrappers import Request, Response

        self.body = b"{}"
        self.requests = 0

        @Request.application  # type: ignore[misc]
        def app(request: Request) -> Response:
            self.requests += 1
            return Response(self.body, mimetype="application/json")

        self.serve(app, "/certs")


@pytest.fixture
def certs() -> Iterator[CertsServer]:
    server = CertsServer()
    yield server
    server.stop()


def _b64url_int(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwk_set(issuer: OidcIssuer) -> bytes:  # noqa: F811
    numbers = issuer.key.public_key().public_numbers()
    key = {"kty": "RSA", "kid": issuer.kid, "alg": "RS256", "use": "sig",
           "n": _b64url_int(numbers.n), "e": _b64url_int(numbers.e)}  # fmt: skip
    other = {"kty": "EC", "kid": "ec-1", "crv": "P-256", "x": "AA", "y": "AA"}
    return json.dumps({"keys": [other, key]}).encode()


def test_a_jwk_set_verifies_tokens(certs: CertsServer, issuer: OidcIssuer) -> None:  # noqa: F811
    certs.body = jwk_set(issuer)
    verifier = TokenVerifier(certs.url)
    try:
        identity = verifier.verify("Bearer " + issuer.token(AUDIENCE, PUSHER), AUDIENCE)
    finally:
        verifier.close()
    assert identity.email == PUSHER


@pytest.mark.parametrize(
    "body",
    [
        b"<html>Service Unavailable</html>",
        b"\xff\xfe{",
        b"[1, 2]",
        b'{"kid": 42}',
        b'{"keys": "none"}',
        # a JWK Set without one usable RSA key (this modulus is no RSA key)
        b'{"keys": [{"kty": "RSA", "kid": "test-kid-1", "alg": "RS256", '
        b'"n": "sXch", "e": "AQAB"}]}',
        # x509 JSON whose certificate does not load (a mirror serving something else)
        b'{"test-kid-1": "this is not a PEM certificate"}',
    ],
)
def test_an_unusable_answer_is_unavailable_and_not_cached(
    certs: CertsServer,
    issuer: OidcIssuer,  # noqa: F811
    body: bytes,
) -> None:
    certs.body = body
    verifier = TokenVerifier(certs.url)
    token = issuer.token(AUDIENCE, PUSHER)
    try:
        with pytest.raises(CertificatesUnavailable):
            verifier.verify("Bearer " + token, AUDIENCE)
        # Fixed at the source: the next push reads the certificates again and is accepted.
        certs.body = json.dumps(issuer.certs).encode()
        assert verifier.verify("Bearer " + token, AUDIENCE).email == PUSHER
        assert verifier.verify("Bearer " + token, AUDIENCE).email == PUSHER
    finally:
        verifier.close()
    assert certs.requests == 2


def _token(header: bytes, claims: bytes) -> str:
    """A JWT of these raw segments (and a signature that verifies nothing)."""
    return ".".join(base64.urlsafe_b64encode(raw).rstrip(b"=").decode() for raw in
                    (header, claims, b"sig"))  # fmt: skip


RS256 = b'{"alg": "RS256", "kid": "test-kid-1"}'


@pytest.mark.parametrize(
    "token",
    [
        # JSON nested deeper than the parser goes, in the header or in the claims
        _token(b"[" * 4000, b"{}"),
        _token(RS256, b"[" * 4000),
        # longer than any ID token
        _token(RS256, b"{}" + b" " * 9000),
    ],
    ids=["nested-header", "nested-claims", "too-long"],
)
def test_a_malformed_token_is_refused_not_an_error(
    certs: CertsServer,
    issuer: OidcIssuer,  # noqa: F811
    token: str,
) -> None:
    certs.body = json.dumps(issuer.certs).encode()
    verifier = TokenVerifier(certs.url)
    try:
        with pytest.raises(InvalidToken):
            verifier.verify("Bearer " + token, AUDIENCE)
    finally:
        verifier.close()
