"""The service use-cases over a real SQLite store."""

from pathlib import Path
from typing import Any

import pytest

from cloudlet.controlplane.services import ServiceManager, Urls
from cloudlet.domain.errors import AlreadyExistsError, ConflictError, InvalidError, NotFoundError
from cloudlet.store import Store


def service(name: str = "hello", image: str = "hello-img", **spec: Any) -> dict[str, Any]:
    template: dict[str, Any] = {"spec": {"containers": [{"image": image}], **spec}}
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"template": template},
    }


@pytest.fixture
def manager(tmp_path: Path) -> ServiceManager:
    return ServiceManager(Store(tmp_path / "db.sqlite"), Urls("localhost", 8080), clock=lambda: 1e9)


def revisions(manager: ServiceManager, name: str = "hello") -> list[str]:
    return [r["metadata"]["name"] for r in manager.list_revisions("default", name)]


def test_creating_a_service_makes_its_first_revision_and_url(manager: ServiceManager) -> None:
    body = manager.create_service("default", service())
    assert body["status"]["url"] == "http://hello.localhost:8080"
    assert body["status"]["latestCreatedRevisionName"].startswith("hello-00001-")
    assert body["metadata"]["generation"] == 1
    assert len(revisions(manager)) == 1


def test_defaults_are_filled_in_as_cloud_run_does(manager: ServiceManager) -> None:
    spec = manager.create_service("default", service())["spec"]["template"]["spec"]
    assert spec["containerConcurrency"] == 80
    assert spec["timeoutSeconds"] == 300
    assert spec["containers"][0]["ports"] == [{"name": "http1", "containerPort": 8080}]
    assert spec["containers"][0]["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}


def test_a_new_service_is_not_ready_until_its_revision_is(manager: ServiceManager) -> None:
    body = manager.create_service("default", service())
    ready = body["status"]["conditions"][0]
    assert (ready["type"], ready["status"]) == ("Ready", "Unknown")
    manager.set_revision_status("default", body["status"]["latestCreatedRevisionName"], "True")
    after = manager.get_service("default", "hello")
    assert after["status"]["conditions"][0]["status"] == "True"
    assert after["status"]["traffic"] == [
        {
            "revisionName": body["status"]["latestCreatedRevisionName"],
            "percent": 100,
            "latestRevision": True,
        }
    ]


def test_replacing_with_the_same_template_makes_no_new_revision(manager: ServiceManager) -> None:
    manager.create_service("default", service())
    manager.replace_service("default", "hello", service())
    assert len(revisions(manager)) == 1


def test_a_template_change_makes_a_new_numbered_revision(manager: ServiceManager) -> None:
    manager.create_service("default", service())
    body = manager.replace_service("default", "hello", service(image="hello-img:v2"))
    assert body["status"]["latestCreatedRevisionName"].startswith("hello-00002-")
    assert body["metadata"]["generation"] == 2
    assert len(revisions(manager)) == 2


def test_a_failed_revision_keeps_traffic_on_the_last_ready_one(manager: ServiceManager) -> None:
    first = manager.create_service("default", service())["status"]["latestCreatedRevisionName"]
    manager.set_revision_status("default", first, "True")
    second = manager.replace_service("default", "hello", service(image="missing"))
    name = second["status"]["latestCreatedRevisionName"]
    manager.set_revision_status("default", name, "False", "ContainerMissing", "image not found")
    body = manager.get_service("default", "hello")
    assert body["status"]["latestReadyRevisionName"] == first
    assert body["status"]["traffic"][0]["revisionName"] == first
    config = body["status"]["conditions"][1]
    assert (config["status"], config["reason"]) == ("False", "ContainerMissing")
    assert "image not found" in config["message"]


def test_a_duplicate_service_is_refused(manager: ServiceManager) -> None:
    manager.create_service("default", service())
    with pytest.raises(AlreadyExistsError):
        manager.create_service("default", service())


def test_a_name_taken_in_another_namespace_is_refused(manager: ServiceManager) -> None:
    manager.create_service("default", service())
    with pytest.raises(AlreadyExistsError, match="per machine"):
        manager.create_service("other", service())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (service(name="Bad_Name"), "metadata.name"),
        (service(containerConcurrency=5000), "spec.template.spec.containerConcurrency"),
        (service(timeoutSeconds=0), "spec.template.spec.timeoutSeconds"),
        ({"metadata": {"name": "x"}}, "spec"),
        ([], "body"),
    ],
)
def test_bad_input_names_the_field_and_stores_nothing(
    manager: ServiceManager, body: Any, field: str
) -> None:
    with pytest.raises(InvalidError) as info:
        manager.create_service("default", body)
    assert info.value.field == field
    assert manager.list_services(None) == []
    assert manager.list_revisions(None) == []


def test_unsupported_fields_are_refused_by_name(manager: ServiceManager) -> None:
    body = service()
    body["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {}}
    with pytest.raises(InvalidError, match="readinessProbe"):
        manager.create_service("default", body)


def test_a_stale_resource_version_is_a_conflict(manager: ServiceManager) -> None:
    created = manager.create_service("default", service())
    stale = service(image="v2")
    stale["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    manager.replace_service("default", "hello", stale)
    with pytest.raises(ConflictError):
        manager.replace_service(
            "default", "hello", stale | {"spec": service("hello", "v3")["spec"]}
        )


def test_deleting_a_service_removes_its_revisions(manager: ServiceManager) -> None:
    manager.create_service("default", service())
    manager.delete_service("default", "hello")
    assert manager.list_revisions(None) == []
    with pytest.raises(NotFoundError):
        manager.get_service("default", "hello")


def test_a_revision_serving_traffic_cannot_be_deleted(manager: ServiceManager) -> None:
    first = manager.create_service("default", service())["status"]["latestCreatedRevisionName"]
    manager.set_revision_status("default", first, "True")
    manager.replace_service("default", "hello", service(image="v2"))
    with pytest.raises(ConflictError, match="serves traffic"):
        manager.delete_revision("default", first)


def test_an_old_revision_without_traffic_can_be_deleted(manager: ServiceManager) -> None:
    first = manager.create_service("default", service())["status"]["latestCreatedRevisionName"]
    manager.set_revision_status("default", first, "True")
    second = manager.replace_service("default", "hello", service(image="v2"))
    manager.set_revision_status("default", second["status"]["latestCreatedRevisionName"], "True")
    manager.delete_revision("default", first)
    assert first not in revisions(manager)


def test_listeners_hear_about_every_change(manager: ServiceManager) -> None:
    heard: list[tuple[str, str]] = []
    manager.subscribe(lambda ns, name: heard.append((ns, name)))
    manager.create_service("default", service())
    manager.delete_service("default", "hello")
    assert heard == [("default", "hello"), ("default", "hello")]


def test_the_invoker_policy_makes_a_service_public(manager: ServiceManager) -> None:
    manager.create_service("default", service())
    assert not manager.is_public("default", "hello")
    manager.set_policy(
        "default", "hello", {"bindings": [{"role": "roles/run.invoker", "members": ["allUsers"]}]}
    )
    assert manager.is_public("default", "hello")


def test_a_malformed_policy_member_is_refused(manager: ServiceManager) -> None:
    manager.create_service("default", service())
    with pytest.raises(InvalidError, match="members"):
        manager.set_policy(
            "default",
            "hello",
            {"bindings": [{"role": "roles/run.invoker", "members": ["everyone"]}]},
        )


def test_derived_status_times_change_only_when_something_changes(tmp_path: Path) -> None:
    now = [1e9]
    manager = ServiceManager(
        Store(tmp_path / "db.sqlite"), Urls("localhost", 8080), clock=lambda: now[0]
    )
    revision = manager.create_service("default", service())["status"]["latestCreatedRevisionName"]
    now[0] += 10
    manager.set_revision_status("default", revision, "True")
    now[0] += 100
    first = manager.get_service("default", "hello")
    now[0] += 100
    manager.set_revision_status("default", revision, "True")  # the same verdict, reported again
    second = manager.get_service("default", "hello")
    assert first["status"] == second["status"]
    assert first["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]
    times = {c["type"]: c["lastTransitionTime"] for c in second["status"]["conditions"]}
    assert times == dict.fromkeys(("Ready", "ConfigurationsReady", "RoutesReady"), times["Ready"])
    assert times["Ready"] == "2001-09-09T01:46:50.000000Z"  # when the revision became ready
    now[0] += 50
    manager.set_revision_status("default", revision, "False", "ExitCode", "exited with code 1")
    failed = manager.get_service("default", "hello")["status"]["conditions"][0]
    assert (failed["status"], failed["lastTransitionTime"]) == (
        "False",
        "2001-09-09T01:51:00.000000Z",
    )


def test_replacing_a_service_with_itself_writes_nothing(manager: ServiceManager) -> None:
    created = manager.create_service("default", service())
    again = manager.replace_service("default", "hello", service())
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert again["metadata"]["generation"] == 1
    changed = manager.replace_service("default", "hello", service(containerConcurrency=5))
    assert int(changed["metadata"]["resourceVersion"]) > int(again["metadata"]["resourceVersion"])
    assert changed["metadata"]["generation"] == 2


def test_a_new_revision_naming_a_missing_secret_is_refused_and_nothing_is_stored(
    manager: ServiceManager,
) -> None:
    known = {("tok", "1"), ("tok", "latest")}

    def check(namespace: str, name: str, version: str) -> None:
        if (name, version) not in known:
            raise NotFoundError(f"secret {name!r} has no version {version!r}", field="version")

    manager.check_secret = check
    env = [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "2"}}}]
    body = service()
    body["spec"]["template"]["spec"]["containers"][0]["env"] = env
    with pytest.raises(InvalidError, match="has no version '2'") as caught:
        manager.create_service("default", body)
    assert caught.value.field == "spec.template.spec.containers[0].env[0].valueFrom.secretKeyRef"
    assert manager.list_services("default") == []
    env[0]["valueFrom"]["secretKeyRef"]["key"] = "1"
    assert manager.create_service("default", body)["metadata"]["generation"] == 1
