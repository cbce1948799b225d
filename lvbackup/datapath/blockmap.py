"""What a backup reads: a source's block map and its bytes.

A source hands the data path a block map: runs of blocks, each one
- HOLE: not read; recorded as a hole (the source knows it reads as zeros),
- READ: read, hashed and stored if new,
- INHERIT: not read; the parent manifest's entry is copied (the source knows the block is
  unchanged since the parent backup, e.g. from LVM's own change tracking).
The runs cover the volume's blocks in order. `BlockSource` is all the data path needs; a
change-tracking source is a BlockSource whose map says INHERIT where nothing changed.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator
from enum import IntEnum
from typing import NamedTuple, Protocol

from ..base.diskio import PageCacheView
from ..base.errors import LvbackupError, UsageError


class Kind(IntEnum):
    HOLE = 0
    READ = 1
    INHERIT = 2


class Run(NamedTuple):
    kind: Kind
    first: int     # block index
    blocks: int    # not "count", which would shadow tuple.count()


class BlockSource(Protocol):
    size: int

    def block_map(self, block_size: int) -> Iterator[Run]:
        """Runs covering blocks 0 .. ceil(size / block_size) - 1, in order."""
        ...

    def readinto(self, view: memoryview, offset: int) -> None:
        """Fill `view` with the bytes at `offset` (all of them, or raise)."""
        ...

    def check_size(self) -> None:
        """Raise if the source is now shorter than `size`: called once everything is read,
        since a map may say HOLE or INHERIT for blocks that are gone by then."""
        ...


def source_ended(at: int, end: int) -> LvbackupError:
    return LvbackupError(f"the source ended at byte {at}, before its size of {end}+ bytes")


def source_size(fd: int) -> int:
    """Size in bytes of an open regular file or block device."""
    return os.lseek(fd, 0, os.SEEK_END)


_HOLE_STEP = 1 << 30


class FileBlocks:
    """A regular file or block device: holes where the filesystem reports them
    (SEEK_DATA / SEEK_HOLE), everything else read."""

    def __init__(self, fd: int, size: int | None = None):
        self.fd = fd
        self.size = source_size(fd) if size is None else size
        # No readahead on this descriptor: segments are read in big requests anyway,
        # and readahead past a segment would put pages in the cache that the next
        # segment's look at the cache takes for someone else's, and leaves there.
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.cache = PageCacheView(fd, self.size)

    def close(self) -> None:
        """Drop the mapping (it holds the file or device open)."""
        self.cache.close()

    def check_size(self) -> None:
        now = source_size(self.fd)
        if now < self.size:
            raise source_ended(now, self.size)

    def block_map(self, block_size: int) -> Iterator[Run]:
        nblocks = -(-self.size // block_size)
        pos = 0   # in blocks: what the runs yielded so far cover
        for start, stop in self._data_extents():
            first, last = start // block_size, min(nblocks, -(-stop // block_size))
            if last <= pos:
                continue
            first = max(first, pos)
            yield from self._holes(pos, first, block_size)
            yield Run(Kind.READ, first, last - first)
            pos = last
        yield from self._holes(pos, nblocks, block_size)

    def _holes(self, first: int, end: int, block_size: int) -> Iterator[Run]:
        """HOLE runs over [first, end), a GiB at a time, each after checking that the file
        has not shrunk: the map is read just ahead of the backup, so a source that ends
        early under it is caught even where there is nothing to read."""
        step = max(1, _HOLE_STEP // block_size)
        for pos in range(first, end, step):
            self.check_size()
            yield Run(Kind.HOLE, pos, min(step, end - pos))

    def _data_extents(self) -> Iterator[tuple[int, int]]:
        """[start, stop) byte ranges that may hold data (a device, or a filesystem
        without SEEK_DATA: all of it)."""
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
                hole = os.lseek(self.fd, data, os.SEEK_HOLE) if data < self.size else self.size
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    return
                if pos == 0:
                    yield 0, self.size
                    return
                raise
            if data >= self.size:
                return
            yield data, min(hole, self.size)
            pos = max(hole, data + 1)

    def readinto(self, view: memoryview, offset: int) -> None:
        """Pages this read brings into the page cache are dropped again afterwards (a backup
        should not evict the machine's working set with a volume's worth of data it reads
        once); pages that were cached already are someone else's and are left alone."""
        page = mmap.PAGESIZE
        start, stop = 0, len(view)
        if self.cache.resident(offset, min(stop, page)) == b"\1":
            # Cached at its start, likely all of it (a hot image): a read that takes only
            # what is cached is the cheapest way to find out. Where the range is cold it
            # is not tried: such a read may start the I/O it then reports as cached.
            with contextlib.suppress(OSError):
                start = os.preadv(self.fd, [view], offset, os.RWF_NOWAIT) // page * page
            if start >= stop:
                return
        resident = self.cache.resident(offset + start, stop - start)
        got = start
        while got < stop:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n == 0:
                raise source_ended(offset + got, offset + stop)
            got += n
        absent = ([(0, -(-(stop - start) // page))] if resident is None
                  else ones(resident.translate(_NOT)))
        for i, j in absent:
            # Not every file supports it; the backup does not depend on it.
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, offset + start + i * page, (j - i) * page,
                                 os.POSIX_FADV_DONTNEED)


_NOT = bytes([1]) + bytes(255)   # translate: 0 (not cached) -> 1


def ones(flags: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """The [first, end) index ranges whose flags are 1."""
    i = flags.find(1)
    while i != -1:
        j = flags.find(0, i)
        j = len(flags) if j == -1 else j
        yield i, j
        i = flags.find(1, j)


def checked(runs: Iterator[Run], size: int, block_size: int,
            parent_size: int | None) -> Iterator[Run]:
    """The runs, refused (UsageError) where they do not cover the blocks in order, or
    inherit without a parent or beyond what the parent holds: a block can be inherited
    only if the parent had all of its bytes, or both end inside it at the same byte."""
    nblocks = -(-size // block_size)
    pos = 0
    for run in runs:
        if run.first != pos or run.blocks <= 0:
            raise UsageError(f"block map: a run at block {run.first} does not continue "
                             f"at block {pos}")
        end = run.first + run.blocks
        if end > nblocks:
            raise UsageError(f"block map reaches block {end - 1} of a {nblocks}-block volume")
        if run.kind == Kind.INHERIT:
            if parent_size is None:
                raise UsageError("block map: blocks to inherit, but the backup has no parent")
            if end * block_size > parent_size and not (end == nblocks and parent_size == size):
                raise UsageError(f"block map: blocks {run.first}-{end - 1} to inherit reach "
                                 f"past the parent's size of {parent_size} bytes")
        pos = end
        yield run
    if pos != nblocks:
        raise UsageError(f"block map covers {pos} of {nblocks} blocks")
