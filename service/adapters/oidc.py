"""Google-signed OIDC ID tokens, as Eventarc and Pub/Sub push subscriptions send them.

A push carries `Authorization: Bearer <ID token>` minted by Google for the service account
configured on the trigger or subscription. It is verified with google-auth
(`google.oauth2.id_token.verify_token`): RS256 signature against Google's certificates
(GENRELAY_OIDC_CERTS_URL, cached for their Cache-Control max-age, at most an hour), audience,
expiry (10 s of clock skew); then the issuer (`https://accounts.google.com` or
`accounts.google.com`) and a verified `email`. Which emails may push is the caller's business.

The certificates URL serves JSON: either Google's x509 format, an object of key id -> PEM
certificate (https://www.googleapis.com/oauth2/v1/certs, the default), or a JWK Set
(`{"keys": [...]}`, as https://www.googleapis.com/oauth2/v3/certs), whose RSA signing keys are
turned into PEM public keys here (google-auth would need pyjwt for it). An answer that is
neither, or holds no usable key, is `CertificatesUnavailable` and is not cached.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import threading
import time
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUERS = frozenset({"https://accounts.google.com", "accounts.google.com"})
CLOCK_SKEW = 10
CERTS_CACHE_MAX = 3600.0
CERTS_TIMEOUT = (3.0, 10.0)
# Characters of a bearer token looked at: Google's ID tokens take about 1,000.
MAX_TOKEN = 8192
_MAX_AGE_RE = re.compile(r"max-age=(\d+)")


class InvalidToken(Exception):
    """The token is missing, malformed, forged, expired or for another audience (401)."""


class CertificatesUnavailable(Exception):
    """Google's certificates could not be read: the sender should try again (503)."""


@dataclasses.dataclass(frozen=True)
class Identity:
    email: str
    subject: str


class _Response:
    """The shape google-auth's transport expects of an answer."""

    def __init__(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.status = status
        self.headers = headers
        self.data = data


class _CachingCertsRequest:
    """A google-auth transport `Request` that caches successful GETs of the certificates URL
    (google-auth would fetch them for every token)."""

    def __init__(self) -> None:
        self._session = requests.Session()
        self._cache: dict[str, tuple[float, _Response]] = {}
        self._lock = threading.Lock()

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> _Response:
        from google.auth import exceptions

        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(url)
        if cached is not None and cached[0] > now and method == "GET":
            return cached[1]
        try:
            answer = self._session.request(method, url, timeout=CERTS_TIMEOUT)
        except requests.RequestException as exc:
            raise exceptions.TransportError(f"certificates: {type(exc).__name__}") from exc
        response = _Response(answer.status_code, dict(answer.headers), answer.content)
        if answer.status_code == 200:
            certs = _usable_certs(answer.content)
            if certs is None:
                raise exceptions.TransportError(
                    "certificates: the answer is neither x509 certificates nor a JWK Set "
                    "with an RSA signing key"
                )
            response.data = json.dumps(certs).encode()
            match = _MAX_AGE_RE.search(answer.headers.get("Cache-Control", ""))
            keep = min(CERTS_CACHE_MAX, float(match.group(1))) if match else 300.0
            with self._lock:
                self._cache[url] = (now + keep, response)
        return response

    def close(self) -> None:
        self._session.close()


class TokenVerifier:
    """Verifies push tokens against one certificates URL."""

    def __init__(self, certs_url: str) -> None:
        self.certs_url = certs_url
        self._request = _CachingCertsRequest()

    def verify(self, authorization: str | None, audience: str) -> Identity:
        from google.auth import exceptions
        from google.oauth2 import id_token

        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidToken("send a Google-signed ID token as 'Authorization: Bearer <token>'")
        _require_jwt_shape(token)  # before the certificates are fetched for it
        try:
            claims = id_token.verify_token(
                token,
                self._request,  # type: ignore[arg-type]
                audience=audience,
                certs_url=self.certs_url,
                clock_skew_in_seconds=CLOCK_SKEW,
            )
        except exceptions.TransportError as exc:
            raise CertificatesUnavailable(str(exc)) from None
        except (ValueError, exceptions.GoogleAuthError) as exc:
            # google-auth's messages say what is wrong (expired, audience, signature, ...).
            raise InvalidToken(f"the ID token was refused: {_short(exc)}") from None
        except RecursionError:  # JSON nested deeper than the parser goes: no ID token
            raise InvalidToken("the ID token's claims are not a JSON object") from None
        if claims.get("iss") not in ISSUERS:
            raise InvalidToken("the ID token was not issued by Google (iss)")
        email = claims.get("email")
        if not isinstance(email, str) or not email:
            raise InvalidToken("the ID token names no email (mint it with the email claim)")
        if claims.get("email_verified") is not True:
            raise InvalidToken("the ID token's email is not verified")
        return Identity(email=email.lower(), subject=str(claims.get("sub", "")))

    def close(self) -> None:
        self._request.close()


def _usable_certs(content: bytes) -> dict[str, str] | None:
    """{key id: PEM} from a certificates answer (x509 JSON or a JWK Set); None if unusable."""
    try:
        document = json.loads(content)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(document, dict):
        return None
    if "keys" in document:
        keys = document["keys"]
        if not isinstance(keys, list):
            return None
        certs: dict[str, str] = {}
        for jwk in keys:
            pem = _rsa_pem(jwk) if isinstance(jwk, dict) else None
            if pem is not None:
                certs[jwk["kid"]] = pem
        return certs or None
    if not document or not all(isinstance(v, str) for v in document.values()):
        return None
    # Only what verifies: a PEM that does not load would refuse every token as forged.
    usable = {kid: pem for kid, pem in document.items() if _loads(pem)}
    return usable or None


def _loads(pem: str) -> bool:
    """Whether `pem` is an x509 certificate, or a public key, that a signature can be checked
    with."""
    data = pem.encode()
    try:
        x509.load_pem_x509_certificate(data)
        return True
    except ValueError:
        pass
    try:
        serialization.load_pem_public_key(data)
        return True
    except (ValueError, TypeError):  # TypeError: a key type it does not support
        return False


def _rsa_pem(jwk: dict[str, Any]) -> str | None:
    """The PEM public key of an RSA signing JWK (RS256 or no alg); None for any other key."""
    if (
        jwk.get("kty") != "RSA"
        or jwk.get("use", "sig") != "sig"
        or jwk.get("alg", "RS256") != "RS256"
        or not isinstance(jwk.get("kid"), str)
        or not isinstance(jwk.get("n"), str)
        or not isinstance(jwk.get("e"), str)
    ):
        return None
    try:
        n, e = (
            int.from_bytes(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)), "big")
            for v in (jwk["n"], jwk["e"])
        )
        key = rsa.RSAPublicNumbers(e, n).public_key()
    except (ValueError, binascii.Error):
        return None
    if key.key_size < 2048:
        return None
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _require_jwt_shape(token: str) -> None:
    """InvalidToken unless `token` is three base64url segments with an RS256 JSON header."""
    if len(token) > MAX_TOKEN:
        raise InvalidToken(f"the bearer token is longer than an ID token ({MAX_TOKEN} at most)")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("the bearer token is not a JWT (an API key is not accepted here)")
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise InvalidToken("the bearer token's header is not base64url JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "RS256":
        raise InvalidToken("the ID token must be signed with RS256")


def _short(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0]
    # google-auth quotes the token's claims in some messages: keep them short.
    return text[:200]
