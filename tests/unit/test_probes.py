"""Probe flags as gcloud parses them, the settings the autoscaler follows, and the liveness
loop's counting, driven by a fake sleep."""

from __future__ import annotations

from typing import Any

import pytest

from cloudlet.autoscaler.probe import until_unhealthy
from cloudlet.cli.template import TemplateFlags, apply, new_service
from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import Probe
from cloudlet.domain.probes import (
    ProbeSettings,
    default_startup_probe,
    parse_probe_flag,
    probe_settings,
)
from cloudlet.runtimes.base import InstanceInfo

INFO = InstanceInfo("i1", "svc", "svc-00001-abc", "10.0.0.2", 8080)


@pytest.mark.parametrize(
    ("text", "kind", "wanted"),
    [
        (
            "httpGet.path=/ready,httpGet.port=8080,initialDelaySeconds=0,timeoutSeconds=1,"
            "periodSeconds=5,failureThreshold=3",
            "startup",
            {
                "httpGet": {"path": "/ready", "port": 8080},
                "initialDelaySeconds": 0,
                "timeoutSeconds": 1,
                "periodSeconds": 5,
                "failureThreshold": 3,
            },
        ),
        ("tcpSocket.port=8080", "startup", {"tcpSocket": {"port": 8080}}),
        ("httpGet.path=/healthz", "liveness", {"httpGet": {"path": "/healthz"}}),
        ("periodSeconds=2", "liveness", {"periodSeconds": 2}),
        ("", "liveness", None),
    ],
)
def test_probe_flags_become_knative_probes(text: str, kind: Any, wanted: Any) -> None:
    assert parse_probe_flag(text, kind) == wanted


@pytest.mark.parametrize(
    ("text", "kind", "named"),
    [
        ("tcpSocket.port=8080", "liveness", "key [tcpSocket.port] not recognized"),
        ("grpc.port=9000", "startup", "key [grpc.port] not recognized"),
        ("periodSeconds=five", "startup", "[periodSeconds] must be a whole number"),
        ("httpGet.port=-1", "liveness", "[httpGet.port] must be a whole number"),
        ("periodSeconds", "startup", "is not KEY=VALUE"),
        ("httpGet.path=/,tcpSocket.port=1", "startup", "not both"),
    ],
)
def test_bad_probe_flags_are_refused_naming_the_flag_and_key(
    text: str, kind: Any, named: str
) -> None:
    with pytest.raises(InvalidError) as caught:
        parse_probe_flag(text, kind)
    assert f"--{kind}-probe" in caught.value.message
    assert named in caught.value.message


def test_deploy_flags_set_and_remove_probes_on_the_container() -> None:
    flags = TemplateFlags(image="img", startup_probe="tcpSocket.port=9000")
    flags.liveness_probe = "httpGet.path=/live,periodSeconds=2"
    body = apply(new_service("svc", "default"), flags)
    container = body["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"] == {"tcpSocket": {"port": 9000}}
    assert container["livenessProbe"] == {"httpGet": {"path": "/live"}, "periodSeconds": 2}
    cleared = apply(body, TemplateFlags(liveness_probe=""))
    assert "livenessProbe" not in cleared["spec"]["template"]["spec"]["containers"][0]
    assert "startupProbe" in cleared["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("probe", "wanted"),
    [
        (None, None),
        (
            {"httpGet": {"path": "/ready"}},
            ProbeSettings("http", 8080, "/ready", 0.0, 1.0, 10.0, 3),
        ),
        (
            {"tcpSocket": {"port": 9000}, "periodSeconds": 2, "failureThreshold": 5},
            ProbeSettings("tcp", 9000, "/", 0.0, 1.0, 2.0, 5),
        ),
        ({"timeoutSeconds": 3}, ProbeSettings("tcp", 8080, "/", 0.0, 3.0, 10.0, 3)),
    ],
)
def test_probes_get_cloud_runs_defaults_and_the_container_port(
    probe: dict[str, Any] | None, wanted: ProbeSettings | None
) -> None:
    model = Probe.model_validate(probe) if probe is not None else None
    assert probe_settings(model, 8080) == wanted


@pytest.mark.parametrize(
    ("settings", "deadline"),
    [
        (default_startup_probe(8080), 240.0),
        (ProbeSettings("http", 8080, "/", 0.0, 1.0, 5.0, 3), 15.0),
        (ProbeSettings("tcp", 8080, "/", 4.0, 1.0, 1.0, 2), 6.0),
    ],
)
def test_startup_deadline_is_240s_or_delay_plus_threshold_times_period(
    settings: ProbeSettings, deadline: float
) -> None:
    assert settings.deadline == deadline


class Script:
    """A liveness check answering from a list, and a sleep that only records."""

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.slept: list[float] = []
        self.checks = 0

    async def check(self, host: str, port: int) -> bool:
        self.checks += 1
        return self.answers.pop(0)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.mark.parametrize(
    ("answers", "checks"),
    [
        ([False, False, False], 3),
        ([True, False, False, True, False, False, False], 7),
        ([False, True, False, True, False, False, False], 7),
    ],
)
async def test_liveness_gives_up_after_threshold_failures_in_a_row(
    answers: list[bool], checks: int
) -> None:
    script = Script(answers)
    settings = ProbeSettings("http", 8080, "/live", 5.0, 1.0, 2.0, 3)
    failures = await until_unhealthy(INFO, settings, script.check, script.sleep)
    assert (failures, script.checks) == (3, checks)
    assert script.slept == [5.0] + [2.0] * checks
