"""Builds: Cloud Build's use-case over the Docker engine, and its HTTP routes.

The CLI uploads the source folder as a tar. The server spools it to a temporary file (so the
upload and the build are decoupled, as Cloud Build's source upload is), records the build and
runs it as a task it owns: a client that disconnects stops watching, not the build. The
engine's progress messages are kept while the build runs, so any number of clients can
follow it; when it ends, its record (status, image, digest, times, the failing step) and its
log (the last ``LOG_LIMIT`` characters) are stored under the kinds ``builds`` and
``buildlogs``, namespaced by project.

HTTP, in Cloud Build's shape (the body is the source tar instead of a Build JSON):

- ``POST /v1/projects/{project}/builds?tag=IMAGE[&nocache=true][&async=true][&source=DIR]``
  with an ``application/x-tar`` body: ``application/x-ndjson``, one JSON object per line:
  ``{"build": {...}}``, then the engine's own messages (``stream``, ``status``, ``aux``,
  ``error``), ``{}`` as a heartbeat when the build is quiet, and ``{"build": {...}}`` with
  the outcome last. With ``async=true``: an Operation whose ``metadata.build`` is the build.
- ``GET /v1/projects/{project}/builds``: ``{"builds": [...]}``, newest first.
- ``GET /v1/projects/{project}/builds/{id}``: the Build.
- ``GET /v1/projects/{project}/builds/{id}/log``: the log as text; with ``follow=true``,
  the NDJSON stream above, until the build ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from contextlib import aclosing
from typing import IO, Any, Final, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from cloudlet.builder.progress import BuildProgress, cap_log
from cloudlet.builder.reference import validate_image
from cloudlet.controlplane.services import timestamp
from cloudlet.domain.errors import InvalidError, NotFoundError, UnavailableError
from cloudlet.runtimes.base import EngineUnavailable, RuntimeFailure
from cloudlet.store import Store

BUILD, BUILD_LOG = "builds", "buildlogs"
BUILDS_PATH: Final = "/v1/projects/{project}/builds"
LOG_LIMIT: Final = 1 << 20
MAX_CONTEXT: Final = 4 << 30
SPOOL_IN_MEMORY: Final = 16 << 20
CHUNK: Final = 64 * 1024
HEARTBEAT_SECONDS: Final = 15.0
UNFINISHED: Final = ("QUEUED", "WORKING")
TAR_TYPES: Final = ("application/x-tar", "application/tar", "application/octet-stream")
Message = dict[str, Any]
_ENGINE_PREFIX: Final = re.compile(r"^the Docker engine failed \S+ \S+ \(\d+\): ")
log = logging.getLogger(__name__)


class ImageBuilder(Protocol):
    """What a build needs from the engine (``runtimes.engine.DockerEngine`` is one)."""

    def build(
        self, context: AsyncIterable[bytes], tag: str, *, nocache: bool = False
    ) -> AsyncGenerator[Message, None]: ...


class _Run:
    """A build in progress: its record, the messages so far, a wake-up for followers."""

    def __init__(self, record: Message) -> None:
        self.record = record
        self.messages: list[Message] = []
        self.lines: list[str] = []
        self.progress = BuildProgress()
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def add(self, message: Message) -> None:
        self.messages.append(message)
        self.lines += self.progress.feed(message)
        self._notify()

    def end(self) -> None:
        self.lines += self.progress.flush()
        self.done = True
        self._notify()

    def waiter(self) -> asyncio.Event:
        return self._wake

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()


class BuildService:
    """Submits, runs, records and reports builds."""

    def __init__(
        self,
        store: Store,
        engine: ImageBuilder | None,
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        heartbeat: float = HEARTBEAT_SECONDS,
    ) -> None:
        self._store = store
        self._engine = engine
        self._clock = clock
        self._new_id = new_id
        self._heartbeat = heartbeat
        self._running: dict[str, _Run] = {}
        self._recover()

    # -- use-cases ------------------------------------------------------------------------

    async def submit(
        self,
        project: str,
        tag: str,
        context: AsyncIterable[bytes],
        *,
        nocache: bool = False,
        source: str = "",
    ) -> str:
        """Takes the upload, records the build and starts it; returns the build's id."""
        engine = self._engine_or_fail()
        if not tag:
            raise InvalidError(
                "tag: required; name the image to build, e.g. ?tag=eu.gcr.io/PROJECT/APP",
                field="tag",
            )
        validate_image(tag, "tag")
        spool = await _spool(context)
        record = self._new_record(project, tag, nocache, source)
        self._save(record)
        run = _Run(record)
        self._running[record["id"]] = run
        run.task = asyncio.create_task(self._run(run, engine, spool, nocache))
        return str(record["id"])

    def list_builds(self, project: str) -> list[Message]:
        return [r.body for r in reversed(self._store.list(BUILD, project))]

    def get(self, project: str, build_id: str) -> Message:
        record = self._store.get(BUILD, project, build_id)
        if record is None:
            raise NotFoundError(
                f"build {build_id!r} not found in project {project!r}; "
                "list builds with `cloudlet builds list`",
                field="build",
            )
        return record.body

    def log(self, project: str, build_id: str) -> str:
        self.get(project, build_id)
        run = self._running.get(build_id)
        if run is not None:
            return "".join(line + "\n" for line in run.lines)
        stored = self._store.get(BUILD_LOG, project, build_id)
        return str(stored.body.get("text", "")) if stored else ""

    async def follow(self, project: str, build_id: str) -> AsyncIterator[Message]:
        """The build record, its messages as they come, then the final record."""
        yield {"build": self.get(project, build_id)}
        run = self._running.get(build_id)
        if run is None:
            yield {"stream": self.log(project, build_id)}
        else:
            async for message in self._messages(run):
                yield message
        yield {"build": self.get(project, build_id)}

    async def close(self) -> None:
        """Cancels running builds (recorded as CANCELLED) and waits for them to end."""
        tasks = [run.task for run in self._running.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- running a build ------------------------------------------------------------------

    async def _messages(self, run: _Run) -> AsyncIterator[Message]:
        index = 0
        while True:
            wake = run.waiter()
            while index < len(run.messages):
                yield run.messages[index]
                index += 1
            if run.done:
                return
            try:
                await asyncio.wait_for(wake.wait(), self._heartbeat)
            except TimeoutError:
                yield {}  # keeps proxies and the client's read timeout from giving up

    async def _run(self, run: _Run, engine: ImageBuilder, spool: IO[bytes], nocache: bool) -> None:
        self._update(run, status="WORKING", startTime=timestamp(self._clock()))
        try:
            status = await self._drive(run, engine, spool, nocache)
        except asyncio.CancelledError:
            run.add({"error": "the build was cancelled: the server is stopping"})
            self._finish(run, "CANCELLED")
            raise
        except Exception as exc:  # a bug must not leave the build WORKING forever
            log.exception("build %s failed unexpectedly", run.record["id"])
            run.add({"error": f"Cloudlet failed the build: {exc!r}"})
            status = "INTERNAL_ERROR"
        finally:
            spool.close()
        self._finish(run, status)

    async def _drive(self, run: _Run, engine: ImageBuilder, spool: IO[bytes], nocache: bool) -> str:
        tag = run.record["images"][0]
        try:
            stream = engine.build(_chunks(spool), tag, nocache=nocache)
            async with aclosing(stream) as messages:
                async for message in messages:
                    run.add(message)
        except EngineUnavailable as failure:
            run.add({"error": failure.message})
            return "INTERNAL_ERROR"
        except RuntimeFailure as failure:
            # The engine refused the build itself, e.g. a Dockerfile it cannot parse.
            run.add({"error": _ENGINE_PREFIX.sub("", failure.message)})
        return "FAILURE" if run.progress.error is not None else "SUCCESS"

    def _finish(self, run: _Run, status: str) -> None:
        run.end()
        fields: Message = {"status": status, "finishTime": timestamp(self._clock())}
        if status == "SUCCESS":
            image = {"name": run.record["images"][0], "digest": run.progress.image_id}
            fields["results"] = {"images": [image]}
        else:
            fields["statusDetail"] = run.progress.failure()
        with self._store.transaction():
            self._update(run, **fields)
            text = cap_log("".join(line + "\n" for line in run.lines), LOG_LIMIT)
            project, build_id = run.record["projectId"], run.record["id"]
            self._store.put(BUILD_LOG, project, build_id, {"text": text}, owner=build_id)
        self._running.pop(run.record["id"], None)

    # -- records --------------------------------------------------------------------------

    def _new_record(self, project: str, tag: str, nocache: bool, source: str) -> Message:
        build_id = self._new_id()
        record: Message = {
            "id": build_id,
            "projectId": project,
            "status": "QUEUED",
            "createTime": timestamp(self._clock()),
            "images": [tag],
            "options": {"noCache": nocache},
            "logUrl": BUILDS_PATH.format(project=project) + f"/{build_id}/log",
        }
        if source:
            record["source"] = {"localDirectory": source[:1024]}
        return record

    def _update(self, run: _Run, **fields: Any) -> None:
        run.record = {**run.record, **fields}
        self._save(run.record)

    def _save(self, record: Message) -> None:
        self._store.put(BUILD, record["projectId"], record["id"], record, now=self._clock())

    def _recover(self) -> None:
        """Builds a previous server left unfinished can never finish: say so."""
        for stored in self._store.list(BUILD):
            if stored.body.get("status") in UNFINISHED:
                body = {
                    **stored.body,
                    "status": "INTERNAL_ERROR",
                    "statusDetail": "the server stopped during the build; submit it again",
                    "finishTime": timestamp(self._clock()),
                }
                self._store.put(BUILD, stored.namespace, stored.name, body)

    def _engine_or_fail(self) -> ImageBuilder:
        if self._engine is None:
            raise UnavailableError(
                "builds need the Docker engine, and this server runs without one; "
                "start `cloudlet server` with Docker available"
            )
        return self._engine


async def _spool(context: AsyncIterable[bytes]) -> IO[bytes]:
    """The whole upload in a temporary file (in memory while small)."""
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
    size = 0
    try:
        async for chunk in context:
            size += len(chunk)
            if size > MAX_CONTEXT:
                raise InvalidError(
                    f"body: the source archive is larger than {MAX_CONTEXT >> 30} GiB; "
                    "leave big files out with .gcloudignore or .dockerignore",
                    field="body",
                )
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    if size == 0:
        spool.close()
        raise InvalidError("body: empty; send the source folder as a tar archive", field="body")
    spool.seek(0)
    return spool


async def _chunks(spool: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := spool.read(CHUNK):
        yield chunk


# -- HTTP --------------------------------------------------------------------------------


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


async def _ndjson(messages: AsyncIterator[Message]) -> AsyncIterator[bytes]:
    async for message in messages:
        yield json.dumps(message).encode() + b"\n"


def _operation(build: Message) -> Message:
    return {
        "name": f"operations/build/{build['projectId']}/{build['id']}",
        "metadata": {
            "@type": "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata",
            "build": build,
        },
    }


def _tar_body(request: Request) -> AsyncIterable[bytes]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in TAR_TYPES:
        raise InvalidError(
            f"Content-Type: {content_type or 'none'}; send the source folder as a tar "
            "archive with Content-Type: application/x-tar",
            field="Content-Type",
        )
    return request.stream()


def add_build_routes(app: FastAPI, builds: BuildService | None) -> None:
    """The build endpoints (see the module's docstring); 503 when ``builds`` is None."""

    def service() -> BuildService:
        if builds is None:
            raise UnavailableError("builds need the Docker engine; this server runs without one")
        return builds

    @app.post(BUILDS_PATH)
    async def create_build(project: str, request: Request) -> Response:
        svc = service()
        build_id = await svc.submit(
            project,
            request.query_params.get("tag", ""),
            _tar_body(request),
            nocache=_flag(request, "nocache"),
            source=request.query_params.get("source", ""),
        )
        if _flag(request, "async"):
            return JSONResponse(_operation(svc.get(project, build_id)))
        return StreamingResponse(
            _ndjson(svc.follow(project, build_id)), media_type="application/x-ndjson"
        )

    @app.get(BUILDS_PATH)
    async def list_builds(project: str) -> dict[str, Any]:
        return {"builds": service().list_builds(project)}

    @app.get(BUILDS_PATH + "/{build_id}")
    async def get_build(project: str, build_id: str) -> dict[str, Any]:
        return service().get(project, build_id)

    @app.get(BUILDS_PATH + "/{build_id}/log")
    async def build_log(project: str, build_id: str, request: Request) -> Response:
        svc = service()
        if _flag(request, "follow"):
            svc.get(project, build_id)  # a 404 before the stream starts
            return StreamingResponse(
                _ndjson(svc.follow(project, build_id)), media_type="application/x-ndjson"
            )
        return PlainTextResponse(svc.log(project, build_id))
