import pytest

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.quantities import (
    format_cpu,
    format_memory,
    parse_cpu,
    parse_duration,
    parse_memory,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512Mi", 512 * 2**20),
        ("1Gi", 2**30),
        ("2G", 2 * 10**9),
        ("128Ki", 128 * 1024),
        ("1.5Gi", int(1.5 * 2**30)),
        ("1000", 1000),
    ],
)
def test_memory_quantities_parse_to_bytes(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "512MB", "-1Gi", "0", "1 Gi"])
def test_bad_memory_names_the_field_and_the_fix(text: str) -> None:
    with pytest.raises(InvalidError) as info:
        parse_memory(text, "--memory")
    assert info.value.field == "--memory"
    assert "--memory" in info.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1000),
        ("2", 2000),
        ("0.5", 500),
        ("500m", 500),
        ("1000m", 1000),
        ("4", 4000),
    ],
)
def test_cpu_quantities_parse_to_millicores(text: str, expected: int) -> None:
    assert parse_cpu(text) == expected


@pytest.mark.parametrize("text", ["", "one", "0", "0m", "1.5.5", "-1"])
def test_bad_cpu_is_refused(text: str) -> None:
    with pytest.raises(InvalidError, match="--cpu"):
        parse_cpu(text, "--cpu")


@pytest.mark.parametrize(("millis", "text"), [(1000, "1"), (2000, "2"), (500, "500m")])
def test_cpu_formats_back(millis: int, text: str) -> None:
    assert format_cpu(millis) == text


@pytest.mark.parametrize(("size", "text"), [(512 * 2**20, "512Mi"), (2**30, "1Gi"), (1000, "1000")])
def test_memory_formats_to_the_shortest_exact_unit(size: int, text: str) -> None:
    assert format_memory(size) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300", 300),
        ("300s", 300),
        ("10m5s", 605),
        ("1h", 3600),
        ("2m", 120),
        (45, 45),
    ],
)
def test_durations_parse_to_seconds(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "5s10", "m", "1.5s", "ten"])
def test_bad_durations_name_the_field(text: str) -> None:
    with pytest.raises(InvalidError, match="--timeout"):
        parse_duration(text, "--timeout")
