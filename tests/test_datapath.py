"""The data path as a library: block maps (hole / read / inherit), backups and restores
through it, and random-access reads of a backup."""

from __future__ import annotations

import errno
import os
import random
import uuid
from collections.abc import Iterator

import pytest

from lvbackup.base.errors import LvbackupError, UsageError
from lvbackup.datapath.backup import ScanStats, write_backup
from lvbackup.datapath.blockmap import FileBlocks, Kind, Run
from lvbackup.datapath.reader import BackupReader
from lvbackup.datapath.unpack import BlockError, restore_blocks
from lvbackup.repository.keys import PASSPHRASE, Secret
from lvbackup.repository.manifest import PAGE_ENTRIES
from lvbackup.repository.repo import Repository

BS = 64 * 1024


@pytest.fixture(params=["plain", "encrypted"])
def repo(tmp_path, request) -> Iterator[Repository]:
    """Every data-path test runs on an unencrypted and on an encrypted repository."""
    secret = [Secret(PASSPHRASE, b"datapath", "test")]
    r, _ = Repository.init(tmp_path / "repo", tmp_path / "cache", BS, lambda: secret,
                           encrypt=request.param == "encrypted")
    assert r.encrypted == (request.param == "encrypted")
    yield r
    r.close()


class MemorySource:
    """A source in memory with a given block map; reading any block the map does not mark
    READ fails with EIO, as a device would that must not be touched there."""

    def __init__(self, data: bytes, runs: list[Run]):
        self.data, self.size, self.runs = data, len(data), runs
        self.read_blocks: set[int] = set()

    def block_map(self, block_size: int) -> Iterator[Run]:
        yield from self.runs

    def readinto(self, view: memoryview, offset: int) -> None:
        for b in range(offset // BS, (offset + len(view) - 1) // BS + 1):
            if not any(r.kind == Kind.READ and r.first <= b < r.first + r.blocks
                       for r in self.runs):
                raise OSError(errno.EIO, "Input/output error (block outside the READ runs)")
            self.read_blocks.add(b)
        view[:] = self.data[offset:offset + len(view)]

    def check_size(self) -> None:
        assert len(self.data) == self.size


class ShrinksAfterItsMap(FileBlocks):
    """A file cut short once its whole map was handed out (a device removed late in a run)."""

    def __init__(self, fd: int, cut_to: int):
        super().__init__(fd)
        self.cut_to = cut_to

    def block_map(self, block_size: int) -> Iterator[Run]:
        yield from super().block_map(block_size)
        os.ftruncate(self.fd, self.cut_to)


def backup(repo: Repository, source, parent_id: str | None = None) -> str:
    backup_id = str(uuid.uuid4())
    parent = repo.manifest(parent_id) if parent_id else None

    def finish(stats: ScanStats) -> dict:
        return {"id": backup_id, "stored_bytes": stats.stored_bytes}

    write_backup(repo, source, parent, backup_id, finish, workers=2, level=1)
    return backup_id


def restored(repo: Repository, backup_id: str) -> bytes:
    m = repo.manifest(backup_id)
    return b"".join(bytes(seg.view) for seg in restore_blocks(repo, m, workers=2,
                                                               fill_holes=True))


def image(blocks: int, seed: int) -> bytearray:
    rng = random.Random(seed)
    return bytearray(b"".join(rng.randbytes(BS // 2) + bytes(BS // 2) for _ in range(blocks)))


def test_inherited_blocks_are_never_read_and_restore_bit_exact(repo):
    n = 200
    old = image(n, 1)
    full = backup(repo, MemorySource(bytes(old), [Run(Kind.READ, 0, n)]))
    new = bytearray(old)
    for b in (3, 4, 150):
        new[b * BS:b * BS + 100] = os.urandom(100)
    new[180 * BS:181 * BS] = bytes(BS)  # discarded: the source says it reads as zeros
    runs = [Run(Kind.INHERIT, 0, 3), Run(Kind.READ, 3, 2), Run(Kind.INHERIT, 5, 145),
            Run(Kind.READ, 150, 1), Run(Kind.INHERIT, 151, 29), Run(Kind.HOLE, 180, 1),
            Run(Kind.INHERIT, 181, 19)]
    src = MemorySource(bytes(new), runs)
    incr = backup(repo, src, full)
    assert src.read_blocks == {3, 4, 150}
    assert restored(repo, incr) == bytes(new)
    assert restored(repo, full) == bytes(old)


def test_a_map_that_inherits_without_a_parent_is_refused(repo):
    data = bytes(image(4, 2))
    with pytest.raises(UsageError, match="no parent"):
        backup(repo, MemorySource(data, [Run(Kind.READ, 0, 2), Run(Kind.INHERIT, 2, 2)]))


def test_a_map_that_inherits_past_the_parent_is_refused(repo):
    old = bytes(image(4, 3))
    full = backup(repo, MemorySource(old, [Run(Kind.READ, 0, 4)]))
    grown = old + bytes(image(2, 4))
    with pytest.raises(UsageError, match="past the parent"):
        backup(repo, MemorySource(grown, [Run(Kind.INHERIT, 0, 6)]), full)
    # A parent that ends inside a block: that block cannot be inherited into a longer one.
    short = old[:-100]
    part = backup(repo, MemorySource(short, [Run(Kind.READ, 0, 4)]))
    with pytest.raises(UsageError, match="past the parent"):
        backup(repo, MemorySource(old, [Run(Kind.INHERIT, 0, 4)]), part)
    # The same size as the parent: its last, short block can be.
    again = backup(repo, MemorySource(short, [Run(Kind.INHERIT, 0, 4)]), part)
    assert restored(repo, again) == short


@pytest.mark.parametrize("runs", [
    [Run(Kind.READ, 0, 3)],                             # does not cover the volume
    [Run(Kind.READ, 0, 2), Run(Kind.READ, 3, 1)],       # a gap
    [Run(Kind.READ, 0, 5)],                             # past the end
    [Run(Kind.READ, 0, 4), Run(Kind.READ, 4, 1)],       # a run after the end
])
def test_a_map_that_does_not_cover_the_blocks_in_order_is_refused(repo, runs):
    with pytest.raises(UsageError, match="block map"):
        backup(repo, MemorySource(bytes(image(4, 5)), runs))


def test_file_source_reports_holes_and_reads_the_rest(tmp_path, repo):
    path = tmp_path / "sparse.img"
    data = bytes(image(8, 6))
    with open(path, "wb") as f:
        f.write(data[:2 * BS])
        f.seek(6 * BS)
        f.write(data[6 * BS:])
    expected = data[:2 * BS] + bytes(4 * BS) + data[6 * BS:]
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = FileBlocks(fd)
        runs = list(blocks.block_map(BS))
        assert Run(Kind.HOLE, 2, 4) in runs and sum(r.blocks for r in runs) == 8
        backup_id = backup(repo, blocks)
    finally:
        os.close(fd)
    assert restored(repo, backup_id) == expected


def test_a_source_cut_short_in_a_hole_after_its_map_fails_the_backup(tmp_path, repo):
    path = tmp_path / "tail.img"
    with open(path, "wb") as f:
        f.write(bytes(image(2, 3)))
        f.truncate(40 * BS)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(LvbackupError, match=f"the source ended at byte {20 * BS}"):
            backup(repo, ShrinksAfterItsMap(fd, 20 * BS))
    finally:
        os.close(fd)


def test_reader_serves_any_range(repo):
    n = PAGE_ENTRIES + 40   # more than one manifest page
    data = bytes(image(n, 7))[:-333]
    backup_id = backup(repo, MemorySource(data, [Run(Kind.READ, 0, n)]))
    reader = BackupReader(repo, repo.manifest(backup_id), cache_bytes=4 * BS)
    rng = random.Random(8)
    for _ in range(300):
        off = rng.randrange(len(data))
        length = rng.randrange(0, min(3 * BS, len(data) - off) + 1)
        assert reader.read(off, length) == data[off:off + length]
    assert reader.read(len(data) - 10, 10) == data[-10:]
    assert reader.read(0, len(data)) == data
    assert reader._cache.weight <= 4 * BS, "the cache stays bounded"
    with pytest.raises(UsageError, match="outside"):
        reader.read(len(data) - 10, 11)


def test_reader_gives_an_error_not_wrong_data_for_a_damaged_chunk(repo, tmp_path):
    data = bytes(image(10, 9))
    backup_id = backup(repo, MemorySource(data, [Run(Kind.READ, 0, 10)]))
    m = repo.manifest(backup_id)
    cid = m.entries_at(4, 1).chunk_id(0)
    ref = repo.index.lookup([cid])[cid]
    pack = next(p for p in (tmp_path / "repo" / "packs").rglob("*") if p.name == ref.pack_id.hex())
    raw = bytearray(pack.read_bytes())
    raw[ref.offset + ref.length // 2] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(raw))
    repo.storage.close()   # drop cached descriptors of the old file
    reader = BackupReader(repo, m)
    assert reader.read(0, 4 * BS) == data[:4 * BS]
    with pytest.raises(BlockError, match="block 4"):
        reader.read(4 * BS + 10, 10)


def test_a_long_hole_costs_no_pages(repo):
    n = PAGE_ENTRIES * 4
    data = bytes(n * BS)
    backup_id = backup(repo, MemorySource(data, [Run(Kind.HOLE, 0, n)]))
    m = repo.manifest(backup_id)
    assert m.page_ids() == [] and m.blocks == n
    assert restored(repo, backup_id) == data


def test_long_holes_are_stretches_and_restore_bit_exact(repo):
    """Holes spanning many segments pass as one stretch (no entries written out for them),
    between data, at the start and at the end, full and incremental."""
    per_seg = 4 * 1024 * 1024 // BS
    n = per_seg * 40 + 7
    data = bytearray(n * BS)
    for b in (3, per_seg * 20 + 5, n - 9):
        data[b * BS:(b + 1) * BS] = os.urandom(BS)
    runs = [Run(Kind.HOLE, 0, 3), Run(Kind.READ, 3, 1), Run(Kind.HOLE, 4, per_seg * 20 + 1),
            Run(Kind.READ, per_seg * 20 + 5, 1),
            Run(Kind.HOLE, per_seg * 20 + 6, n - 15 - per_seg * 20),
            Run(Kind.READ, n - 9, 1), Run(Kind.HOLE, n - 8, 8)]
    full = backup(repo, MemorySource(bytes(data), runs))
    assert restored(repo, full) == bytes(data)
    # Only the pages that name a data block are stored.
    assert len(repo.manifest(full).page_ids()) == 3
    data[(n - 9) * BS:(n - 8) * BS] = bytes(BS)
    incr_runs = runs[:-2] + [Run(Kind.HOLE, n - 9, 9)]
    incr_runs[0:3] = [Run(Kind.INHERIT, 0, per_seg * 20 + 5)]
    incr = backup(repo, MemorySource(bytes(data), incr_runs), full)
    assert restored(repo, incr) == bytes(data)


def test_inherited_stretches_take_the_parents_pages_unread(repo, monkeypatch):
    """An incremental that inherits whole manifest pages names them by the parent's page ids
    without reading them; its entries equal those of an incremental that reads every block."""
    n = PAGE_ENTRIES * 3 + 10
    old = image(n, 7)
    full = backup(repo, MemorySource(bytes(old), [Run(Kind.READ, 0, n)]))
    new = bytearray(old)
    changed = PAGE_ENTRIES + 44
    new[changed * BS:changed * BS + 10] = os.urandom(10)
    scan = backup(repo, MemorySource(bytes(new), [Run(Kind.READ, 0, n)]), full)
    asked: list[bytes] = []
    read_pages = Repository.read_pages

    def counting(self, ids):
        asked.extend(ids)
        return read_pages(self, ids)

    monkeypatch.setattr(Repository, "read_pages", counting)
    runs = [Run(Kind.INHERIT, 0, changed), Run(Kind.READ, changed, 1),
            Run(Kind.INHERIT, changed + 1, n - changed - 1)]
    src = MemorySource(bytes(new), runs)
    incr = backup(repo, src, full)
    assert src.read_blocks == {changed}
    parent_pages = repo.manifest(full).page_table(0, 4)
    pages = repo.manifest(incr).page_table(0, 4)
    whole = [0, 2]       # pages 0 and 2 inherited whole; 1 changed; 3 is the short last one
    for p in whole:
        assert pages[p * 32:(p + 1) * 32] == parent_pages[p * 32:(p + 1) * 32]
        assert parent_pages[p * 32:(p + 1) * 32] not in asked
    assert pages[32:64] != parent_pages[32:64]
    monkeypatch.undo()
    m_incr, m_scan = repo.manifest(incr), repo.manifest(scan)
    assert m_incr.entries_at(0, n).raw == m_scan.entries_at(0, n).raw
    assert restored(repo, incr) == bytes(new)
