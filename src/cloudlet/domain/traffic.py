"""Traffic targets: validation, resolution, and gcloud's rules for changing them (pure).

A Service's ``spec.traffic`` names revisions directly or follows the latest ready revision;
``resolve`` turns it into (revision, percent, tag) triples the router can use.

``update_traffic``, ``update_tags``, ``zero_latest`` and ``apply_change`` compute a new
``spec.traffic`` the way gcloud does client-side (googlecloudsdk/api_lib/run/traffic.py,
``TrafficTargets``): tags are applied before percents; a partial assignment rescales the
other serving targets proportionally, rounding down and then giving the lost percents to
the targets that lost the largest fractions; the result always adds up to 100.
Targets are keyed by revision name, or ``LATEST`` for the latest ready revision.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import TrafficTarget
from cloudlet.domain.names import validate_tag

FIELD = "spec.traffic"
LATEST = "LATEST"
"""The key of targets that follow the latest ready revision (revision names are lowercase)."""


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


def why_in_use(resolved: list[ResolvedTarget], revision: str) -> str | None:
    """Why ``revision`` must not be deleted (its percent, its tags), or None."""
    mine = [t for t in resolved if t.revision == revision]
    percent = sum(t.percent for t in mine)
    tags = sorted(t.tag for t in mine if t.tag)
    reasons = [f"serves traffic ({percent}%)"] if percent else []
    if tags:
        reasons.append(f"carries the tag{'s' if len(tags) > 1 else ''} {', '.join(tags)}")
    return " and ".join(reasons) or None


# -- changing traffic as gcloud does ------------------------------------------------------


def key_of(target: TrafficTarget) -> str:
    """``LATEST`` for a latestRevision target, else its revision name."""
    return LATEST if target.latestRevision else (target.revisionName or "")


def target_for(key: str, percent: int | None = None, tag: str | None = None) -> TrafficTarget:
    if key == LATEST:
        return TrafficTarget(latestRevision=True, percent=percent, tag=tag)
    return TrafficTarget(revisionName=key, percent=percent, tag=tag)


def _order(key: str) -> tuple[int, str]:
    """Revision names in order, LATEST last."""
    return (2, key) if key == LATEST else (1, key)


def _sorted(percents: Mapping[str, int]) -> list[TrafficTarget]:
    return [target_for(key, percents[key]) for key in sorted(percents, key=_order)]


def normalized(targets: Sequence[TrafficTarget]) -> tuple[dict[str, int], list[TrafficTarget]]:
    """(percent by key for keys with traffic, a 0% target per tag): tags and percents apart."""
    percents: dict[str, int] = {}
    tagged: list[TrafficTarget] = []
    for target in targets:
        key = key_of(target)
        if target.tag:
            tagged.append(target_for(key, tag=target.tag))
        if target.percent:
            percents[key] = percents.get(key, 0) + target.percent
    return percents, tagged


def update_traffic(
    targets: Sequence[TrafficTarget], new: Mapping[str, int], flag: str = "--to-revisions"
) -> list[TrafficTarget]:
    """Give each key in ``new`` its percent and rescale the other serving targets.

    Keys set to 0 explicitly are dropped; others rescaled to 0 stay as 0% targets; tags move
    to their own 0% targets. The result is sorted by revision name with LATEST last.
    """
    current, tagged = normalized(targets)
    _check_current(current)
    unassigned = _unassigned(targets, new)
    _check_new(new, unassigned, flag)
    rounded = round_percents({**new, **_rescaled(new, unassigned)})
    kept = {key: p for key, p in rounded.items() if not (key in new and new[key] == 0)}
    return _sorted(kept) + tagged


def _check_current(current: Mapping[str, int]) -> None:
    total = sum(current.values())
    if total != 100:
        raise InvalidError(
            f"{FIELD}: the service's current traffic adds up to {total} percent, not 100, so it "
            "cannot be rescaled; assign all of it, e.g. --to-revisions REVISION=100 or "
            "--to-latest, with `cloudlet run services replace`",
            field=FIELD,
        )


def _unassigned(targets: Sequence[TrafficTarget], new: Mapping[str, int]) -> dict[str, int]:
    """Percent of each serving key without a new assignment (the last target of a key
    counts, as in gcloud)."""
    return {key_of(t): t.percent for t in targets if t.percent and key_of(t) not in new}


def _check_new(new: Mapping[str, int], unassigned: Mapping[str, int], flag: str) -> None:
    for key, percent in new.items():
        if not 0 <= percent <= 100:
            raise InvalidError(
                f"{flag}: new traffic for {key} is {percent}, not between 0 and 100", field=flag
            )
    total = sum(new.values())
    if total > 100:
        raise InvalidError(
            f"{flag}: the percents add up to {total}; at most 100 percent of traffic can be "
            "assigned",
            field=flag,
        )
    if not unassigned and total < 100:
        raise InvalidError(
            f"{flag}: every revision that serves traffic is given a new percent, but they add "
            f"up to {total}, not 100; assign the other {100 - total} percent too",
            field=flag,
        )


def _rescaled(new: Mapping[str, int], unassigned: Mapping[str, int]) -> dict[str, float]:
    """The percent ``new`` leaves over, shared by the unassigned keys in proportion."""
    to_assign = 100 - sum(new.values())
    if to_assign == 0:
        return {}
    source = sum(unassigned.values())
    return {key: percent * to_assign / source for key, percent in unassigned.items()}


def round_percents(percents: Mapping[str, float]) -> dict[str, int]:
    """Whole percents with the same total: round down, then add 1 to the keys that lost the
    largest fraction (ties: smaller percent first, then key order)."""
    out = {key: int(value) for key, value in percents.items()}
    loss = round(sum(percents.values())) - sum(out.values())
    for key, _ in sorted(percents.items(), key=_correction_precedence)[:loss]:
        out[key] += 1
    return out


def _correction_precedence(item: tuple[str, float]) -> tuple[float, float, tuple[int, str]]:
    key, value = item
    return (1 - (value - int(value)), value, _order(key))


def update_tags(
    targets: Sequence[TrafficTarget],
    to_update: Mapping[str, str],
    to_remove: Collection[str] = (),
    clear_others: bool = False,
) -> list[TrafficTarget]:
    """Remove tags (all of them with ``clear_others``), then add ``to_update`` (tag -> key)
    as 0% targets. A tag that is moved is removed first; percents stay as they are."""
    current = list(targets) or [target_for(LATEST, 100)]
    kept: list[TrafficTarget] = []
    for target in current:
        if target.tag and (clear_others or target.tag in to_remove or target.tag in to_update):
            target = target.model_copy(update={"tag": None})
        if target.percent or target.tag:
            kept.append(target)
    return kept + [target_for(key, tag=tag) for tag, key in sorted(to_update.items())]


def zero_latest(targets: Sequence[TrafficTarget], latest_ready: str | None) -> list[TrafficTarget]:
    """``--no-traffic``: pin the latest revision's traffic to the revision that is latest now,
    so a new revision gets none."""
    percents, tagged = normalized(targets)
    if LATEST not in percents:
        return list(targets)
    if not latest_ready:
        raise InvalidError(
            "--no-traffic: the service has no ready revision to keep its traffic on; "
            "deploy without --no-traffic",
            field="--no-traffic",
        )
    latest = percents.pop(LATEST)
    percents[latest_ready] = percents.get(latest_ready, 0) + latest
    return _sorted(percents) + tagged


def tag_to_key(targets: Sequence[TrafficTarget]) -> dict[str, str]:
    return {t.tag: key_of(t) for t in targets if t.tag}


@dataclass(frozen=True)
class TrafficChange:
    """What `services update-traffic` asks for (gcloud's ``TrafficChanges``)."""

    percentages: Mapping[str, int] = field(default_factory=dict)
    """New percent by revision name or LATEST; by tag when ``by_tag``."""
    by_tag: bool = False
    update_tags: Mapping[str, str] = field(default_factory=dict)
    """Tag -> revision name or LATEST."""
    remove_tags: Collection[str] = ()
    clear_other_tags: bool = False

    @property
    def empty(self) -> bool:
        return not (
            self.percentages or self.update_tags or self.remove_tags or self.clear_other_tags
        )


def apply_change(
    targets: Sequence[TrafficTarget], change: TrafficChange, service: str
) -> list[TrafficTarget]:
    """The new ``spec.traffic``: tag changes first, then percents."""
    out = list(targets)
    if change.update_tags or change.remove_tags or change.clear_other_tags:
        out = update_tags(out, change.update_tags, change.remove_tags, change.clear_other_tags)
    if not change.percentages:
        return out
    if not change.by_tag:
        return update_traffic(out, change.percentages)
    return update_traffic(out, _keys_of_tags(out, change.percentages, service), "--to-tags")


def _keys_of_tags(
    targets: Sequence[TrafficTarget], by_tag: Mapping[str, int], service: str
) -> dict[str, int]:
    keys = tag_to_key(targets)
    out: dict[str, int] = {}
    for tag, percent in by_tag.items():
        if tag not in keys:
            known = ", ".join(sorted(keys)) or "none"
            raise InvalidError(
                f"--to-tags: there is no revision tagged with [{tag}] in the traffic "
                f"allocation for [{service}] (tags: {known}); add one with --update-tags "
                f"{tag}=REVISION",
                field="--to-tags",
            )
        out[keys[tag]] = percent
    return out


# -- showing traffic as gcloud does -----------------------------------------------------------


@dataclass(frozen=True)
class TagRow:
    tag: str
    url: str
    in_spec: bool
    in_status: bool

    @property
    def label(self) -> str:
        if self.in_spec and not self.in_status:
            return f"{self.tag} (Adding)"
        if self.in_status and not self.in_spec:
            return f"{self.tag} (Deleting)"
        return self.tag


@dataclass(frozen=True)
class TrafficRow:
    """The wanted (spec) and actual (status) traffic of one key, as gcloud pairs them."""

    key: str
    revision: str | None
    spec_percent: int | None
    status_percent: int | None
    tags: tuple[TagRow, ...]

    @property
    def percent_text(self) -> str:
        spec, status = _percent(self.spec_percent), _percent(self.status_percent)
        return spec if spec == status else f"{spec:4} (currently {status})"

    @property
    def revision_text(self) -> str:
        if self.key == LATEST:
            return f"{LATEST} (currently {self.revision or '-'})"
        return self.key


def _percent(value: int | None) -> str:
    return "-" if value is None else f"{value}%"


def traffic_rows(
    spec: Sequence[TrafficTarget], status: Sequence[TrafficTarget], latest_ready: str | None
) -> list[TrafficRow]:
    """One row per revision name (and LATEST) in the spec or the status, LATEST last."""
    keys = sorted({key_of(t) for t in [*spec, *status]}, key=_order)
    return [_row(key, spec, status, latest_ready) for key in keys]


def _row(
    key: str,
    spec: Sequence[TrafficTarget],
    status: Sequence[TrafficTarget],
    latest_ready: str | None,
) -> TrafficRow:
    mine = [t for t in spec if key_of(t) == key]
    seen = [t for t in status if key_of(t) == key]
    tags = {t.tag: TagRow(t.tag, "", True, False) for t in mine if t.tag}
    for t in seen:
        if t.tag:
            tags[t.tag] = TagRow(t.tag, t.url or "", t.tag in tags, True)
    return TrafficRow(
        key=key,
        revision=latest_ready if key == LATEST else key,
        spec_percent=sum(t.percent or 0 for t in mine) if mine else None,
        status_percent=sum(t.percent or 0 for t in seen) if seen else None,
        tags=tuple(tags[tag] for tag in sorted(tags)),
    )
