"""Revisions, traffic splitting, tags and rollback end to end: a real server, real dockerd,
real requests through the router. Each revision of the test app gets a different env, so
its answer ("hello from REVISION") says which revision served it."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import CloudletServer, wait_for

pytestmark = pytest.mark.docker


def deploy(server: CloudletServer, name: str, image: str, *flags: str) -> dict[str, Any]:
    """Deploy and return the service as `describe --format json` shows it."""
    server.cli("run", "deploy", name, "--image", image, "--allow-unauthenticated", *flags)
    return describe(server, name)


def describe(server: CloudletServer, name: str) -> dict[str, Any]:
    out = server.cli("run", "services", "describe", name, "--format", "json").stdout
    return dict(json.loads(out))


def latest(service: dict[str, Any]) -> str:
    return str(service["status"]["latestCreatedRevisionName"])


def split(service: dict[str, Any]) -> dict[str, int]:
    """Percent by revision from status.traffic (tags ignored)."""
    out: Counter[str] = Counter()
    for target in service["status"]["traffic"]:
        out[target["revisionName"]] += target.get("percent", 0)
    return {k: v for k, v in out.items() if v}


def tags(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        t["tag"]: (t["revisionName"], t["url"]) for t in service["status"]["traffic"] if "tag" in t
    }


def update_traffic(server: CloudletServer, name: str, *flags: str) -> str:
    return server.cli("run", "services", "update-traffic", name, *flags).stdout


def served_by(server: CloudletServer, host_service: str, count: int) -> Counter[str]:
    """Which revisions answered ``count`` requests to SERVICE (or TAG---SERVICE)."""
    answers: Counter[str] = Counter()
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            response = client.get(
                f"http://127.0.0.1:{server.router_port}/",
                headers={"Host": f"{host_service}.localhost:{server.router_port}"},
            )
            assert response.status_code == 200, response.text
            answers[response.text.removeprefix("hello from ").strip()] += 1
    return answers


def revisions(server: CloudletServer, service: str) -> list[str]:
    out = server.cli("run", "revisions", "list", "--service", service, "--format", "json").stdout
    return [r["metadata"]["name"] for r in json.loads(out)]


def revision_containers(server: CloudletServer, revision: str) -> list[str]:
    args = ["docker", "ps", "-q", "--filter", f"label=cloudlet.owner={server.owner}"]
    args += ["--filter", f"label=cloudlet.revision={revision}"]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()


def test_the_issue_flow_splits_tags_promotes_and_rolls_back(
    server: CloudletServer, testapp_image: str
) -> None:
    one = latest(deploy(server, "shop", testapp_image, "--set-env-vars", "V=1"))
    green = deploy(
        server, "shop", testapp_image, "--update-env-vars", "V=2", "--no-traffic", "--tag", "green"
    )
    two = latest(green)
    assert two.startswith("shop-00002-")
    assert split(green) == {one: 100}
    assert tags(green) == {"green": (two, f"http://green---shop.localhost:{server.router_port}")}
    assert served_by(server, "green---shop", 5) == {two: 5}
    assert served_by(server, "shop", 5) == {one: 5}

    out = update_traffic(server, "shop", "--to-revisions", f"{two}=10")
    assert f"90% {one}" in out and f"10% {two}" in out
    assert f"green: http://green---shop.localhost:{server.router_port}" in out
    assert split(describe(server, "shop")) == {one: 90, two: 10}

    update_traffic(server, "shop", "--to-tags", "green=50")
    assert split(describe(server, "shop")) == {one: 50, two: 50}
    assert set(served_by(server, "shop", 40)) == {one, two}

    out = update_traffic(server, "shop", "--to-latest")
    assert f"100% LATEST (currently {two})" in out
    assert served_by(server, "shop", 5) == {two: 5}

    update_traffic(server, "shop", "--to-revisions", f"{one}=100")
    rolled_back = describe(server, "shop")
    assert split(rolled_back) == {one: 100}
    assert tags(rolled_back)["green"][0] == two
    assert served_by(server, "shop", 5) == {one: 5}
    assert revisions(server, "shop") == [two, one]


def test_a_pinned_split_stays_pinned_through_deploys_until_to_latest(
    server: CloudletServer, testapp_image: str
) -> None:
    one = latest(deploy(server, "pinned", testapp_image, "--set-env-vars", "V=1"))
    update = ("run", "services", "update", "pinned", "--update-env-vars", "V=2")
    server.cli(*update, "--no-traffic", "--tag", "canary")
    two = latest(describe(server, "pinned"))
    three = latest(deploy(server, "pinned", testapp_image, "--update-env-vars", "V=3"))
    pinned = describe(server, "pinned")
    assert split(pinned) == {one: 100}
    assert tags(pinned)["canary"][0] == two
    assert served_by(server, "canary---pinned", 3) == {two: 3}
    update_traffic(server, "pinned", "--to-latest")
    assert split(describe(server, "pinned")) == {three: 100}


def test_a_90_10_split_holds_over_1000_requests_through_the_router(
    server: CloudletServer, testapp_image: str
) -> None:
    one = latest(deploy(server, "split", testapp_image, "--set-env-vars", "V=1"))
    two = latest(deploy(server, "split", testapp_image, "--update-env-vars", "V=2"))
    update_traffic(server, "split", "--to-revisions", f"{one}=90,{two}=10")
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda _: served_by(server, "split", 250), range(4)))
    answers = sum(parts, Counter())
    assert sum(answers.values()) == 1000
    # binomial(1000, 0.1): mean 100, sd 9.5; five sd either side
    assert 52 <= answers[two] <= 148, answers
    assert answers[one] + answers[two] == 1000


def test_tag_urls_always_reach_their_revision(server: CloudletServer, testapp_image: str) -> None:
    one = latest(deploy(server, "tagged", testapp_image, "--set-env-vars", "V=1"))
    two = latest(deploy(server, "tagged", testapp_image, "--update-env-vars", "V=2"))
    update_traffic(
        server, "tagged", "--to-revisions", f"{one}=50", "--update-tags", f"blue={one},green={two}"
    )
    assert served_by(server, "blue---tagged", 30) == {one: 30}
    assert served_by(server, "green---tagged", 30) == {two: 30}
    update_traffic(server, "tagged", "--remove-tags", "blue")
    assert server.request("blue---tagged").status_code == 404
    assert served_by(server, "green---tagged", 5) == {two: 5}


class SteadyLoad:
    """``threads`` clients sending requests back to back until stopped (bounded)."""

    def __init__(self, server: CloudletServer, service: str, threads: int = 8) -> None:
        self._url = f"http://127.0.0.1:{server.router_port}/"
        self._host = f"{service}.localhost:{server.router_port}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=30) as client:
            for _ in range(5000):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                self._one(client)

    def _one(self, client: httpx.Client) -> None:
        try:
            response = client.get(self._url, headers={"Host": self._host})
            outcome = (response.status_code, response.text)
        except httpx.HTTPError as exc:
            outcome = (0, repr(exc))
        with self._lock:
            if 200 <= outcome[0] < 300:
                self.answers[outcome[1].removeprefix("hello from ").strip()] += 1
            else:
                self.failures.append(f"{outcome[0]}: {outcome[1][:200]}")


def test_no_request_is_lost_while_traffic_moves_or_a_revision_deploys(
    server: CloudletServer, testapp_image: str
) -> None:
    one = latest(deploy(server, "steady", testapp_image, "--set-env-vars", "V=1"))
    two = latest(deploy(server, "steady", testapp_image, "--update-env-vars", "V=2"))
    with SteadyLoad(server, "steady") as load:
        time.sleep(1)
        update_traffic(server, "steady", "--to-revisions", f"{one}=50")  # one 50, LATEST 50
        time.sleep(1)
        three = latest(deploy(server, "steady", testapp_image, "--update-env-vars", "V=3"))
        time.sleep(1)
        update_traffic(server, "steady", "--to-revisions", f"{two}=100")
        time.sleep(1)
        update_traffic(server, "steady", "--to-latest")
        time.sleep(1)
    assert load.failures == []
    assert {one, two, three} <= set(load.answers), load.answers
    assert sum(load.answers.values()) > 100


def test_revisions_without_traffic_scale_to_zero_tagged_or_not(
    server: CloudletServer, testapp_image: str
) -> None:
    one = latest(deploy(server, "idle", testapp_image, "--set-env-vars", "V=1"))
    two = latest(deploy(server, "idle", testapp_image, "--update-env-vars", "V=2", "--no-traffic"))
    three = latest(
        deploy(
            server, "idle", testapp_image, "--update-env-vars", "V=3", "--no-traffic", "--tag", "t"
        )
    )
    assert revision_containers(server, two) or revision_containers(server, three)
    wait_for(
        lambda: not any(revision_containers(server, r) for r in (one, two, three)),
        90,
        "revisions to scale to zero",
    )
    assert served_by(server, "t---idle", 1) == {three: 1}
    assert served_by(server, "idle", 1) == {one: 1}


def test_deleting_a_revision_that_serves_or_carries_a_tag_is_refused_with_the_reason(
    server: CloudletServer, testapp_image: str
) -> None:
    one = latest(deploy(server, "keep", testapp_image, "--set-env-vars", "V=1"))
    two = latest(
        deploy(server, "keep", testapp_image, "--update-env-vars", "V=2", "--tag", "green")
    )
    update_traffic(server, "keep", "--to-revisions", f"{one}=100")
    three = latest(
        deploy(server, "keep", testapp_image, "--update-env-vars", "V=3", "--no-traffic")
    )

    done = server.cli("run", "revisions", "delete", one, "--quiet", check=False)
    assert done.returncode == 2
    assert f"revision '{one}' serves traffic (100%) for service 'keep'" in done.stderr
    done = server.cli("run", "revisions", "delete", two, "--quiet", check=False)
    assert done.returncode == 2
    assert "carries the tag green" in done.stderr
    done = server.cli("run", "revisions", "delete", three, "--quiet", check=False)
    assert done.returncode == 2
    assert "is the latest revision" in done.stderr

    update_traffic(server, "keep", "--clear-tags")
    server.cli("run", "revisions", "delete", two, "--quiet")
    listed = server.cli("run", "revisions", "list", "--service", "keep").stdout
    assert two not in listed and one in listed and three in listed
    missing = server.cli("run", "revisions", "describe", two, check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_revisions_describe_shows_image_readiness_and_settings(
    server: CloudletServer, testapp_image: str
) -> None:
    revision = latest(
        deploy(server, "shown", testapp_image, "--concurrency", "7", "--timeout", "42")
    )
    out = server.cli("run", "revisions", "describe", revision).stdout
    assert f"✔ Revision {revision}" in out
    assert "Service:      shown" in out
    assert f"Image:        {testapp_image} sha256:" in out
    assert "Ready:        True" in out
    assert "Concurrency:  7" in out and "Timeout:      42s" in out


def test_update_makes_a_new_revision_keeping_the_image_and_an_identical_one_makes_none(
    server: CloudletServer, testapp_image: str
) -> None:
    one = latest(deploy(server, "upd", testapp_image, "--set-env-vars", "MODE=slow"))
    server.cli(
        "run", "services", "update", "upd", "--update-env-vars", "MODE=fast", "--memory", "1Gi"
    )
    service = describe(server, "upd")
    two = latest(service)
    assert two != one and two.startswith("upd-00002-")
    revision = json.loads(
        server.cli("run", "revisions", "describe", two, "--format", "json").stdout
    )
    container = revision["spec"]["containers"][0]
    assert container["image"] == testapp_image
    assert container["env"] == [{"name": "MODE", "value": "fast"}]
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert server.request("upd", "/env").json()["MODE"] == "fast"

    server.cli(
        "run", "services", "update", "upd", "--memory", "1Gi", "--update-env-vars", "MODE=fast"
    )
    again = describe(server, "upd")
    assert latest(again) == two
    assert again["metadata"]["generation"] == service["metadata"]["generation"]
    listed = json.loads(
        server.cli("run", "revisions", "list", "--service", "upd", "--format", "json").stdout
    )
    assert [r["metadata"]["name"] for r in listed] == [two, one]


def failed_condition(service: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in service["status"]["conditions"] if c["type"] == "Ready")


def test_a_revision_whose_image_went_missing_fails_with_a_reason_and_traffic_stays(
    server: CloudletServer, testapp_image: str
) -> None:
    alias = f"cloudlet-test-gone-{uuid.uuid4().hex[:8]}:v1"
    subprocess.run(["docker", "tag", testapp_image, alias], check=True)
    try:
        one = latest(deploy(server, "gone", alias, "--min-instances", "1"))
    finally:
        subprocess.run(["docker", "rmi", alias], capture_output=True, check=True)
    done = server.cli("run", "services", "update", "gone", "--update-env-vars", "V=2", check=False)
    assert done.returncode == 1
    assert "not in the local Docker engine" in done.stderr
    service = describe(server, "gone")
    ready = failed_condition(service)
    assert (ready["status"], ready["reason"]) == ("False", "ContainerMissing")
    assert alias in ready["message"]
    assert service["status"]["latestReadyRevisionName"] == one
    assert split(service) == {one: 100}
    assert served_by(server, "gone", 3) == {one: 3}
    human = server.cli("run", "services", "describe", "gone").stdout
    assert "✘ Service gone" in human
    assert "ConfigurationsReady  False ContainerMissing: Revision" in human


def test_a_revision_that_crashes_at_start_fails_with_a_reason_and_traffic_stays(
    server: CloudletServer, testapp_image: str
) -> None:
    one = latest(deploy(server, "crashy", testapp_image))
    done = server.cli(
        "run",
        "deploy",
        "crashy",
        "--image",
        testapp_image,
        "--update-env-vars",
        "CRASH_AT_START=1",
        check=False,
    )
    assert done.returncode == 1
    service = describe(server, "crashy")
    ready = failed_condition(service)
    assert ready["status"] == "False" and ready["reason"]
    assert "exited with code 3" in ready["message"]
    assert split(service) == {one: 100}
    assert served_by(server, "crashy", 3) == {one: 3}
    human = server.cli("run", "services", "describe", "crashy").stdout
    assert f"100% LATEST (currently {one})" in human
    assert re.search(r"^  Ready +False \w+: Revision .* exited with code 3", human, re.M)
    listed = server.cli("run", "revisions", "list", "--service", "crashy").stdout
    assert re.search(rf"✘ +{latest(service)}", listed)


def test_env_and_label_flags_change_the_template_as_gcloud_does(
    server: CloudletServer, testapp_image: str, tmp_path: Any
) -> None:
    def template(*flags: str) -> tuple[dict[str, str], dict[str, str]]:
        server.cli("run", "services", "update", "flags", *flags)
        body = describe(server, "flags")["spec"]["template"]
        env = {e["name"]: e["value"] for e in body["spec"]["containers"][0].get("env", [])}
        return env, body["metadata"].get("labels", {})

    deploy(server, "flags", testapp_image, "--set-env-vars", "A=1,B=2", "--labels", "team=a")
    assert template("--update-env-vars", "C=3", "--remove-env-vars", "A", "--labels", "env=x") == (
        {"B": "2", "C": "3"},
        {"team": "a", "env": "x"},
    )
    assert template("--update-labels", "env=y", "--remove-labels", "team") == (
        {"B": "2", "C": "3"},
        {"env": "y"},
    )
    assert template("--set-env-vars", "D=4", "--clear-labels") == ({"D": "4"}, {})
    env_file = tmp_path / "env.yaml"
    env_file.write_text("E: 5\nF: six\n")
    assert template("--env-vars-file", str(env_file)) == ({"E": "5", "F": "six"}, {})
    assert template("--clear-env-vars") == ({}, {})
    assert len(revisions(server, "flags")) == 6
    assert server.request("flags", "/env").json().get("E") is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "no traffic configuration change requested"),
        (("--to-revisions", "LATEST=60,nosuch-00001-abc=50"), "the percents add up to 110"),
        (("--to-revisions", "nosuch-00001-abc=10"), "revision 'nosuch-00001-abc' does not exist"),
        (("--to-tags", "ghost=10"), "there is no revision tagged with [ghost]"),
        (("--to-latest", "--to-tags", "a=1"), "use at most one of"),
        (("--update-tags", "Bad=LATEST"), "--update-tags: invalid tag 'Bad'"),
    ],
)
def test_update_traffic_refuses_bad_requests_with_exit_2_and_changes_nothing(
    server: CloudletServer, testapp_image: str, flags: tuple[str, ...], message: str
) -> None:
    if server.cli("run", "services", "describe", "strict", check=False).returncode != 0:
        deploy(server, "strict", testapp_image)
    before = describe(server, "strict")
    done = server.cli("run", "services", "update-traffic", "strict", *flags, check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert describe(server, "strict")["spec"] == before["spec"]


def test_update_traffic_of_a_missing_service_says_so(server: CloudletServer) -> None:
    done = server.cli("run", "services", "update-traffic", "ghost", "--to-latest", check=False)
    assert done.returncode == 2
    assert "service 'ghost' not found" in done.stderr
