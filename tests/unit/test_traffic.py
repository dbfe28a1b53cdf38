"""Traffic split, rescaling and tag rules as gcloud computes them, and how they are shown.

The wanted values follow googlecloudsdk/api_lib/run/traffic.py (TrafficTargets); the rules
were also checked against that code on 20,000 random cases while writing them.
"""

from __future__ import annotations

import random

import click
import pytest

from cloudlet.cli.deploy import next_revision_number
from cloudlet.cli.traffic import (
    parse_percentages,
    parse_tags,
    row_dict,
    traffic_change,
    traffic_lines,
)
from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import TrafficTarget
from cloudlet.domain.traffic import (
    LATEST,
    ResolvedTarget,
    TrafficChange,
    apply_change,
    normalized,
    round_percents,
    tag_to_key,
    target_for,
    traffic_rows,
    update_tags,
    update_traffic,
    why_in_use,
    zero_latest,
)

Row = tuple[str, int | None, str | None]


def targets(*rows: Row) -> list[TrafficTarget]:
    """Targets from (key, percent, tag) rows; key LATEST means latestRevision: true."""
    return [target_for(key, percent, tag) for key, percent, tag in rows]


def rows(result: list[TrafficTarget]) -> list[Row]:
    out: list[Row] = []
    for t in result:
        key = LATEST if t.latestRevision else (t.revisionName or "")
        out.append((key, t.percent, t.tag))
    return out


# -- update_traffic ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "new", "wanted"),
    [
        # a partial assignment rescales the others (gcloud's help: 40/60, a=45 -> 45/55)
        ([("a", 40, None), ("b", 60, None)], {"a": 45}, [("a", 45, None), ("b", 55, None)]),
        ([("a", 100, None)], {"b": 10}, [("a", 90, None), ("b", 10, None)]),
        # rollback: all to one revision drops the others
        ([("a", 90, None), ("b", 10, None)], {"a": 100}, [("a", 100, None)]),
        # --to-latest
        ([("a", 90, None), ("b", 10, None)], {LATEST: 100}, [(LATEST, 100, None)]),
        # LATEST sorts last, revision names in order
        (
            [(LATEST, 100, None)],
            {"b": 10, "a": 20},
            [("a", 20, None), ("b", 10, None), (LATEST, 70, None)],
        ),
        # an explicit 0 removes the target; the rest takes its share
        ([("a", 50, None), ("b", 50, None)], {"a": 0}, [("b", 100, None)]),
        ([("a", 50, None), ("b", 50, None)], {"a": 0, "b": 100}, [("b", 100, None)]),
        # rounding: down, then +1 to the largest lost fractions (29.7, 29.7, 30.6)
        (
            [("a", 33, None), ("b", 33, None), ("c", 34, None)],
            {"d": 10},
            [("a", 30, None), ("b", 30, None), ("c", 30, None), ("d", 10, None)],
        ),
        # equal fractions (49.5, 49.5): the smaller key gets the extra percent
        (
            [("a", 50, None), ("b", 50, None)],
            {"c": 1},
            [("a", 50, None), ("b", 49, None), ("c", 1, None)],
        ),
        # rescaled to 0 but not named: kept as a 0% target (0.01 -> 0, 0.99 -> 1)
        (
            [("a", 1, None), ("b", 99, None)],
            {"c": 99},
            [("a", 0, None), ("b", 1, None), ("c", 99, None)],
        ),
        # tags move to their own 0% targets, after the percent targets
        (
            [("a", 100, "blue"), ("b", None, "green")],
            {"b": 10},
            [("a", 90, None), ("b", 10, None), ("a", None, "blue"), ("b", None, "green")],
        ),
        # two targets of one revision: merged, but gcloud rescales from the last one's
        # percent (20 of a, 50 of b share 50: 14.29 and 35.71)
        (
            [("a", 30, "x"), ("a", 20, None), ("b", 50, None)],
            {"c": 50},
            [("a", 14, None), ("b", 36, None), ("c", 50, None), ("a", None, "x")],
        ),
    ],
)
def test_update_traffic_assigns_and_rescales_as_gcloud_does(
    current: list[Row], new: dict[str, int], wanted: list[Row]
) -> None:
    assert rows(update_traffic(targets(*current), new)) == wanted


@pytest.mark.parametrize(
    ("current", "new", "message"),
    [
        ([("a", 100, None)], {"b": 60, "c": 50}, "the percents add up to 110"),
        ([("a", 100, None)], {"a": 50}, "add up to 50, not 100; assign the other 50 percent"),
        ([("a", 60, None), ("b", 40, None)], {"a": 50, "b": 40}, "add up to 90, not 100"),
        ([("a", 100, None)], {"b": 101}, "new traffic for b is 101, not between 0 and 100"),
        ([("a", 50, None)], {"b": 10}, "current traffic adds up to 50 percent, not 100"),
        ([], {"b": 10}, "current traffic adds up to 0 percent"),
    ],
)
def test_update_traffic_refuses_what_cannot_add_up_to_100_and_says_why(
    current: list[Row], new: dict[str, int], message: str
) -> None:
    with pytest.raises(InvalidError, match=message):
        update_traffic(targets(*current), new)


def test_errors_name_the_flag_the_percents_came_from() -> None:
    with pytest.raises(InvalidError) as caught:
        update_traffic(targets(("a", 100, None)), {"a": 50}, "--to-tags")
    assert caught.value.field == "--to-tags"
    assert caught.value.message.startswith("--to-tags: ")


def test_any_assignment_that_is_accepted_adds_up_to_100_and_keeps_what_was_asked() -> None:
    rng = random.Random(20240301)
    accepted = 0
    for _ in range(500):
        keys = rng.sample(["a", "b", "c", "d", LATEST], rng.randint(1, 4))
        cuts = sorted(rng.randint(0, 100) for _ in keys[1:])
        shares = [hi - lo for lo, hi in zip([0, *cuts], [*cuts, 100], strict=True)]
        current = [target_for(k, p) for k, p in zip(keys, shares, strict=True)]
        new = {k: rng.randint(0, 60) for k in rng.sample(["a", "b", "e", LATEST], 2)}
        try:
            result = update_traffic(current, new)
        except InvalidError:
            continue
        accepted += 1
        assert sum(t.percent or 0 for t in result) == 100
        got = {LATEST if t.latestRevision else t.revisionName: t.percent for t in result}
        assert all(got.get(k, 0) == p for k, p in new.items())
    assert accepted > 250


@pytest.mark.parametrize(
    ("shares", "wanted"),
    [
        ({"a": 50.0, "b": 50.0}, {"a": 50, "b": 50}),
        ({"a": 33.3, "b": 33.3, "c": 33.4}, {"a": 33, "b": 33, "c": 34}),
        ({"a": 0.5, "b": 99.5}, {"a": 1, "b": 99}),
        ({"a": 66.66, "b": 33.34}, {"a": 67, "b": 33}),
    ],
)
def test_round_percents_keeps_the_total(shares: dict[str, float], wanted: dict[str, int]) -> None:
    assert round_percents(shares) == wanted


def test_normalized_merges_percents_by_revision_and_splits_off_tags() -> None:
    percents, tagged = normalized(
        targets(("a", 30, "x"), ("a", 20, None), (LATEST, 50, None), ("b", 0, "y"))
    )
    assert percents == {"a": 50, LATEST: 50}
    assert rows(tagged) == [("a", None, "x"), ("b", None, "y")]


# -- tags --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "update", "remove", "clear", "wanted"),
    [
        # a tag is its own 0% target
        (
            [(LATEST, 100, None)],
            {"green": "b"},
            (),
            False,
            [(LATEST, 100, None), ("b", None, "green")],
        ),
        # no traffic yet: LATEST=100 is made explicit first
        ([], {"green": "b"}, (), False, [(LATEST, 100, None), ("b", None, "green")]),
        # moving a tag removes it from its old target; percents stay
        (
            [("a", 100, "green")],
            {"green": "b"},
            (),
            False,
            [("a", 100, None), ("b", None, "green")],
        ),
        # removing a tag drops its 0% target
        (
            [("a", 100, None), ("b", None, "green"), ("a", None, "blue")],
            {},
            ("green",),
            False,
            [("a", 100, None), ("a", None, "blue")],
        ),
        # --set-tags: clear the others, then add
        (
            [("a", 100, None), ("b", None, "green")],
            {"blue": "a"},
            (),
            True,
            [("a", 100, None), ("a", None, "blue")],
        ),
        # --clear-tags
        ([("a", 90, "x"), ("b", 10, "y")], {}, (), True, [("a", 90, None), ("b", 10, None)]),
        # new tags are added in tag order, LATEST allowed
        (
            [("a", 100, None)],
            {"zed": LATEST, "alpha": "a"},
            (),
            False,
            [("a", 100, None), ("a", None, "alpha"), (LATEST, None, "zed")],
        ),
    ],
)
def test_update_tags_removes_then_adds_without_touching_percents(
    current: list[Row],
    update: dict[str, str],
    remove: tuple[str, ...],
    clear: bool,
    wanted: list[Row],
) -> None:
    assert rows(update_tags(targets(*current), update, remove, clear)) == wanted


def test_tags_map_to_their_revision_or_latest() -> None:
    found = tag_to_key(targets(("a", 100, "blue"), (LATEST, None, "next")))
    assert found == {"blue": "a", "next": LATEST}


# -- --no-traffic -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "latest_ready", "wanted"),
    [
        ([(LATEST, 100, None)], "a", [("a", 100, None)]),
        ([("a", 50, None), (LATEST, 50, "t")], "a", [("a", 100, None), (LATEST, None, "t")]),
        ([("a", 90, None), (LATEST, 10, None)], "b", [("a", 90, None), ("b", 10, None)]),
        # nothing follows LATEST: left exactly as it was
        ([("a", 100, None), ("b", 0, None)], "b", [("a", 100, None), ("b", 0, None)]),
    ],
)
def test_no_traffic_pins_the_latest_share_to_the_revision_that_is_latest_now(
    current: list[Row], latest_ready: str, wanted: list[Row]
) -> None:
    assert rows(zero_latest(targets(*current), latest_ready)) == wanted


def test_no_traffic_without_a_ready_revision_is_refused() -> None:
    with pytest.raises(InvalidError, match="--no-traffic: the service has no ready revision"):
        zero_latest(targets((LATEST, 100, None)), None)


# -- a whole change ----------------------------------------------------------------------


def test_tags_are_applied_before_percents_so_a_new_tag_can_get_traffic() -> None:
    change = TrafficChange(percentages={"green": 10}, by_tag=True, update_tags={"green": "b"})
    result = apply_change(targets(("a", 100, None)), change, "shop")
    assert rows(result) == [("a", 90, None), ("b", 10, None), ("b", None, "green")]


def test_percents_by_tag_need_a_tagged_revision() -> None:
    change = TrafficChange(percentages={"nope": 10}, by_tag=True)
    with pytest.raises(InvalidError, match=r"no revision tagged with \[nope\].*\[shop\]") as caught:
        apply_change(targets(("a", 100, "blue")), change, "shop")
    assert "tags: blue" in caught.value.message
    assert caught.value.field == "--to-tags"


def test_a_change_of_tags_alone_leaves_percents_alone() -> None:
    change = TrafficChange(remove_tags=frozenset({"blue"}))
    result = apply_change(targets(("a", 60, "blue"), ("b", 40, None)), change, "shop")
    assert rows(result) == [("a", 60, None), ("b", 40, None)]


# -- flags -------------------------------------------------------------------------------


def test_percent_flags_merge_across_repeats_and_later_values_win() -> None:
    assert parse_percentages(("a=10,b=20", "a=30"), "--to-revisions") == {"a": 30, "b": 20}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a=ten", "value 'ten' for a is not an integer"),
        ("a=101", "value 101 for a is not between 0 and 100"),
        ("a=-1", "value -1 for a is not between 0 and 100"),
        ("a", "'a' is not KEY=PERCENT"),
        ("=5", "'=5' is not KEY=PERCENT"),
    ],
)
def test_bad_percents_are_refused_naming_the_flag(value: str, message: str) -> None:
    with pytest.raises(InvalidError, match=message) as caught:
        parse_percentages((value,), "--to-revisions")
    assert caught.value.field == "--to-revisions"


def test_tag_flags_check_tag_names() -> None:
    assert parse_tags(("green=LATEST,blue=shop-00001-abc",), "--set-tags") == {
        "green": LATEST,
        "blue": "shop-00001-abc",
    }
    with pytest.raises(InvalidError, match="--update-tags: invalid tag 'Green'"):
        parse_tags(("Green=a",), "--update-tags")
    with pytest.raises(InvalidError, match="is not TAG=REVISION"):
        parse_tags(("green=",), "--update-tags")


def test_flags_become_one_change_as_gcloud_builds_it() -> None:
    assert traffic_change(to_latest=True).percentages == {LATEST: 100}
    by_tag = traffic_change(to_tags=("green=50",))
    assert (by_tag.by_tag, dict(by_tag.percentages)) == (True, {"green": 50})
    setting = traffic_change(set_tags=("blue=a",))
    assert (setting.clear_other_tags, dict(setting.update_tags)) == (True, {"blue": "a"})
    removing = traffic_change(remove_tags="x,y", update_tags=("z=a",))
    assert (set(removing.remove_tags), removing.clear_other_tags) == ({"x", "y"}, False)
    assert traffic_change(clear_tags=True).clear_other_tags
    assert traffic_change().empty


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        ({"to_revisions": ("a=x",)}, "--to-revisions"),
        ({"to_tags": ("a=x",)}, "--to-tags"),
        ({"set_tags": ("A=a",)}, "--set-tags"),
        ({"update_tags": ("A=a",)}, "--update-tags"),
    ],
)
def test_flag_errors_name_the_flag_given(flags: dict[str, tuple[str, ...]], flag: str) -> None:
    with pytest.raises(InvalidError) as caught:
        traffic_change(**flags)  # type: ignore[arg-type]
    assert caught.value.field == flag
    assert caught.value.message.startswith(f"{flag}: ")


@pytest.mark.parametrize(
    "flags",
    [
        {"to_revisions": ("a=1",), "to_latest": True},
        {"to_tags": ("g=1",), "to_revisions": ("a=1",)},
        {"set_tags": ("g=a",), "clear_tags": True},
        {"set_tags": ("g=a",), "remove_tags": "x"},
    ],
)
def test_exclusive_flags_are_a_usage_error(flags: dict[str, object]) -> None:
    with pytest.raises(click.UsageError, match="use at most one of"):
        traffic_change(**flags)  # type: ignore[arg-type]


# -- showing traffic -----------------------------------------------------------------------


def test_traffic_is_shown_like_gcloud_with_tag_urls_under_their_revision() -> None:
    spec = targets(("a", 90, None), ("b", 10, None), ("b", None, "green"))
    status = [
        TrafficTarget(revisionName="a", percent=90),
        TrafficTarget(revisionName="b", percent=10),
        TrafficTarget(revisionName="b", percent=0, tag="green", url="http://green---s.x"),
    ]
    assert traffic_lines(traffic_rows(spec, status, "b")) == [
        "  90% a",
        "  10% b",
        "        green: http://green---s.x",
    ]


def test_latest_shows_the_revision_it_currently_is_and_pending_changes() -> None:
    spec = targets((LATEST, 100, None), ("a", None, "next"))
    rows_ = traffic_rows(spec, [], None)
    assert traffic_lines(rows_) == [
        "  0%   (currently -) a",
        "                       next (Adding):",
        "  100% (currently -) LATEST (currently -)",
    ]
    assert row_dict(rows_[1], "http://s.x") | {"tags": []} == {
        "key": LATEST,
        "latestRevision": True,
        "revisionName": None,
        "specPercent": "100",
        "statusPercent": "-",
        "specTags": "-",
        "statusTags": "-",
        "urls": [],
        "tags": [],
        "displayPercent": "100% (currently -)",
        "displayRevisionId": "LATEST (currently -)",
        "serviceUrl": "http://s.x",
    }


def test_a_revision_in_use_says_how() -> None:
    resolved = [
        ResolvedTarget("a", 90, None, False),
        ResolvedTarget("b", 10, "green", True),
        ResolvedTarget("a", 0, "x", False),
        ResolvedTarget("a", 0, "w", False),
    ]
    assert why_in_use(resolved, "a") == "serves traffic (90%) and carries the tags w, x"
    assert why_in_use(resolved, "b") == "serves traffic (10%) and carries the tag green"
    assert why_in_use(resolved, "c") is None


# -- naming the revision a deploy --tag points at ------------------------------------------


@pytest.mark.parametrize(
    ("names", "wanted"),
    [
        ([], 1),
        (["shop-00001-abc"], 2),
        (["shop-00003-abc", "shop-00001-xyz"], 4),
        (["shop-green", "shop-blue"], 3),
        (["shop-00002-abc", "shopx-00009-abc"], 3),
    ],
)
def test_a_tagged_deploy_names_its_revision_after_the_highest_number(
    names: list[str], wanted: int
) -> None:
    assert next_revision_number("shop", names) == wanted
