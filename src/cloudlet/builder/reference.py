"""Image names: checking a ``--tag`` and naming the images of source deploys (pure)."""

from __future__ import annotations

import re
from typing import Final

from cloudlet.domain.errors import InvalidError

SOURCE_REGISTRY: Final = "cloudlet.local"
"""Registry part of the images ``run deploy --source`` builds; never pushed anywhere."""

# Docker's reference grammar (github.com/distribution/reference), without digests.
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?)"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
REFERENCE: Final = re.compile(rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?$")
MAX_NAME: Final = 255


def validate_image(image: str, field: str = "--tag") -> str:
    """``image`` if it is a valid image name (``[REGISTRY/]PATH[:TAG]``), else a clear error."""
    name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    if REFERENCE.match(image) and len(name) <= MAX_NAME:
        return image
    hint = " (image names are lowercase)" if image != image.lower() else ""
    raise InvalidError(
        f"{field}: {image!r} is not a valid image name{hint}; use [REGISTRY/]PATH[:TAG], "
        "e.g. eu.gcr.io/my-project/my-app or my-app:v1",
        field=field,
    )


def source_image(project: str, service: str, version: str) -> str:
    """The image a source deploy builds: named after the service, one tag per build.

    A new tag per build keeps each revision on its own image, so a later build never
    changes what an existing revision runs.
    """
    return validate_image(f"{SOURCE_REGISTRY}/{project}/{service}:{version}", "--source")
