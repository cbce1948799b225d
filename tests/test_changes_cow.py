"""Classic snapshot exception stores, built byte for byte the way the kernel lays them out
(dm-snap-persistent): header chunk, then areas of one metadata chunk and the
data chunks it describes; chunks handed out in order, skipping metadata chunks."""

from __future__ import annotations

import ctypes
import random
import struct

import pytest

from lvbackup.base.errors import ChangeTrackingError
from lvbackup.volumes.changes.cow import SNAP_MAGIC, ExceptionStore, read_exception_store
from lvbackup.volumes.changes.ranges import Change, Extent

SECTOR = 512


class Store:
    """A COW device image, and the kernel's way of adding exceptions to it."""

    def __init__(self, chunk_sectors: int, nchunks: int, *, magic: int = SNAP_MAGIC,
                 valid: int = 1, version: int = 1, header_chunk: int | None = None):
        self.chunk = chunk_sectors * SECTOR
        self.per_area = self.chunk // 16
        self.image = bytearray(nchunks * self.chunk)
        struct.pack_into("<4I", self.image, 0, magic, valid, version,
                         chunk_sectors if header_chunk is None else header_chunk)
        self.next_free = 2          # past the header and the first metadata chunk
        self.area = 0
        self.committed = 0
        self.reads: list[tuple[int, int, int]] = []

    def add(self, old: int) -> int:
        """Copy origin chunk `old`: take the next free chunk, record the pair."""
        new = self.next_free
        self.next_free += 1
        if self.next_free % (self.per_area + 1) == 1:
            self.next_free += 1     # that one is the next area's metadata chunk
        self.commit(old, new)
        return new

    def commit(self, old: int, new: int) -> None:
        at = (1 + self.area * (self.per_area + 1)) * self.chunk + 16 * self.committed
        struct.pack_into("<QQ", self.image, at, old, new)
        self.committed += 1
        if self.committed == self.per_area:
            self.area, self.committed = self.area + 1, 0

    def readinto(self, view: memoryview, offset: int) -> None:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        self.reads.append((address, offset, len(view)))
        if offset + len(view) > len(self.image):
            raise OSError("read past the end of the device")
        view[:] = self.image[offset:offset + len(view)]

    def read(self) -> ExceptionStore:
        return read_exception_store(self.readinto, len(self.image))


def test_empty_store() -> None:
    store = Store(8, 16)
    got = store.read()
    assert got.chunk_sectors == 8 and got.chunk_bytes == 4096
    assert got.old_chunks == [] and got.extents() == []


def test_multi_area_store_sorted_and_merged() -> None:
    rng = random.Random(5)
    olds = rng.sample(range(5000), 700)     # 256 pairs per 4 KiB area: three areas
    store = Store(8, 1 + 3 * 257)
    for old in olds:
        store.add(old)
    got = store.read()
    assert got.old_chunks == sorted(olds)
    assert [c for e in got.extents() for c in range(e.begin, e.begin + e.length)] \
        == sorted(olds)
    # Reads: header, then each of the three metadata chunks, page-aligned for O_DIRECT.
    assert [(off, n) for _, off, n in store.reads] == \
        [(0, 4096), (4096, 4096), (258 * 4096, 4096), (515 * 4096, 4096)]
    assert all(address % 4096 == 0 for address, _, _ in store.reads)


def test_extents() -> None:
    store = Store(16, 64)
    for old in (7, 3, 4, 5, 9, 4):          # 4 copied twice: once through the snapshot
        store.add(old)
    got = store.read()
    assert got.old_chunks == [3, 4, 5, 7, 9]
    assert got.extents() == [Extent(Change.CHANGED, 3, 3), Extent(Change.CHANGED, 7, 1),
                             Extent(Change.CHANGED, 9, 1)]


def test_exactly_full_area_ends_at_next_areas_zeros() -> None:
    store = Store(8, 1 + 257 + 1)
    for old in range(256):
        store.add(old)
    assert store.read().old_chunks == list(range(256))


def test_full_area_with_no_room_for_the_next_is_refused() -> None:
    # The kernel zeroes the next area's metadata chunk when one fills; where that chunk
    # would lie past the device the store was invalidated, so a valid one is corrupt.
    store = Store(8, 1 + 257)
    for old in range(256):
        store.add(old)
    with pytest.raises(ChangeTrackingError, match="past the end"):
        store.read()


def test_commits_out_of_order_are_accepted() -> None:
    # Copies complete in any order: pairs need not be in the order chunks were handed out.
    store = Store(8, 32)
    store.commit(10, 3)
    store.commit(11, 2)
    assert store.read().old_chunks == [10, 11]


def test_larger_chunks() -> None:
    store = Store(1024, 8)                  # 512 KiB chunks, the largest lvcreate makes
    store.add(1 << 40)
    got = store.read()
    assert got.chunk_bytes == 512 * 1024 and got.old_chunks == [1 << 40]


@pytest.mark.parametrize("kwargs, match", [
    ({"valid": 0}, "invalid"),
    ({"magic": 0}, "no snapshot header"),
    ({"magic": 0x53416e70}, "no snapshot header"),   # big-endian "SnAp"
    ({"version": 2}, "version"),
    ({"header_chunk": 12}, "power of two"),
    ({"header_chunk": 4}, "power of two"),
    ({"header_chunk": 0}, "power of two"),
    ({"header_chunk": 1 << 30}, "power of two"),
])
def test_bad_headers(kwargs: dict[str, int], match: str) -> None:
    store = Store(8, 16, **kwargs)
    with pytest.raises(ChangeTrackingError, match=match):
        store.read()


@pytest.mark.parametrize("new", [16, 1 << 63, 1, 258])
def test_copies_outside_the_data_chunks_are_refused(new: int) -> None:
    # Past the end, the first metadata chunk, the second one.
    store = Store(8, 16 if new != 258 else 300)
    store.add(1)
    store.commit(2, new)
    with pytest.raises(ChangeTrackingError, match="not a data chunk"):
        store.read()


def test_too_small_devices() -> None:
    with pytest.raises(ChangeTrackingError):
        read_exception_store(Store(8, 1).readinto, 2048)
    store = Store(16, 1)                    # room for the header only
    with pytest.raises(ChangeTrackingError, match="past the end"):
        store.read()


def test_read_errors_propagate() -> None:
    store = Store(8, 1 + 257)
    for old in range(256):
        store.add(old)
    with pytest.raises(OSError):
        # The device is said to be bigger than it is: the next area's read fails.
        read_exception_store(store.readinto, 1000 * 4096)
