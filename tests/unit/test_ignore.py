"""Which files go into a build context: gcloud's .gcloudignore and Docker's .dockerignore rules.

The gcloud cases were checked against gcloud's own implementation (googlecloudsdk's
gcloudignore module) and the Docker cases come from Docker's documentation of .dockerignore.
"""

from __future__ import annotations

import tarfile
from io import BytesIO
from pathlib import Path

import pytest

from cloudlet.builder.ignore import (
    DockerRules,
    GcloudRules,
    IgnoreRules,
    load_rules,
    parse_dockerignore,
    parse_gcloudignore,
    path_prefixes,
)
from cloudlet.builder.source import open_source, tar_stream
from cloudlet.domain.errors import InvalidError


def no_files(_: str) -> str | None:
    return None


def gcloud(text: str) -> GcloudRules:
    return GcloudRules(tuple(parse_gcloudignore(text, no_files)))


def docker(text: str) -> DockerRules:
    return DockerRules(tuple(parse_dockerignore(text)))


@pytest.mark.parametrize(
    ("rules", "path", "is_dir", "included"),
    [
        ("foo", "foo", False, False),
        ("foo", "a/b/foo", False, False),  # no leading slash: any depth
        ("foo", "a/foo/bar", False, False),  # under an ignored folder
        ("foo", "foobar", False, True),
        ("/foo", "foo", False, False),
        ("/foo", "a/foo", False, True),  # a leading slash anchors to the root
        ("foo/", "foo", False, True),  # a trailing slash matches folders only
        ("foo/", "foo", True, False),
        ("foo/", "foo/bar", False, False),
        ("*.pyc", "x.pyc", False, False),
        ("*.pyc", "deep/er/x.pyc", False, False),
        ("*.pyc\n!keep.pyc", "keep.pyc", False, True),
        ("*.pyc\n!keep.pyc", "other.pyc", False, False),
        ("build/\n!build/keep", "build/keep", False, False),  # no way back under a folder
        ("a/**/d", "a/d", False, False),
        ("a/**/d", "a/x/y/d", False, False),
        ("a/**/d", "b/d", False, True),
        ("**/c", "q/w/c", False, False),
        ("?ar", "bar", False, False),
        ("?ar", "baar", False, True),
        ("# a comment", "# a comment", False, True),
        ("\\#x", "#x", False, False),  # an escaped # is a pattern
        ("x\\ ", "x ", False, False),  # an escaped trailing space is kept
        ("x ", "x", False, False),  # an unescaped one is not
        ("", "anything", False, True),
    ],
)
def test_gcloudignore_patterns_follow_gcloud(
    rules: str, path: str, is_dir: bool, included: bool
) -> None:
    assert gcloud(rules).includes(path, is_dir) is included


def test_gcloudignore_includes_the_gitignore_it_names() -> None:
    files = {".gitignore": "*.log\n"}
    patterns = parse_gcloudignore("#!include:.gitignore\nnotes/\n", files.get)
    rules = GcloudRules(tuple(patterns))
    assert not rules.includes("server.log", False)
    assert not rules.includes("notes", True)
    assert rules.includes("app.py", False)


def test_an_include_of_a_missing_file_is_an_error_naming_gcloudignore() -> None:
    with pytest.raises(InvalidError, match=r"\.gcloudignore.*\.gitignore.*does not exist"):
        parse_gcloudignore("#!include:.gitignore\n", no_files)


def test_an_include_from_another_folder_is_refused() -> None:
    with pytest.raises(InvalidError, match=r"beside \.gcloudignore"):
        parse_gcloudignore("#!include:sub/.gitignore\n", no_files)


def test_includes_inside_included_files_are_not_followed() -> None:
    files = {".gitignore": "#!include:other\n*.log\n"}
    patterns = parse_gcloudignore("#!include:.gitignore\n", files.get)
    assert [p.parts for p in patterns] == [("*.log",)]


def test_path_prefixes_list_every_folder_above_a_path() -> None:
    assert path_prefixes("a/b/c") == ["", "a", "a/b", "a/b/c"]


@pytest.mark.parametrize(
    ("rules", "path", "excluded"),
    [
        ("*/temp*", "somedir/temporary.txt", True),
        ("*/temp*", "somedir/temp", True),
        ("*/temp*", "temp.txt", False),  # * does not match the empty first element
        ("*/*/temp*", "somedir/subdir/temporary.txt", True),
        ("temp?", "tempa", True),
        ("temp?", "tempab", False),
        ("**/*.go", "a.go", True),
        ("**/*.go", "x/y/a.go", True),
        ("foo", "foo/bar/baz", True),  # a folder's verdict covers what is under it
        ("foo", "x/foo", False),  # matched from the root only
        ("/foo", "foo", True),
        ("./foo", "foo", True),
        ("foo/../bar", "bar", True),
        ("*.md\n!README.md", "README.md", False),
        ("*.md\n!README.md", "other.md", True),
        ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", True),
        ("*.md\n!README*.md\nREADME-secret.md", "README-public.md", False),
        ("# comment\n\n  spaced.txt  ", "spaced.txt", True),
        ("a.b", "axb", False),  # . is literal
        ("[ab].txt", "b.txt", True),
        ("[ab].txt", "c.txt", False),
        ("\\*.txt", "*.txt", True),
        ("\\*.txt", "a.txt", False),
        ("build/**", "build/x/y", True),
        ("build/**", "builder", False),
    ],
)
def test_dockerignore_patterns_follow_docker(rules: str, path: str, excluded: bool) -> None:
    assert docker(rules).excludes(path) is excluded


def test_a_lone_exclamation_mark_in_dockerignore_is_an_error() -> None:
    with pytest.raises(InvalidError, match=r"\.dockerignore"):
        parse_dockerignore("!\n")


def test_a_broken_character_class_in_dockerignore_is_an_error_naming_it() -> None:
    with pytest.raises(InvalidError, match=r"\.dockerignore: '\[ab' is not a valid pattern"):
        parse_dockerignore("[ab\n")


def test_dockerfile_and_dockerignore_are_always_sent() -> None:
    rules = IgnoreRules(docker=docker("Dockerfile\n.dockerignore\n*\n"))
    assert rules.includes("Dockerfile", False)
    assert rules.includes(".dockerignore", False)
    assert not rules.includes("app.py", False)


def test_a_file_goes_in_only_if_both_rule_sets_keep_it() -> None:
    rules = IgnoreRules(gcloud=gcloud("*.log\n"), docker=docker("secret.txt\n"))
    assert rules.includes("app.py", False)
    assert not rules.includes("debug.log", False)
    assert not rules.includes("secret.txt", False)


def test_walking_enters_an_excluded_folder_only_when_a_pattern_brings_something_back() -> None:
    assert IgnoreRules(docker=docker("build\n!build/keep\n")).descend("build")
    assert not IgnoreRules(docker=docker("build\n")).descend("build")
    assert not IgnoreRules(gcloud=gcloud("build/\n!build/keep\n")).descend("build")


def test_without_gcloudignore_a_git_folder_gets_gclouds_default_rules() -> None:
    files = {".gitignore": "*.log\n"}
    rules = load_rules(files.get, has_git=True)
    assert rules.files == [".gcloudignore"]
    for path in (".git", ".gitignore", ".gcloudignore", "server.log"):
        assert not rules.includes(path, path == ".git")
    assert rules.includes("app.py", False)


def test_without_ignore_files_everything_goes_in() -> None:
    rules = load_rules(no_files, has_git=False)
    assert rules.files == []
    assert rules.includes(".git", True)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_context_tar_holds_exactly_the_kept_files(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "Dockerfile": "FROM busybox\n",
            ".dockerignore": "secret.txt\nbuild\n!build/keep\n",
            "app.py": "print('hi')\n",
            "secret.txt": "no\n",
            "build/out.o": "x",
            "build/keep": "k",
            "pkg/mod.py": "",
        },
    )
    (tmp_path / "link").symlink_to("app.py")
    source = open_source(tmp_path, "SOURCE")
    archive = b"".join(tar_stream(source, {"Generated": b"extra\n"}))
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        kept = [".dockerignore", "Dockerfile", "Generated", "app.py", "build/keep", "link"]
        assert sorted(members) == sorted([*kept, "pkg", "pkg/mod.py"])
        assert members["link"].issym() and members["link"].linkname == "app.py"
        assert members["pkg"].isdir()
        assert tar.extractfile("Generated").read() == b"extra\n"  # type: ignore[union-attr]
        assert tar.extractfile("app.py").read() == b"print('hi')\n"  # type: ignore[union-attr]
        assert {m.uid for m in members.values()} == {0}


def test_a_source_that_is_not_a_folder_is_an_error_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(InvalidError, match=r"--source: .* is not a folder"):
        open_source(tmp_path / "missing", "--source")
