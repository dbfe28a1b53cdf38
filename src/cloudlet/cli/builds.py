"""`cloudlet builds ...` (as `gcloud builds`), and the source build behind `run deploy --source`.

The CLI packs the source folder (honouring .gcloudignore and .dockerignore), streams it to
the server's build endpoint and renders the engine's progress as it arrives; the server
builds. A failed build exits 1 showing the failing step's output.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import click
import httpx
from rich.text import Text

from cloudlet.builder.detect import detect
from cloudlet.builder.dockerfile import render as render_dockerfile
from cloudlet.builder.progress import STEP, BuildProgress
from cloudlet.builder.reference import source_image, validate_image
from cloudlet.builder.source import Source, facts, open_source, tar_stream
from cloudlet.cli import render
from cloudlet.cli.client import ApiError, Client, discover
from cloudlet.cli.failures import BuildFailed
from cloudlet.cli.options import namespace
from cloudlet.domain.errors import InvalidError

BUILDS = "/v1/projects/{project}/builds"
# Uploads and builds take as long as they take; the server sends a heartbeat line every
# 15 s while a build is quiet, so a minute of silence means the server is gone.
STREAM_TIMEOUT = httpx.Timeout(30.0, read=60.0, write=None)


# -- talking to the server -----------------------------------------------------------------


class BuildClient:
    """The build endpoints of the control API (JSON, text and NDJSON streams)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self._http = httpx.Client(
            base_url=base_url, timeout=STREAM_TIMEOUT, headers={"Authorization": f"Bearer {token}"}
        )

    @classmethod
    def from_env(cls) -> BuildClient:
        return cls(*discover())

    def path(self, project: str, build_id: str = "", suffix: str = "") -> str:
        base = BUILDS.format(project=project)
        return f"{base}/{build_id}{suffix}" if build_id else base

    def get(self, path: str) -> httpx.Response:
        try:
            response = self._http.get(path)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        _raise_for_status(response)
        return response

    def stream(
        self,
        method: str,
        path: str,
        params: Mapping[str, str],
        content: Iterator[bytes] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The NDJSON messages of a streamed answer, as they arrive."""
        headers = {"Content-Type": "application/x-tar"} if content is not None else {}
        try:
            with self._http.stream(
                method, path, params=params, content=content, headers=headers
            ) as response:
                if response.is_error:
                    response.read()
                    _raise_for_status(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: httpx.TransportError) -> ApiError:
        return ApiError(
            f"lost the Cloudlet server at {self.base_url} ({exc!r}); is `cloudlet server` "
            "running? A build that started goes on: see `cloudlet builds list`"
        )


def _raise_for_status(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        message = response.json().get("message") or response.text
    except ValueError:
        message = response.text
    raise ApiError(message, response.status_code)


# -- submitting ----------------------------------------------------------------------------


def submit(
    project: str,
    tag: str,
    source: Source,
    extra: Mapping[str, bytes] | None = None,
    *,
    nocache: bool = False,
    wait: bool = True,
) -> dict[str, Any]:
    """Uploads the folder, builds it as ``tag`` and returns the finished build record."""
    client = BuildClient.from_env()
    count = len(source.files) + len(extra or {})
    ignored = f" (honouring {', '.join(source.rules.files)})" if source.rules.files else ""
    _say(
        f"Creating temporary archive of {count} file(s) totalling {_size(source.size)} "
        f"before compression{ignored}."
    )
    path = client.path(project)
    _say(f"Uploading tarball of [{source.root}] to [{client.base_url}{path}]")
    params = {"tag": tag, "source": str(source.root)}
    params |= {"nocache": "true"} if nocache else {}
    params |= {} if wait else {"async": "true"}
    messages = client.stream("POST", path, params, tar_stream(source, extra))
    return _follow(client, project, messages)


def _follow(
    client: BuildClient, project: str, messages: Iterator[dict[str, Any]]
) -> dict[str, Any]:
    first = next(messages, None)
    if first is None or ("build" not in first and "metadata" not in first):
        raise ApiError(f"the server answered the build with {first!r}, not a build")
    build: dict[str, Any] = first.get("build") or first["metadata"]["build"]
    url = f"{client.base_url}{client.path(project, build['id'])}"
    _say(f"Created [{url}].")
    _say(f"Logs are available at [{url}/log].")
    if "metadata" in first:  # --async: an Operation, nothing more comes
        return build
    return _render_progress(build, messages)


def _render_progress(build: dict[str, Any], messages: Iterator[dict[str, Any]]) -> dict[str, Any]:
    progress, started = BuildProgress(), time.monotonic()
    render.err.rule("REMOTE BUILD OUTPUT")
    with render.err.status("Waiting for the build to start...") as spinner:
        for message in messages:
            if "build" in message:
                build = message["build"]
                continue
            for line in progress.feed(message):
                render.err.print(_styled(line))
            step = progress.step or "Sending the build context"
            spinner.update(f"{step} ({time.monotonic() - started:.0f}s)")
        for line in progress.flush():
            render.err.print(_styled(line))
    render.err.rule()
    return build


def _say(message: str) -> None:
    render.err.print(Text(message))  # Text: paths in [brackets] are not rich markup


def _styled(line: str) -> Text:
    if STEP.match(line):
        return Text(line, style="bold cyan")
    if line.startswith("ERROR: "):
        return Text(line, style="bold red")
    return Text(line, style="dim" if line.startswith((" ---> ", "Removing intermediate")) else "")


def _size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"


def check_outcome(build: dict[str, Any]) -> None:
    """Raises BuildFailed unless the build succeeded (or is still running, for --async)."""
    if build.get("status") in ("SUCCESS", "QUEUED", "WORKING"):
        return
    raise BuildFailed(
        f"build {build.get('id')} ended with status {build.get('status', 'FAILURE')}; "
        f"the failing step and its last output:\n{build.get('statusDetail', '')}"
    )


# -- run deploy --source -------------------------------------------------------------------


def image_for_deploy(
    client: Client, ns: str, service: str, image: str | None, source: str | None
) -> str | None:
    """The image `run deploy` should use: ``--image``, or one built from ``--source``."""
    if image is not None and source is not None:
        raise InvalidError(
            "--image, --source: give one, not both (--image deploys an existing image, "
            "--source builds a folder first)",
            field="--source",
        )
    if source is None:
        if image is None and client.get_service(ns, service) is None:
            raise InvalidError(
                f"--image or --source: one is required to create service {service!r}; "
                "e.g. --image my-app:v1, or --source . to build the current folder",
                field="--image",
            )
        return image
    return build_source(ns, service, source)


def build_source(project: str, service: str, folder: str) -> str:
    """Builds the folder (its Dockerfile, or one generated for the detected app)."""
    source = open_source(folder, "--source")
    plan = detect(facts(source), folder)
    version = datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    tag = source_image(project, service, version)
    verb = "Generated a Dockerfile for" if plan.generated else "Using"
    _say(f"Building [{folder}] as [{tag}]. {verb} {plan.description}.")
    extra = {"Dockerfile": render_dockerfile(plan).encode()} if plan.generated else None
    build = submit(project, tag, source, extra)
    check_outcome(build)
    return tag


# -- commands ------------------------------------------------------------------------------


def build_options(func: Any) -> Any:
    """gcloud's global flags that `builds` commands accept."""
    for option in reversed(
        [
            click.option(
                "--project",
                envvar="CLOUDLET_PROJECT",
                help="Project; its builds are kept apart (default: 'default').",
            ),
            click.option("--region", help="Accepted for gcloud compatibility."),
            click.option("--format", "fmt", help="Output format: yaml or json."),
        ]
    ):
        func = option(func)
    return func


@click.group("builds")
def builds_group() -> None:
    """Build container images from source, list builds and read their logs (gcloud builds)."""


@builds_group.command("submit")
@click.argument("source", default=".", required=False)
@click.option(
    "--tag", "-t", required=True, help="Name of the image to build, e.g. eu.gcr.io/P/APP."
)
@click.option("--no-cache", is_flag=True, help="Build every step again; use no cached layer.")
@click.option("--async", "run_async", is_flag=True, help="Return once the build has started.")
@build_options
def submit_command(
    source: str,
    tag: str,
    no_cache: bool,
    run_async: bool,
    project: str | None,
    region: str | None,
    fmt: str | None,
) -> None:
    """Build SOURCE (a folder with a Dockerfile; default: the current folder) as --tag."""
    validate_image(tag, "--tag")
    folder = open_source(source, "SOURCE")
    if not folder.has("Dockerfile"):
        raise InvalidError(
            f"SOURCE: {source} has no Dockerfile, which --tag builds; add one (or deploy "
            "with `cloudlet run deploy SERVICE --source` to build a detected Python app)",
            field="SOURCE",
        )
    build = submit(namespace(project), tag, folder, nocache=no_cache, wait=not run_async)
    if not render.emit(build, fmt):
        _table([build])
    check_outcome(build)


@builds_group.command("list")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many builds.")
@build_options
def list_command(
    limit: int | None, project: str | None, region: str | None, fmt: str | None
) -> None:
    """List builds, newest first."""
    client = BuildClient.from_env()
    builds: list[dict[str, Any]] = client.get(client.path(namespace(project))).json()["builds"]
    builds = builds[:limit] if limit else builds
    if render.emit(builds, fmt):
        return
    if not builds:
        render.err.print("Listed 0 items.")
        return
    _table(builds)


@builds_group.command("describe")
@click.argument("build_id")
@build_options
def describe_command(
    build_id: str, project: str | None, region: str | None, fmt: str | None
) -> None:
    """Show a build (YAML unless --format json)."""
    client = BuildClient.from_env()
    build = client.get(client.path(namespace(project), build_id)).json()
    render.emit(build, fmt or "yaml")


@builds_group.command("log")
@click.argument("build_id")
@click.option("--stream", is_flag=True, help="Follow a running build until it ends.")
@build_options
def log_command(
    build_id: str, stream: bool, project: str | None, region: str | None, fmt: str | None
) -> None:
    """Print a build's log."""
    client = BuildClient.from_env()
    path = client.path(namespace(project), build_id, "/log")
    if not stream:
        click.echo(client.get(path).text, nl=False)
        return
    build: dict[str, Any] = {}
    progress = BuildProgress()
    for message in client.stream("GET", path, {"follow": "true"}):
        build = message.get("build", build)
        for line in progress.feed(message):
            click.echo(line)
    for line in progress.flush():
        click.echo(line)
    check_outcome(build)


def _table(builds: list[dict[str, Any]]) -> None:
    """gcloud's columns, never folded or cut: build ids are copied from here."""
    rows = [["ID", "CREATE_TIME", "DURATION", "SOURCE", "IMAGES", "STATUS"]]
    rows += [
        [
            b["id"],
            b.get("createTime", "")[:19].replace("T", " "),
            _duration(b),
            b.get("source", {}).get("localDirectory", "-"),
            " ".join(b.get("images", [])),
            b.get("status", ""),
        ]
        for b in builds
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _duration(build: dict[str, Any]) -> str:
    start, finish = build.get("startTime"), build.get("finishTime")
    if not start or not finish:
        return "-"
    seconds = (_time(finish) - _time(start)).total_seconds()
    return f"{seconds // 60:.0f}M{seconds % 60:.0f}S" if seconds >= 60 else f"{seconds:.0f}S"


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
