"""Names of services, revisions, tags and environment variables, and their rules."""

from __future__ import annotations

import re
import secrets

from cloudlet.domain.errors import InvalidError

MAX_SERVICE_NAME = 49
_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SUFFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def validate_service_name(name: str, field: str = "metadata.name") -> str:
    if not name or len(name) > MAX_SERVICE_NAME or not _LABEL.match(name):
        raise InvalidError(
            f"{field}: invalid service name {name!r}: use 1 to {MAX_SERVICE_NAME} lowercase "
            "letters, digits and hyphens, starting with a letter and not ending with a hyphen",
            field=field,
        )
    return name


def validate_tag(tag: str, field: str = "tag") -> str:
    if not tag or len(tag) > 46 or not _LABEL.match(tag):
        raise InvalidError(
            f"{field}: invalid tag {tag!r}: use lowercase letters, digits and hyphens, "
            "starting with a letter",
            field=field,
        )
    return tag


def validate_env_name(name: str, field: str = "env") -> str:
    if not _ENV_NAME.match(name):
        raise InvalidError(
            f"{field}: invalid environment variable name {name!r}: use letters, digits, "
            "'_', '-' and '.', not starting with a digit",
            field=field,
        )
    if name in RESERVED_ENV:
        raise InvalidError(
            f"{field}: {name} is set by the platform and cannot be overridden; remove it",
            field=field,
        )
    return name


RESERVED_ENV = frozenset({"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"})


def revision_name(service: str, generation: int, suffix: str | None, token: str) -> str:
    """``SERVICE-00001-xyz`` or ``SERVICE-SUFFIX`` when the user chose a suffix."""
    if suffix:
        return f"{service}-{suffix}"
    return f"{service}-{generation:05d}-{token}"


def random_token(length: int = 3) -> str:
    return "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(length))


def validate_revision_suffix(service: str, suffix: str, field: str = "revisionSuffix") -> str:
    name = f"{service}-{suffix}"
    if not _LABEL.match(suffix) or len(name) > 63:
        raise InvalidError(
            f"{field}: invalid revision suffix {suffix!r}: use lowercase letters, digits and "
            "hyphens so that SERVICE-SUFFIX is at most 63 characters",
            field=field,
        )
    return suffix
