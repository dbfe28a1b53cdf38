"""A source folder on disk: its ignore rules, the files they keep, and the tar stream of them.

The tar is produced piece by piece (a header, then the file in 64 KiB chunks), so a large
folder streams to the server without being held in memory. Entries are owned by root with
no user or group names, as the docker CLI sends them; symbolic links stay links.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cloudlet.builder.detect import SourceFacts, reads
from cloudlet.builder.ignore import IgnoreRules, load_rules
from cloudlet.domain.errors import InvalidError

CHUNK: Final = 64 * 1024
MAX_TEXT: Final = 256 * 1024
"""Files detection reads are small (requirements.txt, Procfile, main.py); larger are skipped."""


@dataclass(frozen=True)
class Entry:
    """One path of the context, relative to the folder and ``/``-separated."""

    path: str
    kind: str  # "file", "dir" or "link"
    size: int = 0


@dataclass(frozen=True)
class Source:
    """A source folder with the entries its ignore rules keep."""

    root: Path
    rules: IgnoreRules
    entries: tuple[Entry, ...]

    @property
    def files(self) -> list[str]:
        return [e.path for e in self.entries if e.kind != "dir"]

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def has(self, path: str) -> bool:
        return any(e.path == path for e in self.entries)


def open_source(folder: str | Path, flag: str) -> Source:
    """Reads the folder's ignore files and lists what they keep; ``flag`` names the input."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InvalidError(f"{flag}: {folder} is not a folder; name the app's folder", field=flag)
    root = root.resolve()
    has_git = (root / ".git").exists() or (root / ".gitignore").exists()
    rules = load_rules(lambda name: _read_text(root / name), has_git)
    return Source(root, rules, tuple(walk(root, rules)))


def walk(root: Path, rules: IgnoreRules) -> Iterator[Entry]:
    """The entries under ``root`` that the rules keep, folders before their contents."""
    for folder, dirnames, filenames in os.walk(root):
        rel_folder = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        dirnames.sort()
        kept: list[str] = []
        for name in dirnames:
            path = prefix + name
            if (root / path).is_symlink():
                filenames.append(name)  # a link to a folder is sent as the link
            elif rules.descend(path):
                kept.append(name)
                if rules.includes(path, is_dir=True):
                    yield Entry(path, "dir")
        dirnames[:] = kept
        for name in sorted(filenames):
            path = prefix + name
            if rules.includes(path, is_dir=False):
                yield _entry(root, path)


def _entry(root: Path, path: str) -> Entry:
    info = (root / path).lstat()
    if stat.S_ISLNK(info.st_mode):
        return Entry(path, "link")
    return Entry(path, "file", info.st_size)


def facts(source: Source) -> SourceFacts:
    """What detection looks at: the file names and the text of the few files it reads."""
    files = frozenset(source.files)
    texts: dict[str, str] = {}
    for path in sorted(files):
        if reads(path) and (text := _read_text(source.root / path)) is not None:
            texts[path] = text
    return SourceFacts(files, texts)


def _read_text(path: Path) -> str | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_TEXT:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def tar_stream(source: Source, extra: Mapping[str, bytes] | None = None) -> Iterator[bytes]:
    """The context as an uncompressed tar, in chunks; ``extra`` adds generated files."""
    for entry in source.entries:
        yield from _tar_entry(source.root, entry)
    for name, content in (extra or {}).items():
        info = _info(name, tarfile.REGTYPE, 0o644, len(content))
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        yield content + _padding(len(content))
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _info(name: str, kind: bytes, mode: int, size: int = 0, mtime: float = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, int(mtime)
    return info


def _tar_entry(root: Path, entry: Entry) -> Iterator[bytes]:
    full = root / entry.path
    try:
        st = full.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if entry.kind == "dir":
            info = _info(entry.path, tarfile.DIRTYPE, mode, mtime=st.st_mtime)
        elif entry.kind == "link":
            info = _info(entry.path, tarfile.SYMTYPE, mode, mtime=st.st_mtime)
            info.linkname = os.readlink(full)
        else:
            yield from _tar_file(full, entry.path, mode, st.st_mtime)
            return
    except OSError as exc:
        raise InvalidError(
            f"source: cannot read {entry.path} ({exc.strerror}); fix its permissions or "
            "list it in .gcloudignore",
            field="source",
        ) from None
    yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _tar_file(full: Path, name: str, mode: int, mtime: float) -> Iterator[bytes]:
    with full.open("rb") as handle:
        # The size in the header is the size now; a file that grows or shrinks while it is
        # read is cut or padded to it, so the archive stays well formed.
        size = os.fstat(handle.fileno()).st_size
        yield _info(name, tarfile.REGTYPE, mode, size, mtime).tobuf(
            tarfile.PAX_FORMAT, "utf-8", "surrogateescape"
        )
        left = size
        while left > 0:
            chunk = handle.read(min(CHUNK, left)) or b"\0" * min(CHUNK, left)
            left -= len(chunk)
            yield chunk
    yield _padding(size)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)
