"""The core round trip with the repository, the catalog, the source image and the restore
targets on each filesystem users keep them on, under the kernel users run (docs/reliability.md,
"Filesystems").

Each kernel- and filesystem-dependent call of the data path is on this path: O_DIRECT pack
writes and restores (set after the open; refused by tmpfs before Linux 6.6), O_EXCL
temporary files, SEEK_DATA/SEEK_HOLE on the source, mincore and POSIX_FADV_RANDOM/DONTNEED
while reading, sparse restores (holes skipped, then ftruncate), F_SETPIPE_SZ on a restore
to a pipe, BLKGETSIZE64 and O_EXCL on a loop device as source and target, and fsync of
files and directories.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lvbhelpers import Lvb, assert_refused, ct, mixed

run = ct.run

MiB = 1 << 20
SIZE = 24 * MiB


@pytest.fixture(scope="module")
def mounts(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """A fresh tmpfs, ext4 and xfs, the last two on loop devices over sparse files."""
    base = tmp_path_factory.mktemp("fs")
    made: dict[str, Path] = {}
    try:
        for fs in ("tmpfs", "ext4", "xfs"):
            point = base / fs
            point.mkdir()
            if fs == "tmpfs":
                run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", point])
            else:
                image = base / f"{fs}.img"
                with open(image, "wb") as f:
                    f.truncate(1 << 30)
                run([f"mkfs.{fs}", "-q", *(["-F"] if fs == "ext4" else []), image])
                run(["mount", "-o", "loop", image, point])
            made[fs] = point
        yield made
    finally:
        for point in made.values():
            run(["umount", point], check=False)


def _image(path: Path) -> bytes:
    """A sparse source image: data, a 8 MiB hole, data."""
    data = mixed(8 * MiB, b"a") + bytes(8 * MiB) + mixed(8 * MiB, b"b")
    with open(path, "wb") as f:
        f.write(data[:8 * MiB])
        f.seek(16 * MiB)
        f.write(data[16 * MiB:])
    return data


def _restore_to_pipe(lvb: Lvb, backup_id: str) -> bytes:
    """`restore --to-file -` read through a pipe (where F_SETPIPE_SZ applies)."""
    p = subprocess.Popen(lvb.argv("restore", backup_id, "--to-file", "-"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode(errors="replace")
    return out


def _loop(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return run(["losetup", "--find", "--show", path]).strip()


def round_trip(lvb: Lvb, data_dir: Path, target_dir: Path, block_device: bool) -> None:
    """init, full and incremental backups, restores to a file and a pipe (and to and from a
    loop device), verify --deep, delete and gc; each restored byte compared."""
    src = data_dir / "source.img"
    first = _image(src)
    lvb("init", "--block-size", "64K")
    full = lvb.json("create", "--device", src)
    assert full["status"] == "available", full
    assert full["stored_bytes"] < 17 * MiB, full  # the hole was neither read nor stored

    changed = os.urandom(1 * MiB)
    with open(src, "r+b") as f:
        f.seek(3 * MiB)
        f.write(changed)
    second = first[:3 * MiB] + changed + first[4 * MiB:]
    incr = lvb.json("create", "--device", src, "--incremental")
    assert incr["parent_id"] == full["id"] and incr["status"] == "available", incr

    out = target_dir / "restored.img"
    lvb("restore", full["id"], "--to-file", out)
    assert out.read_bytes() == first
    # The hole was skipped, not written as zeros (a sparse restore).
    assert os.stat(out).st_blocks * 512 <= SIZE - 4 * MiB, os.stat(out)
    restored = _restore_to_pipe(lvb, incr["id"])
    assert hashlib.sha256(restored).digest() == hashlib.sha256(second).digest()

    if block_device:
        loops = [_loop(target_dir / "dev.img", SIZE)]
        try:
            lvb("restore", incr["id"], "--to", loops[0])
            with open(loops[0], "rb") as f:
                assert f.read() == second
            dev = lvb.json("create", "--device", loops[0])
            assert dev["size"] == SIZE and dev["status"] == "available", dev
            lvb("delete", dev["id"])
        finally:
            for loop in loops:
                run(["losetup", "-d", loop], check=False)

    lvb("verify", "--deep")
    lvb("delete", incr["id"])
    lvb("gc")
    lvb("restore", full["id"], "--to-file", out, "--force")
    assert out.read_bytes() == first
    repo = lvb.config.parent / "repo"
    assert not list((repo / "tmp").glob("*")), "temporary files left in the repository"
    strays = [p for p in target_dir.iterdir() if ".lvbackup-" in p.name]
    assert not strays, strays


@pytest.mark.parametrize("fs", ["tmpfs", "ext4", "xfs"])
def test_round_trip_with_everything_on(mounts, fs):
    where = mounts[fs] / "all"
    lvb = Lvb(where)
    round_trip(lvb, where, where, block_device=True)


def test_repository_and_restore_target_on_9p(tmp_path):
    ninep = Path(os.environ["LVBACKUP_VM_9P"]) / tmp_path.name
    ninep.mkdir()
    lvb = Lvb(tmp_path / "state", repository=str(ninep / "repo"))
    round_trip(lvb, tmp_path, ninep, block_device=False)


def test_catalog_on_9p_is_refused_with_the_setting_to_change(tmp_path):
    ninep = Path(os.environ["LVBACKUP_VM_9P"]) / tmp_path.name
    ninep.mkdir()
    # The cache lives beside the catalog unless told otherwise: either is named.
    lvb = Lvb(tmp_path, catalog=str(ninep / "catalog.db"))
    line = assert_refused(lvb("init", check=False), "shared memory mapping")
    assert str(ninep) in line and "beside the catalog" in line, line
    lvb = Lvb(tmp_path, catalog=str(ninep / "catalog.db"), cache_dir=str(tmp_path / "cache"))
    line = assert_refused(lvb("init", check=False), "shared memory mapping")
    assert str(ninep / "catalog.db") in line and "catalog:" in line, line

    local = tmp_path / "local"
    lvb = Lvb(local)
    lvb("init")
    lvb = Lvb(local, cache_dir=str(ninep / "cache"))
    src = tmp_path / "source.img"
    _image(src)
    line = assert_refused(lvb("create", "--device", src, check=False), "shared memory mapping")
    assert str(ninep / "cache") in line and "cache_dir:" in line, line
    # Nothing was recorded as backed up; with a local cache the same backup succeeds.
    lvb = Lvb(local)
    assert lvb.json("create", "--device", src)["status"] == "available"
    assert [r["status"] for r in lvb.rows()] == ["available"]
