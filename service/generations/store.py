"""The `store` task: stream a finished image from Deep-Image into GCS.

The download is read in chunks and handed to the upload as it arrives: the worker holds one
chunk at a time plus a small header prefix, whatever the image size. On the way through, a
`ResultStream` checks the magic number (PNG, JPEG, WEBP), counts bytes against the limit,
computes the CRC32C and keeps the header for the image's dimensions.

The result URL comes from outside (Deep-Image's answer, or an unsigned callback), so it is
fetched like a webhook target (service/notifications/ssrf.py): its host must be on
GENRELAY_RESULT_HOSTS,
https (http only in dev mode, GENRELAY_ALLOW_PRIVATE_WEBHOOKS=1), every address it resolves
to public, the connection pinned to the checked address, no proxy or .netrc from the
environment, and each redirect checked again as a new URL (at most MAX_REDIRECTS). What the
tenant sees in `error.message` is our own sentence: never bytes of the answer, nor the text
of an internal error (those go to the task's `last_error` and the log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin

import requests
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.adapters.blobstore import (
    BlobAlreadyExists,
    BlobError,
    BlobStore,
    Crc32cHasher,
    PermanentBlobError,
    StoredBlob,
    TransientBlobError,
)
from service.adapters.deepimage import (
    DeepImageClient,
    PermanentUpstreamError,
    TransientUpstreamError,
)
from service.config import Config
from service.database import Store
from service.domain import ErrorCode, GenerationStatus
from service.errors import TransientError
from service.generations.images import IMAGE_KINDS, SNIFF_BYTES, ImageKind, dimensions, sniff
from service.generations.lifecycle import change_status, failing
from service.generations.result_access import (
    delete_orphan,
    output_location,
    schedule_expiry,
    sign_result,
)
from service.metrics import GCS_UPLOAD_LATENCY
from service.models import Generation, Tenant, utcnow
from service.notifications.ssrf import (
    Deadline,
    Unresolvable,
    UnsafeURL,
    URLPolicy,
    pinned_session,
    timed_resolver,
)
from service.runtime.outcomes import DONE, Apply, Done, Failed, Outcome
from service.runtime.queue import ClaimedTask, TaskQueue
from service.tenants import settings_of

log = logging.getLogger("genrelay.results")

DOWNLOAD_CHUNK = 1024 * 1024
# Up to this size the upload goes as one request, which the client builds in memory; above
# it, a resumable upload in chunks. (Both honour create-only on GCS; fake-gcs-server 1.54
# enforces it only on single requests, which is why its tests use results under this size.)
SINGLE_REQUEST_MAX = 2 * 1024 * 1024
# Enough of the file to find the dimensions (JPEG headers can follow large EXIF/ICC blocks).
HEADER_PREFIX = 256 * 1024
DOWNLOAD_TIMEOUT = (5.0, 60.0)
# Seconds for the result host's lookup: DOWNLOAD_DEADLINE cannot cut getaddrinfo.
DOWNLOAD_DNS_TIMEOUT = 5.0
# The whole attempt, confirmation, download and upload, in seconds: DOWNLOAD_TIMEOUT bounds
# each read only, so a host sending a byte every minute would hold a worker thread for as
# long as it liked. At the largest result allowed by default (256 MiB) this still leaves
# 290 KB/s; a cut download is retried like any interrupted one.
DOWNLOAD_DEADLINE = 900.0
MAX_REDIRECTS = 3
# What a failed attempt was doing, at the start of its error (the task's `last_error`): when
# the attempts run out, the generation's error names the side that failed.
CONFIRMING = "confirming the job"
DOWNLOADING = "downloading the result"
WRITING = "writing to GCS"
_REDIRECTS = (301, 302, 303, 307, 308)


def result_url_policy(config: Config) -> URLPolicy:
    """Which result URLs may be fetched (and accepted from a callback)."""
    return URLPolicy(
        allow_private=config.allow_private_webhooks,
        allowed_hosts=config.allowed_result_hosts,
        resolver=timed_resolver(DOWNLOAD_DNS_TIMEOUT),
    )


def download_session(config: Config) -> requests.Session:
    """The session results are downloaded with: pinned, DNS-checked, no redirects of its own."""
    return pinned_session(result_url_policy(config), timeout=DOWNLOAD_TIMEOUT)


class ResultRejected(Exception):
    """The result cannot be stored, and will not become storable by trying again."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ResultStream:
    """A read()-able view of a download that inspects the bytes as they pass."""

    def __init__(self, chunks: Iterator[bytes], *, max_bytes: int) -> None:
        self._chunks = chunks
        self._max_bytes = max_bytes
        self._buffer = bytearray()
        self._position = 0
        self._exhausted = False
        self.size = 0
        self.crc32c = Crc32cHasher()
        self.head = bytearray()
        self.kind: ImageKind | None = None
        self.ended_at: float | None = None  # when the body's end was read

    def prime(self) -> ImageKind:
        """Read just enough to know the format; ResultRejected if it is not an image."""
        while len(self.head) < SNIFF_BYTES and self._pull():
            pass
        if self.kind is None:
            self.kind = sniff(bytes(self.head))
        if self.kind is None:
            # Not what the bytes were: they could be anything the URL answered.
            raise ResultRejected(
                ErrorCode.RESULT_NOT_IMAGE, "the result is not a PNG, JPEG or WEBP image"
            )
        return self.kind

    def read(self, size: int | None = -1) -> bytes:
        """File protocol for the uploader."""
        if self.kind is None:
            self.prime()
        while (size is None or size < 0 or len(self._buffer) < size) and self._pull():
            pass
        if size is None or size < 0:
            size = len(self._buffer)
        with memoryview(self._buffer) as view:
            out = bytes(view[:size])  # one copy: a bytearray slice would make a second
        del self._buffer[:size]
        self._position += len(out)
        return out

    def tell(self) -> int:
        return self._position

    def drain(self) -> None:
        """Read the rest without keeping it (to finish the CRC32C after an aborted upload)."""
        self._buffer.clear()
        while self._pull():
            self._buffer.clear()

    def dimensions(self) -> tuple[int, int] | None:
        return dimensions(bytes(self.head))

    def _pull(self) -> bool:
        if self._exhausted:
            return False
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._exhausted = True
            self.ended_at = time.monotonic()
            return False
        except requests.RequestException as exc:
            failure = type(exc).__name__
            raise DownloadInterrupted(f"the connection failed midway: {failure}") from None
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise ResultRejected(
                ErrorCode.RESULT_TOO_LARGE,
                f"the result is larger than the limit of {self._max_bytes} bytes",
            )
        self.crc32c.update(chunk)
        if len(self.head) < HEADER_PREFIX:
            self.head += chunk[: HEADER_PREFIX - len(self.head)]
        self._buffer += chunk
        return True


class DownloadInterrupted(Exception):
    """The connection failed while the body was being read: worth another try."""


class StoreHandler:
    """Confirms a completed job, streams its image into the bucket, marks it succeeded."""

    def __init__(
        self,
        store: Store,
        queue: TaskQueue,
        deepimage: DeepImageClient,
        blobs: BlobStore,
        config: Config,
        *,
        http: requests.Session | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.deepimage = deepimage
        self.blobs = blobs
        self.config = config
        self.policy = result_url_policy(config)
        self.http = http or download_session(config)

    def _read(self, generation_id: str) -> tuple[Generation, str, str] | None:
        """The generation, and the bucket and prefix of its tenant's results (one query)."""
        with self.store.read() as session:
            row = session.execute(
                sa.select(Generation, Tenant)
                .join(Tenant, Tenant.id == Generation.tenant_id)
                .where(Generation.id == generation_id)
            ).one_or_none()
        if row is None:
            return None
        bucket, prefix = output_location(self.config, settings_of(row[1]))
        return row[0], bucket, prefix

    def run(self, task: ClaimedTask) -> Outcome:
        assert task.generation_id is not None
        found = self._read(task.generation_id)
        if found is None:
            return DONE
        generation, bucket, prefix = found
        earlier = task.attempts > 1  # an earlier attempt may have stored the object
        if generation.status != GenerationStatus.PROCESSING:
            # Canceled (cancel wins), failed meanwhile, or finished by an earlier attempt.
            if earlier and generation.status != GenerationStatus.SUCCEEDED:
                return Done(self._leftovers(generation, bucket, prefix))
            return DONE
        started = time.monotonic()
        with Deadline(DOWNLOAD_DEADLINE) as deadline:
            try:
                target = self.blobs.for_bucket(bucket)
                response = self._get(self._confirmed_source(generation))
                stored, width_height = self._copy(generation, response, target, prefix, deadline)
            except ResultRejected as rejected:
                GCS_UPLOAD_LATENCY.labels("rejected").observe(time.monotonic() - started)
                if deadline.expired:  # what was cut short is no verdict on the result
                    return Failed(_too_slow())
                fail = failing(generation.id, rejected.code, rejected.message)
                if not earlier or rejected.code == ErrorCode.STORAGE_CONFLICT:
                    return Done(fail)  # (a conflicting object is left for the operator)
                return Done(_both(fail, self._leftovers(generation, bucket, prefix)))
            except TransientError as exc:
                GCS_UPLOAD_LATENCY.labels("retry").observe(time.monotonic() - started)
                if deadline.expired:  # the download's connection was cut
                    return Failed(_too_slow())
                return Failed(str(exc))
        GCS_UPLOAD_LATENCY.labels("stored").observe(time.monotonic() - started)
        width, height = width_height or (None, None)
        result: dict[str, Any] = {
            "uri": stored.uri,
            "content_type": stored.content_type,
            "size": stored.size,
            "crc32c": stored.crc32c,
            "width": width,
            "height": height,
        }
        # Signed once for every notification of this event (see
        # service/generations/result_access.py).
        link = sign_result(self.blobs, stored.uri, self.config.notification_url_ttl)
        log.info(
            "stored %s (%d bytes, %s) in %.2f s",
            stored.uri,
            stored.size,
            stored.content_type,
            time.monotonic() - started,
            extra={"generation_id": generation.id},
        )

        def succeed(session: Session) -> None:
            moved = change_status(
                session,
                generation.id,
                GenerationStatus.SUCCEEDED,
                now=utcnow(),
                signed_url=link,
                result=result,
            )
            if moved:
                schedule_expiry(session, self.queue, generation)
                return
            status = _status(session, generation.id)
            if status != GenerationStatus.SUCCEEDED:  # (else: an earlier attempt recorded it)
                # Canceled or failed (a poll's verdict) while its result was copied: such a
                # generation keeps nothing in the bucket. The worker deletes the object
                # (retried until it is gone).
                log.info(
                    "generation %s was %s while its result was stored at %s; deleting it",
                    generation.id,
                    status,
                    stored.uri,
                )
                delete_orphan(session, self.queue, generation.id, stored.uri)

        return Done(succeed)

    def on_exhausted(self, task: ClaimedTask, error: str) -> Apply:
        """Fail the generation, naming the side that failed last (`error` may be an internal
        error's text: it stays in the task's last_error), and have deleted what an earlier
        attempt may have stored without recording it."""
        assert task.generation_id is not None
        if error.startswith(CONFIRMING):
            code, doing = ErrorCode.UPSTREAM_UNAVAILABLE, "confirmed with Deep-Image"
        elif error.startswith(DOWNLOADING):
            code, doing = ErrorCode.RESULT_UNAVAILABLE, "downloaded"
        else:
            code, doing = ErrorCode.STORAGE_FAILED, "stored"
        message = f"the result could not be {doing} after {task.attempts} attempts"
        fail = failing(task.generation_id, code, message)
        found = self._read(task.generation_id)
        if found is None:
            return fail
        return _both(fail, self._leftovers(*found))

    @staticmethod
    def _delete(blobs: BlobStore, name: str) -> None:
        """Delete an object of ours that must not stay; if that fails, the next attempt finds
        it (the name taken by other bytes of this generation's) and tries again."""
        try:
            blobs.delete(name)
        except BlobError as exc:
            log.warning("could not delete gs://%s/%s: %s", blobs.bucket, name, exc.message)

    def _leftovers(self, generation: Generation, bucket: str, prefix: str) -> Apply:
        """Have deleted any object an earlier attempt stored for `generation` and died before
        recording: it is under one of the result's possible names. The `expire_result` task
        deletes only an object of this generation's that no result records, and counts a
        missing one as deleted."""
        uris = [f"gs://{bucket}/{object_name(prefix, generation, kind)}" for kind in IMAGE_KINDS]

        def apply(session: Session) -> None:
            for uri in uris:
                delete_orphan(session, self.queue, generation.id, uri)

        return apply

    def _confirmed_source(self, generation: Generation) -> str:
        """The URL to download: Deep-Image's own answer when confirming, else the callback's."""
        if not self.config.confirm_results:
            assert generation.source_url is not None
            return generation.source_url
        assert generation.upstream_job is not None
        try:
            job = self.deepimage.result(generation.upstream_job)
        except TransientUpstreamError as exc:
            raise TransientError(f"{CONFIRMING}: {exc.message}") from None
        except PermanentUpstreamError as exc:
            raise ResultRejected(exc.error_code, exc.message) from None
        if not job.finished or job.result_url is None:
            raise TransientError(
                f"{CONFIRMING}: Deep-Image reports job {job.job} as {job.status}, not complete"
            )
        return job.result_url

    def _get(self, url: str) -> requests.Response:
        """GET the result, following redirects one checked hop at a time."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                self.policy.check_syntax(url)  # scheme, host list: refused at once, no retry
                response = self.http.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT)
            except Unresolvable:
                raise TransientError(f"{DOWNLOADING}: the host does not resolve") from None
            except UnsafeURL as exc:
                raise ResultRejected(
                    ErrorCode.RESULT_UNAVAILABLE, f"the result URL may not be fetched: {exc.reason}"
                ) from None
            except requests.RequestException as exc:
                raise TransientError(f"{DOWNLOADING}: {type(exc).__name__}") from None
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            response.close()
            url = urljoin(url, location)
        raise ResultRejected(
            ErrorCode.RESULT_UNAVAILABLE,
            f"the result URL redirected more than {MAX_REDIRECTS} times",
        )

    def _copy(
        self,
        generation: Generation,
        response: requests.Response,
        blobs: BlobStore,
        prefix: str,
        deadline: Deadline,
    ) -> tuple[StoredBlob, tuple[int, int] | None]:
        with response:
            if response.status_code in (404, 410):
                raise ResultRejected(
                    ErrorCode.RESULT_UNAVAILABLE,
                    f"the result URL answered {response.status_code}",
                )
            if not 200 <= response.status_code < 300:
                raise TransientError(f"{DOWNLOADING}: HTTP {response.status_code}")
            declared = _declared_size(response)
            if declared is not None and declared > self.config.max_result_bytes:
                raise ResultRejected(
                    ErrorCode.RESULT_TOO_LARGE,
                    f"the result is {declared} bytes, over the limit of "
                    f"{self.config.max_result_bytes}",
                )
            stream = ResultStream(
                response.iter_content(DOWNLOAD_CHUNK), max_bytes=self.config.max_result_bytes
            )
            try:
                kind = stream.prime()
                name = object_name(prefix, generation, kind)
                stored = self._write(generation, blobs, name, kind, stream, declared)
            except DownloadInterrupted as exc:
                raise TransientError(f"{DOWNLOADING}: {exc}") from None
            if deadline.expired and _maybe_cut(stream, declared, deadline):
                # An answer with neither a length nor chunks ends at the deadline's cut the
                # same way as a whole one: what was stored may be short, and is not recorded.
                self._delete(blobs, stored.name)
                raise TransientError(_too_slow())
            return stored, stream.dimensions()

    def _write(
        self,
        generation: Generation,
        blobs: BlobStore,
        name: str,
        kind: ImageKind,
        stream: ResultStream,
        declared: int | None,
    ) -> StoredBlob:
        metadata = {
            "generation_id": generation.id,
            "upstream_job": generation.upstream_job or "",
            "model_type": _model_type(generation.input),
        }
        size = declared if declared is not None and declared <= SINGLE_REQUEST_MAX else None
        try:
            return blobs.write_new(
                name, stream, content_type=kind.content_type, metadata=metadata, size=size
            )
        except BlobAlreadyExists as exists:
            # Most likely our own earlier attempt, which stored the object and then died
            # before recording it: the same bytes count as stored.
            if exists.existing is None:
                # It could not be read (GCS failing for a moment, or the object just deleted):
                # whether it is ours is for the next attempt to tell.
                raise TransientError(f"{WRITING}: {name} exists but could not be read") from None
            stream.drain()
            if exists.existing.crc32c == stream.crc32c.base64():
                return exists.existing
            if exists.existing.metadata.get("generation_id") == generation.id:
                # Our own earlier copy, other bytes (cut short, or Deep-Image's file changed):
                # nothing records it while the generation is processing. The next attempt
                # writes it afresh.
                self._delete(blobs, name)
                raise TransientError(
                    f"{WRITING}: an earlier copy of {name} differed; deleted"
                ) from None
            raise ResultRejected(
                ErrorCode.STORAGE_CONFLICT,
                f"gs://{blobs.bucket}/{name} already exists with other content",
            ) from None
        except TransientBlobError as exc:
            raise TransientError(f"{WRITING}: {exc}") from None
        except PermanentBlobError as exc:
            log.error("GCS refused the write of %s: %s", name, exc)
            raise ResultRejected(ErrorCode.STORAGE_FAILED, "GCS refused the write") from None


def object_name(prefix: str, generation: Generation, kind: ImageKind) -> str:
    """`{prefix}/{tenant}/{yyyy}/{mm}/{dd}/{id}.{ext}`, dated by creation (stable on retry)."""
    created = generation.created_at
    path = f"{generation.tenant_id}/{created:%Y/%m/%d}/{generation.id}.{kind.extension}"
    return f"{prefix}/{path}" if prefix else path


def _declared_size(response: requests.Response) -> int | None:
    """Content-Length, when it is the size of the bytes we will read: no content coding, and
    no Transfer-Encoding (whose framing the HTTP client reads instead, RFC 9112 6.3)."""
    length = response.headers.get("Content-Length")
    if (
        length is None
        or not (length.isascii() and length.isdigit())
        or response.headers.get("Content-Encoding")
        or response.headers.get("Transfer-Encoding")
    ):
        return None
    return int(length)


def _model_type(request: dict[str, Any]) -> str:
    generate = (request.get("background") or {}).get("generate")
    if not isinstance(generate, dict):
        return ""
    return str(generate.get("model_type") or "realistic")


def _status(session: Session, generation_id: str) -> str | None:
    return session.execute(
        sa.select(Generation.status).where(Generation.id == generation_id)
    ).scalar()


def _too_slow() -> str:
    """What an attempt cut at its deadline failed with."""
    return f"{DOWNLOADING} took more than {DOWNLOAD_DEADLINE:g} s"


def _maybe_cut(stream: ResultStream, declared: int | None, deadline: Deadline) -> bool:
    """Whether a download that read to its end may have been cut short by `deadline`: its
    length was not declared (a declared one is checked by the client), and its end came no
    sooner than the cut (a copy whose upload alone outlasted the deadline is whole)."""
    return declared is None and (stream.ended_at is None or stream.ended_at >= deadline.at)


def _both(first: Apply, then: Apply) -> Apply:
    """Two changes as one outcome's."""

    def apply(session: Session) -> None:
        first(session)
        then(session)

    return apply
