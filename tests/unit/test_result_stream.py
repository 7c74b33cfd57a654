"""ResultStream, on its own: the byte limit is counted as the body streams, whatever the
response declared."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from PIL import Image

from service.domain import ErrorCode
from service.generations.store import ResultRejected, ResultStream


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 4), "red").save(out, "PNG")
    return out.getvalue()


class Chunks:
    """The chunks of a body, counting how many were taken."""

    def __init__(self, body: bytes, size: int) -> None:
        self._chunks = [body[i : i + size] for i in range(0, len(body), size)]
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.taken += 1
            yield chunk


def _body(size: int) -> bytes:
    png = _png()
    return png + bytes(size - len(png))


def test_a_body_of_exactly_the_limit_is_read_whole() -> None:
    body = _body(1000)
    stream = ResultStream(iter(Chunks(body, 100)), max_bytes=1000)
    assert stream.read() == body
    assert stream.size == 1000
    assert stream.dimensions() == (8, 4)


@pytest.mark.parametrize("how", ["read", "read_in_pieces", "drain"])
def test_a_body_over_the_limit_is_refused_at_the_chunk_that_crosses_it(how: str) -> None:
    chunks = Chunks(_body(2000), 100)
    stream = ResultStream(iter(chunks), max_bytes=1000)
    stream.prime()  # a PNG: the first chunk is under the limit
    with pytest.raises(ResultRejected) as refused:
        if how == "read":
            stream.read()
        elif how == "read_in_pieces":
            while stream.read(64):
                pass
        else:
            stream.drain()
    assert refused.value.code is ErrorCode.RESULT_TOO_LARGE
    assert refused.value.message == "the result is larger than the limit of 1000 bytes"
    assert chunks.taken == 11  # not one chunk more than it took to cross the limit
    assert stream.size == 1100


def test_a_first_chunk_over_the_limit_is_refused_before_the_format_is_known() -> None:
    stream = ResultStream(iter([_body(1001)]), max_bytes=1000)
    with pytest.raises(ResultRejected) as refused:
        stream.prime()
    assert refused.value.code is ErrorCode.RESULT_TOO_LARGE


def test_a_body_one_byte_over_the_limit_is_refused() -> None:
    # The last chunk is a single byte: the limit is on bytes, not on chunks.
    body = _body(1001)
    stream = ResultStream(iter([body[:1000], body[1000:]]), max_bytes=1000)
    assert stream.read(1000) == body[:1000]
    with pytest.raises(ResultRejected) as refused:
        stream.read()
    assert refused.value.code is ErrorCode.RESULT_TOO_LARGE
