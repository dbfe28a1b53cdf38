"""`cloudlet run ...`: deploy, services and revisions, as in `gcloud run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from cloudlet.cli import render
from cloudlet.cli.builds import image_for_deploy
from cloudlet.cli.client import ApiError, Client
from cloudlet.cli.deploy import deploy, edit_binding, summary, wait_ready
from cloudlet.cli.logs import logs_group, recent_traffic_lines
from cloudlet.cli.options import DEFAULT_REGION, common, namespace
from cloudlet.cli.template import TemplateFlags, parse_pairs
from cloudlet.cli.traffic import rows_of, traffic_lines, update_traffic_command
from cloudlet.security.flags import parse_secret_refs, parse_secret_removals, secret_file_lines


@click.group("run")
def run_group() -> None:
    """Manage services, revisions and traffic (gcloud run)."""


def template_options(func: Any) -> Any:
    """The revision-template flags shared by `deploy` and `services update`."""
    options = [
        click.option("--image", help="Container image to deploy (a local image name)."),
        click.option("--port", type=int, help="Port the container listens on (default 8080)."),
        click.option(
            "--concurrency", help="Max concurrent requests per instance (1-1000, default 80)."
        ),
        click.option(
            "--timeout",
            help="Request timeout: seconds or a duration like 10m5s (default 300s, max 3600s).",
        ),
        click.option("--cpu", help="CPU limit per instance: 1, 2, 0.5 or 500m (default 1)."),
        click.option(
            "--memory", help="Memory limit per instance, e.g. 512Mi, 1Gi (default 512Mi)."
        ),
        click.option("--min-instances", help="Instances kept even when idle (default 0)."),
        click.option("--max-instances", help="Upper bound on instances (default 100)."),
        click.option("--command", help="Entrypoint, comma-separated."),
        click.option("--args", help="Arguments, comma-separated."),
        click.option("--set-env-vars", help="Replace all env vars: KEY=VALUE,..."),
        click.option("--update-env-vars", help="Add or change env vars: KEY=VALUE,..."),
        click.option("--remove-env-vars", help="Remove env vars: KEY,..."),
        click.option("--clear-env-vars", is_flag=True, help="Remove all env vars."),
        click.option(
            "--env-vars-file",
            type=click.Path(exists=True, dir_okay=False),
            help="YAML file of KEY: VALUE to set as all env vars.",
        ),
        click.option("--labels", help="Add or change labels: KEY=VALUE,... (= --update-labels)."),
        click.option("--update-labels", help="Add or change labels."),
        click.option("--remove-labels", help="Remove labels: KEY,..."),
        click.option("--clear-labels", is_flag=True, help="Remove all labels."),
        click.option("--revision-suffix", help="Name the new revision SERVICE-SUFFIX."),
        click.option(
            "--cpu-throttling/--no-cpu-throttling",
            default=None,
            help="Throttle CPU of idle instances (default on).",
        ),
        click.option(
            "--cpu-boost/--no-cpu-boost",
            default=None,
            help="Double CPU while an instance starts (default on).",
        ),
        click.option(
            "--startup-probe",
            help="Startup probe, KEY=VALUE,...: httpGet.path=/ready,httpGet.port=8080 or "
            "tcpSocket.port=8080, initialDelaySeconds, timeoutSeconds, periodSeconds, "
            'failureThreshold ("" removes it).',
        ),
        click.option(
            "--liveness-probe",
            help="Liveness probe, KEY=VALUE,...: httpGet.path, httpGet.port, "
            'initialDelaySeconds, timeoutSeconds, periodSeconds, failureThreshold ("" removes it).',
        ),
        click.option(
            "--set-secrets",
            help="Replace all secret env vars and files: ENV=SECRET:VERSION or "
            "/DIR/FILE=SECRET:VERSION (a read-only file), ... (VERSION a number or latest; "
            "`cloudlet secrets create` makes secrets).",
        ),
        click.option(
            "--update-secrets",
            help="Add or change secret env vars and files: ENV=SECRET:VERSION, "
            "/DIR/FILE=SECRET:VERSION",
        ),
        click.option("--remove-secrets", help="Remove secret env vars and files: ENV,/DIR/FILE"),
        click.option("--clear-secrets", is_flag=True, help="Remove all secret env vars and files."),
        click.option(
            "--ingress",
            type=click.Choice(["all", "internal"]),
            help="all: anyone who can reach the router; internal: only this machine and "
            "Cloudlet instances (others get 404).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _env_file(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise click.BadParameter(
            "expected a YAML mapping of NAME: VALUE", param_hint="--env-vars-file"
        )
    return {str(k): str(v) for k, v in data.items()}


def flags_from(opts: dict[str, Any]) -> TemplateFlags:
    def pairs(key: str) -> dict[str, str] | None:
        value = opts.get(key)
        return parse_pairs(value, "--" + key.replace("_", "-")) if value is not None else None

    def names(key: str) -> list[str]:
        return [n for n in (opts.get(key) or "").split(",") if n]

    def secret_refs(key: str) -> dict[str, tuple[str, str]] | None:
        value = opts.get(key)
        return parse_secret_refs(value, "--" + key.replace("_", "-")) if value else None

    set_env = pairs("set_env_vars")
    file_env = _env_file(opts.get("env_vars_file"))
    return TemplateFlags(
        image=opts.get("image"),
        port=opts.get("port"),
        concurrency=opts.get("concurrency"),
        timeout=opts.get("timeout"),
        cpu=opts.get("cpu"),
        memory=opts.get("memory"),
        min_instances=opts.get("min_instances"),
        max_instances=opts.get("max_instances"),
        command=opts.get("command"),
        args=opts.get("args"),
        set_env_vars=file_env if file_env is not None else set_env,
        update_env_vars=pairs("update_env_vars") or {},
        remove_env_vars=names("remove_env_vars"),
        clear_env_vars=bool(opts.get("clear_env_vars")),
        labels=pairs("labels"),
        update_labels=pairs("update_labels") or {},
        remove_labels=names("remove_labels"),
        clear_labels=bool(opts.get("clear_labels")),
        revision_suffix=opts.get("revision_suffix"),
        cpu_throttling=opts.get("cpu_throttling"),
        cpu_boost=opts.get("cpu_boost"),
        startup_probe=opts.get("startup_probe"),
        liveness_probe=opts.get("liveness_probe"),
        set_secrets=secret_refs("set_secrets"),
        update_secrets=secret_refs("update_secrets") or {},
        remove_secrets=parse_secret_removals(opts.get("remove_secrets") or ""),
        clear_secrets=bool(opts.get("clear_secrets")),
        ingress=opts.get("ingress"),
    )


@run_group.command("deploy")
@click.argument("service")
@template_options
@click.option(
    "--allow-unauthenticated/--no-allow-unauthenticated",
    default=None,
    help="Let anyone invoke the service (allUsers gets roles/run.invoker).",
)
@click.option(
    "--no-traffic",
    is_flag=True,
    help="Keep traffic where it is; the new revision "
    "gets none until `services update-traffic --to-latest`.",
)
@click.option("--tag", help="Give the new revision a tag URL: TAG---SERVICE.DOMAIN.")
@click.option("--async", "run_async", is_flag=True, help="Return without waiting for readiness.")
@click.option(
    "--source",
    help="Build this folder (its Dockerfile, or one generated for a detected Python app) "
    "and deploy the image; instead of --image.",
)
@common
def deploy_command(
    service: str,
    allow_unauthenticated: bool | None,
    no_traffic: bool,
    tag: str | None,
    run_async: bool,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
    **opts: Any,
) -> None:
    """Deploy an image to SERVICE, creating it or a new revision of it."""
    client = Client.from_env()
    source = opts.pop("source")
    opts["image"] = image_for_deploy(client, namespace(project), service, opts["image"], source)
    result = deploy(
        client,
        namespace(project),
        region or DEFAULT_REGION,
        service,
        flags_from(opts),
        allow_unauthenticated=allow_unauthenticated,
        no_traffic=no_traffic,
        tag=tag,
        wait=not run_async,
    )
    if not render.emit(result, fmt):
        render.out.print("Done." if not run_async else "Deployment started.")
        if not run_async:
            render.out.print(summary(result))


@run_group.group("services")
def services_group() -> None:
    """List, describe, update and delete services."""


services_group.add_command(update_traffic_command)
services_group.add_command(logs_group)


@services_group.command("list")
@common
def services_list(
    project: str | None, region: str | None, platform: str, fmt: str | None, quiet: bool
) -> None:
    """List services."""
    client = Client.from_env()
    items = client.request("GET", client.service_path(namespace(project)))
    services = items["items"]
    if render.emit(services, fmt):
        return
    if not services:
        render.err.print("Listed 0 items.")
        return
    rows = [
        [
            render.ready_mark(s),
            s["metadata"]["name"],
            region or DEFAULT_REGION,
            s.get("status", {}).get("url", ""),
            s.get("status", {}).get("latestReadyRevisionName", "-"),
            s["metadata"].get("creationTimestamp", ""),
        ]
        for s in services
    ]
    render.table(["", "SERVICE", "REGION", "URL", "LATEST REVISION", "CREATED"], rows)


@services_group.command("describe")
@click.argument("service")
@common
def services_describe(
    service: str,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Show a service: URL, traffic, conditions, template."""
    client = Client.from_env()
    body = client.request("GET", client.service_path(namespace(project), service))
    if fmt == "export":
        body = export(body)
    if render.emit(body, fmt):
        return
    describe_service(body)
    for line in recent_traffic_lines(client, namespace(project), service):
        render.out.print(line)


def export(body: dict[str, Any]) -> dict[str, Any]:
    """The service without server-set fields, ready for `services replace`."""
    meta = {
        k: v
        for k, v in body["metadata"].items()
        if k in ("name", "namespace", "labels", "annotations")
    }
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": meta,
        "spec": body["spec"],
    }


def describe_service(body: dict[str, Any]) -> None:
    status = body.get("status", {})
    container = body["spec"]["template"]["spec"]["containers"][0]
    spec = body["spec"]["template"]["spec"]
    limits = container.get("resources", {}).get("limits", {})
    render.out.print(
        f"{render.ready_mark(body)} Service {body['metadata']['name']} "
        f"in namespace {body['metadata'].get('namespace', '')}"
    )
    render.out.print(f"URL:     {status.get('url', '')}")
    render.out.print("Traffic:")
    for line in traffic_lines(rows_of(body)):
        render.out.print(line)
    render.out.print("Conditions:")
    for cond in status.get("conditions", []):
        why = f" {cond.get('reason', '')}: {cond.get('message', '')}" if cond.get("reason") else ""
        render.out.print(f"  {cond['type']:<20} {cond['status']}{why}")
    render.out.print(
        f"Latest revision: {status.get('latestCreatedRevisionName', '-')} "
        f"(ready: {status.get('latestReadyRevisionName', '-')})"
    )
    render.out.print(f"  Image:         {container['image']}")
    render.out.print(
        f"  Port:          {container.get('ports', [{}])[0].get('containerPort', 8080)}"
    )
    render.out.print(f"  Concurrency:   {spec.get('containerConcurrency')}")
    render.out.print(f"  Timeout:       {spec.get('timeoutSeconds')}s")
    render.out.print(f"  CPU / memory:  {limits.get('cpu', '')} / {limits.get('memory', '')}")
    for env in container.get("env", []):
        render.out.print(f"  Env:           {env['name']}={env.get('value', '')}")
    for line in secret_file_lines(spec):
        render.out.print(f"  Secret file:   {line}")


@services_group.command("delete")
@click.argument("service")
@click.option("--async", "run_async", is_flag=True, help="Accepted for gcloud compatibility.")
@common
def services_delete(
    service: str,
    run_async: bool,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Delete a service, its revisions and its instances."""
    _confirm(quiet, f"Service [{service}] will be deleted.")
    client = Client.from_env()
    client.request("DELETE", client.service_path(namespace(project), service))
    render.err.print(f"Deleted service [{service}].", markup=False)


def _confirm(quiet: bool, message: str) -> None:
    stdin = click.get_text_stream("stdin")
    if quiet or not stdin.isatty():
        return
    click.confirm(f"{message}\n\nDo you want to continue", default=True, abort=True, err=True)


@services_group.command("update")
@click.argument("service")
@template_options
@click.option("--no-traffic", is_flag=True, help="Keep traffic where it is (see deploy).")
@click.option("--tag", help="Give the new revision a tag URL: TAG---SERVICE.DOMAIN.")
@click.option("--async", "run_async", is_flag=True, help="Return without waiting.")
@common
def services_update(
    service: str,
    run_async: bool,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
    **opts: Any,
) -> None:
    """Change settings of SERVICE; a template change makes a new revision."""
    client = Client.from_env()
    if client.get_service(namespace(project), service) is None:
        raise ApiError(
            f"service {service!r} not found; deploy it first with `cloudlet run deploy`", 404
        )
    result = deploy(
        client,
        namespace(project),
        region or DEFAULT_REGION,
        service,
        flags_from(opts),
        allow_unauthenticated=None,
        no_traffic=bool(opts.get("no_traffic")),
        tag=opts.get("tag"),
        wait=not run_async,
    )
    if not render.emit(result, fmt) and not run_async:
        render.out.print(summary(result))


@services_group.command("replace")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Validate only; change nothing.")
@click.option("--async", "run_async", is_flag=True, help="Return without waiting.")
@common
def services_replace(
    file: str,
    dry_run: bool,
    run_async: bool,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Create or replace a service from a Knative Service YAML (a Cloud Run export works)."""
    try:
        body = yaml.safe_load(Path(file).read_text())
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"not valid YAML: {exc}", param_hint="FILE") from None
    meta = body.get("metadata") if isinstance(body, dict) else None
    if not isinstance(meta, dict) or not meta.get("name"):
        raise click.BadParameter("expected a Knative Service with metadata.name", param_hint="FILE")
    name = str(body["metadata"].get("name", ""))
    # a Cloud Run export's namespace is the project number, which means nothing here
    file_ns = str(body["metadata"].get("namespace") or "")
    ns = namespace(project or (None if file_ns.isdigit() else file_ns or None))
    body["metadata"].pop("resourceVersion", None)
    client = Client.from_env()
    params = {"dryRun": "All"} if dry_run else None
    exists = client.get_service(ns, name) is not None
    method, path = (
        ("PUT", client.service_path(ns, name)) if exists else ("POST", client.service_path(ns))
    )
    result = client.request(method, path, body, params=params)
    if dry_run:
        render.err.print(f"Validated service [{name}]: the change would be accepted.", markup=False)
        return
    if not run_async:
        result = wait_ready(client, ns, name, int(result["metadata"]["generation"]))
    if not render.emit(result, fmt):
        render.out.print(summary(result))


@services_group.command("add-iam-policy-binding")
@click.argument("service")
@click.option("--member", required=True, help="allUsers or user:NAME")
@click.option("--role", required=True, help="roles/run.invoker")
@common
def services_add_binding(
    service: str,
    member: str,
    role: str,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Grant ROLE on SERVICE to MEMBER."""
    client = Client.from_env()
    edit_binding(client, namespace(project), region or DEFAULT_REGION, service, member, role, True)
    render.err.print(f"Updated IAM policy for service [{service}].", markup=False)


@services_group.command("remove-iam-policy-binding")
@click.argument("service")
@click.option("--member", required=True, help="allUsers or user:NAME")
@click.option("--role", required=True, help="roles/run.invoker")
@common
def services_remove_binding(
    service: str,
    member: str,
    role: str,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Take ROLE on SERVICE away from MEMBER."""
    client = Client.from_env()
    edit_binding(client, namespace(project), region or DEFAULT_REGION, service, member, role, False)
    render.err.print(f"Updated IAM policy for service [{service}].", markup=False)


@services_group.command("get-iam-policy")
@click.argument("service")
@common
def services_get_policy(
    service: str,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Print SERVICE's IAM policy (who holds which role)."""
    client = Client.from_env()
    ns, where = namespace(project), region or DEFAULT_REGION
    policy = client.request("POST", client.iam(ns, where, service, "getIamPolicy"), {})
    render.emit(policy, fmt if fmt in ("json", "yaml") else "yaml")


@run_group.group("revisions")
def revisions_group() -> None:
    """List, describe and delete revisions."""


@revisions_group.command("list")
@click.option("--service", help="Only this service's revisions.")
@common
def revisions_list(
    service: str | None,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """List revisions, newest first."""
    client = Client.from_env()
    items = client.revisions(namespace(project), service)
    if render.emit(items, fmt):
        return
    serving = _serving(client, namespace(project), items)
    rows = [
        [
            render.ready_mark(r),
            r["metadata"]["name"],
            "yes" if r["metadata"]["name"] in serving else "",
            r["metadata"]["labels"].get("serving.knative.dev/service", ""),
            r["metadata"].get("creationTimestamp", ""),
        ]
        for r in items
    ]
    render.table(["", "REVISION", "ACTIVE", "SERVICE", "DEPLOYED"], rows)


def _serving(client: Client, ns: str, revisions: list[dict[str, Any]]) -> set[str]:
    names = {r["metadata"]["labels"].get("serving.knative.dev/service") for r in revisions}
    out: set[str] = set()
    for name in filter(None, names):
        service = client.get_service(ns, str(name)) or {}
        out |= {
            t["revisionName"]
            for t in service.get("status", {}).get("traffic", [])
            if t.get("percent")
        }
    return out


@revisions_group.command("describe")
@click.argument("revision")
@common
def revisions_describe(
    revision: str,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Show a revision."""
    client = Client.from_env()
    body = client.request("GET", client.revision_path(namespace(project), revision))
    if render.emit(body, fmt):
        return
    container = body["spec"]["containers"][0]
    cond = render.condition(body)
    render.out.print(f"{render.ready_mark(body)} Revision {revision}")
    render.out.print(
        f"  Service:      {body['metadata']['labels'].get('serving.knative.dev/service')}"
    )
    render.out.print(
        f"  Image:        {container['image']} {body.get('status', {}).get('imageDigest', '')}"
    )
    render.out.print(
        f"  Ready:        {cond['status']} {cond.get('reason', '')} {cond.get('message', '')}"
    )
    render.out.print(f"  Concurrency:  {body['spec'].get('containerConcurrency')}")
    render.out.print(f"  Timeout:      {body['spec'].get('timeoutSeconds')}s")


@revisions_group.command("delete")
@click.argument("revision")
@common
def revisions_delete(
    revision: str,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Delete a revision that serves no traffic and carries no tag."""
    _confirm(quiet, f"Revision [{revision}] will be deleted.")
    client = Client.from_env()
    client.request("DELETE", client.revision_path(namespace(project), revision))
    render.err.print(f"Deleted revision [{revision}].", markup=False)
