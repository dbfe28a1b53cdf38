"""The backbone end to end: a real server, real dockerd, real HTTP through the router."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess

import httpx
import pytest

from tests.conftest import CloudletServer, wait_for

pytestmark = pytest.mark.docker


def deploy(server: CloudletServer, name: str, image: str, *flags: str) -> str:
    done = server.cli("run", "deploy", name, "--image", image, "--allow-unauthenticated", *flags)
    assert f"Service URL: {server.url(name)}" in done.stdout
    return done.stdout


def test_deploy_prints_the_url_and_the_container_serves_it(
    server: CloudletServer, testapp_image: str
) -> None:
    out = deploy(server, "hello", testapp_image)
    assert "revision [hello-00001-" in out
    response = server.request("hello")
    assert response.status_code == 200
    assert response.text.startswith("hello from hello-00001-")


def test_the_router_answers_with_and_without_the_port_in_host(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "hostcheck", testapp_image)
    bare = httpx.get(
        f"http://127.0.0.1:{server.router_port}/", headers={"Host": "hostcheck.localhost"}
    )
    assert bare.status_code == 200


def test_the_container_sees_the_cloud_run_contract(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "contract", testapp_image, "--set-env-vars", "GREETING=hi,MODE=test")
    env = server.request("contract", "/env").json()
    assert env["PORT"] == "8080"
    assert env["K_SERVICE"] == "contract"
    assert env["K_CONFIGURATION"] == "contract"
    assert env["K_REVISION"].startswith("contract-00001-")
    assert (env["GREETING"], env["MODE"]) == ("hi", "test")
    headers = server.request("contract", "/headers").json()
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert "for=127.0.0.1" in headers["forwarded"]
    assert headers["traceparent"].startswith("00-")
    assert "x-cloud-trace-context" in headers


def test_unknown_hosts_get_404_with_an_explanation(server: CloudletServer) -> None:
    response = server.request("nothing-here")
    assert response.status_code == 404
    assert "nothing-here" in response.text


def test_list_describe_and_revisions_show_the_service(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "listed", testapp_image)
    assert "listed" in server.cli("run", "services", "list").stdout
    described = server.cli("run", "services", "describe", "listed", "--format", "json").stdout
    body = json.loads(described)
    assert body["status"]["url"] == server.url("listed")
    assert [c["status"] for c in body["status"]["conditions"]] == ["True"] * 3
    revisions = server.cli("run", "revisions", "list", "--service", "listed").stdout
    assert "listed-00001-" in revisions


def test_concurrency_is_capped_per_instance_and_excess_requests_queue(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "capped", testapp_image, "--concurrency", "2", "--max-instances", "1")
    server.request("capped", "/stats/reset")
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(
            pool.map(lambda _: server.request("capped", "/sleep?ms=200").status_code, range(12))
        )
    assert codes == [200] * 12
    stats = server.request("capped", "/stats").json()
    assert 1 <= stats["peak"] <= 2
    assert len(server.containers("capped")) == 1


def test_a_full_queue_answers_503(server: CloudletServer, testapp_image: str) -> None:
    deploy(server, "tiny", testapp_image, "--concurrency", "1", "--max-instances", "1")
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(
            pool.map(lambda _: server.request("tiny", "/sleep?ms=1500").status_code, range(20))
        )
    assert 503 in codes
    assert codes.count(200) >= 10


def test_a_request_past_the_timeout_gets_504(server: CloudletServer, testapp_image: str) -> None:
    deploy(server, "slow", testapp_image, "--timeout", "1")
    response = server.request("slow", "/sleep?ms=3000")
    assert response.status_code == 504
    assert server.request("slow", "/").status_code == 200


def test_idle_service_scales_to_zero_and_cold_starts(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "sleepy", testapp_image)
    assert server.request("sleepy").status_code == 200
    wait_for(lambda: not server.containers("sleepy"), 60, "scale to zero")
    response = server.request("sleepy")
    assert response.status_code == 200
    assert len(server.containers("sleepy")) == 1


def test_deleting_a_service_stops_its_instances(server: CloudletServer, testapp_image: str) -> None:
    deploy(server, "doomed", testapp_image)
    assert server.containers("doomed")
    server.cli("run", "services", "delete", "doomed", "--quiet")
    wait_for(lambda: not server.containers("doomed"), 30, "containers to stop")
    assert server.request("doomed").status_code == 404


def test_a_restarted_server_adopts_running_instances(make_server, testapp_image: str) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(["--stable-window", "60s"])
    srv.start()
    deploy(srv, "durable", testapp_image)
    before = srv.containers("durable")
    srv.stop()
    assert srv.containers("durable") == before
    srv.start()
    assert srv.request("durable").status_code == 200
    assert srv.containers("durable") == before
    assert "durable" in srv.cli("run", "services", "list").stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "deploy", "Bad_Name", "--image", "x"], "invalid service name"),
        (["run", "deploy", "ok", "--image", "x", "--concurrency", "5000"], "--concurrency"),
        (["run", "deploy", "ok", "--image", "x", "--memory", "lots"], "--memory"),
        (["run", "deploy", "ok", "--image", "x", "--timeout", "2h"], "--timeout"),
        (["run", "deploy", "ok", "--image", "cloudlet-no-such-image:v9"], "cloudlet-no-such-image"),
    ],
)
def test_bad_input_is_refused_with_exit_2_and_stores_nothing(
    server: CloudletServer, args: list[str], needle: str
) -> None:
    done = server.cli(*args, check=False)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    assert "ok" not in server.cli("run", "services", "list", "--format", "json").stdout


def test_an_unknown_flag_is_a_usage_error(server: CloudletServer) -> None:
    done = server.cli("run", "deploy", "x", "--image", "y", "--no-such-flag", check=False)
    assert done.returncode == 2
    assert "--no-such-flag" in done.stderr


def test_a_container_that_crashes_at_start_fails_the_deploy_and_keeps_traffic(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "fragile", testapp_image)
    done = server.cli(
        "run",
        "deploy",
        "fragile",
        "--image",
        testapp_image,
        "--update-env-vars",
        "CRASH_AT_START=1",
        check=False,
    )
    assert done.returncode == 1
    assert "exited with code 3" in done.stderr
    assert server.request("fragile").text.startswith("hello from fragile-00001-")


def test_a_command_that_cannot_run_fails_the_deploy_saying_what_to_fix(
    server: CloudletServer, testapp_image: str
) -> None:
    done = server.cli(
        "run",
        "deploy",
        "nocmd",
        "--image",
        testapp_image,
        "--command",
        "/no/such/binary",
        check=False,
    )
    assert done.returncode == 1
    assert (
        "ContainerCommandFailed"
        in server.cli("run", "revisions", "list", "--service", "nocmd", "--format", "json").stdout
    )
    assert "/no/such/binary" in done.stderr and "check --command" in done.stderr


def test_the_cli_says_how_to_start_a_server_when_none_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDLET_")}
    done = subprocess.run(
        [sys.executable, "-m", "cloudlet", "run", "services", "list"],
        env=env | {"CLOUDLET_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "cloudlet server" in done.stderr


def test_a_revision_keeps_its_image_when_the_tag_moves(
    server: CloudletServer, testapp_image: str
) -> None:
    from tests.images import REPO, ensure_image

    other = ensure_image("hello:latest", REPO / "examples" / "hello")
    subprocess.run(["docker", "tag", testapp_image, "cloudlet-retag-test:v1"], check=True)
    try:
        deploy(server, "pinned", "cloudlet-retag-test:v1")
        first = server.request("pinned").text
        assert first.startswith("hello from pinned-00001-")
        subprocess.run(["docker", "tag", other, "cloudlet-retag-test:v1"], check=True)
        wait_for(lambda: not server.containers("pinned"), 60, "scale to zero")
        assert server.request("pinned").text == first
    finally:
        subprocess.run(
            ["docker", "rmi", "cloudlet-retag-test:v1"], capture_output=True, check=False
        )
