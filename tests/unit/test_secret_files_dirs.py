"""The host side of secret mounts (runtimes/secretfiles.py) on a real RAM filesystem."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlet.runtimes.base import RuntimeFailure, SecretFile
from cloudlet.runtimes.secretfiles import SecretDirs, filesystem_of

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
25 22 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw
26 22 0:24 / /run rw,nosuid - tmpfs tmpfs rw
27 26 0:25 / /run/my\\040disk rw - ext4 /dev/vdb rw
28 22 0:26 / /dev/shm rw,relatime - ext4 /dev/vdc rw
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/", "ext4"),
        ("/run", "tmpfs"),
        ("/run/x/y", "tmpfs"),
        ("/run/my disk/z", "ext4"),
        ("/running", "ext4"),
        ("/dev/shm/a", "ext4"),  # the later of two mounts at one point is the visible one
    ],
)
def test_the_filesystem_of_a_path_is_its_innermost_mount(path: str, kind: str) -> None:
    assert filesystem_of(path, MOUNTINFO) == kind


@pytest.fixture
def ram() -> Iterator[Path]:
    """A fresh directory on /dev/shm, a tmpfs on every Linux."""
    path = Path("/dev/shm") / f"cloudlet-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        for parent, dirs, _ in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(parent, name), 0o700)
        shutil.rmtree(path)


FILES = (
    SecretFile("/secrets/api", "key", b"one\x00two", 0o444),
    SecretFile("/secrets/api", "nested/other", b"three", 0o400),
    SecretFile("/etc/app", "config", b"four", 0o444),
)


def test_files_are_written_per_mount_and_mounted_read_only(ram: Path) -> None:
    dirs = SecretDirs("owner1", candidates=[str(ram)])
    mounts = dirs.write("cloudlet-web-00001-abc-x1y2z3", FILES)
    root = ram / "cloudlet-owner1"
    base = root / "cloudlet-web-00001-abc-x1y2z3"
    assert mounts == [
        {"Type": "bind", "Source": str(base / "0"), "Target": "/secrets/api", "ReadOnly": True},
        {"Type": "bind", "Source": str(base / "1"), "Target": "/etc/app", "ReadOnly": True},
    ]
    assert (base / "0" / "key").read_bytes() == b"one\x00two"
    assert (base / "0" / "nested" / "other").read_bytes() == b"three"
    assert (base / "1" / "config").read_bytes() == b"four"
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700  # other host users stay out
    assert stat.S_IMODE(os.stat(base / "0").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(base / "0" / "nested").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(base / "0" / "key").st_mode) == 0o444
    assert stat.S_IMODE(os.stat(base / "0" / "nested" / "other").st_mode) == 0o400


def test_a_stopped_containers_files_are_removed(ram: Path) -> None:
    dirs = SecretDirs("owner2", candidates=[str(ram)])
    dirs.write("cloudlet-web-1", FILES)
    dirs.track("container-id-1", "cloudlet-web-1")
    dirs.release("container-id-1")
    assert list((ram / "cloudlet-owner2").iterdir()) == []
    dirs.close()  # the server stops: nothing left on the host
    assert not (ram / "cloudlet-owner2").exists()


def test_adoption_removes_dirs_of_containers_that_no_longer_run(ram: Path) -> None:
    before = SecretDirs("owner3", candidates=[str(ram)])
    before.write("cloudlet-alive", FILES)
    before.write("cloudlet-gone", FILES)
    after = SecretDirs("owner3", candidates=[str(ram)])  # a restarted server
    after.write("cloudlet-being-created", FILES)
    after.adopt({"id-alive": "cloudlet-alive"})
    left = sorted(p.name for p in (ram / "cloudlet-owner3").iterdir())
    assert left == ["cloudlet-alive", "cloudlet-being-created"]
    after.close()  # instances outlive the server: their files stay for the next one
    assert (ram / "cloudlet-owner3" / "cloudlet-alive" / "0" / "key").exists()
    after.release("id-alive")
    assert not (ram / "cloudlet-owner3" / "cloudlet-alive").exists()


def test_without_a_ram_filesystem_no_secret_is_written(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"22 1 254:0 / / rw - ext4 /dev/vda rw\n25 22 0:23 / {tmp_path} rw - ext4 x rw\n"
    )
    dirs = SecretDirs("owner4", candidates=[str(tmp_path)], mountinfo=str(mountinfo))
    with pytest.raises(RuntimeFailure, match="need a RAM filesystem"):
        dirs.write("cloudlet-web-1", FILES)
    assert list(tmp_path.iterdir()) == [mountinfo]


def test_a_root_someone_else_could_read_is_refused(ram: Path) -> None:
    (ram / "cloudlet-owner5").mkdir(mode=0o755)
    os.chmod(ram / "cloudlet-owner5", 0o755)
    with pytest.raises(RuntimeFailure, match="not a private directory"):
        SecretDirs("owner5", candidates=[str(ram)]).write("cloudlet-web-1", FILES)
