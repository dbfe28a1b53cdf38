"""`cloudlet kubeconfig` and `cloudlet gcloud-config`: point the real kubectl and gcloud here.

Both read the running server's ``server.json``, token and CA from CLOUDLET_HOME, and print
what the other tool needs; neither changes anything on the machine.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import yaml

from cloudlet.cli.client import ApiError
from cloudlet.settings import default_home

DEFAULT_REGION = "europe-west1"
DEFAULT_HOST = "cloudlet.local"
# Keep gcloud from calling Google for anything but the API it is pointed at.
QUIET_PROPERTIES = (
    ("core/should_prompt_to_enable_api", "false"),
    ("core/disable_usage_reporting", "true"),
    ("core/check_gce_metadata", "false"),
    ("component_manager/disable_update_check", "true"),
    ("survey/disable_prompts", "true"),
)


@dataclass(frozen=True)
class ServerInfo:
    """What a running server published in its home."""

    home: Path
    api: str
    api_tls: str | None

    @property
    def token_file(self) -> Path:
        return self.home / "token"


def server_info(env: dict[str, str] | None = None) -> ServerInfo:
    home = default_home(os.environ if env is None else env)
    path = home / "server.json"
    try:
        info = json.loads(path.read_text())
    except OSError:
        raise ApiError(
            f"no Cloudlet server found (no {path}); start one with `cloudlet server` "
            "or set CLOUDLET_HOME to its home"
        ) from None
    return ServerInfo(home, str(info["api"]), info.get("api_tls"))


# -- kubeconfig ----------------------------------------------------------------------------


def kubeconfig(server: str, ca_pem: bytes, token: str, namespace: str) -> dict[str, Any]:
    """A kubeconfig with one context, ``cloudlet``, for ``server``."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "cloudlet",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "cloudlet", "user": {"token": token}}],
        "contexts": [
            {
                "name": "cloudlet",
                "context": {"cluster": "cloudlet", "user": "cloudlet", "namespace": namespace},
            }
        ],
        "current-context": "cloudlet",
    }


def _tls_server(info: ServerInfo) -> str:
    if not info.api_tls:
        raise click.UsageError(
            "the server has no HTTPS listener, and kubectl sends its token only over HTTPS: "
            "restart it with `cloudlet server --api-tls-port 8443` "
            "(443 if gcloud --platform kubernetes should use it too)"
        )
    return info.api_tls


@click.command("kubeconfig")
@click.option("--namespace", default="default", show_default=True, help="Namespace of the context.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (mode 0600) instead of printing.",
)
def kubeconfig_command(namespace: str, output: Path | None) -> None:
    """Print a kubeconfig for kubectl (and gcloud --platform kubernetes).

    It holds the control API's HTTPS URL, the CA that signed its certificate and the
    API token: `cloudlet kubeconfig -o ~/.kube/cloudlet && kubectl --kubeconfig
    ~/.kube/cloudlet get ksvc`.
    """
    from cloudlet.controlplane.tls import ca_path  # cryptography: only when needed

    info = server_info()
    server = _tls_server(info)
    token = info.token_file.read_text().strip()
    text = yaml.safe_dump(
        kubeconfig(server, ca_path(info.home).read_bytes(), token, namespace), sort_keys=False
    )
    if output is None:
        sys.stdout.write(text)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    click.echo(f"Wrote {output}; use it with `kubectl --kubeconfig {output} get ksvc`.", err=True)


# -- gcloud ---------------------------------------------------------------------------------


def gcloud_properties(
    api: str, token_file: Path, project: str, region: str, host: str
) -> list[tuple[str, str]]:
    """The gcloud properties that send `gcloud run` to the control API at ``api``."""
    port = urlsplit(api).port
    endpoint = f"http://{host}:{port}/" if port else f"http://{host}/"
    return [
        ("api_endpoint_overrides/run", endpoint),
        ("auth/access_token_file", str(token_file)),
        ("core/project", project),
        ("run/region", region),
        ("run/platform", "managed"),
        *QUIET_PROPERTIES,
    ]


def hosts_line(api: str, host: str, regions: list[str]) -> str:
    """The /etc/hosts line gcloud needs: it puts the region in front of the host name."""
    address = urlsplit(api).hostname or "127.0.0.1"
    names = [f"{region}-{host}" for region in regions] + [host]
    return f"{address} {' '.join(names)}"


def _env_name(prop: str) -> str:
    return "CLOUDSDK_" + prop.replace("/", "_").upper()


def render_gcloud(props: list[tuple[str, str]], hosts: str, fmt: str) -> str:
    if fmt == "env":
        lines = [f"export {_env_name(k)}={shlex.quote(v)}" for k, v in props]
        return "\n".join([f"# /etc/hosts needs: {hosts}", *lines]) + "\n"
    lines = [
        "# Resolve the API host with the region gcloud puts in front of it (as root):",
        f"grep -qxF {shlex.quote(hosts)} /etc/hosts || echo {shlex.quote(hosts)} >> /etc/hosts",
        "# A gcloud configuration of its own keeps your Google one intact:",
        "gcloud config configurations create cloudlet",
        *[f"gcloud config set {k} {shlex.quote(v)}" for k, v in props],
        "# Back to Google later: gcloud config configurations activate default",
    ]
    return "\n".join(lines) + "\n"


@click.command("gcloud-config")
@click.option(
    "--project",
    default="default",
    show_default=True,
    help="gcloud project = Cloudlet namespace ('default' is what `cloudlet run` uses).",
)
@click.option(
    "--region",
    "regions",
    multiple=True,
    default=[DEFAULT_REGION],
    show_default=True,
    help="Region(s) you will pass to gcloud; each needs a host name. Repeatable.",
)
@click.option(
    "--host", default=DEFAULT_HOST, show_default=True, help="Host name gcloud is pointed at."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["commands", "env"]),
    default="commands",
    show_default=True,
    help="`gcloud config set` commands, or CLOUDSDK_* variables for scripts and CI.",
)
def gcloud_config_command(project: str, regions: tuple[str, ...], host: str, fmt: str) -> None:
    """Print how to point the real gcloud at this server.

    gcloud `run` commands then deploy here: `gcloud run deploy hello --image hello
    --allow-unauthenticated`. gcloud puts the region in front of the API's host name
    (europe-west1-cloudlet.local), so that name needs a line in /etc/hosts.
    """
    info = server_info()
    props = gcloud_properties(info.api, info.token_file, project, regions[0], host)
    sys.stdout.write(render_gcloud(props, hosts_line(info.api, host, list(regions)), fmt))
