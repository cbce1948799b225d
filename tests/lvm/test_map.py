"""Mapping a backup as a block device through nbdkit and the kernel's NBD client (module
nbd), for real: `map`, `mount`, `unmount`, `unmap`, `list --mapped`, a damaged chunk read
through the device, `--writable` overlays, backups held against delete and gc, and a killed
server cleaned up by `unmap`.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import blake3
import pytest

from lvbackup.repository.backends.local import LocalBackend
from lvbackup.repository.codec import PLAIN
from lvbackup.repository.pack import read_trailer

from lvbhelpers import Lvb, assert_refused, ct, mixed

run = ct.run

MiB = 1 << 20
BLOCK = 64 * 1024


def _read_device(device: str) -> bytes:
    with open(device, "rb") as f:
        return f.read()


def _device_size(device: str) -> int:
    return int(Path(f"/sys/block/{Path(device).name}/size").read_text()) * 512


def _repo_state(repo: Path) -> dict[str, tuple[int, int]]:
    """Every file of the repository: (size, mtime in ns)."""
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in repo.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def ext4(tmp_path_factory):
    """An ext4 image with a few files, backed up: (lvb, backup id, image, {name: bytes})."""
    base = tmp_path_factory.mktemp("map")
    image = base / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(24 * MiB)
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", image])
    files = {f"dir/file{i}.bin": os.urandom(300_000 + i * 77_777) for i in range(4)}
    files["notes.txt"] = b"single-file restore\n" * 1000
    point = base / "src"
    point.mkdir()
    run(["mount", "-o", "loop", image, point])
    try:
        (point / "dir").mkdir()
        for name, data in files.items():
            (point / name).write_bytes(data)
    finally:
        run(["umount", point])
    lvb = Lvb(base / "state", cache_dir=str(base / "state" / "cache"))
    lvb("init", "--block-size", "64K")
    backup = lvb.json("create", "--device", image)
    return lvb, backup["id"], image, files


def test_mount_a_backup_and_read_its_files(ext4, tmp_path):
    lvb, backup_id, _, files = ext4
    point = tmp_path / "mnt"
    point.mkdir()
    mounted = lvb.json("mount", backup_id, point)
    assert mounted["backup_id"] == backup_id and mounted["filesystem"] == "ext4", mounted
    device = mounted["device"]
    try:
        assert device.startswith("/dev/nbd") and mounted["mountpoint"] == str(point), mounted
        for name, data in files.items():
            assert (point / name).read_bytes() == data, name
        with pytest.raises(OSError) as e:
            (point / "new.txt").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        listed = lvb.json("list", "--mapped")
        assert [(m["device"], m["backup_id"], m["alive"], m["mountpoints"]) for m in listed] \
            == [(device, backup_id, True, [str(point)])], listed
        # Mounted: unmap alone is refused.
        assert_refused(lvb("unmap", device, check=False), "is mounted on")
    finally:
        lvb("unmount", point)
    assert not os.path.ismount(point)
    assert _device_size(device) == 0
    assert lvb.json("list", "--mapped") == []


def test_every_block_of_a_mapped_backup_and_backups_held(ext4):
    lvb, backup_id, image, _ = ext4
    expected = image.read_bytes()
    device = lvb.json("map", backup_id)["device"]
    try:
        assert lvb("map", backup_id).stdout.decode().strip().startswith("/dev/nbd")
        got = _read_device(device)
        assert len(got) == len(expected) and hashlib.sha256(got).digest() == \
            hashlib.sha256(expected).digest()
        restored = lvb("restore", backup_id, "--to-file", "-").stdout
        assert restored == got
        # Held: delete and gc refuse while the backup is mapped.
        assert_refused(lvb("delete", backup_id, check=False), "is mapped on")
        assert_refused(lvb("gc", check=False), "is mapped on")
        assert lvb.json("show", backup_id)["status"] == "available"

        # A killed server: nothing it left blocks delete/gc checks, and unmap clears it.
        maps = {m["device"]: m for m in lvb.json("list", "--mapped")}
        assert len(maps) == 2, maps
        pid = maps[device]["pids"][0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        maps = {m["device"]: m for m in lvb.json("list", "--mapped")}
        assert maps[device]["alive"] is False and maps[device]["pids"] == [], maps
        unmapped = lvb.json("unmap", device)
        assert [m["device"] for m in unmapped] == [device]
        assert _device_size(device) == 0
        again = lvb.json("map", backup_id)["device"]
        with open(again, "rb") as f:
            f.seek(5 * MiB)
            assert f.read(MiB) == expected[5 * MiB:6 * MiB]
    finally:
        lvb("unmap", backup_id)   # every map of the backup
    assert lvb.json("list", "--mapped") == []
    lvb("gc")


def test_writable_map_never_writes_the_repository(ext4):
    lvb, backup_id, image, _ = ext4
    expected = image.read_bytes()
    repo = lvb.config.parent / "repo"
    before = _repo_state(repo)
    mapped = lvb.json("map", backup_id, "--writable")
    device = mapped["device"]
    try:
        assert mapped["writable"] is True
        junk = os.urandom(MiB)
        fd = os.open(device, os.O_RDWR)
        try:
            assert os.pwrite(fd, junk, 2 * MiB) == MiB
            os.fsync(fd)
            assert os.pread(fd, MiB, 2 * MiB) == junk
        finally:
            os.close(fd)
        run(["fsck.ext4", "-n", device], check=False)  # fsck of a changed copy: any verdict
    finally:
        lvb("unmap", device)
    overlays = lvb.config.parent / "cache" / "overlays"
    assert not overlays.exists() or not list(overlays.iterdir()), "overlay left behind"
    assert _repo_state(repo) == before
    lvb("verify", "--deep", backup_id)
    assert lvb("restore", backup_id, "--to-file", "-").stdout == expected


def test_a_damaged_chunk_is_an_io_error_on_its_range(tmp_path):
    data = mixed(4 * MiB, b"damage")
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    lvb = Lvb(tmp_path / "state", cache_dir=str(tmp_path / "state" / "cache"))
    lvb("init", "--block-size", "64K")
    backup_id = lvb.json("create", "--device", image)["id"]
    repo = tmp_path / "state" / "repo"
    pack = next((repo / "packs").rglob("*"))
    while pack.is_dir():
        pack = next(pack.iterdir())
    storage = LocalBackend(repo)
    try:
        refs = read_trailer(storage, bytes.fromhex(pack.name), PLAIN)
    finally:
        storage.close()
    ref = refs[len(refs) // 2]
    block = next(i for i in range(len(data) // BLOCK)
                 if blake3.blake3(data[i * BLOCK:(i + 1) * BLOCK]).digest() == ref.chunk_id)
    with open(pack, "r+b") as f:
        f.seek(ref.offset + ref.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x20]))

    device = lvb.json("map", backup_id)["device"]
    try:
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, BLOCK)
            with pytest.raises(OSError) as e:
                os.preadv(fd, [buf], block * BLOCK)
            assert e.value.errno == errno.EIO
            for other in {0, block - 1, block + 1, len(data) // BLOCK - 1} - {block}:
                if 0 <= other < len(data) // BLOCK:
                    assert os.preadv(fd, [buf], other * BLOCK) == BLOCK
                    assert bytes(buf) == data[other * BLOCK:(other + 1) * BLOCK], other
        finally:
            os.close(fd)
    finally:
        lvb("unmap", device)


@pytest.mark.parametrize("point", ["map-server-started", "map-attached"])
def test_a_killed_map_command_leaves_nothing_behind(ext4, point):
    """`lvbackup map` killed while it sets up: the next command undoes the half-made map
    (server stopped, device detached), and the backup maps again."""
    lvb, backup_id, image, _ = ext4
    attached = {d for d in os.listdir("/sys/block") if d.startswith("nbd")
                and _device_size(f"/dev/{d}")}
    p = subprocess.run(lvb.argv("map", backup_id), capture_output=True,
                       env={**{k: v for k, v in os.environ.items()
                               if not k.startswith("LVBACKUP_")}, "LVBACKUP_FAULT": point})
    assert p.returncode == -signal.SIGKILL, p
    assert lvb.json("list", "--mapped") == []
    assert {d for d in os.listdir("/sys/block") if d.startswith("nbd")
            and _device_size(f"/dev/{d}")} == attached
    device = lvb.json("map", backup_id)["device"]
    try:
        with open(device, "rb") as f:
            assert f.read(MiB) == image.read_bytes()[:MiB]
    finally:
        lvb("unmap", device)


def test_mount_a_partition_of_a_disk_image(tmp_path):
    image = tmp_path / "disk.img"
    sectors = 20 * MiB // 512
    # An MBR with one Linux partition from sector 2048 to the end.
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, sectors - 2048)
    with open(image, "wb") as f:
        f.truncate(sectors * 512)
        f.seek(446)
        f.write(entry + bytes(48) + b"\x55\xaa")
    loop = run(["losetup", "--find", "--show", "--partscan", image]).strip()
    point = tmp_path / "mnt"
    point.mkdir()
    try:
        run(["mkfs.ext4", "-q", "-F", f"{loop}p1"])
        run(["mount", f"{loop}p1", point])
        (point / "hello.txt").write_bytes(b"from partition 1\n")
        run(["umount", point])
    finally:
        run(["losetup", "-d", loop])
    lvb = Lvb(tmp_path / "state", cache_dir=str(tmp_path / "state" / "cache"))
    lvb("init", "--block-size", "64K")
    backup_id = lvb.json("create", "--device", image)["id"]
    assert_refused(lvb("mount", backup_id, point, "--partition", "2", check=False),
                   "has no partition 2")
    assert lvb.json("list", "--mapped") == []
    mounted = lvb.json("mount", backup_id, point, "--partition", "1")
    try:
        assert mounted["mounted"] == mounted["device"] + "p1", mounted
        assert (point / "hello.txt").read_bytes() == b"from partition 1\n"
    finally:
        lvb("unmount", point)
    assert lvb.json("list", "--mapped") == []
