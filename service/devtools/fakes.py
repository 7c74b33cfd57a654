"""`FakeBlobStore`: an in-memory `BlobStore` with GCS's semantics (create-only writes,
CRC32C, signed URLs when asked), for tests and local runs without an emulator."""

from __future__ import annotations

import datetime
import itertools
import threading
import urllib.parse

from service.adapters.blobstore import (
    MAX_SIGNED_URL_LIFETIME,
    BlobAlreadyExists,
    Crc32cHasher,
    PermanentBlobError,
    ReadableStream,
    StoredBlob,
    TransientBlobError,
)

FAKE_READ_SIZE = 64 * 1024


class FakeBlobStore:
    """In-memory `BlobStore` with the same semantics, for tests and local runs."""

    def __init__(self, bucket: str = "fake", *, can_sign: bool = False) -> None:
        self.bucket = bucket
        self.can_sign = can_sign
        self.available = True
        self._objects: dict[str, tuple[StoredBlob, bytes]] = {}
        self._generations = itertools.count(1)
        self._lock = threading.Lock()
        self._buckets: dict[str, FakeBlobStore] = {bucket: self}

    def for_bucket(self, bucket: str) -> FakeBlobStore:
        """Another in-memory bucket beside this one (made on first use)."""
        other = self._buckets.get(bucket)
        if other is None:
            other = FakeBlobStore(bucket, can_sign=self.can_sign)
            other._buckets = self._buckets
            self._buckets[bucket] = other
        return other

    def delete(self, name: str) -> bool:
        """Delete `name`; False when it was not there."""
        self._require_available()
        with self._lock:
            return self._objects.pop(name, None) is not None

    def write_new(
        self,
        name: str,
        stream: ReadableStream,
        *,
        content_type: str,
        metadata: dict[str, str],
        size: int | None = None,
    ) -> StoredBlob:
        """Create `name` from `stream` only if it does not exist (read in chunks)."""
        self._require_available()
        self._refuse_existing(name)
        hasher = Crc32cHasher()
        chunks: list[bytes] = []
        remaining = size
        while remaining is None or remaining > 0:
            want = FAKE_READ_SIZE if remaining is None else min(FAKE_READ_SIZE, remaining)
            chunk = stream.read(want)
            if not chunk:
                break
            hasher.update(chunk)
            chunks.append(chunk)
            if remaining is not None:
                remaining -= len(chunk)
        if remaining:
            raise PermanentBlobError(f"the stream ended {remaining} bytes short of size={size}")
        data = b"".join(chunks)
        with self._lock:
            self._require_available()
            # Checked again: another writer may have won while the stream was read.
            self._refuse_existing(name)
            stored = StoredBlob(
                bucket=self.bucket,
                name=name,
                size=len(data),
                crc32c=hasher.base64(),
                content_type=content_type,
                generation=next(self._generations),
                metadata=dict(metadata),
            )
            self._objects[name] = (stored, data)
        return stored

    def stat(self, name: str) -> StoredBlob | None:
        """The object `name`, or None."""
        self._require_available()
        entry = self._objects.get(name)
        return None if entry is None else entry[0]

    def signed_url(self, name: str, expires_in: datetime.timedelta) -> str | None:
        """A fake https://fake.invalid URL when `can_sign`, else None."""
        if not datetime.timedelta(0) < expires_in <= MAX_SIGNED_URL_LIFETIME:
            raise ValueError(f"expires_in must be within (0, 7 days], not {expires_in}")
        if not self.can_sign:
            return None
        quoted = urllib.parse.quote(name, safe="/~")
        return (
            f"https://fake.invalid/{self.bucket}/{quoted}"
            f"?X-Goog-Expires={int(expires_in.total_seconds())}"
        )

    def check(self) -> None:
        """Raise TransientBlobError while `available` is False."""
        self._require_available()

    def read(self, name: str) -> bytes:
        """The bytes of `name` (fake only; raises KeyError when missing)."""
        return self._objects[name][1]

    def close(self) -> None:
        """Nothing to close."""

    def _require_available(self) -> None:
        if not self.available:
            raise TransientBlobError("fake blob store is unavailable")

    def _refuse_existing(self, name: str) -> None:
        entry = self._objects.get(name)
        if entry is not None:
            raise BlobAlreadyExists(f"gs://{self.bucket}/{name} already exists", existing=entry[0])
