"""`cloudlet`: the entry point, and the one place errors become exit codes.

Exit codes: 0 success; 2 bad input (a usage error or a 4xx answer); 1 anything else.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from rich.text import Text

from cloudlet import __version__
from cloudlet.cli import render
from cloudlet.cli.auth import auth_group
from cloudlet.cli.billing import billing_group
from cloudlet.cli.builds import BuildFailed, builds_group
from cloudlet.cli.client import ApiError
from cloudlet.cli.config import gcloud_config_command, kubeconfig_command
from cloudlet.cli.deploy import DeployFailed
from cloudlet.cli.logs import beta_group
from cloudlet.cli.run import deploy_command, run_group
from cloudlet.cli.secrets import secrets_group
from cloudlet.domain.errors import CloudletError

USAGE_EXIT = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cloudlet")
def cli() -> None:
    """Cloudlet: Cloud Run on your own machine.

    Start the daemon with `cloudlet server`, then use gcloud's commands with `gcloud`
    replaced by `cloudlet`, e.g. `cloudlet run deploy hello --image hello`.
    """


@cli.command("server")
@click.option("--home", help="State directory [env CLOUDLET_HOME; default XDG data dir].")
@click.option("--host", help="Router bind address [CLOUDLET_HOST; default 127.0.0.1].")
@click.option("--port", help="Router port [CLOUDLET_PORT; default 8080].")
@click.option("--api-port", help="Control API port on 127.0.0.1 [CLOUDLET_API_PORT; default 8090].")
@click.option(
    "--api-tls-port",
    help="Also serve the control API over HTTPS on this port, for kubectl and gcloud "
    "--platform kubernetes (which needs 443) [CLOUDLET_API_TLS_PORT; default off].",
)
@click.option(
    "--api-tls-host", help="Address of the HTTPS listener [CLOUDLET_API_TLS_HOST; 127.0.0.1]."
)
@click.option("--domain", help="Domain of service URLs [CLOUDLET_DOMAIN; default localhost].")
@click.option(
    "--scale-to-zero-grace",
    help="Idle time past the stable window before scaling "
    "to zero [CLOUDLET_SCALE_TO_ZERO_GRACE; default 30s].",
)
@click.option(
    "--stable-window", help="Autoscaler stable window [CLOUDLET_STABLE_WINDOW; default 60s]."
)
@click.option(
    "--log-retention-bytes",
    help="Size cap of stored logs, oldest dropped first, e.g. 512Mi "
    "[CLOUDLET_LOG_RETENTION_BYTES; default 256Mi].",
)
def server_command(**flags: Any) -> None:
    """Run the Cloudlet daemon in the foreground: control API, router, autoscaler."""
    from cloudlet import settings as settings_module
    from cloudlet.server import serve

    settings = settings_module.load(os.environ, **flags)
    serve(settings)


cli.add_command(run_group)
cli.add_command(deploy_command, "deploy")
cli.add_command(builds_group)
cli.add_command(kubeconfig_command)
cli.add_command(gcloud_config_command)
cli.add_command(auth_group)
cli.add_command(secrets_group)
cli.add_command(beta_group)
cli.add_command(billing_group)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="cloudlet", standalone_mode=False)
    except click.exceptions.Abort:
        render.err.print("Aborted.")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ApiError as exc:
        _fail(exc.message, USAGE_EXIT if exc.user_fault else 1)
    except CloudletError as exc:
        _fail(exc.message, USAGE_EXIT if exc.user_fault else 1)
    except (DeployFailed, BuildFailed) as exc:
        _fail(str(exc), 1)


def _fail(message: str, code: int) -> None:
    render.err.print(Text.assemble(("ERROR: ", "bold red"), message))
    sys.exit(code)
