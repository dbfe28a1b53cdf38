"""Logs, metrics and billing end to end: a real server, real dockerd, real requests."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from cloudlet.telemetry.billing import busy_spans
from tests.conftest import CloudletServer, wait_for

pytestmark = pytest.mark.docker
BASE = "/apis/cloudlet.dev/v1/namespaces/default"


def deploy(server: CloudletServer, name: str, image: str, *flags: str) -> None:
    server.cli("run", "deploy", name, "--image", image, "--allow-unauthenticated", *flags)


def read_logs(server: CloudletServer, service: str, *args: str) -> list[dict[str, Any]]:
    done = server.cli(
        "run", "services", "logs", "read", service, "--limit", "500", "--format", "json", *args
    )
    entries: list[dict[str, Any]] = json.loads(done.stdout)
    return entries


def api(server: CloudletServer, path: str, **params: str) -> Any:
    token = (server.home / "token").read_text().strip()
    response = httpx.get(
        server.api + path, params=params, headers={"Authorization": f"Bearer {token}"}
    )
    response.raise_for_status()
    return response.json() if "json" in response.headers["content-type"] else response.text


def events(entries: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e["jsonPayload"] for e in entries if e.get("jsonPayload", {}).get("event") == kind]


def stamp(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


def test_logs_read_shows_app_lines_and_request_entries_newest_first(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "chatty", testapp_image)
    assert server.request("chatty", "/sleep?ms=50").status_code == 200
    assert server.request("chatty", "/status?code=500").status_code == 500
    entries = read_logs(server, "chatty")
    assert [stamp(e) for e in entries] == sorted((stamp(e) for e in entries), reverse=True)
    app = [e for e in entries if e["logName"] == "run.googleapis.com/stdout"]
    assert any(e["jsonPayload"]["message"] == "GET /sleep?ms=50 200" for e in app)
    assert all(e["severity"] == "INFO" for e in app)
    requests = {e["httpRequest"]["requestUrl"]: e for e in entries if "httpRequest" in e}
    slept = requests["/sleep?ms=50"]
    assert slept["httpRequest"]["status"] == 200
    assert float(slept["httpRequest"]["latency"].rstrip("s")) >= 0.05
    assert slept["labels"]["instanceId"] == server.containers("chatty")[0]
    assert requests["/status?code=500"]["severity"] == "ERROR"
    errors = read_logs(server, "chatty", "--log-filter", "severity>=ERROR")
    assert errors and all(e["severity"] in ("ERROR", "CRITICAL") for e in errors)
    text = server.cli("run", "services", "logs", "read", "chatty", "--limit", "5").stdout
    assert "GET 500 /status?code=500" in text


def test_a_bad_filter_is_a_usage_error(server: CloudletServer) -> None:
    done = server.cli(
        "run", "services", "logs", "read", "chatty", "--log-filter", "severity>=LOUD", check=False
    )
    assert done.returncode == 2
    assert "unknown severity 'LOUD'" in done.stderr


def test_tail_follows_new_entries(server: CloudletServer, testapp_image: str) -> None:
    deploy(server, "followed", testapp_image)
    tail = subprocess.Popen(
        [sys.executable, "-m", "cloudlet", "beta", "run", "services", "logs", "tail", "followed"],
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stderr is not None and "Tailing logs" in tail.stderr.readline()
        assert server.request("followed", "/sleep?ms=1&marker=tail").status_code == 200
        assert tail.stdout is not None
        seen = []
        while not any("GET 200 /sleep?ms=1&marker=tail" in line for line in seen):
            seen.append(tail.stdout.readline())  # the app's line, then the request's
            assert len(seen) < 10 and seen[-1], seen
    finally:
        tail.terminate()
        tail.wait(10)


def test_platform_events_explain_why_instances_came_and_went(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "eventful", testapp_image)
    wait_for(lambda: not server.containers("eventful"), 60, "scale to zero")
    wait_for(lambda: events(read_logs(server, "eventful"), "instance.stopped"), 10, "the event")
    entries = read_logs(server, "eventful")
    assert events(entries, "revision.ready")
    assert events(entries, "instance.started")
    [ready] = events(entries, "instance.ready")
    assert 0 < ready["startupSeconds"] < 240
    assert "cold start took" in ready["message"]
    [scaled] = events(entries, "revision.scaled")
    assert (scaled["current"], scaled["desired"]) == (1, 0)
    [stopped] = events(entries, "instance.stopped")
    assert "scale to zero" in stopped["reason"]


def test_a_crash_at_start_is_logged_as_an_error_from_stderr(
    server: CloudletServer, testapp_image: str
) -> None:
    done = server.cli(
        "run",
        "deploy",
        "crashy",
        "--image",
        testapp_image,
        "--set-env-vars",
        "CRASH_AT_START=1",
        check=False,
    )
    assert done.returncode == 1
    wait_for(
        lambda: any(
            "CRASH_AT_START" in e.get("textPayload", "") for e in read_logs(server, "crashy")
        ),
        10,
        "the stderr line",
    )
    [line] = [
        e for e in read_logs(server, "crashy") if "CRASH_AT_START" in e.get("textPayload", "")
    ]
    assert (line["severity"], line["logName"]) == ("ERROR", "run.googleapis.com/stderr")
    [stopped] = events(read_logs(server, "crashy"), "instance.stopped")
    assert "failed to start" in stopped["reason"]


def test_metrics_expose_the_series(server: CloudletServer, testapp_image: str) -> None:
    deploy(server, "measured", testapp_image)
    assert server.request("measured", "/").status_code == 200
    counted = 'cloudlet_requests_total{service="measured",revision="measured-00001-'
    wait_for(lambda: counted in api(server, "/metrics"), 5, "the batch to reach the counters")
    text = api(server, "/metrics")
    for series in (
        'cloudlet_requests_total{service="measured",revision="measured-00001-',
        "cloudlet_request_latency_seconds_bucket{",
        'cloudlet_instances{service="measured"',
        'state="starting"',
        'state="throttled"',
        'state="draining"',
        "cloudlet_requests_in_flight{",
        "cloudlet_queue_depth{",
        'cloudlet_cold_starts_total{service="measured"',
        "cloudlet_startup_latency_seconds_bucket{",
        "cloudlet_billable_instance_seconds_total",
    ):
        assert series in text, series
    described = server.cli("run", "services", "describe", "measured").stdout
    assert "Last 5 minutes:" in described
    assert "1 now, 1 cold starts" in described


def _request_intervals(server: CloudletServer, service: str, since: float) -> list[Any]:
    entries = read_logs(server, service, "--log-filter", 'logName="run.googleapis.com/requests"')
    intervals = []
    for e in entries:
        start = stamp(e)
        if start >= since:
            intervals.append((start, start + float(e["httpRequest"]["latency"].rstrip("s"))))
    return intervals


def test_the_meter_matches_the_request_log_and_the_report_adds_it_up(
    make_server: Any, testapp_image: str
) -> None:
    srv = make_server([])  # default scaling: the instance stays up for the whole test
    srv.start()
    deploy(srv, "metered", testapp_image, "--max-instances", "3", "--memory", "512Mi")
    time.sleep(0.5)
    since = time.time()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for pair in (("300", "150"), ("200", "400")):  # overlapping pairs
            list(pool.map(lambda ms: srv.request("metered", f"/sleep?ms={ms}"), pair))
            time.sleep(0.6)  # an idle gap
    for ms in ("120", "250"):
        srv.request("metered", f"/sleep?ms={ms}")
        time.sleep(0.6)
    expected = busy_spans(_request_intervals(srv, "metered", since))
    metered = [
        (s["start"], s["end"])
        for s in api(srv, BASE + "/billing/spans", service="metered")["spans"]
        if s["start"] >= since - 0.05
    ]
    assert len(metered) == len(expected) == 4, (metered, expected)
    for (start, end), (want_start, want_end) in zip(sorted(metered), expected, strict=True):
        assert abs(start - want_start) < 0.1 and abs(end - want_end) < 0.1

    report = json.loads(srv.cli("billing", "report", "--format", "json").stdout)
    [row] = [r for r in report["rows"] if r["service"] == "metered"]
    spans = api(srv, BASE + "/billing/spans", service="metered")["spans"]
    billable = sum(s["billable"] for s in spans)
    assert row["requests"] == 6
    assert row["vcpu_seconds"] == pytest.approx(billable, abs=0.2)  # a span may still grow
    assert row["gib_seconds"] == pytest.approx(billable / 2, abs=0.1)
    assert row["mode"] == "request"
    assert row["ceiling_per_hour"] == pytest.approx(3 * 3600 * (0.000024 + 0.5 * 0.0000025))
    assert report["cost_after_free_tier"] == 0
    csv_text = srv.cli("billing", "report", "--format", "csv", "--service", "metered").stdout
    assert csv_text.splitlines()[0].startswith("service,revision,mode,billable_seconds")

    srv.stop()  # logs and usage survive a restart
    srv.start()
    assert _request_intervals(srv, "metered", since)
    again = json.loads(srv.cli("billing", "report", "--format", "json").stdout)
    [row_again] = [r for r in again["rows"] if r["service"] == "metered"]
    assert row_again["requests"] == 6
    assert row_again["vcpu_seconds"] >= row["vcpu_seconds"] - 0.2
