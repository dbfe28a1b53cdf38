"""Traffic targets: validation and resolution to concrete revisions (pure).

A Service's ``spec.traffic`` names revisions directly or follows the latest ready revision;
``resolve`` turns it into (revision, percent, tag) triples the router can use.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import TrafficTarget
from cloudlet.domain.names import validate_tag

FIELD = "spec.traffic"


@dataclass(frozen=True)
class ResolvedTarget:
    revision: str
    percent: int
    tag: str | None
    latest: bool


def default_traffic() -> list[TrafficTarget]:
    return [TrafficTarget(latestRevision=True, percent=100)]


def validate(targets: list[TrafficTarget], known_revisions: set[str]) -> None:
    """Percents sum to 100, each target names one revision that exists, tags are unique."""
    total = 0
    tags: set[str] = set()
    for i, target in enumerate(targets):
        where = f"{FIELD}[{i}]"
        _validate_target(target, where, known_revisions)
        total += target.percent or 0
        if target.tag:
            validate_tag(target.tag, f"{where}.tag")
            if target.tag in tags:
                raise InvalidError(
                    f"{where}.tag: tag {target.tag!r} is used twice; tags must be unique",
                    field=f"{where}.tag",
                )
            tags.add(target.tag)
    if total != 100:
        raise InvalidError(
            f"{FIELD}: traffic percents add up to {total}, they must add up to 100",
            field=FIELD,
        )


def _validate_target(target: TrafficTarget, where: str, known: set[str]) -> None:
    if target.latestRevision and target.revisionName:
        raise InvalidError(
            f"{where}: set either revisionName or latestRevision: true, not both", field=where
        )
    if not target.latestRevision and not target.revisionName:
        raise InvalidError(
            f"{where}: name a revision (revisionName) or set latestRevision: true", field=where
        )
    if target.revisionName and target.revisionName not in known:
        raise InvalidError(
            f"{where}.revisionName: revision {target.revisionName!r} does not exist; "
            "`cloudlet run revisions list` shows the service's revisions",
            field=f"{where}.revisionName",
        )


def resolve(targets: list[TrafficTarget], latest_ready: str | None) -> list[ResolvedTarget]:
    """Concrete targets; a latestRevision target without a ready revision is left out."""
    out: list[ResolvedTarget] = []
    for target in targets:
        name = latest_ready if target.latestRevision else target.revisionName
        if name:
            out.append(
                ResolvedTarget(name, target.percent or 0, target.tag, bool(target.latestRevision))
            )
    return out


def serving_revisions(resolved: list[ResolvedTarget]) -> set[str]:
    """Revisions that receive traffic or carry a tag (and so must not be deleted)."""
    return {t.revision for t in resolved if t.percent > 0 or t.tag}
