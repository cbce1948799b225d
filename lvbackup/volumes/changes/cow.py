"""A classic (non-thin) snapshot's COW device: which origin chunks it holds copies of.

The Linux kernel's persistent exception store (dm-snap-persistent), all little-endian:
chunk 0 is the header, u32 magic 0x70416e53 ("SnAp"), u32 valid, u32 version (1), u32
chunk size in 512-byte sectors. Then areas, area n starting at chunk
1 + n * (E + 1), where E = chunk bytes / 16: one metadata chunk of E (old_chunk u64,
new_chunk u64) pairs, then the E data chunks they point to. The first pair with new_chunk 0
ends the list (chunk 0 is the header, so no copy lives there); an area with all E pairs in
use continues in the next one.

An exception exists for every origin chunk written since the snapshot was taken (and for
every chunk written through the snapshot itself), so the old_chunk list is a superset of
what changed in the origin, as long as the store is valid: the kernel clears the valid flag
when the COW device overflows, after which changes go unrecorded.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ...base.errors import ChangeTrackingError
from .ranges import Change, Extent

SNAP_MAGIC = 0x70416e53
DISK_VERSION = 1
SECTOR = 512
_HEADER = struct.Struct("<4I")
_EXCEPTION = struct.Struct("<QQ")
# O_DIRECT wants whole, aligned sectors of the device's logical block size (at most 4 KiB),
# and the smallest chunk the kernel accepts is a page.
_HEADER_READ = 4096
_MIN_CHUNK_SECTORS = 8
# Far above what lvcreate allows (512 KiB); a bigger one is a corrupt header, and would
# make this allocate a buffer of its size.
_MAX_CHUNK_SECTORS = 1 << 21

ReadInto = Callable[[memoryview, int], None]


@dataclass(frozen=True)
class ExceptionStore:
    chunk_sectors: int
    old_chunks: list[int]     # sorted, each once

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * SECTOR

    def extents(self) -> list[Extent]:
        """The copied chunks as CHANGED extents (units of chunk_bytes), neighbours merged,
        for ranges.block_runs."""
        out: list[Extent] = []
        for chunk in self.old_chunks:
            if out and out[-1].begin + out[-1].length == chunk:
                out[-1] = out[-1]._replace(length=out[-1].length + 1)
            else:
                out.append(Extent(Change.CHANGED, chunk, 1))
        return out


def read_exception_store(readinto: ReadInto, size: int) -> ExceptionStore:
    """The exception store of a COW device of `size` bytes, read with `readinto(view,
    offset)` (which fills all of `view` or raises). Reads are page-aligned buffers of whole
    chunks at chunk offsets, so `readinto` may use O_DIRECT: the kernel writes the store
    behind the page cache's back."""
    if size < _HEADER_READ:
        raise ChangeTrackingError(f"a COW device of {size} bytes holds no exception store")
    with mmap.mmap(-1, _HEADER_READ) as header, memoryview(header) as view:
        readinto(view, 0)
        magic, valid, version, chunk_sectors = _HEADER.unpack_from(header)
    if magic != SNAP_MAGIC:
        raise ChangeTrackingError(f"the COW device has no snapshot header (magic "
                                  f"{magic:#010x})")
    if version != DISK_VERSION:
        raise ChangeTrackingError(f"snapshot exception store version {version} is not "
                                  f"{DISK_VERSION}")
    if not valid:
        raise ChangeTrackingError("the snapshot is invalid (its COW device overflowed or "
                                  "it was dropped): its record of changes is incomplete")
    if (chunk_sectors & (chunk_sectors - 1)
            or not _MIN_CHUNK_SECTORS <= chunk_sectors <= _MAX_CHUNK_SECTORS):
        raise ChangeTrackingError(f"snapshot chunk size of {chunk_sectors} sectors is not "
                                  "a power of two of at least 8")
    chunk_bytes = chunk_sectors * SECTOR
    per_area = chunk_bytes // _EXCEPTION.size
    stride = per_area + 1
    nchunks = size // chunk_bytes
    old_chunks: set[int] = set()
    with mmap.mmap(-1, chunk_bytes) as area, memoryview(area) as view:
        area_chunk = 1
        while True:
            if area_chunk >= nchunks:
                raise ChangeTrackingError(
                    f"snapshot exception store: metadata area at chunk {area_chunk} "
                    f"lies past the end of the {nchunks}-chunk COW device")
            readinto(view, area_chunk * chunk_bytes)
            for old, new in _EXCEPTION.iter_unpack(view):
                if new == 0:
                    return ExceptionStore(chunk_sectors, sorted(old_chunks))
                # A copy lives in a data chunk of the device: not the header, not a
                # metadata chunk.
                if new >= nchunks or (new - 1) % stride == 0:
                    raise ChangeTrackingError(
                        f"snapshot exception store: origin chunk {old} has its copy "
                        f"at chunk {new}, which is not a data chunk of the "
                        f"{nchunks}-chunk COW device")
                old_chunks.add(old)
            area_chunk += stride
