"""Blob storage: the `BlobStore` port and `GcsBlobStore` (Google Cloud Storage); the in-memory
`FakeBlobStore` is in service/devtools/fakes.py.

Every failure is classified once, here (like service/adapters/deepimage.py):
- `BlobAlreadyExists`: the create-only precondition failed (HTTP 412); `existing` is the object
  already there when it could be read. A retry of our own upload whose first answer was lost
  also ends here: compare `existing.crc32c` with the CRC32C of what was sent.
- `TransientBlobError`: connection errors, timeouts, 408/429/5xx, retries given up, checksum
  mismatches in transit. The caller's task queue retries later.
- `PermanentBlobError`: 400/401/403, 404 (no such bucket) and other 4xx, missing credentials,
  a stream shorter than the `size` promised. Retrying fails the same way.
Exceptions raised by the caller's stream while it is read (e.g. "too large", "not an image")
propagate unchanged.

CRC32C values are base64 of the big-endian CRC32C, exactly as GCS reports them; `Crc32cHasher`
computes them incrementally for callers that checksum a stream as they pass it along.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import http.client
import io
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import google_crc32c
import requests

from service.errors import TransientError

if TYPE_CHECKING:
    from google.cloud import storage

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
EMULATOR_PROJECT = "genrelay-local"
# google-cloud-storage (seen in 3.11 on) fetches each bucket's metadata (`storage.buckets.get`) in a
# thread of its own the first time a client touches the bucket, only to label OpenTelemetry
# spans, which genrelay does not export. The runtime roles of docs/deploy.md do not grant that
# permission: every process would leave a denied request per bucket in the audit log, and
# while GCS is unreachable the thread retries for two minutes. This variable, read by the
# library before each call, is its only switch (googleapis/google-cloud-python#17650); it is
# process-wide. A value the operator set is kept.
BUCKET_METADATA_SWITCH = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"
MAX_SIGNED_URL_LIFETIME = datetime.timedelta(days=7)  # the V4 signing limit
MAX_MESSAGE_CHARS = 500
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Readiness probes run again soon anyway: answer fast, never retry.
_CHECK_TIMEOUT = (3.0, 5.0)
_QUERY = re.compile(r"\?[^\s:]*")


class Crc32cHasher:
    """Incremental CRC32C whose `base64()` is the value GCS reports for the same bytes."""

    def __init__(self, data: bytes = b"") -> None:
        self._checksum = google_crc32c.Checksum(data)

    def update(self, data: bytes) -> None:
        """Add `data` to the checksum."""
        self._checksum.update(data)

    def digest(self) -> bytes:
        """The CRC32C as 4 big-endian bytes."""
        digest: bytes = self._checksum.digest()
        return digest

    def base64(self) -> str:
        """The CRC32C as GCS reports it (base64 of the big-endian bytes)."""
        return base64.b64encode(self.digest()).decode("ascii")


def crc32c_base64(data: bytes | Iterable[bytes]) -> str:
    """The GCS-style CRC32C of `data` (bytes, or an iterable of chunks)."""
    hasher = Crc32cHasher()
    for chunk in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
        hasher.update(bytes(chunk))
    return hasher.base64()


@dataclasses.dataclass(frozen=True)
class StoredBlob:
    """An object as the store reports it after a write or a stat."""

    bucket: str
    name: str
    size: int
    crc32c: str
    content_type: str
    generation: int | None
    metadata: dict[str, str]

    @property
    def uri(self) -> str:
        """``gs://bucket/name``."""
        return f"gs://{self.bucket}/{self.name}"


class BlobError(Exception):
    """Base of the errors a blob store raises."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class TransientBlobError(BlobError, TransientError):
    """May succeed when tried again later."""


class PermanentBlobError(BlobError):
    """Will fail the same way again."""


class BlobAlreadyExists(BlobError):
    """The create-only precondition failed: an object of that name is already there."""

    def __init__(self, message: str, *, existing: StoredBlob | None) -> None:
        super().__init__(message, http_status=412)
        self.existing = existing


class ReadableStream(Protocol):
    """What `write_new` reads from: any object with a binary `read` (files, BinaryIO, wrappers).

    Short reads are fine (they are filled); an empty read means the end.
    """

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes; b"" at the end."""
        ...


class BlobStore(Protocol):
    """Write-once object storage in one bucket."""

    bucket: str

    def write_new(
        self,
        name: str,
        stream: ReadableStream,
        *,
        content_type: str,
        metadata: dict[str, str],
        size: int | None = None,
    ) -> StoredBlob:
        """Create `name` from `stream` only if it does not exist; never buffers the whole stream."""
        ...

    def stat(self, name: str) -> StoredBlob | None:
        """The object `name`, or None when there is none."""
        ...

    def signed_url(self, name: str, expires_in: datetime.timedelta) -> str | None:
        """A V4 GET URL where the credentials can sign; None where they cannot."""
        ...

    def check(self) -> None:
        """Readiness: raise BlobError when the bucket is not reachable."""
        ...

    def delete(self, name: str) -> bool:
        """Delete `name`; False when there was no such object."""
        ...

    def for_bucket(self, bucket: str) -> BlobStore:
        """The same store (client, credentials, options) on another bucket."""
        ...


class GcsBlobStore:
    """`BlobStore` on one Google Cloud Storage bucket through google-cloud-storage.

    Uploads with a known `size` up to 8 MiB go in one multipart request (the library reads
    them into memory once); larger or unknown sizes go as a resumable upload in `chunk_size`
    pieces, so at most one chunk of the stream is held at a time. The stream must deliver
    its bytes once, front to back; it is never rewound, and never read past `size`.
    `retry_timeout` bounds the library's own retries of one request or chunk (0: none).
    """

    def __init__(
        self,
        bucket: str,
        *,
        client: storage.Client | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float | tuple[float, float] = (10, 120),
        signing_service_account: str | None = None,
        retry_timeout: float = 30.0,
        signing_credentials: Any = None,
    ) -> None:
        # Imported here, not at module import: loading google-cloud-storage is slow and only
        # processes that actually store blobs need it.
        from google.cloud import storage
        from google.cloud.storage.retry import DEFAULT_RETRY

        if chunk_size <= 0 or chunk_size % (256 * 1024):
            raise ValueError("chunk_size must be a positive multiple of 256 KiB")
        os.environ.setdefault(BUCKET_METADATA_SWITCH, "true")
        self.bucket = bucket
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.signing_service_account = signing_service_account
        # Credentials that sign URLs when the client's own cannot (a service-account key
        # beside an anonymous emulator client, in development and tests).
        self.signing_credentials = signing_credentials
        self._retry_timeout = retry_timeout
        self._other_buckets: dict[str, GcsBlobStore] = {}
        # IAM signers by (credentials, account), shared with the stores of other buckets.
        self._iam_signers: dict[tuple[int, str], _IamSigning] = {}
        self._owns_client = client is None
        # Nothing is contacted here; without a client, storage.Client() finds the application
        # default credentials (on GCE/Cloud Run that may ask the metadata server).
        self._client = client if client is not None else storage.Client()
        self._bucket = self._client.bucket(bucket)
        # The library's retries stay on but bounded: they re-send a request or one chunk
        # from memory (cheap, and safe for create-only uploads: a re-sent upload that already
        # landed answers 412), while our task queue retries everything else with backoff.
        # The library's default would keep a request retrying for 120 s. 0 disables them.
        self._retry = DEFAULT_RETRY.with_timeout(retry_timeout) if retry_timeout > 0 else None

    @classmethod
    def from_environment(cls, bucket: str, **kwargs: Any) -> GcsBlobStore:
        """A store whose client talks to `STORAGE_EMULATOR_HOST` when set, else to GCS."""
        from google.auth import exceptions as auth_exceptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
        if emulator:
            if "://" not in emulator:
                emulator = f"http://{emulator}"
            client = storage.Client(
                project=EMULATOR_PROJECT,
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": emulator},
            )
            key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip()
            if key_file and "signing_credentials" not in kwargs:
                # The emulator takes no credentials, but a service-account key can still sign
                # URLs pointing at it (the emulator does not check their signatures).
                from google.oauth2 import service_account

                try:
                    kwargs["signing_credentials"] = (
                        service_account.Credentials.from_service_account_file(key_file)
                    )
                except (OSError, ValueError, auth_exceptions.GoogleAuthError) as exc:
                    # Missing, not JSON, or a user's credentials (gcloud's login), which
                    # cannot sign. The reason names what is missing, never the file's values.
                    raise PermanentBlobError(
                        "GOOGLE_APPLICATION_CREDENTIALS must name a service-account key file "
                        "to sign URLs for the emulator (STORAGE_EMULATOR_HOST): "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
        else:
            try:
                client = storage.Client()
            except auth_exceptions.DefaultCredentialsError as exc:
                raise PermanentBlobError(f"no Google credentials for GCS: {exc}") from exc
        store = cls(bucket, client=client, **kwargs)
        store._owns_client = True
        return store

    def write_new(
        self,
        name: str,
        stream: ReadableStream,
        *,
        content_type: str,
        metadata: dict[str, str],
        size: int | None = None,
    ) -> StoredBlob:
        """Create `name` from `stream` only if it does not exist (if_generation_match=0)."""
        blob = self._bucket.blob(name)
        # Always set: left unset, a resumable upload reads up to 100 MiB per request.
        blob.chunk_size = self.chunk_size
        blob.metadata = dict(metadata)
        source = _UploadSource(stream, size=size)
        try:
            blob.upload_from_file(
                source,
                size=size,
                content_type=content_type,
                if_generation_match=0,
                checksum="crc32c",
                timeout=self.timeout,
                retry=self._retry,
            )
        except Exception as exc:
            if exc is source.stream_error or isinstance(exc, BlobError):
                raise
            if _status_of(exc) == http.client.PRECONDITION_FAILED:
                raise BlobAlreadyExists(
                    f"gs://{self.bucket}/{name} already exists", existing=self._stat_quietly(name)
                ) from exc
            _raise_classified(exc, f"uploading gs://{self.bucket}/{name}")
        return self._stored(blob, fallback=source)

    def stat(self, name: str) -> StoredBlob | None:
        """The object `name`, or None (also for a missing bucket: GCS answers 404 to both)."""
        try:
            blob = self._bucket.get_blob(name, timeout=self.timeout, retry=self._retry)
        except Exception as exc:
            _raise_classified(exc, f"reading gs://{self.bucket}/{name}")
        return None if blob is None else self._stored(blob)

    def for_bucket(self, bucket: str) -> GcsBlobStore:
        """The same client, credentials and options on `bucket` (this store for its own)."""
        if bucket == self.bucket:
            return self
        other = self._other_buckets.get(bucket)
        if other is None:
            other = GcsBlobStore(
                bucket,
                client=self._client,
                chunk_size=self.chunk_size,
                timeout=self.timeout,
                signing_service_account=self.signing_service_account,
                retry_timeout=self._retry_timeout,
                signing_credentials=self.signing_credentials,
            )
            other._iam_signers = self._iam_signers
            self._other_buckets[bucket] = other
        return other

    def delete(self, name: str) -> bool:
        """Delete `name`; False when it was not there (already deleted counts as done)."""
        try:
            self._bucket.blob(name).delete(timeout=self.timeout, retry=self._retry)
        except Exception as exc:
            if _status_of(exc) == http.client.NOT_FOUND:
                return False
            _raise_classified(exc, f"deleting gs://{self.bucket}/{name}")
        return True

    def signed_url(self, name: str, expires_in: datetime.timedelta) -> str | None:
        """A V4 GET URL for `name`; None when the credentials cannot sign (anonymous, emulator)."""
        from google.auth.credentials import AnonymousCredentials, Signing

        if not datetime.timedelta(0) < expires_in <= MAX_SIGNED_URL_LIFETIME:
            raise ValueError(f"expires_in must be within (0, 7 days], not {expires_in}")
        credentials = self.signing_credentials or self._client._credentials
        options: dict[str, Any] = {
            "version": "v4",
            "expiration": expires_in,
            "method": "GET",
            # The client's endpoint: the emulator's URL there, storage.googleapis.com otherwise.
            "api_access_endpoint": self._client.api_endpoint,
        }
        blob = self._bucket.blob(name)
        try:
            if isinstance(credentials, Signing):
                # A service-account key: signed locally, no request.
                return str(blob.generate_signed_url(credentials=credentials, **options))
            if self.signing_service_account and not isinstance(credentials, AnonymousCredentials):
                # Cloud Run / GCE credentials hold only a token; IAM signBlob signs for the
                # service account (which needs roles/iam.serviceAccountTokenCreator on itself).
                signing = self._iam_signing(credentials, self.signing_service_account)
                return str(blob.generate_signed_url(credentials=signing, **options))
            return None
        except (AttributeError, TypeError) as exc:
            # google-cloud-storage's way of saying these credentials cannot sign.
            if "private key" in str(exc):
                return None
            raise
        except Exception as exc:
            _raise_classified(exc, f"signing a URL for gs://{self.bucket}/{name}")

    def check(self) -> None:
        """Raise BlobError unless the bucket answers a one-object listing."""
        # objects.list, not buckets.get: an uploader's role (roles/storage.objectUser or
        # objectAdmin on the bucket) grants storage.objects.list but not storage.buckets.get.
        try:
            blobs = self._client.list_blobs(
                self._bucket, max_results=1, timeout=_CHECK_TIMEOUT, retry=None
            )
            for _ in blobs:
                break
        except Exception as exc:
            _raise_classified(exc, f"checking gs://{self.bucket}")

    def _iam_signing(self, credentials: Any, account: str) -> _IamSigning:
        key = (id(credentials), account)
        signing = self._iam_signers.get(key)
        if signing is None:
            signing = self._iam_signers.setdefault(key, _IamSigning(credentials, account))
        return signing

    def close(self) -> None:
        """Close the client's connections when this store created the client, and the IAM
        signers'."""
        if self._owns_client:
            self._client.close()
        for signing in list(self._iam_signers.values()):
            signing.close()

    def _stat_quietly(self, name: str) -> StoredBlob | None:
        try:
            return self.stat(name)
        except BlobError:
            return None

    def _stored(self, blob: Any, *, fallback: _UploadSource | None = None) -> StoredBlob:
        # The upload's answer normally carries size and crc32c; if a server left them out,
        # what we sent is the same value by definition.
        size = blob.size if blob.size is not None else (fallback.tell() if fallback else 0)
        crc32c = blob.crc32c or (fallback.hasher.base64() if fallback else "")
        return StoredBlob(
            bucket=self.bucket,
            name=blob.name,
            size=int(size),
            crc32c=crc32c,
            content_type=blob.content_type or "application/octet-stream",
            generation=blob.generation,
            metadata=dict(blob.metadata or {}),
        )


class _UploadSource:
    """The caller's stream as google-cloud-storage needs it.

    The library's resumable upload asks `tell()` for positions and takes a short read for
    the end of the stream, which a socket- or pipe-like stream would break; here each read
    is filled up to the size asked for. Exceptions the stream raises are remembered so they
    can be told apart from the library's and re-raised unchanged.
    """

    def __init__(self, raw: ReadableStream, *, size: int | None) -> None:
        self._raw = raw
        self._size = size
        self._position = 0
        self.hasher = Crc32cHasher()
        self.stream_error: BaseException | None = None

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = (self._size - self._position) if self._size is not None else None
        chunks: list[bytes] = []
        got = 0
        while size is None or got < size:
            try:
                chunk = self._raw.read(DEFAULT_CHUNK_SIZE if size is None else size - got)
            except BaseException as exc:
                self.stream_error = exc
                raise
            if not chunk:
                if self._size is not None and self._position + got < self._size:
                    raise PermanentBlobError(
                        f"the stream ended after {self._position + got} bytes, "
                        f"short of size={self._size}"
                    )
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
        self._position += len(data)
        self.hasher.update(data)
        return data

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # The library seeks only to where the stream already is (rewinding would need
        # recover(), which we never call): allow that, refuse anything else.
        if whence == io.SEEK_SET and offset == self._position:
            return offset
        raise io.UnsupportedOperation("the upload stream cannot be rewound")


def _status_of(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _classify(exc: Exception, what: str) -> BlobError | None:
    """The BlobError for a google-cloud-storage / google-auth / requests failure, else None."""
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud.storage import exceptions as storage_exceptions

    if isinstance(exc, BlobError):
        return exc
    if isinstance(exc, api_exceptions.RetryError):
        # Described by its last failure, which was retryable, hence transient.
        cause = exc.cause
        retried = f"{what}: gave up retrying"
        inner = _classify(cause, retried) if isinstance(cause, Exception) else None
        if inner is None:
            return TransientBlobError(f"{retried}: {type(cause or exc).__name__}")
        return TransientBlobError(inner.message, http_status=inner.http_status)
    status = _status_of(exc)
    if isinstance(exc, api_exceptions.GoogleAPICallError | storage_exceptions.InvalidResponse):
        # Query strings dropped: a resumable upload's session URL is a bearer capability.
        server_says = _QUERY.sub("", str(getattr(exc, "message", "") or ""))
        detail = f"{what}: HTTP {status} {server_says}".rstrip()
        if status in _TRANSIENT_STATUSES:
            return TransientBlobError(detail[:MAX_MESSAGE_CHARS], http_status=status)
        return PermanentBlobError(detail[:MAX_MESSAGE_CHARS], http_status=status)
    if isinstance(exc, storage_exceptions.DataCorruption):
        return TransientBlobError(_message(f"{what}: checksum mismatch in transit", exc))
    if isinstance(exc, auth_exceptions.RefreshError):
        error_class = TransientBlobError if exc.retryable else PermanentBlobError
        return error_class(_message(f"{what}: credentials refresh failed", exc))
    if isinstance(exc, auth_exceptions.TransportError):
        if _REFUSED_BY_GOOGLE.search(str(exc)):
            # google-auth reports an IAM signBlob refusal (no Token Creator role) this way:
            # asking again will not help.
            return PermanentBlobError(_message(f"{what}: refused", exc))
        return TransientBlobError(_message(f"{what}: transport error", exc))
    if isinstance(exc, auth_exceptions.GoogleAuthError):
        return PermanentBlobError(_message(f"{what}: credentials error", exc))
    if isinstance(
        exc,
        requests.ConnectionError
        | requests.Timeout
        | requests.exceptions.ChunkedEncodingError
        | ConnectionError
        | TimeoutError
        | http.client.HTTPException,
    ):
        # Only the exception's type: its text can carry the upload session URL.
        return TransientBlobError(f"{what}: {type(exc).__name__}")
    if isinstance(exc, requests.RequestException):
        return PermanentBlobError(f"{what}: {type(exc).__name__}")
    # Anything else is a bug, ours or the library's: not a storage failure to classify.
    return None


# A Google API's error body refusing the caller: 401 or 403 (UNAUTHENTICATED,
# PERMISSION_DENIED).
_REFUSED_BY_GOOGLE = re.compile(r'"code":\s*40[13]\b|PERMISSION_DENIED|UNAUTHENTICATED')


def _raise_classified(exc: Exception, what: str) -> NoReturn:
    """Raise the BlobError for `exc`, or `exc` itself when it is no storage failure."""
    error = _classify(exc, what)
    if error is None:
        raise exc
    raise error from exc


def _message(what: str, exc: BaseException) -> str:
    return f"{what}: {type(exc).__name__}: {exc}"[:MAX_MESSAGE_CHARS]


# IAM signBlob, per request: it answers in tens of milliseconds. google-cloud-storage's own
# call (`service_account_email=`, `access_token=`) waits up to 120 s, retries for up to 120 s
# more, and makes a new connection for every URL.
IAM_SIGN_TIMEOUT = (5.0, 10.0)


class _IamSigning:
    """Signs as `account` through IAM's signBlob, authorized by `credentials` (refreshed when
    due): one kept-alive session for every URL, IAM_SIGN_TIMEOUT for each request, and
    google-auth's three tries of a 5xx. A google.auth.credentials.Signing (registered as one
    on first use: google-auth is imported only by the processes that sign)."""

    def __init__(self, credentials: Any, account: str) -> None:
        from google.auth import iam
        from google.auth.credentials import Signing
        from google.auth.transport import requests as auth_requests

        Signing.register(_IamSigning)
        self._session = requests.Session()
        request = auth_requests.Request(session=self._session)

        def timed(*args: Any, **kwargs: Any) -> Any:
            return request(*args, **{**kwargs, "timeout": IAM_SIGN_TIMEOUT})

        self.signer = iam.Signer(timed, credentials, account)
        self.signer_email = account

    def sign_bytes(self, message: bytes) -> bytes:
        signature: bytes = self.signer.sign(message)
        return signature

    def close(self) -> None:
        self._session.close()
