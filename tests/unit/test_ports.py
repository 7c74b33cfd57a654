"""The free port that servers in the dev stack, the tests and the benchmarks start on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from service.devtools import ports


def test_a_free_port_lies_below_the_ephemeral_range_and_can_be_listened_on() -> None:
    low = ports.ephemeral_low()
    for _ in range(20):
        port = ports.free_port()
        assert max(1024, low - ports._SPAN) <= port < low
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))
            server.listen()


def test_the_ephemeral_range_is_read_from_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("40000\t60999\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", range_file)
    assert ports.ephemeral_low() == 40000
    range_file.write_text("garbage\n")
    assert ports.ephemeral_low() == 32768
    range_file.unlink()
    assert ports.ephemeral_low() == 32768


def _listening_below_the_range() -> socket.socket:
    """A socket listening below the ephemeral range, on a port whose next port is free.

    Below the range, no outgoing connection takes the next port meanwhile (inside it, one did,
    on a busy CI machine).
    """
    for _ in range(50):
        taken = socket.socket()
        try:
            taken.bind(("127.0.0.1", ports.free_port()))
            taken.listen()
            with socket.socket() as neighbour:
                neighbour.bind(("127.0.0.1", taken.getsockname()[1] + 1))
            return taken
        except OSError:
            taken.close()
    raise AssertionError("no listening port with a free neighbour below the ephemeral range")


def test_a_port_someone_listens_on_is_never_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _listening_below_the_range() as taken:
        port = taken.getsockname()[1]
        range_file = tmp_path / "ip_local_port_range"
        # Only `port` and the one above it can be drawn.
        range_file.write_text(f"{port + 2} 60999\n")
        monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", range_file)
        monkeypatch.setattr(ports, "_SPAN", 2)
        assert {ports.free_port() for _ in range(20)} == {port + 1}
        monkeypatch.setattr(ports, "_SPAN", 1)
        range_file.write_text(f"{port + 1} 60999\n")  # only `port` can be drawn
        with pytest.raises(OSError, match="no free port"):
            ports.free_port()
