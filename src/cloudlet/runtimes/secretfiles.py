"""Secret files on the host, for bind mounts: in RAM only, one directory per container.

Each container that mounts secrets gets ``ROOT/CONTAINER-NAME/N/`` (N per mount directory)
holding its files, which the engine bind-mounts read-only at the mount path. ROOT is
``cloudlet-OWNER`` (mode 0700) on the first of /run and /dev/shm that is a RAM filesystem
(tmpfs or ramfs), so secret plaintext never reaches a disk; with neither, starting such an
instance fails rather than write it anywhere else. A directory goes when its container is
stopped, and directories whose container no longer runs are swept when a restarted server
adopts its instances.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from cloudlet.runtimes.base import RuntimeFailure, SecretFile

CANDIDATES: Final = ("/run", "/dev/shm")
RAM_FILESYSTEMS: Final = frozenset({"tmpfs", "ramfs"})
_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


class SecretDirs:
    """The host side of secret mounts for one server (``owner``)."""

    def __init__(
        self,
        owner: str,
        candidates: Iterable[str] = CANDIDATES,
        mountinfo: str = "/proc/self/mountinfo",
    ) -> None:
        self._owner = owner
        self._candidates = tuple(candidates)
        self._mountinfo = mountinfo
        self._root: Path | None = None
        self._written: set[str] = set()  # container names this process wrote dirs for
        self._names: dict[str, str] = {}  # container id -> name, for removal at stop

    def write(self, name: str, files: Iterable[SecretFile]) -> list[dict[str, Any]]:
        """Write ``files`` for container ``name``; the engine's ``HostConfig.Mounts``."""
        self._written.add(name)
        try:
            base = self.root() / name
            base.mkdir(mode=0o700)
            return [
                _mount(base / str(index), target, group)
                for index, (target, group) in enumerate(_by_mount(files).items())
            ]
        except OSError as error:
            raise RuntimeFailure(
                f"cannot write the secret files of {name}: {error.strerror}"
            ) from None

    def track(self, container_id: str, name: str) -> None:
        self._names[container_id] = name

    def release(self, container_id: str) -> None:
        """The container is gone: its files go too."""
        name = self._names.pop(container_id, None)
        if name is not None:
            self.remove(name)

    def remove(self, name: str) -> None:
        self._written.discard(name)
        root = self._existing_root()
        if root is not None:
            _remove_tree(root / name)

    def adopt(self, running: Mapping[str, str]) -> None:
        """After a restart: remember the running containers (id -> name), and remove the
        directories of containers that no longer run (unless this process just wrote them
        for a container being created)."""
        self._names.update(running)
        root = self._existing_root()
        if root is None:
            return
        keep = set(running.values()) | self._written
        for entry in root.iterdir():
            if entry.name not in keep:
                _remove_tree(entry)

    def close(self) -> None:
        """The server stops: ROOT goes if empty (live instances keep their files)."""
        root = self._existing_root()
        if root is not None:
            with contextlib.suppress(OSError):
                root.rmdir()

    def root(self) -> Path:
        """ROOT, made (0700, owned by this user) on the first RAM filesystem found."""
        if self._root is None:
            self._root = self._make_root()
        return self._root

    def _make_root(self) -> Path:
        for candidate in self._candidates:
            if os.access(candidate, os.W_OK) and self._in_ram(candidate):
                root = Path(candidate) / f"cloudlet-{self._owner}"
                with contextlib.suppress(FileExistsError):
                    root.mkdir(mode=0o700)
                _check_private(root)
                return root
        raise RuntimeFailure(
            "secret files need a RAM filesystem (tmpfs) at one of "
            f"{', '.join(self._candidates)}, so their contents never reach a disk; "
            "mount one there (e.g. `mount -t tmpfs tmpfs /run`) or use secret env vars"
        )

    def _existing_root(self) -> Path | None:
        if self._root is not None:
            return self._root
        for candidate in self._candidates:
            root = Path(candidate) / f"cloudlet-{self._owner}"
            if root.is_dir() and not root.is_symlink():
                return root
        return None

    def _in_ram(self, path: str) -> bool:
        try:
            text = Path(self._mountinfo).read_text()
        except OSError:
            return False
        return filesystem_of(os.path.realpath(path), text) in RAM_FILESYSTEMS


def filesystem_of(path: str, mountinfo: str) -> str | None:
    """The filesystem type ``path`` lives on, from /proc/self/mountinfo's text."""
    best, kind = "", None
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), parts[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # the last of equal mounts is on top
            best, kind = point, rest.split()[0]
    return kind


def _by_mount(files: Iterable[SecretFile]) -> dict[str, list[SecretFile]]:
    out: dict[str, list[SecretFile]] = {}
    for file in files:
        out.setdefault(file.mount_path, []).append(file)
    return out


def _mount(source: Path, target: str, files: list[SecretFile]) -> dict[str, Any]:
    source.mkdir(mode=0o700)
    for file in files:
        _write(source, file)
    _seal(source)
    return {"Type": "bind", "Source": str(source), "Target": target, "ReadOnly": True}


def _write(directory: Path, file: SecretFile) -> None:
    path = directory / file.path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, file.content)
        os.fchmod(fd, file.mode)
    finally:
        os.close(fd)


def _seal(directory: Path) -> None:
    """Directories readable and searchable by any user of the container (the mount is
    read-only anyway); the 0700 ROOT above keeps other host users out."""
    for parent, dirs, _ in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(parent, name), 0o555)
    os.chmod(directory, 0o555)


def _check_private(root: Path) -> None:
    """ROOT sits in a world-writable place (/dev/shm): refuse one someone else made."""
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise RuntimeFailure(
            f"{root} is not a private directory of this user (mode 0700); "
            "remove it so Cloudlet can make its own"
        )


def _remove_tree(path: Path) -> None:
    """Remove a sealed (0555) tree, also when not running as root."""
    if not path.is_dir() or path.is_symlink():
        return
    for parent, dirs, _ in os.walk(path):
        for directory in (parent, *(os.path.join(parent, name) for name in dirs)):
            with contextlib.suppress(OSError):
                os.chmod(directory, 0o700)
    shutil.rmtree(path, ignore_errors=True)
