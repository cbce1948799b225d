"""The block data path: reading a source into blocks for a backup, and blocks back for a restore.

Backup: a reader fills reused 4 MiB segment buffers; worker threads hash each block
(xxh3-128), skip all-zero blocks (holes) and blocks whose hash equals the parent manifest's
entry at the same index, name the rest by BLAKE3-256, look them up in the index in one batch,
and compress only those the repository lacks. The caller's thread appends results, in order,
to the manifest and the packer.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import blake3
import xxhash
import zstandard

from .errors import CorruptionError, LvbackupError
from .faults import crash_point
from .manifest import ENTRY_SIZE, HOLE, Manifest, ManifestWriter
from .pipeline import BufferPool, ordered_map
from .repository.pack import FLAG_RAW, FLAG_ZSTD
from .repository.repo import Packer, Repository

SEGMENT = 4 * 1024 * 1024
DEPTH = 4

Progress = Callable[[int], None]


@dataclass
class ScanStats:
    bytes_read: int = 0
    hole_bytes: int = 0
    unchanged_bytes: int = 0   # equal to the parent's block: not hashed again nor stored
    reused_bytes: int = 0      # already in the repository (dedup, or packs a dead run left)
    new_bytes: int = 0         # plaintext of the chunks this backup stored
    stored_bytes: int = 0      # what those chunks take in the repository

    def add(self, other: "ScanStats") -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))


class _Segment(NamedTuple):
    first_block: int
    length: int
    buf: bytearray | None      # None: not read, copy the parent's entries
    parent: bytes              # the parent's entries for these blocks (may be short or empty)


class _Analyzed(NamedTuple):
    entries: bytes
    new: list[tuple[bytes, bytes, int, int]]   # (chunk id, blob, plaintext length, flags)
    stats: ScanStats


_tls = threading.local()
_zero_digest: dict[int, bytes] = {}


def _compressor(level: int) -> zstandard.ZstdCompressor:
    c = getattr(_tls, "cctx", None)
    if c is None or _tls.level != level:
        c = _tls.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        _tls.level = level
    return c


def _is_hole(block: memoryview, digest: bytes) -> bool:
    n = len(block)
    zd = _zero_digest.get(n)
    if zd is None:
        zd = _zero_digest[n] = xxhash.xxh3_128_digest(bytes(n))
    # Comparing digests first keeps the byte comparison (a copy) off non-zero blocks.
    return digest == zd and block.tobytes() == bytes(n)


def source_size(fd: int) -> int:
    """Size in bytes of an open regular file or block device."""
    return os.lseek(fd, 0, os.SEEK_END)


def backup_blocks(repo: Repository, packer: Packer, fd: int, size: int,
                  parent: Manifest | None, out: ManifestWriter, *, workers: int, level: int,
                  ranges: list[tuple[int, int]] | None = None,
                  progress: Progress | None = None) -> ScanStats:
    """Read `size` bytes of `fd` into `out` and `packer`; return what was read and stored.

    `ranges` lists the [start, end) block ranges to read; blocks outside them are taken
    from `parent` unread (changed-block tracking). None means read everything.
    """
    bs = repo.block_size
    per_seg = max(1, SEGMENT // bs)
    seg_bytes = per_seg * bs
    nblocks = (size + bs - 1) // bs
    if ranges is not None and parent is None:
        raise ValueError("reading only some ranges needs a parent manifest")
    stop = threading.Event()
    buffers = BufferPool(DEPTH + workers + 1, seg_bytes, stop)
    parent_entries = parent.entries(per_seg) if parent is not None else iter(())

    def wanted(first: int, count: int) -> bool:
        return ranges is None or any(s < first + count and e > first for s, e in ranges)

    def segments() -> Iterator[_Segment]:
        for first in range(0, nblocks, per_seg):
            offset = first * bs
            length = min(seg_bytes, size - offset)
            count = (length + bs - 1) // bs
            pe = next(parent_entries, b"")
            if not wanted(first, count) and len(pe) >= count * ENTRY_SIZE:
                yield _Segment(first, length, None, pe)
                continue
            buf = buffers.get()
            try:
                _read_exact(fd, buf, offset, length)
            except BaseException:
                buffers.put(buf)
                raise
            crash_point("read-segment")
            yield _Segment(first, length, buf, pe)

    def analyze(seg: _Segment) -> _Analyzed:
        stats = ScanStats()
        if seg.buf is None:
            stats.unchanged_bytes = seg.length
            return _Analyzed(seg.parent[: ((seg.length + bs - 1) // bs) * ENTRY_SIZE], [], stats)
        try:
            return _analyze_read(seg, bs, packer, level, stats)
        finally:
            buffers.put(seg.buf)

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
            total.add(result.stats)
            done += result.stats.bytes_read + result.stats.unchanged_bytes
            if progress:
                progress(done)
    finally:
        stop.set()
    return total


def _read_exact(fd: int, buf: bytearray, offset: int, length: int) -> None:
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:length]], offset + got)
        if n == 0:
            raise LvbackupError(f"the source ended at byte {offset + got}, "
                                f"before its size of {offset + length}+ bytes")
        got += n
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # not every file supports it; the backup does not depend on it


def _analyze_read(seg: _Segment, bs: int, packer: Packer, level: int,
                  stats: ScanStats) -> _Analyzed:
    view = memoryview(seg.buf)
    entries = bytearray()
    candidates: dict[bytes, memoryview] = {}
    stats.bytes_read = seg.length
    for i, off in enumerate(range(0, seg.length, bs)):
        block = view[off:min(off + bs, seg.length)]
        digest = xxhash.xxh3_128_digest(block)
        if _is_hole(block, digest):
            entries += HOLE
            stats.hole_bytes += len(block)
            continue
        pe = seg.parent[i * ENTRY_SIZE:(i + 1) * ENTRY_SIZE]
        if pe[:16] == digest and pe != HOLE:
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
        flags = FLAG_ZSTD
        if len(blob) >= len(block):
            blob, flags = block.tobytes(), FLAG_RAW
        new.append((cid, blob, len(block), flags))
        stats.new_bytes += len(block)
    return _Analyzed(bytes(entries), new, stats)


class BlockError(CorruptionError):
    pass


def restore_blocks(repo: Repository, manifest: Manifest, *, workers: int
                   ) -> Iterator[tuple[int, list[bytes | None]]]:
    """(first block index, [plaintext, or None for a hole, ...]) per segment, in order.

    Every chunk is checked against its BLAKE3 id; a missing or corrupt one raises
    BlockError naming the block.
    """
    bs = manifest.block_size
    per_seg = max(1, SEGMENT // bs)

    def items():
        first = 0
        for entries in manifest.entries(per_seg):
            ids = {entries[o + 16:o + ENTRY_SIZE] for o in range(0, len(entries), ENTRY_SIZE)
                   if entries[o:o + ENTRY_SIZE] != HOLE}
            refs = repo.index.lookup(ids)
            yield first, entries, refs
            first += len(entries) // ENTRY_SIZE

    def fetch(item) -> tuple[int, list[bytes | None]]:
        first, entries, refs = item
        out: list[bytes | None] = []
        cache: dict[bytes, bytes] = {}
        for i, o in enumerate(range(0, len(entries), ENTRY_SIZE)):
            entry = entries[o:o + ENTRY_SIZE]
            if entry == HOLE:
                out.append(None)
                continue
            cid = entry[16:]
            data = cache.get(cid)
            if data is None:
                ref = refs.get(cid)
                block = first + i
                if ref is None:
                    raise BlockError(f"block {block} (byte {block * bs}): chunk {cid.hex()} "
                                     "is not in the repository index")
                try:
                    data = cache[cid] = repo.read_chunk(ref)
                except CorruptionError as e:
                    raise BlockError(f"block {block} (byte {block * bs}): {e}") from None
            out.append(data)
        return first, out

    return ordered_map(fetch, items(), workers, DEPTH)
