"""Restores never write where they must not: through a symbolic link, over a device node
with --to-file, or onto a volume that a backup is reading."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path

import pytest

from lvbackup.sources import device_volume_id

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


def test_to_file_replaces_a_regular_file(tmp_path: Path, backed_up) -> None:
    wd, rec, data = backed_up
    out = tmp_path / "out"
    out.write_bytes(b"old")
    p = wd.run("restore", rec["id"], "--to-file", out)
    assert p.returncode == 0, describe(p)
    assert out.read_bytes() == data


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
    p = wd.run("restore", rec["id"], "--to-file", big)
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
