"""Probe flags as gcloud parses them, the settings the autoscaler follows, and the liveness
loop's counting, driven by a fake sleep."""

from __future__ import annotations

from typing import Any, cast

import pytest

from cloudlet.autoscaler.probe import (
    InstanceFailed,
    poll_interval,
    state_check_interval,
    until_unhealthy,
    wait_ready,
)
from cloudlet.cli.template import TemplateFlags, apply, new_service
from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import Probe
from cloudlet.domain.probes import (
    ProbeSettings,
    default_startup_probe,
    parse_probe_flag,
    probe_settings,
)
from cloudlet.runtimes.base import ExitState, InstanceInfo, Runtime

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


# -- startup probing: how often, driven by a fake clock -----------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "interval"),
    [(0.0, 0.005), (0.2, 0.005), (0.4, 0.01), (1.0, 0.025), (4.0, 0.1), (10.0, 0.25), (99, 0.25)],
)
def test_startup_probes_every_5ms_then_a_fortieth_of_the_wait_up_to_250ms(
    elapsed: float, interval: float
) -> None:
    assert poll_interval(elapsed) == pytest.approx(interval)


@pytest.mark.parametrize(
    ("elapsed", "interval"),
    [(0.0, 0.1), (0.4, 0.1), (1.0, 0.25), (2.0, 0.5), (4.0, 1.0), (60, 1.0)],
)
def test_container_state_is_checked_every_100ms_then_a_quarter_of_the_wait_up_to_1s(
    elapsed: float, interval: float
) -> None:
    assert state_check_interval(elapsed) == pytest.approx(interval)


class SlowStart:
    """An app that listens ``listens_at`` seconds after its container started, on a fake
    clock that only sleeping moves; counts probes and container state checks."""

    def __init__(self, listens_at: float, exits_at: float | None = None) -> None:
        self.now = 0.0
        self.listens_at, self.exits_at = listens_at, exits_at
        self.probes = self.state_checks = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds

    async def probe(self, host: str, port: int) -> bool:
        self.probes += 1
        return self.now >= self.listens_at

    async def state(self, instance_id: str) -> ExitState:
        self.state_checks += 1
        exited = self.exits_at is not None and self.now >= self.exits_at
        return ExitState(running=not exited, exit_code=3 if exited else None)

    async def logs_tail(self, instance_id: str, lines: int = 20) -> str:
        return "boom\n"

    async def wait(self) -> None:
        runtime = cast(Runtime, self)  # only state and logs_tail are called
        await wait_ready(runtime, INFO, 8080, 240, self.probe, self.clock, sleep=self.sleep)


@pytest.mark.parametrize(
    ("listens_at", "most_probes", "most_state_checks"),
    # a probe every 5 ms and a state check every 100 ms would be 200/10 at 1 s, 460/43 at 5 s
    [(0.05, 12, 1), (0.3, 60, 3), (1.0, 110, 8), (5.0, 180, 15), (30.0, 300, 40)],
)
async def test_a_slow_start_costs_few_probes_and_is_seen_within_3_percent(
    listens_at: float, most_probes: int, most_state_checks: int
) -> None:
    app = SlowStart(listens_at)
    await app.wait()
    assert listens_at <= app.now <= max(listens_at * 1.03, listens_at + 0.005)
    assert app.probes <= most_probes
    assert app.state_checks <= most_state_checks


async def test_an_exit_while_starting_is_noticed_within_a_quarter_of_the_wait() -> None:
    app = SlowStart(listens_at=99.0, exits_at=2.0)
    with pytest.raises(InstanceFailed) as failed:
        await app.wait()
    assert failed.value.reason == "ExitCode"
    assert "exited with code 3" in failed.value.message and "boom" in failed.value.message
    assert 2.0 <= app.now <= 2.5
