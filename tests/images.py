"""Container images for tests: build them on demand with the docker CLI.

scripts/build-images.sh normally builds every image before the tests run; these helpers make
a test work without it. Base images (python:*, busybox:*) cannot come from Docker Hub here,
so a missing base is made by scripts/build-images.sh (root, debootstrap; about a minute).
"""

from __future__ import annotations

import fcntl
import functools
import pathlib
import re
import shutil
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
BUILD_IMAGES = REPO / "scripts" / "build-images.sh"
TESTAPP_DIR = REPO / "tests" / "apps" / "testapp"
TESTAPP_IMAGE = "cloudlet-testapp:latest"

# Base image tags that build-images.sh makes, by the name it takes on its command line.
_BASES = {
    "python:3.11-slim": "python",
    "python:3.11": "python",
    "python:3.10": "python",
    "python:3": "python",
    "busybox:latest": "busybox",
    "busybox": "busybox",
}


@functools.cache
def docker_available() -> bool:
    """True if the docker CLI is installed and its daemon answers."""
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def image_exists(tag: str) -> bool:
    done = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False)
    return done.returncode == 0


def ensure_image(tag: str, context_dir: pathlib.Path) -> str:
    """Return `tag`, first building it from `context_dir`'s Dockerfile if it is missing.

    Missing base images named in the Dockerfile's FROM lines are made first with
    scripts/build-images.sh. A file lock keeps parallel test workers from building twice.
    """
    if image_exists(tag):
        return tag
    safe_tag = re.sub(r"[^\w.-]", "_", tag)
    lock_path = pathlib.Path("/tmp") / f"cloudlet-image-{safe_tag}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image_exists(tag):  # another worker built it while we waited
            return tag
        for base in _missing_bases(context_dir / "Dockerfile"):
            _run(["bash", str(BUILD_IMAGES), _BASES[base]], f"base image {base}")
        _run(["docker", "build", "-t", tag, str(context_dir)], f"image {tag}")
    return tag


def ensure_testapp() -> str:
    """The integration-test application image (tests/apps/testapp)."""
    return ensure_image(TESTAPP_IMAGE, TESTAPP_DIR)


def _missing_bases(dockerfile: pathlib.Path) -> list[str]:
    froms = re.findall(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)", dockerfile.read_text(), re.I | re.M)
    return [b for b in dict.fromkeys(froms) if b in _BASES and not image_exists(b)]


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"building {what} failed ({' '.join(cmd)}, exit {done.returncode}):\n"
            f"{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )
