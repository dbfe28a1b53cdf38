"""The seed guide end to end: its Django app, built and deployed with exactly its two commands.

"Hosting Django on Cloud Run" builds with `gcloud builds submit --tag ...` in the project's
folder and deploys with `gcloud run deploy my-service --image ...`. Here both run as written,
through bash, with `cloudlet` in place of `gcloud`; then the site, its static files and its
admin answer through the router, and again after a cold start from zero instances.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, CloudletServer

SITE = REPO / "examples" / "django-mysite"
GC_PROJECT = "my-gc-project"
SEED_BUILD = "cloudlet builds submit --tag eu.gcr.io/$GC_PROJECT/my-dj-app"
SEED_DEPLOY = (
    "cloudlet run deploy my-service --image eu.gcr.io/$GC_PROJECT/my-dj-app "
    "--project $GC_PROJECT --region europe-west1 --allow-unauthenticated --platform managed"
)
BUILD_TIMEOUT = 600

pytestmark = [pytest.mark.docker, pytest.mark.timeout(BUILD_TIMEOUT)]


def seed_command(server: CloudletServer, command: str) -> subprocess.CompletedProcess[str]:
    """Runs a line of the seed guide in bash, in the app's folder, as a user would.

    `cloudlet` is this checkout's CLI under the tests' Python, whatever is on PATH.
    """
    script = f'cloudlet() {{ "{sys.executable}" -m cloudlet "$@"; }}\n{command}\n'
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=SITE,
        env=server.env | {"GC_PROJECT": GC_PROJECT},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def seed(server: CloudletServer) -> Iterator[tuple[str, str]]:
    """The output of the seed's build and deploy commands."""
    built = seed_command(server, SEED_BUILD)
    deployed = seed_command(server, SEED_DEPLOY)
    yield built.stdout + built.stderr, deployed.stdout + deployed.stderr


def get(server: CloudletServer, path: str) -> tuple[int, str, str]:
    response = server.request("my-service", path)
    return response.status_code, response.headers.get("content-type", ""), response.text


def test_the_seed_commands_build_the_image_and_deploy_it(
    server: CloudletServer, seed: tuple[str, str]
) -> None:
    built, deployed = seed
    assert "Successfully tagged eu.gcr.io/my-gc-project/my-dj-app:latest" in built
    assert "SUCCESS" in built
    assert "Deploying new service my-service in project my-gc-project region europe-west1" in (
        deployed
    )
    assert f"Service URL: {server.url('my-service')}" in deployed


def test_the_site_its_static_files_and_its_admin_answer_through_the_router(
    server: CloudletServer, seed: tuple[str, str]
) -> None:
    status, _, page = get(server, "/")
    assert status == 200
    assert "Hello from Django 5.2" in page
    assert "Served by revision my-service-00001-" in page
    status, content_type, css = get(server, "/static/admin/css/base.css")
    assert (status, content_type.split(";")[0]) == (200, "text/css")
    assert "--primary" in css
    status, _, login = get(server, "/admin/login/")
    assert status == 200
    assert "Django administration" in login
    assert 'href="/static/admin/css/base.css"' in login
    redirect = server.request("my-service", "/admin/", follow_redirects=False)
    assert redirect.status_code == 302
    assert redirect.headers["location"].endswith("/admin/login/?next=/admin/")


def test_the_site_serves_again_after_a_cold_start_from_zero(
    server: CloudletServer, seed: tuple[str, str]
) -> None:
    assert get(server, "/")[0] == 200
    deadline = time.monotonic() + 120
    while server.containers("my-service"):
        assert time.monotonic() < deadline, "my-service did not scale to zero within 120 s"
        time.sleep(0.5)
    status, _, page = get(server, "/admin/login/")
    assert status == 200
    assert "Django administration" in page
    assert len(server.containers("my-service")) == 1
