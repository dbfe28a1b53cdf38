"""Builds from source end to end: a real server builds through the real Docker engine.

Image builds with pip downloads are slow, so each example is built once per module (in a
module-scoped fixture) and every other build here uses busybox and takes about a second.
The first tests need no Docker: how the engine's build messages are followed, and the build
use-case over a scripted engine (below the engine seam) with a real SQLite store.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudlet.builder.progress import BuildProgress, cap_log
from cloudlet.controlplane.builds import BUILD, SPOOL_IN_MEMORY, BuildService
from cloudlet.domain.errors import InvalidError
from cloudlet.runtimes.base import EngineUnavailable, RuntimeFailure
from cloudlet.store import Store
from tests.conftest import REPO, CloudletServer

EXAMPLES = REPO / "examples"
BUILD_TIMEOUT = 600


# -- following the engine's messages (pure) -----------------------------------------------


def test_progress_joins_split_stream_chunks_into_lines_and_tracks_the_step() -> None:
    progress = BuildProgress()
    lines = [
        *progress.feed({"stream": "Step 2/3 : RUN make"}),
        *progress.feed({"stream": "\n ---> Running in abc\ncompil"}),
        *progress.feed({"stream": "ing\n\x1b[91mwarning: x\n\x1b[0m"}),
    ]
    assert lines == ["Step 2/3 : RUN make", " ---> Running in abc", "compiling", "warning: x"]
    assert progress.step == "Step 2/3 : RUN make"


def test_a_failure_reports_the_failing_step_its_last_output_and_the_error() -> None:
    progress = BuildProgress()
    progress.feed({"stream": "Step 1/2 : FROM busybox\n ---> 1234\nStep 2/2 : RUN false\n"})
    progress.feed({"stream": "about to fail\nno newline"})
    lines = progress.feed(
        {"errorDetail": {"code": 1, "message": "returned a non-zero code: 1"}, "error": "x"}
    )
    assert lines == ["no newline", "ERROR: returned a non-zero code: 1"]
    assert progress.failure() == (
        "Step 2/2 : RUN false\nabout to fail\nno newline\nreturned a non-zero code: 1"
    )


def test_the_image_id_comes_from_the_aux_message() -> None:
    progress = BuildProgress()
    assert progress.feed({"aux": {"ID": "sha256:abc"}}) == []
    assert progress.image_id == "sha256:abc"


def test_a_long_log_keeps_its_end() -> None:
    assert cap_log("0123456789", 4) == "[... the first 6 characters are not kept ...]\n6789"
    assert cap_log("short", 10) == "short"


# -- the build use-case over a scripted engine ---------------------------------------------


class ScriptedEngine:
    """Plays back engine messages, then waits for ``gate`` or raises ``error`` if given."""

    def __init__(
        self,
        messages: list[dict[str, Any]],
        error: Exception | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.messages, self.error, self.gate = messages, error, gate
        self.context = b""

    async def build(
        self, context: AsyncIterable[bytes], tag: str, *, nocache: bool = False
    ) -> AsyncGenerator[dict[str, Any], None]:
        self.context = b"".join([chunk async for chunk in context])
        for message in self.messages:
            yield message
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error


SUCCESS_MESSAGES = [
    {"stream": "Step 1/1 : FROM busybox\n"},
    {"stream": " ---> 1234\n"},
    {"aux": {"ID": "sha256:feed"}},
    {"stream": "Successfully built 1234\n"},
]


async def upload(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def service(tmp_path: Path, engine: ScriptedEngine, **options: Any) -> BuildService:
    clock = itertools.count(1_700_000_000)
    return BuildService(
        Store(tmp_path / "db.sqlite"), engine, clock=lambda: float(next(clock)), **options
    )


async def finished(builds: BuildService, build_id: str) -> dict[str, Any]:
    async for message in builds.follow("proj", build_id):
        last = message
    return dict(last["build"])


async def test_a_build_is_recorded_with_its_image_digest_times_and_log(tmp_path: Path) -> None:
    engine = ScriptedEngine(SUCCESS_MESSAGES)
    builds = service(tmp_path, engine, new_id=lambda: "b-1")
    build_id = await builds.submit("proj", "app:v1", upload(b"tar", b"ball"), source="/src")
    build = await finished(builds, build_id)
    assert engine.context == b"tarball"
    assert build["status"] == "SUCCESS"
    assert build["results"] == {"images": [{"name": "app:v1", "digest": "sha256:feed"}]}
    assert build["source"] == {"localDirectory": "/src"}
    assert build["createTime"] < build["startTime"] < build["finishTime"]
    assert builds.log("proj", "b-1") == (
        "Step 1/1 : FROM busybox\n ---> 1234\nSuccessfully built 1234\n"
    )
    assert [b["id"] for b in builds.list_builds("proj")] == ["b-1"]
    assert builds.list_builds("other") == []


@pytest.mark.parametrize(
    ("error", "status", "detail"),
    [
        (
            RuntimeFailure("the Docker engine failed POST /build (400): bad line"),
            "FAILURE",
            "bad line",
        ),
        (EngineUnavailable("cannot reach the Docker engine"), "INTERNAL_ERROR", "cannot reach"),
        (ValueError("a bug"), "INTERNAL_ERROR", "a bug"),
    ],
)
async def test_an_engine_refusal_is_a_failure_and_a_lost_engine_an_internal_error(
    tmp_path: Path, error: Exception, status: str, detail: str
) -> None:
    builds = service(tmp_path, ScriptedEngine([], error=error))
    build = await finished(builds, await builds.submit("proj", "app", upload(b"x")))
    assert build["status"] == status
    assert detail in build["statusDetail"]
    assert "the Docker engine failed POST" not in build["statusDetail"]


async def test_stopping_the_server_records_running_builds_as_cancelled(tmp_path: Path) -> None:
    builds = service(tmp_path, ScriptedEngine(SUCCESS_MESSAGES[:1], gate=asyncio.Event()))
    build_id = await builds.submit("proj", "app", upload(b"x"))
    await asyncio.sleep(0.01)
    assert builds.get("proj", build_id)["status"] == "WORKING"
    await builds.close()
    build = builds.get("proj", build_id)
    assert build["status"] == "CANCELLED"
    assert "the server is stopping" in builds.log("proj", build_id)


async def test_builds_a_previous_server_left_unfinished_are_marked_failed(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    store.put(BUILD, "proj", "old", {"id": "old", "projectId": "proj", "status": "WORKING"})
    builds = BuildService(store, None)
    build = builds.get("proj", "old")
    assert build["status"] == "INTERNAL_ERROR"
    assert "the server stopped during the build" in build["statusDetail"]


async def test_followers_see_every_message_and_heartbeats_while_the_build_is_quiet(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    builds = service(tmp_path, ScriptedEngine(SUCCESS_MESSAGES, gate=gate), heartbeat=0.01)
    build_id = await builds.submit("proj", "app", upload(b"x"))
    seen: list[dict[str, Any]] = []
    async for message in builds.follow("proj", build_id):
        seen.append(message)
        if message == {}:
            gate.set()
    assert seen[0]["build"]["status"] in ("QUEUED", "WORKING")
    assert [m for m in seen[1:-1] if m] == SUCCESS_MESSAGES
    assert {} in seen
    assert seen[-1]["build"]["status"] == "SUCCESS"


async def test_a_missing_tag_an_invalid_tag_and_an_empty_upload_are_refused(
    tmp_path: Path,
) -> None:
    builds = service(tmp_path, ScriptedEngine([]))
    for tag, body, field in (("", b"x", "tag"), ("Bad Tag", b"x", "tag"), ("app", b"", "body")):
        with pytest.raises(InvalidError) as caught:
            await builds.submit("proj", tag, upload(body))
        assert caught.value.field == field
    assert builds.list_builds("proj") == []


# -- helpers and fixtures -----------------------------------------------------------------


def copy_example(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("src") / name
    shutil.copytree(EXAMPLES / name, target)
    return target


def folder(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def builds(server: CloudletServer) -> list[dict[str, Any]]:
    done = server.cli("builds", "list", "--format", "json")
    return list(json.loads(done.stdout))


def build_of(server: CloudletServer, image_prefix: str) -> dict[str, Any]:
    """The newest build whose image starts with ``image_prefix``."""
    return next(b for b in builds(server) if b["images"][0].startswith(image_prefix))


def step_reused_cache(log: str, step_prefix: str) -> bool:
    """Whether the step whose instruction starts with ``step_prefix`` came from the cache."""
    lines = log.splitlines()
    index = next(
        i for i, line in enumerate(lines) if line.split(" : ", 1)[-1].startswith(step_prefix)
    )
    return lines[index + 1].strip() == "---> Using cache"


def image_files(image: str, path: str) -> set[str]:
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", image, "find", path, "-type", "f"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.removeprefix(path + "/") for line in done.stdout.split()}


def remove_images(*images: str) -> None:
    subprocess.run(["docker", "rmi", *images], capture_output=True, check=False)


def remove_stale_source_images(repository: str, keep: str) -> None:
    """Older builds of an example (earlier test runs); the newest keeps the layer cache."""
    done = subprocess.run(
        ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", repository],
        capture_output=True,
        text=True,
        check=False,
    )
    stale = [tag for tag in done.stdout.split() if tag != keep]
    if stale:
        remove_images(*stale)  # refused (and left) while a container still uses one


def deploy_source(server: CloudletServer, service: str, source: Path) -> str:
    done = server.cli(
        "run",
        "deploy",
        service,
        "--source",
        str(source),
        "--allow-unauthenticated",
        timeout=BUILD_TIMEOUT,
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def flask_app(
    server: CloudletServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, str]]:
    """examples/flask-hello (a copy, so a test may change it) deployed with --source."""
    source = copy_example("flask-hello", tmp_path_factory)
    yield source, deploy_source(server, "flask-hello", source)
    server.remove_containers()
    newest = build_of(server, "cloudlet.local/default/flask-hello")["images"][0]
    remove_stale_source_images("cloudlet.local/default/flask-hello", newest)


@pytest.fixture(scope="module")
def fastapi_app(server: CloudletServer) -> Iterator[str]:
    yield deploy_source(server, "fastapi-hello", EXAMPLES / "fastapi-hello")
    server.remove_containers()
    newest = build_of(server, "cloudlet.local/default/fastapi-hello")["images"][0]
    remove_stale_source_images("cloudlet.local/default/fastapi-hello", newest)


pytestmark = [pytest.mark.docker, pytest.mark.timeout(BUILD_TIMEOUT)]


# -- deploy --source ----------------------------------------------------------------------


def test_a_flask_app_without_a_dockerfile_is_detected_built_and_served(
    server: CloudletServer, flask_app: tuple[Path, str]
) -> None:
    _, output = flask_app
    assert "Generated a Dockerfile for a Flask app (main:app)" in output
    assert "RUN pip install --no-cache-dir -r requirements.txt gunicorn" in output
    assert f"Service URL: {server.url('flask-hello')}" in output
    response = server.request("flask-hello")
    assert response.status_code == 200
    assert response.text.startswith("Hello from Flask on Cloudlet (revision flask-hello-00001-")
    assert server.request("flask-hello", "/env").json()["PORT"] == "8080"


def test_a_fastapi_app_without_a_dockerfile_is_served_by_uvicorn(
    server: CloudletServer, fastapi_app: str
) -> None:
    assert "Generated a Dockerfile for an ASGI app (main:app)" in fastapi_app
    assert "CMD exec uvicorn main:app --host 0.0.0.0 --port $PORT" in fastapi_app
    assert server.request("fastapi-hello", "/items/7").json() == {"item_id": 7}


def test_pip_in_a_build_reaches_pypi_through_the_base_images_ca_bundle(
    server: CloudletServer, tmp_path: Path
) -> None:
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    source = folder(
        tmp_path / "pip",
        {
            "Dockerfile": "FROM python:3.11-slim\n"
            f"RUN pip download --no-deps --no-cache-dir --cert {bundle} -d /tmp/wheels six\n"
        },
    )
    done = server.cli(
        "builds", "submit", "--no-cache", "--tag", "cloudlet-test/pip", str(source),
        timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    assert "Saved /tmp/wheels/six-" in done.stderr
    remove_images("cloudlet-test/pip")


def test_source_images_are_named_after_the_service_and_recorded_with_their_digest(
    server: CloudletServer, flask_app: tuple[Path, str]
) -> None:
    build = build_of(server, "cloudlet.local/default/flask-hello")
    assert build["status"] == "SUCCESS"
    image = build["results"]["images"][0]
    assert image["name"] == build["images"][0]
    assert image["digest"].startswith("sha256:")
    inspected = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", image["name"]],
        capture_output=True,
        text=True,
        check=True,
    )
    assert inspected.stdout.strip() == image["digest"]
    assert build["startTime"] <= build["finishTime"]
    service = json.loads(
        server.cli("run", "services", "describe", "flask-hello", "--format", "json").stdout
    )
    assert service["spec"]["template"]["spec"]["containers"][0]["image"] == image["name"]


def test_a_source_only_change_reuses_the_dependency_layer_and_makes_a_new_revision(
    server: CloudletServer, flask_app: tuple[Path, str]
) -> None:
    source, _ = flask_app
    main = source / "main.py"
    marker = uuid.uuid4().hex[:8]  # new content every run, or the engine's cache has it
    main.write_text(main.read_text().replace("Hello from Flask", f"Hello {marker} from Flask"))
    deploy_source(server, "flask-hello", source)
    log = server.cli(
        "builds", "log", build_of(server, "cloudlet.local/default/flask-hello")["id"]
    ).stdout
    assert step_reused_cache(log, "RUN pip install")
    assert not step_reused_cache(log, "COPY . ./")
    response = server.request("flask-hello")
    assert response.text.startswith(
        f"Hello {marker} from Flask on Cloudlet (revision flask-hello-00002-"
    )


def test_deploy_source_with_a_dockerfile_builds_that_dockerfile(
    server: CloudletServer, tmp_path: Path
) -> None:
    source = folder(
        tmp_path / "static-site",
        {
            "Dockerfile": "FROM busybox:latest\nCOPY www /www\n"
            'CMD exec httpd -f -p "$PORT" -h /www\n',
            "www/index.html": "<h1>busybox httpd</h1>\n",
        },
    )
    output = deploy_source(server, "static-site", source)
    assert "Using the folder's Dockerfile" in output
    assert server.request("static-site", "/index.html").text == "<h1>busybox httpd</h1>\n"
    server.cli("run", "services", "delete", "static-site", "--quiet")
    for container in server.containers("static-site"):  # the engine keeps images in use
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)
    remove_images(build_of(server, "cloudlet.local/default/static-site")["images"][0])


def test_a_folder_with_nothing_recognisable_is_refused_with_what_was_looked_for(
    server: CloudletServer, tmp_path: Path
) -> None:
    source = folder(tmp_path / "notes", {"notes.txt": "hello\n"})
    done = server.cli("run", "deploy", "notes", "--source", str(source), check=False)
    assert done.returncode == 2
    assert "looked for" in done.stderr
    assert "a Procfile with a `web:` line" in done.stderr
    assert "Add a Dockerfile, or a Procfile" in done.stderr


def test_image_and_source_together_are_refused(server: CloudletServer, tmp_path: Path) -> None:
    done = server.cli(
        "run", "deploy", "both", "--image", "busybox", "--source", str(tmp_path), check=False
    )
    assert done.returncode == 2
    assert "--image, --source: give one, not both" in done.stderr


def test_a_new_service_without_image_or_source_is_an_error_naming_both(
    server: CloudletServer,
) -> None:
    done = server.cli("run", "deploy", "neither", check=False)
    assert done.returncode == 2
    assert "--image or --source: one is required to create service 'neither'" in done.stderr


# -- builds submit, list, log -------------------------------------------------------------


def test_a_failing_dockerfile_exits_1_showing_the_failing_steps_output(
    server: CloudletServer, tmp_path: Path
) -> None:
    source = folder(
        tmp_path / "failing",
        {
            "Dockerfile": "FROM busybox:latest\nRUN echo fine\n"
            "RUN echo about-to-fail && echo on-stderr >&2 && exit 3\nRUN echo never\n"
        },
    )
    done = server.cli(
        "builds", "submit", "--no-cache", "--tag", "cloudlet-test/failing", str(source),
        check=False,
    )  # fmt: skip
    assert done.returncode == 1
    error = done.stderr[done.stderr.index("ERROR: build") :]
    assert "ended with status FAILURE" in error
    assert "Step 3/4 : RUN echo about-to-fail" in error
    assert "\nabout-to-fail\n" in error and "\non-stderr\n" in error  # output, not the step
    assert "returned a non-zero code: 3" in error
    assert "never" not in done.stderr
    build = build_of(server, "cloudlet-test/failing")
    assert build["status"] == "FAILURE"
    assert "returned a non-zero code: 3" in build["statusDetail"]
    log = server.cli("builds", "log", build["id"]).stdout
    assert "\nfine\n" in log and "\nabout-to-fail\n" in log


def test_a_dockerfile_the_engine_cannot_parse_is_a_failure_not_an_internal_error(
    server: CloudletServer, tmp_path: Path
) -> None:
    source = folder(tmp_path / "unparsable", {"Dockerfile": "FROMM busybox\n"})
    done = server.cli(
        "builds", "submit", "--tag", "cloudlet-test/unparsable", str(source), check=False
    )
    assert done.returncode == 1
    assert "unknown instruction: FROMM" in done.stderr
    assert build_of(server, "cloudlet-test/unparsable")["status"] == "FAILURE"


def test_files_listed_in_dockerignore_are_not_in_the_image(
    server: CloudletServer, tmp_path: Path
) -> None:
    source = folder(
        tmp_path / "dockerignore",
        {
            "Dockerfile": "FROM busybox:latest\nCOPY . /ctx\n",
            ".dockerignore": "secret.txt\nlogs\n*.tmp\n!keep.tmp\n",
            "app.txt": "app",
            "secret.txt": "do not ship",
            "logs/today.log": "log",
            "scratch.tmp": "tmp",
            "keep.tmp": "kept",
        },
    )
    server.cli("builds", "submit", "--tag", "cloudlet-test/dockerignore", str(source))
    files = image_files("cloudlet-test/dockerignore", "/ctx")
    assert files == {"Dockerfile", ".dockerignore", "app.txt", "keep.tmp"}
    remove_images("cloudlet-test/dockerignore")


def test_a_context_larger_than_the_in_memory_spool_uploads_whole(
    server: CloudletServer, tmp_path: Path
) -> None:
    size = SPOOL_IN_MEMORY + (4 << 20)  # spills to a temporary file in the server
    source = folder(
        tmp_path / "big",
        {"Dockerfile": "FROM busybox:latest\nCOPY big.bin /\nRUN wc -c /big.bin\n"},
    )
    (source / "big.bin").write_bytes(bytes(range(256)) * (size // 256))
    done = server.cli("builds", "submit", "--no-cache", "--tag", "cloudlet-test/big", str(source))
    assert f"{size} /big.bin" in done.stderr
    remove_images("cloudlet-test/big")


def test_gcloudignore_with_an_included_gitignore_is_honoured(
    server: CloudletServer, tmp_path: Path
) -> None:
    source = folder(
        tmp_path / "gcloudignore",
        {
            "Dockerfile": "FROM busybox:latest\nCOPY . /ctx\n",
            ".gcloudignore": ".gcloudignore\n#!include:.gitignore\nnotes/\n",
            ".gitignore": "*.log\n",
            "app.txt": "app",
            "debug.log": "log",
            "notes/todo.txt": "todo",
        },
    )
    done = server.cli("builds", "submit", "--tag", "cloudlet-test/gcloudignore", str(source))
    assert "(honouring .gcloudignore)" in done.stderr
    files = image_files("cloudlet-test/gcloudignore", "/ctx")
    assert files == {"Dockerfile", ".gitignore", "app.txt"}
    remove_images("cloudlet-test/gcloudignore")


def test_builds_submit_async_returns_at_once_and_the_log_can_be_followed(
    server: CloudletServer, tmp_path: Path
) -> None:
    source = folder(
        tmp_path / "slow",
        {"Dockerfile": "FROM busybox:latest\nRUN echo first && sleep 2 && echo second\n"},
    )
    done = server.cli(
        "builds", "submit", "--async", "--no-cache", "--tag", "cloudlet-test/slow",
        str(source), "--format", "json",
    )  # fmt: skip
    started = json.loads(done.stdout)
    assert started["status"] in ("QUEUED", "WORKING")
    assert started["options"] == {"noCache": True}
    followed = server.cli("builds", "log", "--stream", started["id"])
    assert "first\nsecond\n" in followed.stdout
    described = server.cli("builds", "describe", started["id"], "--format", "json")
    assert json.loads(described.stdout)["status"] == "SUCCESS"
    remove_images("cloudlet-test/slow")


def test_builds_list_shows_builds_newest_first_in_gclouds_columns(
    server: CloudletServer, tmp_path: Path
) -> None:
    source = folder(tmp_path / "listed", {"Dockerfile": "FROM busybox:latest\n"})
    for name in ("first", "second"):
        server.cli("builds", "submit", "--tag", f"cloudlet-test/{name}", str(source))
    table = server.cli("builds", "list", "--limit", "2").stdout.splitlines()
    assert table[0].split() == ["ID", "CREATE_TIME", "DURATION", "SOURCE", "IMAGES", "STATUS"]
    assert [row.split()[-2:] for row in table[1:]] == [
        ["cloudlet-test/second", "SUCCESS"],
        ["cloudlet-test/first", "SUCCESS"],
    ]
    remove_images("cloudlet-test/first", "cloudlet-test/second")


def test_builds_submit_needs_a_dockerfile(server: CloudletServer, tmp_path: Path) -> None:
    source = folder(tmp_path / "nodockerfile", {"main.py": "print()\n"})
    done = server.cli("builds", "submit", "--tag", "cloudlet-test/x", str(source), check=False)
    assert done.returncode == 2
    assert "has no Dockerfile, which --tag builds" in done.stderr


def test_an_invalid_tag_is_refused_before_uploading(server: CloudletServer, tmp_path: Path) -> None:
    done = server.cli("builds", "submit", "--tag", "Not/Valid", str(tmp_path), check=False)
    assert done.returncode == 2
    assert "--tag: 'Not/Valid' is not a valid image name" in done.stderr


def test_the_log_of_an_unknown_build_is_a_404(server: CloudletServer) -> None:
    done = server.cli("builds", "log", "no-such-build", check=False)
    assert done.returncode == 2
    assert "build 'no-such-build' not found in project 'default'" in done.stderr


def test_the_build_api_refuses_a_body_that_is_not_a_tar_and_a_missing_tag(
    server: CloudletServer,
) -> None:
    token = (server.home / "token").read_text().strip()
    url = f"{server.api}/v1/projects/default/builds"
    auth = {"Authorization": f"Bearer {token}"}
    wrong_type = httpx.post(url, params={"tag": "x"}, json={}, headers=auth)
    assert wrong_type.status_code == 400
    assert "Content-Type" in wrong_type.json()["message"]
    no_tag = httpx.post(
        url, content=b"x" * 10, headers=auth | {"Content-Type": "application/x-tar"}
    )
    assert no_tag.status_code == 400
    assert no_tag.json()["details"]["causes"][0]["field"] == "tag"
    assert httpx.get(url).status_code == 401
