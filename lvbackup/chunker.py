"""The block data path: reading a source into blocks for a backup, and blocks back for a restore.

Backup: the reader hands out reused 4 MiB segment buffers; worker threads each read their
segment (skipping holes the filesystem reports), hash each block (xxh3-128), skip all-zero
blocks (holes) and blocks whose hash equals the parent manifest's entry at the same index,
name the rest by BLAKE3-256, look them up in the index in one batch, and compress only those
the repository lacks. The caller's thread appends results, in order, to the manifest and the
packer.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import blake3
import xxhash
import zstandard

from .errors import CorruptionError, LvbackupError
from .faults import crash_point
from .manifest import ENTRY_SIZE, HOLE, Manifest, ManifestWriter
from .pipeline import BufferPool, ordered_map
from .repository.pack import FLAG_RAW, FLAG_ZSTD, ChunkRef
from .repository.repo import ChunkError, Packer, Repository

SEGMENT = 4 * 1024 * 1024
DEPTH = 4

Progress = Callable[[int], None]


@dataclass
class ScanStats:
    bytes_read: int = 0
    hole_bytes: int = 0        # all-zero blocks, and holes the filesystem reported (not read)
    unchanged_bytes: int = 0   # equal to the parent's block: not hashed again nor stored
    reused_bytes: int = 0      # already in the repository (dedup, or packs a dead run left)
    new_bytes: int = 0         # plaintext of the chunks this backup stored
    stored_bytes: int = 0      # what those chunks take in the repository

    def add(self, other: "ScanStats") -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))


class _Segment(NamedTuple):
    first_block: int
    offset: int                # in bytes
    length: int
    buf: mmap.mmap
    parent: bytes              # the parent's entries for these blocks (may be short or empty)


class _Analyzed(NamedTuple):
    entries: bytes
    new: list[tuple[bytes, memoryview | bytes, int, int]]   # (chunk id, blob, plaintext
    stats: ScanStats                                        #  length, flags)
    length: int
    buf: mmap.mmap             # the segment's buffer, which raw blobs are views of


_tls = threading.local()
_zeros: dict[int, tuple[bytes, bytes]] = {}   # block length -> (zero block, its xxh3-128)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    c = getattr(_tls, "cctx", None)
    if c is None or _tls.level != level:
        c = _tls.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        _tls.level = level
    return c


def _is_hole(block: memoryview, digest: bytes) -> bool:
    n = len(block)
    zero = _zeros.get(n)
    if zero is None:
        z = bytes(n)
        zero = _zeros[n] = (z, xxhash.xxh3_128_digest(z))
    # The digest keeps the byte comparison off non-zero blocks; the comparison keeps a
    # crafted xxh3 collision from passing for a hole. startswith() compares without a copy.
    return digest == zero[1] and zero[0].startswith(block)


def source_size(fd: int) -> int:
    """Size in bytes of an open regular file or block device."""
    return os.lseek(fd, 0, os.SEEK_END)


def backup_blocks(repo: Repository, packer: Packer, fd: int, size: int,
                  parent: Manifest | None, out: ManifestWriter, *, workers: int, level: int,
                  progress: Progress | None = None) -> ScanStats:
    """Read `size` bytes of `fd` into `out` and `packer`; return what was read and stored."""
    bs = repo.block_size
    per_seg = max(1, SEGMENT // bs)
    seg_bytes = per_seg * bs
    nblocks = (size + bs - 1) // bs
    stop = threading.Event()
    buffers = BufferPool(DEPTH + 2, seg_bytes, stop)
    parent_entries = parent.entries(per_seg) if parent is not None else iter(())
    # Unchanged blocks whose chunk was found damaged are stored again, not inherited.
    damaged = repo.index.damaged_ids() if parent is not None else set()

    def segments() -> Iterator[_Segment]:
        for first in range(0, nblocks, per_seg):
            offset = first * bs
            yield _Segment(first, offset, min(seg_bytes, size - offset), buffers.get(),
                           next(parent_entries, b""))

    def analyze(seg: _Segment) -> _Analyzed:
        # Workers read their own segments: reads from several threads keep up with the
        # hashing where one reader thread could not.
        try:
            data = _read_segment(fd, seg, bs)
            crash_point("read-segment")
            return _analyze_read(seg, data, bs, packer, level, damaged)
        except BaseException:
            buffers.put(seg.buf)
            raise

    total = ScanStats()
    recent: deque[set[bytes]] = deque(maxlen=DEPTH + workers + 2)
    done = 0
    try:
        for result in ordered_map(analyze, segments(), workers, DEPTH, stop):
            out.append(result.entries)
            added: set[bytes] = set()
            for cid, blob, raw_len, flags in result.new:
                # A chunk another in-flight segment already stored (its lookup came first).
                if cid in added or any(cid in s for s in recent):
                    result.stats.new_bytes -= raw_len
                    result.stats.reused_bytes += raw_len
                    continue
                packer.add(cid, blob, raw_len, flags)
                added.add(cid)
                result.stats.stored_bytes += len(blob)
            recent.append(added)
            buffers.put(result.buf)  # raw blobs were views of it; the packer copied them
            total.add(result.stats)
            done += result.length
            if progress:
                progress(done)
    finally:
        stop.set()
    return total


def _data_blocks(fd: int, offset: int, length: int, bs: int) -> bytearray:
    """Per block of the segment, 1 if it may hold data, 0 if the filesystem reports it a
    hole (SEEK_DATA / SEEK_HOLE; a device or a filesystem without them: all data)."""
    count = (length + bs - 1) // bs
    end = offset + length
    flags = bytearray(count)
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE) if data < end else end
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            return bytearray(b"\x01") * count
        if data >= end:
            break
        first, last = (data - offset) // bs, min(count, (hole - offset + bs - 1) // bs)
        flags[first:last] = b"\x01" * (last - first)
        pos = max(hole, data + 1)
    if not flags[-1]:  # a hole, or past the end of a source that shrank under the backup
        now = source_size(fd)
        if now < end:
            raise _ended(now, end)
    return flags


def _ended(at: int, end: int) -> LvbackupError:
    return LvbackupError(f"the source ended at byte {at}, before its size of {end}+ bytes")


def data_runs(flags: bytearray) -> Iterator[tuple[int, int]]:
    """The [first, end) block ranges whose flags are 1."""
    i = flags.find(1)
    while i != -1:
        j = flags.find(0, i)
        j = len(flags) if j == -1 else j
        yield i, j
        i = flags.find(1, j)


def _read_segment(fd: int, seg: _Segment, bs: int) -> bytearray:
    """Read the blocks of `seg` that may hold data into its buffer; their flags."""
    data = _data_blocks(fd, seg.offset, seg.length, bs)
    view = memoryview(seg.buf)
    for i, j in data_runs(data):
        _read_range(fd, view, i * bs, min(j * bs, seg.length), seg.offset)
    return data


def _read_range(fd: int, view: memoryview, start: int, stop: int, base: int) -> None:
    """Read bytes [start, stop) of the segment at `base` into view[start:stop].

    Pages this read brings into the page cache are dropped again afterwards (a backup
    should not evict the machine's working set with a volume's worth of data it reads
    once); pages that were cached already, which a first read with RWF_NOWAIT finds, are
    someone else's and are left alone."""
    got = start
    try:
        got += os.preadv(fd, [view[start:stop]], base + start, os.RWF_NOWAIT)
    except (OSError, AttributeError):
        pass  # nothing cached there, or no RWF_NOWAIT for this file: read it all
    loaded = got
    while got < stop:
        n = os.preadv(fd, [view[got:stop]], base + got)
        if n == 0:
            raise _ended(base + got, base + stop)
        got += n
    if loaded < stop:
        try:
            os.posix_fadvise(fd, base + loaded, stop - loaded, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # not every file supports it; the backup does not depend on it


def _analyze_read(seg: _Segment, data: bytearray, bs: int, packer: Packer,
                  level: int, damaged: set[bytes]) -> _Analyzed:
    view = memoryview(seg.buf)
    entries = bytearray()
    candidates: dict[bytes, memoryview] = {}
    stats = ScanStats()
    for i, off in enumerate(range(0, seg.length, bs)):
        block = view[off:min(off + bs, seg.length)]
        if not data[i]:
            entries += HOLE
            stats.hole_bytes += len(block)
            continue
        stats.bytes_read += len(block)
        digest = xxhash.xxh3_128_digest(block)
        if _is_hole(block, digest):
            entries += HOLE
            stats.hole_bytes += len(block)
            continue
        pe = seg.parent[i * ENTRY_SIZE:(i + 1) * ENTRY_SIZE]
        if pe[:16] == digest and pe != HOLE and pe[16:] not in damaged:
            entries += pe
            stats.unchanged_bytes += len(block)
            continue
        cid = blake3.blake3(block).digest()
        entries += digest + cid
        if cid in candidates:
            stats.reused_bytes += len(block)
        else:
            candidates[cid] = block
    new = []
    missing = packer.missing(list(candidates)) if candidates else set()
    cctx = _compressor(level)
    for cid, block in candidates.items():
        if cid not in missing:
            stats.reused_bytes += len(block)
            continue
        blob = cctx.compress(block)
        if len(blob) < len(block):
            new.append((cid, blob, len(block), FLAG_ZSTD))
        else:
            new.append((cid, block, len(block), FLAG_RAW))
        stats.new_bytes += len(block)
    return _Analyzed(bytes(entries), new, stats, seg.length, seg.buf)


class BlockError(CorruptionError):
    pass


class Restored(NamedTuple):
    """One segment of a restored image: `view` holds its bytes; data[i] is 0 where block i
    is a hole (its bytes in `view` are zeros only if holes were asked to be filled). `buf`
    is the whole page-aligned buffer `view` starts at (room to pad a last, short write)."""

    first_block: int
    view: memoryview
    data: bytearray
    buf: mmap.mmap


def restore_blocks(repo: Repository, manifest: Manifest, *, workers: int,
                   fill_holes: bool, by_id: bool = False,
                   write: Callable[[Restored], None] | None = None) -> Iterator[Restored]:
    """The image, segment by segment, in order. A segment's buffer is reused once the
    caller asks for the next one. `write`, if given, is called with each segment by the
    worker that assembled it, in no particular order (writes to a file or device then
    run in parallel).

    Every block is checked against the xxh3-128 digest its manifest entry records or, with
    `by_id`, its chunk against the chunk's BLAKE3 id; a missing or corrupt one raises
    BlockError naming the block.
    """
    bs, size = manifest.block_size, manifest.size
    per_seg = max(1, SEGMENT // bs)
    stop = threading.Event()
    buffers = BufferPool(DEPTH + 2, per_seg * bs, stop)
    zero = bytes(bs)

    def items():
        first = 0
        for entries in manifest.entries(per_seg):
            ids = {entries[o + 16:o + ENTRY_SIZE] for o in range(0, len(entries), ENTRY_SIZE)
                   if entries[o:o + ENTRY_SIZE] != HOLE}
            refs = repo.index.lookup(ids)
            yield first, entries, refs, buffers.get()
            first += len(entries) // ENTRY_SIZE

    def fetch(item) -> Restored:
        first, entries, refs, buf = item
        try:
            length = min(len(buf), size - first * bs)
            view = memoryview(buf)[:length]
            data = bytearray(len(entries) // ENTRY_SIZE)
            wanted: list[tuple[ChunkRef, memoryview, bytes | None]] = []
            where: dict[bytes, int] = {}          # chunk id -> its first block here
            copies: list[tuple[memoryview, int]] = []  # (block, earlier block, same chunk)
            for i, o in enumerate(range(0, len(entries), ENTRY_SIZE)):
                entry = entries[o:o + ENTRY_SIZE]
                out = view[i * bs:(i + 1) * bs]
                if entry == HOLE:
                    if fill_holes:
                        out[:] = zero[:len(out)]
                    continue
                data[i] = 1
                cid = entry[16:]
                if cid in where:
                    copies.append((out, where[cid]))
                    continue
                ref = refs.get(cid)
                if ref is None:
                    block = first + i
                    raise BlockError(f"block {block} (byte {block * bs}): chunk {cid.hex()} "
                                     "is not in the repository index")
                where[cid] = i
                wanted.append((ref, out, None if by_id else entry[:16]))
            try:
                repo.read_chunks_into(wanted)
            except ChunkError as e:
                if e.damaged:
                    repo.quarantine(e.ref)
                block = first + where[e.ref.chunk_id]
                raise BlockError(f"block {block} (byte {block * bs}): {e}") from None
            for out, j in copies:  # a block repeated within the segment: read once
                out[:] = view[j * bs:j * bs + len(out)]
            seg = Restored(first, view, data, buf)
            if write is not None:
                write(seg)
            return seg
        except BaseException:
            buffers.put(buf)
            raise

    try:
        for seg in ordered_map(fetch, items(), workers, DEPTH, stop):
            try:
                yield seg
            finally:
                buffers.put(seg.buf)
    finally:
        stop.set()
