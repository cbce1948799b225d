"""Restores never write where they must not: through a symbolic link, over a device node
with --to-file, over an existing file without --force, over an image a loop device in use
serves (even with --force), or onto a volume that a backup is reading."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lvbackup.volumes.sources import device_volume_id
from lvbackup.volumes.targets import loop_devices_of, loop_in_use

from support import MiB, Workdir, assert_one_line_error, describe, make_image


@pytest.fixture
def backed_up(tmp_path: Path, workdir: Workdir) -> tuple[Workdir, dict, bytes]:
    workdir.init()
    data = make_image(tmp_path / "img", 2, seed=30)
    return workdir, workdir.create(tmp_path / "img"), data


def test_to_file_never_writes_through_a_symlink(tmp_path: Path, backed_up) -> None:
    wd, rec, _ = backed_up
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "link"
    link.symlink_to(victim)
    assert_one_line_error(wd.run("restore", rec["id"], "--to-file", link), 2,
                          "symbolic link", str(link))
    assert victim.read_bytes() == b"precious" and link.is_symlink()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert_one_line_error(wd.run("restore", rec["id"], "--to-file", dangling), 2,
                          "symbolic link")
    assert not (tmp_path / "nowhere").exists()


def test_to_file_never_replaces_a_device_node_or_fifo(tmp_path: Path, backed_up) -> None:
    wd, rec, _ = backed_up
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_one_line_error(wd.run("restore", rec["id"], "--to-file", fifo), 2,
                          "not a regular file", "--to")
    assert fifo.is_fifo()
    p = wd.run("restore", rec["id"], "--to-file", "/dev/null")
    assert_one_line_error(p, 2, "not a regular file")
    assert Path("/dev/null").is_char_device()


def test_to_file_refuses_an_existing_file_without_force(tmp_path: Path, backed_up) -> None:
    wd, rec, data = backed_up
    out = tmp_path / "out"
    out.write_bytes(b"old")
    before = out.stat()
    p = wd.run("restore", rec["id"], "--to-file", out)
    assert_one_line_error(p, 2, str(out), "exists", "--force")
    assert out.read_bytes() == b"old" and out.stat().st_mtime_ns == before.st_mtime_ns
    assert list(tmp_path.glob("out.lvbackup-*")) == []
    assert wd.show(rec["id"])["status"] == "available"


def test_force_replaces_a_file_keeping_its_mode_and_owner(tmp_path: Path, backed_up) -> None:
    wd, rec, data = backed_up
    out = tmp_path / "out"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    if os.geteuid() == 0:
        os.chown(out, 1234, 4321)
    owner = out.stat().st_uid, out.stat().st_gid
    p = wd.run("--json", "restore", rec["id"], "--to-file", out, "--force")
    assert p.returncode == 0, describe(p)
    assert out.read_bytes() == data
    st = out.stat()
    assert (st.st_mode & 0o7777, (st.st_uid, st.st_gid)) == (0o640, owner)
    assert json.loads(p.stdout)["created"] is False


def test_a_new_file_is_said_and_made_0600(tmp_path: Path, backed_up) -> None:
    wd, rec, data = backed_up
    out = tmp_path / "new.img"
    p = wd.run("restore", rec["id"], "--to-file", out)
    assert p.returncode == 0, describe(p)
    assert p.stdout.strip() == f"Restored backup {rec['id']} to new file {out}"
    assert out.read_bytes() == data and out.stat().st_mode & 0o777 == 0o600


# --- loop devices ------------------------------------------------------------------------

def test_loop_devices_are_found_from_sysfs(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"x")
    sysfs = tmp_path / "sys" / "block"
    for name, backing in (("loop3", f"{image}\n"), ("loop7", "/elsewhere.img\n"),
                          ("loop12", f"{image} (deleted)\n")):
        (sysfs / name / "loop").mkdir(parents=True)
        (sysfs / name / "loop" / "backing_file").write_text(backing)
        (sysfs / name / "holders").mkdir()
    (sysfs / "loop0").mkdir()       # not attached: no loop/ directory
    assert loop_devices_of(str(image), sysfs) == ["/dev/loop3", "/dev/loop12"]
    (sysfs / "loop3" / "holders" / "dm-0").touch()
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/loop12 /mnt ext4 rw 0 0\n")
    assert loop_in_use("/dev/loop3", sysfs, mounts)
    assert loop_in_use("/dev/loop12", sysfs, mounts)
    assert not loop_in_use("/dev/loop7", sysfs, tmp_path / "no-mounts")


@pytest.fixture
def loop(tmp_path: Path):
    """An ext4 image of 2 MiB attached to a loop device: (image, /dev/loopN)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.fail("these tests need root and losetup (the loop device is the point)")
    image = tmp_path / "fs.img"
    image.write_bytes(bytes(2 * MiB))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        yield image, device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_never_over_a_mounted_loop_image_even_with_force(tmp_path: Path, backed_up,
                                                         loop) -> None:
    wd, rec, _ = backed_up
    image, device = loop
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", device, str(mnt)], check=True)
    try:
        before = image.read_bytes()
        for args in (["--to-file", image], ["--to-file", image, "--force"],
                     ["--to", image], ["--to", image, "--force"]):
            p = wd.run("restore", rec["id"], *args)
            assert_one_line_error(p, 2, device, "in use")
        assert image.read_bytes() == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_never_over_a_loop_image_held_open_exclusively(backed_up, loop) -> None:
    wd, rec, _ = backed_up
    image, device = loop
    fd = os.open(device, os.O_RDONLY | os.O_EXCL)
    try:
        p = wd.run("restore", rec["id"], "--to-file", image, "--force")
        assert_one_line_error(p, 2, device, "in use")
    finally:
        os.close(fd)
    # Attached but unused: --force replaces the file (the loop device keeps the old one).
    p = wd.run("restore", rec["id"], "--to-file", image, "--force")
    assert p.returncode == 0, describe(p)


def test_never_onto_a_volume_a_backup_is_reading(tmp_path: Path, backed_up) -> None:
    """A backup holds its volume's lock while it reads: a restore onto that volume (here
    the image file a real backup is reading, stopped half-way) is refused while it does,
    whatever --force says."""
    wd, rec, _ = backed_up
    big = tmp_path / "big"
    big.write_bytes(os.urandom(96 * MiB))
    lock = wd.cache / "locks" / f"volume-{device_volume_id(str(big.resolve()))}.lock"
    backup = wd.popen("create", "--device", big)
    try:
        while not _held(lock):
            assert backup.poll() is None, "the backup ended before it could be stopped"
            time.sleep(0.002)
        os.kill(backup.pid, signal.SIGSTOP)
        assert _held(lock)
        before = big.read_bytes()
        for target in (["--to-file", big], ["--to", big, "--force"]):
            p = wd.run("restore", rec["id"], *target)
            assert_one_line_error(p, 75, "locked by another lvbackup run")
        assert big.read_bytes() == before
    finally:
        os.kill(backup.pid, signal.SIGCONT)
        backup.communicate()
    assert backup.returncode == 0
    p = wd.run("restore", rec["id"], "--to-file", big, "--force")
    assert p.returncode == 0, describe(p)


def _held(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
