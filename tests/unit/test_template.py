"""Deploy flags applied to a Service body, as gcloud does client-side."""

import pytest

from cloudlet.cli.template import TemplateFlags, apply, new_service, parse_pairs
from cloudlet.domain.errors import InvalidError


def container(body: dict) -> dict:  # type: ignore[type-arg]
    return body["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def test_a_new_service_needs_an_image() -> None:
    with pytest.raises(InvalidError, match="--image"):
        apply(new_service("x", "default"), TemplateFlags())


def test_flags_set_the_template_fields() -> None:
    body = apply(
        new_service("x", "default"),
        TemplateFlags(
            image="img",
            port=9000,
            concurrency="10",
            timeout="10m5s",
            cpu="2",
            memory="1Gi",
            min_instances="1",
            max_instances="5",
            command="python3,app.py",
            args="-v",
        ),
    )
    spec = body["spec"]["template"]["spec"]
    assert spec["containerConcurrency"] == 10
    assert spec["timeoutSeconds"] == 605
    assert container(body)["ports"] == [{"name": "http1", "containerPort": 9000}]
    assert container(body)["resources"]["limits"] == {"cpu": "2", "memory": "1Gi"}
    assert container(body)["command"] == ["python3", "app.py"]
    annotations = body["spec"]["template"]["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/minScale"] == "1"
    assert annotations["autoscaling.knative.dev/maxScale"] == "5"


def test_deploying_a_new_image_keeps_the_other_settings() -> None:
    first = apply(
        new_service("x", "default"), TemplateFlags(image="a", memory="1Gi", set_env_vars={"A": "1"})
    )
    second = apply(first, TemplateFlags(image="b"))
    assert container(second)["image"] == "b"
    assert container(second)["env"] == [{"name": "A", "value": "1"}]
    assert container(second)["resources"]["limits"]["memory"] == "1Gi"


def test_env_flags_set_update_remove_and_clear() -> None:
    body = apply(new_service("x", "d"), TemplateFlags(image="a", set_env_vars={"A": "1", "B": "2"}))
    body = apply(body, TemplateFlags(update_env_vars={"B": "3", "C": "4"}, remove_env_vars=["A"]))
    assert container(body)["env"] == [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]
    body = apply(body, TemplateFlags(clear_env_vars=True))
    assert "env" not in container(body)


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (TemplateFlags(image="a", concurrency="5000"), "--concurrency"),
        (TemplateFlags(image="a", concurrency="many"), "--concurrency"),
        (TemplateFlags(image="a", timeout="2h"), "--timeout"),
        (TemplateFlags(image="a", memory="lots"), "--memory"),
        (TemplateFlags(image="a", cpu="fast"), "--cpu"),
        (TemplateFlags(image="a", port=70000), "--port"),
        (TemplateFlags(image="a", max_instances="-1"), "--max-instances"),
        (TemplateFlags(image="a", set_env_vars={"PORT": "1"}), "--set-env-vars"),
    ],
)
def test_bad_flag_values_name_the_flag(flags: TemplateFlags, field: str) -> None:
    with pytest.raises(InvalidError) as info:
        apply(new_service("x", "d"), flags)
    assert info.value.field == field


def test_pairs_parse_with_gcloud_delimiter_escape() -> None:
    assert parse_pairs("A=1,B=x=y", "--f") == {"A": "1", "B": "x=y"}
    assert parse_pairs("^:^A=1,2:B=3", "--f") == {"A": "1,2", "B": "3"}
    with pytest.raises(InvalidError, match="KEY=VALUE"):
        parse_pairs("A", "--set-env-vars")


def test_a_revision_suffix_names_the_revision() -> None:
    body = apply(new_service("shop", "d"), TemplateFlags(image="a", revision_suffix="v2"))
    assert body["spec"]["template"]["metadata"]["name"] == "shop-v2"
    again = apply(body, TemplateFlags(image="b"))
    assert "name" not in again["spec"]["template"]["metadata"]


def test_env_flags_leave_variables_set_from_secrets_alone() -> None:
    body = apply(
        new_service("x", "d"),
        TemplateFlags(image="a", set_env_vars={"A": "1"}, set_secrets={"TOKEN": ("tok", "1")}),
    )
    secret_env = {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "1"}}}
    body = apply(body, TemplateFlags(set_env_vars={"B": "2"}))
    assert container(body)["env"] == [{"name": "B", "value": "2"}, secret_env]
    body = apply(body, TemplateFlags(clear_env_vars=True))
    assert container(body)["env"] == [secret_env]
    with pytest.raises(InvalidError, match="TOKEN is set from a secret") as caught:
        apply(body, TemplateFlags(update_env_vars={"TOKEN": "plain"}))
    assert caught.value.field == "--update-env-vars"
