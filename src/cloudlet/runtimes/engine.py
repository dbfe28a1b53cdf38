"""A small async client for the Docker Engine API (v1.41) over its unix socket.

It covers only what the docker runtime and the builder need, returns the engine's JSON as
plain dicts, and translates every foreign error here, at the edge: a socket that does not
answer becomes ``EngineUnavailable``, a missing image ``ImageNotFound``, any other missing
object ``NoSuchObject``, a conflict ``EngineConflict``, anything else ``RuntimeFailure``
carrying the engine's own message.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Final, Literal, cast
from urllib.parse import quote

import httptools
import httpx

from cloudlet.runtimes.base import (
    CommandNotRunnable,
    EngineUnavailable,
    ImageNotFound,
    LogLine,
    RuntimeFailure,
)

API_VERSION: Final = "v1.41"
JSON = dict[str, Any]

# Ordinary calls answer in milliseconds; a minute only guards against a wedged daemon.
_CALL_TIMEOUT: Final = 60.0
# Follow-mode streams (events, logs, builds) stay silent for as long as nothing happens.
_STREAM_TIMEOUT: Final = httpx.Timeout(_CALL_TIMEOUT, read=None)
_FRAME_HEADER: Final = struct.Struct(">BxxxL")
_STREAM_NAMES: Final[dict[int, Literal["stdout", "stderr"]]] = {1: "stdout", 2: "stderr"}


class NoSuchObject(RuntimeFailure):
    """The engine has no container (or network) by that name or id."""

    status = 404
    reason = "NotFound"


class EngineConflict(RuntimeFailure):
    """The object already exists or is busy (e.g. a removal already in progress)."""

    status = 409
    reason = "Conflict"


class DockerEngine:
    """The Engine API calls Cloudlet makes, each one method; safe to use concurrently."""

    def __init__(
        self,
        socket_path: str = "/var/run/docker.sock",
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.socket_path = socket_path
        # Every followed log and the event stream each hold a connection for as long as it
        # runs, so the pool must not cap them (the default of 100 would starve other calls).
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
        self._client = httpx.AsyncClient(
            transport=transport or httpx.AsyncHTTPTransport(uds=socket_path, limits=limits),
            base_url=f"http://docker/{API_VERSION}",
            timeout=_CALL_TIMEOUT,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self) -> None:
        """Raises EngineUnavailable unless the daemon answers."""
        await self._call("GET", "/_ping")

    # -- images ---------------------------------------------------------------------------

    async def image_inspect(self, name: str) -> JSON:
        response = await self._call("GET", f"/images/{_quote(name)}/json", not_found=ImageNotFound)
        return _json(response)

    async def build(
        self,
        context: AsyncIterable[bytes],
        tag: str,
        dockerfile: str = "Dockerfile",
        *,
        buildargs: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        nocache: bool = False,
    ) -> AsyncGenerator[JSON, None]:
        """Build an image from a tar stream (sent as it comes, never buffered whole).

        Yields the engine's progress messages (``stream``, ``status``, ``aux`` with the image
        id). A message with ``error``/``errorDetail`` means the build failed, usually through
        the user's Dockerfile, so it is yielded for the caller to report, not raised here.
        """
        params = {
            "t": tag,
            "dockerfile": dockerfile,
            "rm": "1",
            "forcerm": "1",
            "nocache": "1" if nocache else "0",
            "buildargs": json.dumps(dict(buildargs or {})),
            "labels": json.dumps(dict(labels or {})),
        }
        headers = {"Content-Type": "application/x-tar"}
        stream = self._stream("POST", "/build", params, content=context, headers=headers)
        async with stream as response, aclosing(_json_messages(response)) as messages:
            async for message in messages:
                yield message

    # -- containers -----------------------------------------------------------------------

    async def container_create(self, name: str, config: JSON) -> str:
        """Creates the container; returns its full id."""
        try:
            response = await self._call(
                "POST", "/containers/create", params={"name": name}, body=config
            )
        except NoSuchObject as exc:
            # The same 404 covers a missing image and a missing network; only the message
            # tells them apart.
            if "no such image" in exc.message.lower():
                raise ImageNotFound(exc.message) from exc
            raise
        return str(_json(response)["Id"])

    async def container_start(self, container_id: str) -> None:
        try:
            await self._call("POST", f"/containers/{_quote(container_id)}/start")
        except RuntimeFailure as error:
            raise command_failure(error.message) or error from None

    async def container_inspect(self, container_id: str) -> JSON:
        return _json(await self._call("GET", f"/containers/{_quote(container_id)}/json"))

    async def container_stop(self, container_id: str, grace_seconds: int) -> None:
        """SIGTERM (or the container's stop signal), SIGKILL after ``grace_seconds``."""
        await self._call(
            "POST",
            f"/containers/{_quote(container_id)}/stop",
            params={"t": str(grace_seconds)},
            timeout=grace_seconds + _CALL_TIMEOUT,
        )

    async def container_remove(self, container_id: str) -> None:
        """Removes the container (killing it if it still runs) with its anonymous volumes."""
        await self._call(
            "DELETE", f"/containers/{_quote(container_id)}", params={"force": "1", "v": "1"}
        )

    async def container_update(self, container_id: str, resources: JSON) -> None:
        await self._call("POST", f"/containers/{_quote(container_id)}/update", body=resources)

    async def container_list(
        self, labels: Sequence[str], *, running_only: bool = True
    ) -> list[JSON]:
        """Containers carrying every ``key=value`` in ``labels``."""
        filters: dict[str, list[str]] = {"label": list(labels)}
        params = {"filters": json.dumps(filters), "all": "0" if running_only else "1"}
        found = _json_any(await self._call("GET", "/containers/json", params=params))
        return [dict(entry) for entry in found]

    async def container_logs(self, container_id: str, tail: int) -> list[tuple[str, bytes]]:
        """The last ``tail`` log entries as (stream name, bytes) in the order written."""
        params = {"stdout": "1", "stderr": "1", "tail": str(tail)}
        response = await self._call("GET", f"/containers/{_quote(container_id)}/logs", params)
        return [(_stream_name(s), payload) for s, payload in StreamDemuxer().feed(response.content)]

    async def container_log_lines(self, container_id: str) -> AsyncGenerator[LogLine, None]:
        """Every line the container writes, from its start, until it stops.

        Not through httpx: a chatty instance sends its lines one small chunk at a time,
        and httpx's streaming stack cost ~350 µs of CPU per chunk. A plain protocol on its
        own connection to the socket (httptools for the HTTP framing) costs a few µs."""
        loop = asyncio.get_running_loop()
        try:
            transport, follower = await loop.create_unix_connection(LogFollower, self.socket_path)
        except OSError as exc:
            raise EngineUnavailable(
                f"cannot reach the Docker engine at {self.socket_path}: is dockerd running? "
                "start it with `dockerd &`"
            ) from exc
        path = f"/{API_VERSION}/containers/{_quote(container_id)}/logs"
        query = "stdout=1&stderr=1&follow=1&timestamps=1"
        transport.write(f"GET {path}?{query} HTTP/1.1\r\nHost: docker\r\n\r\n".encode())
        try:
            while True:
                lines = follower.take()
                for line in lines:
                    yield line
                if not lines:
                    if follower.done:
                        break
                    await follower.wait()
            follower.check("GET", path, self.socket_path)
            for line in follower.splitter.flush():
                yield line
        finally:
            transport.close()

    # -- networks and events --------------------------------------------------------------

    async def network_inspect(self, name: str) -> JSON | None:
        try:
            return _json(await self._call("GET", f"/networks/{_quote(name)}"))
        except NoSuchObject:
            return None

    async def network_create(self, name: str, labels: Mapping[str, str]) -> str:
        """Creates a bridge network; EngineConflict if one by that name exists already."""
        body = {"Name": name, "Driver": "bridge", "CheckDuplicate": True, "Labels": dict(labels)}
        return str(_json(await self._call("POST", "/networks/create", body=body))["Id"])

    async def events(
        self, filters: Mapping[str, Sequence[str]], since: float | None = None
    ) -> AsyncGenerator[JSON, None]:
        """The engine's event stream; replays from ``since`` (Unix time) when given."""
        params = {"filters": json.dumps({key: list(values) for key, values in filters.items()})}
        if since is not None:
            params["since"] = f"{since:.6f}"
        stream = self._stream("GET", "/events", params)
        async with stream as response, aclosing(_json_messages(response)) as messages:
            async for message in messages:
                yield message

    # -- transport ------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        body: JSON | None = None,
        timeout: float = _CALL_TIMEOUT,
        not_found: type[RuntimeFailure] = NoSuchObject,
    ) -> httpx.Response:
        try:
            response = await self._client.request(
                method, path, params=params, json=body, timeout=timeout
            )
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        if response.is_error:
            raise _engine_error(response, not_found)
        return response

    @asynccontextmanager
    async def _stream(
        self,
        method: str,
        path: str,
        params: Mapping[str, str],
        *,
        content: AsyncIterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        request = self._client.build_request(
            method, path, params=params, content=content, headers=headers, timeout=_STREAM_TIMEOUT
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        try:
            if response.is_error:
                await response.aread()
                raise _engine_error(response, NoSuchObject)
            yield response
        except httpx.TransportError as exc:  # the daemon went away mid-stream
            raise self._unavailable(exc) from exc
        finally:
            await response.aclose()

    def _unavailable(self, exc: httpx.TransportError) -> EngineUnavailable:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return EngineUnavailable(
                f"cannot reach the Docker engine at {self.socket_path}: is dockerd running? "
                "start it with `dockerd &`"
            )
        return EngineUnavailable(f"lost the Docker engine at {self.socket_path}: {exc!r}")


class StreamDemuxer:
    """Splits the engine's multiplexed stdout/stderr stream into (stream id, payload) frames.

    Each frame is an 8-byte header (stream id: 1 stdout, 2 stderr; three zero bytes; payload
    length as a big-endian uint32) then the payload. Chunks may split a frame anywhere.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        self._buffer += chunk
        frames: list[tuple[int, bytes]] = []
        while len(self._buffer) >= _FRAME_HEADER.size:
            stream, size = _FRAME_HEADER.unpack_from(self._buffer)
            end = _FRAME_HEADER.size + size
            if len(self._buffer) < end:
                break
            frames.append((stream, bytes(self._buffer[_FRAME_HEADER.size : end])))
            del self._buffer[:end]
        return frames


class LogLineSplitter:
    """Turns timestamped log frames into whole lines, per stream.

    The engine stamps every frame (``2024-05-01T12:00:00.123456789Z payload``) and cuts
    lines longer than 16 KiB into several frames, so a line may span frames; it keeps the
    stamp of its first part.
    """

    def __init__(self) -> None:
        self._partial: dict[int, tuple[datetime, bytes]] = {}

    def feed(self, stream: int, payload: bytes) -> list[LogLine]:
        stamp, _, text = payload.partition(b" ")
        when = parse_timestamp(stamp.decode("ascii", errors="replace"))
        first_stamp, prefix = self._partial.pop(stream, (when, b""))
        *complete, rest = (prefix + text).split(b"\n")
        lines = [
            _log_line(stream, line, first_stamp if i == 0 else when)
            for i, line in enumerate(complete)
        ]
        if rest:
            self._partial[stream] = (first_stamp if not complete else when, rest)
        return lines

    def flush(self) -> list[LogLine]:
        """Lines left without a final newline when the stream ended."""
        lines = [_log_line(stream, text, when) for stream, (when, text) in self._partial.items()]
        self._partial.clear()
        return lines


class LogFollower(asyncio.Protocol):
    """One follow-mode logs response read off the engine's socket: httptools undoes the
    HTTP framing, ``StreamDemuxer`` the stdout/stderr frames, ``LogLineSplitter`` the lines.
    Reading pauses while more than ``PAUSE_AT`` lines wait for the consumer."""

    PAUSE_AT = 10_000

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.demuxer = StreamDemuxer()
        self.splitter = LogLineSplitter()
        self.status = 0
        self.done = False
        self.lost: Exception | None = None
        self._lines: list[LogLine] = []
        self._error = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.lost, self.done = exc, True
        if len(self._lines) > self.PAUSE_AT and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self._error += body
            return
        for stream, payload in self.demuxer.feed(body):
            self._lines += self.splitter.feed(stream, payload)

    def on_message_complete(self) -> None:
        self.done = True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self.lost = exc or ConnectionResetError("the engine closed the logs stream")
        self.done = True
        self._wake()

    def take(self) -> list[LogLine]:
        lines, self._lines = self._lines, []
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return lines

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def check(self, method: str, path: str, socket_path: str) -> None:
        """Raise what went wrong, if anything: the engine's error, or a lost connection."""
        if self.status >= 400:
            try:
                message = str(json.loads(self._error)["message"])
            except (ValueError, KeyError, TypeError):
                message = self._error.decode(errors="replace").strip()
            raise _error_for(self.status, message, method, path, NoSuchObject)
        if self.lost is not None and not isinstance(self.lost, httptools.HttpParserError):
            raise EngineUnavailable(f"lost the Docker engine at {socket_path}: {self.lost!r}")
        if self.lost is not None:
            raise RuntimeFailure(f"the Docker engine sent a malformed logs stream: {self.lost}")

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (self._lines or self.done):
            waiter.set_result(None)


def parse_timestamp(text: str) -> datetime:
    """The engine's RFC 3339 stamp (nanoseconds, ``Z``) as an aware datetime; now if bad."""
    try:
        head, _, fraction = text.rstrip("Z").partition(".")
        parsed = datetime.fromisoformat(f"{head}.{(fraction or '0')[:6]:0<6}")
    except ValueError:
        return datetime.now(UTC)
    return parsed.replace(tzinfo=UTC)


def _log_line(stream: int, raw: bytes, when: datetime) -> LogLine:
    return LogLine(_stream_name(stream), raw.decode("utf-8", errors="replace").rstrip("\r"), when)


def _stream_name(stream: int) -> Literal["stdout", "stderr"]:
    return _STREAM_NAMES.get(stream, "stdout")


async def _json_messages(response: httpx.Response) -> AsyncGenerator[JSON, None]:
    """Newline-separated JSON objects; tolerates several objects on one line."""
    decoder = json.JSONDecoder()
    async for raw in response.aiter_lines():
        position, line = 0, raw.strip()
        while position < len(line):
            try:
                message, position = decoder.raw_decode(line, position)
            except ValueError as exc:
                raise RuntimeFailure(f"the Docker engine sent malformed JSON: {line!r}") from exc
            yield dict(message)
            while position < len(line) and line[position].isspace():
                position += 1


_EXEC_FAILED = re.compile(r"unable to start container process: (exec: .*?)(?:: unknown)?$")


def command_failure(message: str) -> CommandNotRunnable | None:
    """The user's fault in an engine's start error, when its command cannot be executed
    (no such file, not executable): the runtime's wording, made to say what to fix."""
    found = _EXEC_FAILED.search(message)
    if found is None:
        return None
    return CommandNotRunnable(
        f"the container's command cannot run ({found.group(1)}); check --command and --args, "
        "or the image's ENTRYPOINT and CMD"
    )


def _engine_error(response: httpx.Response, not_found: type[RuntimeFailure]) -> RuntimeFailure:
    request = response.request
    return _error_for(
        response.status_code, _error_message(response), request.method, request.url.path, not_found
    )


def _error_for(
    status: int, message: str, method: str, path: str, not_found: type[RuntimeFailure]
) -> RuntimeFailure:
    if status == 404:
        return not_found(message)
    if status == 409:
        return EngineConflict(message)
    return RuntimeFailure(f"the Docker engine failed {method} {path} ({status}): {message}")


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip() or response.reason_phrase


def _json(response: httpx.Response) -> JSON:
    return dict(response.json())


def _json_any(response: httpx.Response) -> list[JSON]:
    return list(response.json())


def _quote(name: str) -> str:
    """Object names go into the path; image names keep their ``/``, ``:`` and ``@``."""
    return quote(name, safe="/:@")
