"""The engine's follow-mode logs stream read by a plain protocol: HTTP chunked framing,
stdout/stderr frames and lines split anywhere, the engine's errors, a lost connection."""

from __future__ import annotations

import struct

import pytest

from cloudlet.runtimes.base import EngineUnavailable
from cloudlet.runtimes.engine import LogFollower, NoSuchObject

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.multiplexed-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
STAMP = b"2026-11-28T01:02:03.123456789Z "


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def feed_in_pieces(follower: LogFollower, data: bytes, size: int) -> None:
    for i in range(0, len(data), size):
        follower.data_received(data[i : i + size])


@pytest.mark.parametrize("piece", [1, 7, 64, 10_000])
def test_lines_come_out_whole_however_the_bytes_arrive(piece: int) -> None:
    body = (
        frame(1, STAMP + b"first line\nsecond ")
        + frame(2, STAMP + b"an error\n")
        + frame(1, STAMP + b"half\n")
    )
    data = HEAD + chunked(body[:13]) + chunked(body[13:]) + b"0\r\n\r\n"
    follower = LogFollower()
    feed_in_pieces(follower, data, piece)
    lines = follower.take()
    assert [(line.stream, line.line) for line in lines] == [
        ("stdout", "first line"),
        ("stderr", "an error"),
        ("stdout", "second half"),
    ]
    assert lines[0].timestamp.microsecond == 123456
    assert follower.done
    follower.check("GET", "/logs", "/sock")  # nothing went wrong


def test_the_engines_error_becomes_the_runtime_error_it_names() -> None:
    follower = LogFollower()
    body = b'{"message":"No such container: abc"}'
    follower.data_received(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with pytest.raises(NoSuchObject, match="No such container: abc"):
        follower.check("GET", "/logs", "/sock")


def test_a_stream_cut_off_by_the_engine_is_reported_as_lost() -> None:
    follower = LogFollower()
    follower.data_received(HEAD + chunked(frame(1, STAMP + b"partial line")))
    follower.connection_lost(None)
    assert follower.done and follower.take() == []
    assert [line.line for line in follower.splitter.flush()] == ["partial line"]
    with pytest.raises(EngineUnavailable, match="lost the Docker engine"):
        follower.check("GET", "/logs", "/sock")
