"""`create --device IMAGE` of an image file that a loop device exposes to a read-write mount:
the backup reads a filesystem as it changes, so it warns (one line) that the backup is
crash-consistent at best. Read-only or not mounted: no warning."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support import Workdir, describe


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def loop_image(tmp_path):
    """(image, loop device, mount point): an ext4 image attached to a loop device and
    mounted read-write; detached and unmounted afterwards, whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    run("mkfs.ext4", "-q", "-F", str(image))
    p = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"no loop device: {p.stderr.strip()}")
    device = p.stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        run("mount", device, str(mnt))
        try:
            yield image, device, mnt
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


def warnings(p: subprocess.CompletedProcess) -> list[str]:
    assert p.returncode == 0, describe(p)
    return [line for line in p.stderr.splitlines() if "warning" in line]


def test_an_image_mounted_read_write_through_a_loop_device_warns(tmp_path, loop_image):
    image, device, mnt = loop_image
    (mnt / "file").write_text("changing\n")
    wd = Workdir(tmp_path / "wd")
    wd.init()
    (line,) = warnings(wd.run("create", "--device", image))
    assert "crash-consistent at best" in line and str(mnt) in line and device in line, line
    # The loop device itself, mounted read-write: the same.
    (line,) = warnings(wd.run("create", "--device", device))
    assert "crash-consistent at best" in line and str(mnt) in line, line

    run("mount", "-o", "remount,ro", str(mnt))
    assert warnings(wd.run("create", "--device", image)) == []
    run("umount", str(mnt))
    assert warnings(wd.run("create", "--device", image)) == []
    assert [b["status"] for b in wd.list()] == ["available"] * 4


def test_an_image_attached_to_no_loop_device_does_not_warn(tmp_path):
    image = tmp_path / "plain.img"
    image.write_bytes(os.urandom(1 << 20))
    wd = Workdir(tmp_path / "wd")
    wd.init()
    assert warnings(wd.run("create", "--device", Path(image))) == []
