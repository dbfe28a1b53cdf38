"""`cloudlet auth ...`: identity tokens for invoking private services (gcloud auth).

The account is ``--account``, else CLOUDLET_ACCOUNT, else the OS user name; its IAM
member is ``user:ACCOUNT``. The server mints the token (its signing key never leaves
CLOUDLET_HOME/keys); holding the control API's token is what allows asking for one.
"""

from __future__ import annotations

import getpass
import os

import click

from cloudlet.cli import render
from cloudlet.cli.client import Client
from cloudlet.security.tokens import CLI_AUDIENCE


@click.group("auth")
def auth_group() -> None:
    """Identity tokens for calling services that require authentication."""


def current_account(given: str | None) -> str:
    return given or os.environ.get("CLOUDLET_ACCOUNT") or getpass.getuser()


@auth_group.command("print-identity-token")
@click.option(
    "--audiences",
    help="The token's audience: the service URL or a custom audience of the service "
    "(default: Cloudlet's CLI audience, which every service accepts).",
)
@click.option("--account", help="Account to act as [CLOUDLET_ACCOUNT; default: the OS user].")
def print_identity_token(audiences: str | None, account: str | None) -> None:
    """Print an identity token (valid 1 hour) for `Authorization: Bearer TOKEN`."""
    client = Client.from_env()
    path = f"/v1/projects/-/serviceAccounts/{current_account(account)}:generateIdToken"
    answer = client.request("POST", path, {"audience": audiences or CLI_AUDIENCE})
    render.out.print(answer["token"])
