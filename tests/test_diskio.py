"""Direct I/O and the fixed pack buffers: what is written is exactly what was asked for,
whether or not the filesystem takes O_DIRECT, and a pack never outgrows its buffer."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
from pathlib import Path

import blake3
import pytest

from lvbackup.base import diskio
from lvbackup.repository import repo as repo_mod
from lvbackup.repository.backends import LocalBackend
from lvbackup.repository.codec import FLAG_RAW, PLAIN
from lvbackup.repository.pack import PackBuilder, pack_name, read_trailer
from lvbackup.repository.repo import Repository

SHM = Path("/dev/shm")   # tmpfs: refuses O_DIRECT at open


def _dirs(tmp_path: Path) -> list[Path]:
    out = [tmp_path]
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        d = SHM / f"lvbackup-test-{os.getpid()}-{tmp_path.name}"
        d.mkdir()
        out.append(d)
    return out


def _named(pack: bytes) -> bytes:
    """What docs/format.md names a pack by: BLAKE3 of its trailer entries."""
    count = int.from_bytes(pack[-44:-40], "little")
    return blake3.blake3(pack[-44 - 49 * count:-44]).digest()


@pytest.fixture
def dirs(tmp_path):
    found = _dirs(tmp_path)
    yield found
    for d in found[1:]:
        shutil.rmtree(d)


@pytest.mark.parametrize("length", [1, 4095, 4096, 4097, 3 * 4096 + 17, 64 * 1024])
def test_put_of_an_aligned_buffer_stores_exactly_the_bytes(dirs, length, monkeypatch):
    opened = []
    real = diskio.open_file

    def open_file(*args, direct=False):
        opened.append(direct)
        return real(*args, direct=direct)

    monkeypatch.setattr(diskio, "open_file", open_file)
    for d in dirs:
        storage = LocalBackend(d)
        buf = diskio.aligned_buffer(128 * 1024)
        payload = random.Random(length).randbytes(length)
        buf[:length] = payload
        buf[length:length + 100] = b"\xff" * 100   # padding garbage must not survive
        storage.put("packs/x/obj", memoryview(buf)[:length])
        assert (d / "packs/x/obj").read_bytes() == payload, d
        assert not list((d / "tmp").iterdir()), "no temporary file left behind"
    assert opened == [True] * len(dirs), "an aligned buffer is written with O_DIRECT"


def test_pwrite_all_falls_back_when_a_write_is_not_aligned(tmp_path):
    path = tmp_path / "f"
    fd = diskio.open_file(path, os.O_WRONLY | os.O_CREAT, direct=True)
    try:
        # An unaligned length at an unaligned offset: O_DIRECT refuses it (EINVAL), the
        # file drops to buffered writes and the bytes still land.
        diskio.pwrite_all(fd, memoryview(b"hello"), 3)
        diskio.pwrite_all(fd, memoryview(b"!"), 8)
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & diskio.O_DIRECT
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0\0\0hello!"


def test_pwrite_all_writes_padding_only_to_be_truncated(tmp_path):
    path = tmp_path / "f"
    buf = diskio.aligned_buffer(8192)
    buf[:5000] = b"a" * 5000
    buf[5000:] = b"b" * (8192 - 5000)
    fd = diskio.open_file(path, os.O_WRONLY | os.O_CREAT, direct=True)
    try:
        diskio.pwrite_all(fd, memoryview(buf)[:5000], 0, memoryview(buf)[:8192])
        os.ftruncate(fd, 5000)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"a" * 5000


def test_pack_buffer_refuses_what_does_not_fit():
    b = PackBuilder(4096, PLAIN.trailer_digest)
    b.add(b"\1" * 32, b"x" * 1000, 1000, FLAG_RAW)
    assert not b.room(4000)
    with pytest.raises(ValueError):
        b.add(b"\2" * 32, b"y" * 4000, 4000, FLAG_RAW)
    pack_id, data, refs = b.finish()
    assert len(refs) == 1 and pack_id == _named(bytes(data))


def test_reused_pack_buffer_holds_only_the_new_pack():
    b = PackBuilder(1 << 16, PLAIN.trailer_digest)
    b.add(b"\1" * 32, b"first" * 1000, 5000, FLAG_RAW)
    first_id, first, _ = b.finish()
    first = bytes(first)
    b.reset()
    b.add(b"\2" * 32, b"second", 6, FLAG_RAW)
    second_id, second, refs = b.finish()
    assert second_id != first_id and len(second) < len(first)
    assert bytes(second[refs[0].offset:refs[0].offset + 6]) == b"second"


def test_many_tiny_chunks_are_split_into_packs(tmp_path, monkeypatch):
    """A pack holds at most PACK_MAX_CHUNKS chunks, so its trailer stays bounded however
    well the blocks compress."""
    monkeypatch.setattr(repo_mod, "PACK_MAX_CHUNKS", 7)
    repo, _ = Repository.init(tmp_path / "repo", tmp_path / "cache", 4096)
    try:
        packer = repo.packer("run-1")
        chunks = {}
        for i in range(30):
            data = b"%d" % i
            cid = blake3.blake3(data).digest()
            packer.add(cid, data, len(data), FLAG_RAW)
            chunks[cid] = data
        packer.commit()
        assert len(packer.pack_ids) == 5   # 7 + 7 + 7 + 7 + 2
        seen = {}
        for pack_id in packer.pack_ids:
            refs = read_trailer(repo.storage, pack_id, PLAIN)
            assert len(refs) <= 7
            assert _named((tmp_path / "repo" / pack_name(pack_id)).read_bytes()) == pack_id
            for r in refs:
                seen[r.chunk_id] = repo.read_chunk(r)
        assert seen == chunks
    finally:
        repo.close()


def test_pack_buffer_takes_every_kind_of_blob():
    """Blobs come as bytes (compressed), views of a segment buffer (raw blocks), or other
    buffers (gc); each is copied in exactly."""
    b = PackBuilder(1 << 16, PLAIN.trailer_digest)
    seg = diskio.aligned_buffer(4096)
    seg[:4] = b"view"
    blobs = [b"bytes", bytearray(b"bytearray"), memoryview(b"read-only view"),
             memoryview(seg)[:4]]
    for i, blob in enumerate(blobs):
        b.add(bytes([i + 1]) * 32, blob, len(blob), FLAG_RAW)
    _, data, refs = b.finish()
    assert [bytes(data[r.offset:r.offset + r.length]) for r in refs] == \
        [bytes(x) for x in blobs]


@pytest.fixture
def refusing_direct(monkeypatch):
    """A filesystem that refuses O_DIRECT (tmpfs before Linux 6.6): setting it fails EINVAL."""
    real = fcntl.fcntl

    def fake(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & diskio.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)
    monkeypatch.setattr(diskio.fcntl, "fcntl", fake)


def test_exclusive_create_where_o_direct_is_refused(tmp_path, refusing_direct):
    path = tmp_path / "f"
    fd = diskio.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, direct=True)
    try:
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & diskio.O_DIRECT
        diskio.pwrite_all(fd, memoryview(b"data"), 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"data" and os.listdir(tmp_path) == ["f"]


def test_put_where_o_direct_is_refused(tmp_path, refusing_direct):
    storage = LocalBackend(tmp_path)
    buf = diskio.aligned_buffer(8192)
    buf[:5000] = b"z" * 5000
    storage.put("packs/y/obj", memoryview(buf)[:5000])
    assert (tmp_path / "packs/y/obj").read_bytes() == b"z" * 5000
    assert not list((tmp_path / "tmp").iterdir())
