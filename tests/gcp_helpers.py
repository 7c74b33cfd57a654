"""Google-side test doubles for the GCP loop: a throwaway service-account key (signs V4 URLs
offline), a check of V4 signatures, and an OIDC issuer on loopback that mints RS256 ID tokens
the way Google does for Eventarc and Pub/Sub pushes and serves its certificates in google-auth's
format (JSON of key id -> PEM certificate)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import io
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

SIGNER_EMAIL = "signer@genrelay-local.iam.gserviceaccount.com"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account_info(key: rsa.RSAPrivateKey | None = None) -> dict[str, str]:
    """A service-account key file's content: enough to sign V4 URLs offline."""
    key = key or new_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": "genrelay-local",
        "private_key_id": "throwaway",
        "private_key": pem,
        "client_email": SIGNER_EMAIL,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }


def public_key_of(info: dict[str, str]) -> rsa.RSAPublicKey:
    key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.public_key()


def verify_v4_signature(url: str, public_key: rsa.RSAPublicKey) -> None:
    """Check a V4 signed GET URL's signature (GOOG4-RSA-SHA256, host the only signed header),
    rebuilding the canonical request as GCS does. fake-gcs-server ignores signatures, so
    this is the test's proof that the URL is really signed by the key."""
    parts = urllib.parse.urlsplit(url)
    pairs = [p.split("=", 1) for p in parts.query.split("&")]
    query = {k: v for k, v in pairs}
    signature = bytes.fromhex(query.pop("X-Goog-Signature"))
    assert query["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert query["X-Goog-SignedHeaders"] == "host"
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted(query.items()))
    canonical_request = "\n".join(
        ["GET", parts.path, canonical_query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    credential = urllib.parse.unquote(query["X-Goog-Credential"])
    scope = credential.split("/", 1)[1]
    to_sign = "\n".join(
        [
            "GOOG4-RSA-SHA256",
            query["X-Goog-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    # Raises InvalidSignature when it does not match.
    public_key.verify(signature, to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OidcIssuer:
    """Mints Google-style ID tokens and serves the certificates that verify them on loopback."""

    def __init__(self) -> None:
        from werkzeug.serving import make_server
        from werkzeug.wrappers import Request, Response

        self.key = new_key()
        self.kid = "test-kid-1"
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "genrelay test issuer")])
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.certs = {
            self.kid: certificate.public_bytes(serialization.Encoding.PEM).decode(),
        }

        @Request.application  # type: ignore[misc]
        def app(request: Request) -> Response:
            return Response(json.dumps(self.certs), mimetype="application/json")

        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.certs_url = f"http://127.0.0.1:{self._server.server_port}/oauth2/v1/certs"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def token(
        self,
        audience: str,
        email: str,
        *,
        issuer: str = "https://accounts.google.com",
        expires_in: int = 3600,
        email_verified: bool = True,
        key: rsa.RSAPrivateKey | None = None,
        **claims: Any,
    ) -> str:
        """An RS256 ID token as Google signs for a push's service account."""
        now = int(time.time())
        header = {"alg": "RS256", "kid": self.kid, "typ": "JWT"}
        payload = {
            "iss": issuer,
            "aud": audience,
            "azp": "1234567890",
            "sub": "1234567890",
            "email": email,
            "email_verified": email_verified,
            "iat": now - 5 if expires_in > 0 else now - 7200,
            "exp": now + expires_in,
            **claims,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(payload).encode())
        )
        signature = (key or self.key).sign(
            signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return signing_input + "." + _b64url(signature)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --- Fixtures (import them into a test module to use them) ------------------------------------


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    """An OIDC issuer on loopback (its certificates URL goes in GENRELAY_OIDC_CERTS_URL)."""
    server = OidcIssuer()
    yield server
    server.stop()


@dataclasses.dataclass
class GcpStack:
    """An app whose blob store signs with a service-account key, on the emulator."""

    services: Any
    client: Any
    auth: dict[str, str]
    blobs: Any
    signer_info: dict[str, str]
    gcs: Any

    def bucket(self) -> str:
        """A new empty bucket on the emulator."""
        name = f"genrelay-in-{uuid.uuid4().hex[:12]}"
        self.gcs.create_bucket(name)
        return name

    def upload(self, bucket: str, name: str, data: bytes, content_type: str = "image/png") -> str:
        self.blobs.for_bucket(bucket).write_new(
            name, io.BytesIO(data), content_type=content_type, metadata={}, size=len(data)
        )
        return f"gs://{bucket}/{name}"


@pytest.fixture(scope="session")
def signer_info() -> dict[str, str]:
    return service_account_info()


@pytest.fixture
def gcp_config(config: Any) -> Any:
    """The Config of the `gcp` stack (a test module may override this fixture)."""
    return config


@pytest.fixture
def gcp(
    gcp_config: Any, store: Any, gcs_server: Any, gcs_bucket: str, signer_info: dict[str, str]
) -> Iterator[GcpStack]:
    from google.oauth2 import service_account

    from service.app import create_app
    from service.bootstrap import build_services
    from tests.conftest import emulator_blob_store

    config = gcp_config
    credentials = service_account.Credentials.from_service_account_info(signer_info)
    blobs = emulator_blob_store(gcs_server.url, gcs_bucket, signing_credentials=credentials)
    services = build_services(config, store=store, blobs=blobs)
    client = create_app(config, services=services).test_client()
    auth = {"Authorization": "Bearer " + services.api_keys.create("acme")}
    yield GcpStack(services, client, auth, blobs, signer_info, gcs_server)
    services.triggers.verifier.close()
    services.deepimage.close()
    services.downloads.close()


def png_bytes(
    width: int = 8, height: int = 6, color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


class _IamRefuses:
    """IAM signBlob's answer to a caller without the Token Creator role."""

    status = 403
    headers: dict[str, str] = {}
    data = (
        b'{"error": {"code": 403, "message": "Permission \'iam.serviceAccounts.signBlob\' '
        b'denied on resource", "status": "PERMISSION_DENIED"}}'
    )


def cannot_sign_for_good(monkeypatch: pytest.MonkeyPatch, blobs: Any, signer: str) -> None:
    """`blobs` signs as on Cloud Run (token-only credentials, through IAM as the signing
    account) and can never sign: "refused by IAM" (no Token Creator role), or "cannot refresh"
    (no token and no way to get one)."""
    import google.auth.transport.requests as google_requests
    from google.oauth2.credentials import Credentials

    monkeypatch.setattr(blobs, "signing_service_account", "rt@p.iam.gserviceaccount.com")
    if signer == "refused by IAM":
        monkeypatch.setattr(blobs, "signing_credentials", Credentials(token="ya29.x"))
        real_call = google_requests.Request.__call__

        def iam(self: Any, url: str, method: str = "GET", *args: Any, **kwargs: Any) -> Any:
            if "iamcredentials" in url:
                return _IamRefuses()
            return real_call(self, url, method, *args, **kwargs)

        monkeypatch.setattr(google_requests.Request, "__call__", iam)
    else:
        assert signer == "cannot refresh"
        monkeypatch.setattr(blobs, "signing_credentials", Credentials(token=None))
