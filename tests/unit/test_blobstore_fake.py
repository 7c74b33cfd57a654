"""FakeBlobStore keeps the BlobStore contract: create-only, GCS-style CRC32C, streaming reads."""

from __future__ import annotations

import base64
import datetime
import io
import threading

import google_crc32c
import pytest

from service.adapters.blobstore import (
    BlobAlreadyExists,
    BlobError,
    BlobStore,
    Crc32cHasher,
    PermanentBlobError,
    StoredBlob,
    TransientBlobError,
    crc32c_base64,
)
from service.devtools.fakes import FakeBlobStore

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


class NotAnImage(Exception):
    """What a caller's validating stream raises to abort an upload."""


class RecordingStream(io.RawIOBase):
    """Serves `data`, records every read size and raises `fail_with` after `fail_after` bytes."""

    def __init__(
        self, data: bytes, *, fail_after: int | None = None, fail_with: Exception | None = None
    ) -> None:
        self._data = memoryview(data)
        self._position = 0
        self.read_sizes: list[int] = []
        self._fail_after = fail_after
        self._fail_with = fail_with

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        self.read_sizes.append(-1 if size is None else size)
        if self._fail_after is not None and self._position >= self._fail_after:
            assert self._fail_with is not None
            raise self._fail_with
        end = len(self._data) if size is None or size < 0 else self._position + size
        chunk = bytes(self._data[self._position : end])
        self._position += len(chunk)
        return chunk


def _gcs_crc32c(data: bytes) -> str:
    """The CRC32C as GCS reports it, computed independently of service.adapters.blobstore."""
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def test_the_fake_satisfies_the_blobstore_protocol() -> None:
    store: BlobStore = FakeBlobStore()
    assert store.bucket == "fake"


def test_write_new_stores_the_bytes_and_reports_them() -> None:
    store = FakeBlobStore("media")

    stored = store.write_new(
        "gen/1/out.png", io.BytesIO(PNG), content_type="image/png", metadata={"generation": "1"}
    )

    assert stored.bucket == "media"
    assert stored.name == "gen/1/out.png"
    assert stored.uri == "gs://media/gen/1/out.png"
    assert stored.size == len(PNG)
    assert stored.crc32c == _gcs_crc32c(PNG)
    assert stored.content_type == "image/png"
    assert stored.metadata == {"generation": "1"}
    assert stored.generation is not None
    assert store.read("gen/1/out.png") == PNG
    assert store.stat("gen/1/out.png") == stored


def test_write_new_refuses_an_existing_name_and_reports_the_existing_object() -> None:
    store = FakeBlobStore()
    first = store.write_new("a.png", io.BytesIO(b"first"), content_type="image/png", metadata={})

    with pytest.raises(BlobAlreadyExists) as caught:
        store.write_new("a.png", io.BytesIO(b"second"), content_type="image/png", metadata={})

    assert caught.value.existing == first
    assert caught.value.http_status == 412
    assert isinstance(caught.value, BlobError)
    assert store.read("a.png") == b"first"


def test_concurrent_writers_of_one_name_get_exactly_one_success() -> None:
    store = FakeBlobStore()
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def write(index: int) -> None:
        barrier.wait()
        try:
            store.write_new("race.png", io.BytesIO(PNG * 4), content_type="image/png", metadata={})
            outcomes.append("stored")
        except BlobAlreadyExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["exists"] * 7 + ["stored"]


def test_each_write_gets_a_new_generation() -> None:
    store = FakeBlobStore()
    one = store.write_new("1", io.BytesIO(b"1"), content_type="text/plain", metadata={})
    two = store.write_new("2", io.BytesIO(b"2"), content_type="text/plain", metadata={})
    assert one.generation != two.generation


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # The CRC32C (Castagnoli) check value of "123456789" is 0xE3069283.
        (b"123456789", base64.b64encode((0xE3069283).to_bytes(4, "big")).decode()),
        (b"", "AAAAAA=="),
        (PNG, _gcs_crc32c(PNG)),
    ],
)
def test_crc32c_is_what_gcs_reports(data: bytes, expected: str) -> None:
    store = FakeBlobStore()
    stored = store.write_new("x", io.BytesIO(data), content_type="a/b", metadata={})
    assert stored.crc32c == expected
    assert crc32c_base64(data) == expected


def test_crc32c_hasher_gives_the_same_value_chunk_by_chunk() -> None:
    hasher = Crc32cHasher()
    for start in range(0, len(PNG), 1000):
        hasher.update(PNG[start : start + 1000])
    assert hasher.base64() == _gcs_crc32c(PNG)
    assert hasher.digest() == google_crc32c.Checksum(PNG).digest()
    assert crc32c_base64([PNG[:10], PNG[10:]]) == _gcs_crc32c(PNG)


def test_the_stream_is_read_in_chunks() -> None:
    store = FakeBlobStore()
    data = b"\x00" * (1024 * 1024)
    stream = RecordingStream(data)

    store.write_new("big", stream, content_type="application/octet-stream", metadata={})

    assert store.read("big") == data
    assert max(stream.read_sizes) <= 64 * 1024
    assert len(stream.read_sizes) > 1


def test_an_exception_raised_by_the_stream_propagates_unchanged_and_stores_nothing() -> None:
    store = FakeBlobStore()
    abort = NotAnImage("not an image")
    stream = RecordingStream(PNG * 100, fail_after=64 * 1024, fail_with=abort)

    with pytest.raises(NotAnImage) as caught:
        store.write_new("bad.png", stream, content_type="image/png", metadata={})

    assert caught.value is abort
    assert store.stat("bad.png") is None


def test_a_stream_shorter_than_size_is_a_permanent_error() -> None:
    store = FakeBlobStore()
    with pytest.raises(PermanentBlobError):
        store.write_new("short", io.BytesIO(b"12345"), content_type="a/b", metadata={}, size=10)
    assert store.stat("short") is None


def test_size_bounds_what_is_read() -> None:
    store = FakeBlobStore()
    stored = store.write_new(
        "sized", io.BytesIO(b"1234567890"), content_type="a/b", metadata={}, size=4
    )
    assert stored.size == 4
    assert store.read("sized") == b"1234"


def test_stat_of_a_missing_object_is_none() -> None:
    assert FakeBlobStore().stat("missing") is None


def test_an_unavailable_store_fails_transiently() -> None:
    store = FakeBlobStore()
    store.available = False

    with pytest.raises(TransientBlobError):
        store.check()
    with pytest.raises(TransientBlobError):
        store.write_new("x", io.BytesIO(b"x"), content_type="a/b", metadata={})

    store.available = True
    store.check()
    store.write_new("x", io.BytesIO(b"x"), content_type="a/b", metadata={})


def test_signed_url_is_none_unless_the_fake_can_sign() -> None:
    expires = datetime.timedelta(minutes=15)
    assert FakeBlobStore().signed_url("a b.png", expires) is None

    url = FakeBlobStore("media", can_sign=True).signed_url("a b.png", expires)

    assert url is not None
    assert url.startswith("https://fake.invalid/media/a%20b.png?")


@pytest.mark.parametrize("expires", [datetime.timedelta(0), datetime.timedelta(days=8)])
def test_signed_url_refuses_lifetimes_v4_cannot_sign(expires: datetime.timedelta) -> None:
    with pytest.raises(ValueError):
        FakeBlobStore(can_sign=True).signed_url("a", expires)


def test_stored_blob_is_immutable() -> None:
    blob = StoredBlob("b", "n", 1, "AAAAAA==", "a/b", 1, {})
    with pytest.raises(AttributeError):
        blob.size = 2  # type: ignore[misc]
