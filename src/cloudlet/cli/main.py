"""`cloudlet`: the entry point, and the one place errors become exit codes.

Exit codes: 0 success; 2 bad input (a usage error or a 4xx answer); 1 anything else.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click
from rich.text import Text

from cloudlet import __version__
from cloudlet.cli import render
from cloudlet.cli.failures import ApiError, BuildFailed, DeployFailed
from cloudlet.domain.errors import CloudletError

USAGE_EXIT = 2


class LazyGroup(click.Group):
    """A group whose subcommands are imported when first used: `cloudlet builds submit`
    does not pay for importing every other command group (the CLI starts in about half
    the time)."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy and cmd_name not in self.commands:
            module, attr = self._lazy[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


COMMANDS = {
    "run": "cloudlet.cli.run:run_group",
    "deploy": "cloudlet.cli.run:deploy_command",
    "builds": "cloudlet.cli.builds:builds_group",
    "kubeconfig": "cloudlet.cli.config:kubeconfig_command",
    "gcloud-config": "cloudlet.cli.config:gcloud_config_command",
    "auth": "cloudlet.cli.auth:auth_group",
    "secrets": "cloudlet.cli.secrets:secrets_group",
    "beta": "cloudlet.cli.logs:beta_group",
    "billing": "cloudlet.cli.billing:billing_group",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
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
