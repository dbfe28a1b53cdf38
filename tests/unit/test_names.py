import pytest

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.names import (
    revision_name,
    validate_env_name,
    validate_service_name,
    validate_tag,
)


@pytest.mark.parametrize("name", ["hello", "my-service", "a", "a1", "x" * 49])
def test_valid_service_names_pass(name: str) -> None:
    assert validate_service_name(name) == name


@pytest.mark.parametrize("name", ["", "Hello", "1abc", "abc-", "my_service", "x" * 50, "a.b"])
def test_invalid_service_names_say_what_is_allowed(name: str) -> None:
    with pytest.raises(InvalidError) as info:
        validate_service_name(name)
    assert "lowercase" in info.value.message
    assert info.value.field == "metadata.name"


def test_revision_names_are_numbered_with_a_random_token() -> None:
    assert revision_name("shop", 1, None, "xyz") == "shop-00001-xyz"
    assert revision_name("shop", 12, None, "abc") == "shop-00012-abc"


def test_a_revision_suffix_replaces_number_and_token() -> None:
    assert revision_name("shop", 3, "blue", "abc") == "shop-blue"


@pytest.mark.parametrize("name", ["PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"])
def test_platform_env_names_are_reserved(name: str) -> None:
    with pytest.raises(InvalidError, match="set by the platform"):
        validate_env_name(name)


@pytest.mark.parametrize("name", ["1ABC", "A B", "", "A=B"])
def test_malformed_env_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidError):
        validate_env_name(name)


def test_tags_follow_label_rules() -> None:
    assert validate_tag("green") == "green"
    with pytest.raises(InvalidError):
        validate_tag("Green")
