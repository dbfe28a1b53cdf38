"""Which files of a source folder go into a build context (pure: paths in, verdicts out).

Two rule sets, each with its own tool's semantics, so a folder uploads here as it would with
the real tools:

- ``.gcloudignore``: gcloud's rules (a port of ``googlecloudsdk.command_lib.util.glob`` and
  ``gcloudignore``). gitignore-like: a pattern matches at any depth unless it starts with
  ``/``; a trailing ``/`` matches directories only; ``!`` re-includes; the verdict on a
  directory holds for everything under it (a child of an ignored directory cannot be
  re-included); ``#!include:FILE`` inserts FILE's patterns (FILE in the same folder). With
  no ``.gcloudignore`` but a ``.git`` or ``.gitignore``, gcloud's default rules apply
  (``.gcloudignore``, ``.git``, ``.gitignore`` and ``#!include:.gitignore``).
- ``.dockerignore``: Docker's rules (moby's patternmatcher). Paths are matched from the
  context root; ``*`` and ``?`` stay within one path element, ``**`` spans any number; the
  last matching pattern wins and ``!`` re-includes; a pattern matching a directory matches
  everything under it. ``Dockerfile`` and ``.dockerignore`` are always sent, as the docker
  CLI does.

A file goes into the context when both rule sets keep it: gcloud filters the upload and the
docker CLI in Cloud Build filters the Docker build context again. The Docker engine itself
does not apply ``.dockerignore``, so it must be applied here.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from cloudlet.domain.errors import InvalidError

GCLOUDIGNORE: Final = ".gcloudignore"
DOCKERIGNORE: Final = ".dockerignore"
GCLOUD_DEFAULT: Final = ".gcloudignore\n.git\n.gitignore\n"
ALWAYS_SENT: Final = ("Dockerfile", DOCKERIGNORE)
_INCLUDE: Final = "!include:"
_ODD_BACKSLASHES: Final = re.compile(r"(?<!\\)\\(\\\\)*$")
# Characters moby escapes because they mean something to regexps but not to path globs.
_GO_ESCAPED: Final = frozenset(".+()|{}$")

Reader = Callable[[str], str | None]
"""Reads a file of the source folder by relative path; None if there is none."""


# -- gcloud --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GcloudPattern:
    """One line of a ``.gcloudignore``."""

    parts: tuple[str, ...]
    negated: bool = False
    must_be_dir: bool = False

    def matches(self, path: str, is_dir: bool) -> bool:
        if self.must_be_dir and not is_dir:
            return False
        return _gcloud_match(self.parts, path)


def path_prefixes(path: str) -> list[str]:
    """``'a/b/c'`` → ``['', 'a', 'a/b', 'a/b/c']`` (gcloud's GetPathPrefixes)."""
    prefixes = [path]
    rest = True
    while path and rest:
        path, tail = posixpath.split(path)
        rest = bool(tail)
        prefixes.insert(0, path)
    return prefixes


def _gcloud_match(parts: Sequence[str], path: str | None) -> bool:
    """Right to left: the last part must match the last path element, and so on."""
    if not parts:
        return True
    if path is None:
        return False
    part, rest = parts[-1], list(parts[:-1])
    if path:
        path = posixpath.normpath(path)
    head, tail = posixpath.split(path)
    remaining: str | None = head if tail else None
    if part == "**":
        # ``**`` patterns match against the full path, as if they began with ``/``.
        if not (rest and rest[0] == ""):
            rest.insert(0, "")
        return any(_gcloud_match(rest, prefix) for prefix in path_prefixes(path))
    if part == "*" and not rest and remaining and len(remaining) > 1:
        return False
    if not fnmatch.fnmatchcase(tail, part):
        return False
    return _gcloud_match(rest, remaining)


def _strip_unescaped_trailing_spaces(line: str) -> str:
    tokens: list[str] = []
    i = 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            tokens.append(line[i : i + 2])
            i += 2
        else:
            tokens.append(line[i])
            i += 1
    while tokens and tokens[-1] == " ":
        tokens.pop()
    return "".join(tokens).replace("\\ ", " ")


def _unescape(line: str) -> str:
    return re.sub(r"\\([^\\])", r"\1", line).replace("\\\\", "\\")


def parse_gcloud_line(line: str) -> GcloudPattern | None:
    """A pattern, or None for a comment, a blank or an invalid line (gcloud skips those)."""
    if line.startswith("#"):
        return None
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    must_be_dir = line.endswith("/")
    if must_be_dir:
        line = line[:-1]
    line = _strip_unescaped_trailing_spaces(line)
    if _ODD_BACKSLASHES.search(line):
        return None
    line = _unescape(line)
    if not line:
        return None
    return GcloudPattern(tuple(line.split("/")), negated, must_be_dir)


def parse_gcloudignore(text: str, read: Reader, includes: int = 1) -> list[GcloudPattern]:
    """The patterns of a ``.gcloudignore``; ``includes`` is how deep ``#!include`` nests."""
    patterns: list[GcloudPattern] = []
    for line in text.splitlines():
        if line.startswith("#"):
            if line[1:].lstrip().startswith(_INCLUDE):
                patterns += _included(line, read, includes)
            continue
        pattern = parse_gcloud_line(line)
        if pattern is not None:
            patterns.append(pattern)
    return patterns


def _included(line: str, read: Reader, includes: int) -> list[GcloudPattern]:
    name = line[line.find(_INCLUDE) + len(_INCLUDE) :]
    if "/" in name:
        raise InvalidError(
            f"{GCLOUDIGNORE}: {line!r} includes a file in another folder; "
            "#!include may only name a file beside .gcloudignore",
            field=GCLOUDIGNORE,
        )
    if not includes:
        return []
    text = read(name)
    if text is None:
        raise InvalidError(
            f"{GCLOUDIGNORE}: {line!r} includes {name}, which does not exist; "
            "create it or remove the line",
            field=GCLOUDIGNORE,
        )
    return parse_gcloudignore(text, read, includes - 1)


@dataclass(frozen=True)
class GcloudRules:
    """gcloud's FileChooser: the patterns of one ``.gcloudignore``."""

    patterns: tuple[GcloudPattern, ...]

    def includes(self, path: str, is_dir: bool) -> bool:
        for prefix in path_prefixes(path)[1:]:
            prefix_is_dir = prefix != path or is_dir
            verdict: bool | None = None
            for pattern in self.patterns:
                if pattern.matches(prefix, prefix_is_dir):
                    verdict = pattern.negated
            if verdict is False:
                return False
        return True


# -- docker --------------------------------------------------------------------------------


def _clean(path: str) -> str:
    """Go's filepath.Clean for slash-separated paths."""
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


@dataclass(frozen=True)
class DockerPattern:
    """One line of a ``.dockerignore``, compiled as moby's patternmatcher does."""

    text: str
    exclusion: bool
    regex: re.Pattern[str]

    def matches(self, path: str) -> bool:
        return self.regex.match(path) is not None


def compile_docker_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression moby's patternmatcher makes of a cleaned pattern."""
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*" and pattern[i : i + 1] == "*":
            i += 1
            if pattern[i : i + 1] == "/":
                i += 1
            out += ".*" if i >= len(pattern) else "(.*/)?"
        elif ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch in _GO_ESCAPED:
            out += "\\" + ch
        elif ch == "\\":
            out += re.escape(pattern[i]) if i < len(pattern) else "\\\\"
            i += 1
        else:
            out += ch  # including [ and ], which keep their character-class meaning
    return re.compile(out + "$", re.DOTALL)


def parse_docker_line(line: str) -> DockerPattern | None:
    """A pattern, or None for a comment or a blank line."""
    if line.startswith("#"):
        return None
    line = line.strip()
    exclusion = line.startswith("!")
    if exclusion:
        line = line[1:].strip()
    if not line:
        if exclusion:
            raise InvalidError(
                f'{DOCKERIGNORE}: a lone "!" is not a pattern; remove it', field=DOCKERIGNORE
            )
        return None
    line = _clean(line)
    if len(line) > 1 and line.startswith("/"):
        line = line[1:]
    try:
        regex = compile_docker_pattern(line)
    except (ValueError, re.error) as exc:
        raise InvalidError(
            f"{DOCKERIGNORE}: {line!r} is not a valid pattern ({exc}); fix or remove it",
            field=DOCKERIGNORE,
        ) from None
    return DockerPattern(line, exclusion, regex)


def parse_dockerignore(text: str) -> list[DockerPattern]:
    text = text.removeprefix("\ufeff")
    return [p for p in map(parse_docker_line, text.splitlines()) if p is not None]


@dataclass(frozen=True)
class DockerRules:
    """Docker's pattern matcher over one ``.dockerignore``."""

    patterns: tuple[DockerPattern, ...]

    def excludes(self, path: str) -> bool:
        """True if the path (or a folder above it) is excluded; the last match wins."""
        parents = path.split("/")[:-1]
        parent_paths = ["/".join(parents[: i + 1]) for i in range(len(parents))]
        excluded = False
        for pattern in self.patterns:
            if pattern.exclusion != excluded:
                continue
            if pattern.matches(path) or any(pattern.matches(p) for p in parent_paths):
                excluded = not pattern.exclusion
        return excluded

    def may_reinclude_under(self, folder: str) -> bool:
        """Whether a ``!`` pattern names something under an excluded folder (the docker
        CLI's test for walking into it anyway)."""
        prefix = folder + "/"
        return any(p.exclusion and (p.text + "/").startswith(prefix) for p in self.patterns)


# -- both ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRules:
    """Both rule sets of a source folder; ``files`` names the ignore files that apply."""

    gcloud: GcloudRules | None = None
    docker: DockerRules | None = None

    @property
    def files(self) -> list[str]:
        return [
            name
            for name, rules in ((GCLOUDIGNORE, self.gcloud), (DOCKERIGNORE, self.docker))
            if rules is not None
        ]

    def includes(self, path: str, is_dir: bool) -> bool:
        """Whether ``path`` (relative, ``/``-separated) goes into the context."""
        if self.gcloud is not None and not self.gcloud.includes(path, is_dir):
            return False
        if self.docker is None or path in ALWAYS_SENT:
            return True
        return not self.docker.excludes(path)

    def descend(self, folder: str) -> bool:
        """Whether walking into ``folder`` can find anything to include."""
        if self.includes(folder, is_dir=True):
            return True
        if self.gcloud is not None and not self.gcloud.includes(folder, is_dir=True):
            return False  # gcloud never re-includes below an ignored folder
        return self.docker is not None and self.docker.may_reinclude_under(folder)


def load_rules(read: Reader, has_git: bool) -> IgnoreRules:
    """The rules of a folder, reading its ignore files through ``read``.

    ``has_git``: the folder holds ``.git`` or ``.gitignore``, which makes gcloud use its
    default rules when there is no ``.gcloudignore``.
    """
    gcloud_text = read(GCLOUDIGNORE)
    if gcloud_text is None and has_git:
        gitignore = read(".gitignore") is not None
        gcloud_text = GCLOUD_DEFAULT + ("#!include:.gitignore\n" if gitignore else "")
    gcloud = (
        GcloudRules(tuple(parse_gcloudignore(gcloud_text, read)))
        if gcloud_text is not None
        else None
    )
    docker_text = read(DOCKERIGNORE)
    docker = (
        DockerRules(tuple(parse_dockerignore(docker_text))) if docker_text is not None else None
    )
    return IgnoreRules(gcloud, docker)
