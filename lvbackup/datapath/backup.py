"""The backup data path: a source's blocks into chunks, packs and manifest entries.

The coordinator cuts the source's block map into segments of SEGMENT bytes and hands them
out with reused buffers; worker threads each read their segment's READ blocks, hash each
(xxh3-128), skip all-zero blocks (holes) and blocks whose hash equals the parent manifest's
entry at the same index, name the rest (codec), look them up in the index in one batch, and
encode only those the repository lacks. HOLE and INHERIT blocks are never read: a hole's
entry is the hole entry, an inherited block's is the parent's. Runs of either kind that
cover whole segments pass as one stretch, without a buffer or a worker's per-block loop;
a stretch of inherited blocks takes the parent's manifest pages it covers whole by id. The
coordinator appends the results, in order, to the manifest and the packer.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import xxhash

from ..base.faults import crash_point
from ..repository import codec
from ..repository.manifest import HOLE, Entries, Manifest, ManifestWriter, entry
from ..repository.repo import Packer, Repository
from .blockmap import BlockSource, Kind, Run, checked, ones
from .pipeline import DEPTH, SEGMENT, BufferPool, ordered_map

Progress = Callable[[int], None]


@dataclass
class ScanStats:
    bytes_read: int = 0
    hole_bytes: int = 0        # all-zero blocks, and holes the source reported (not read)
    unchanged_bytes: int = 0   # equal to the parent's block, or inherited: not stored
    reused_bytes: int = 0      # already in the repository (dedup, or packs a dead run left)
    new_bytes: int = 0         # plaintext of the chunks this backup stored
    stored_bytes: int = 0      # what this backup added to the repository (its packer's count)

    def add(self, other: ScanStats) -> None:
        for name in _STAT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


_STAT_FIELDS = tuple(f.name for f in fields(ScanStats))


class _Segment(NamedTuple):
    first_block: int
    offset: int                # in bytes
    length: int
    kinds: bytearray           # per block: a Kind; empty for a stretch
    buf: mmap.mmap | None      # None for a stretch: nothing to read
    parent: Entries            # the parent's entries for these blocks (may be short or empty)
    blocks: int
    stretch: Kind | None       # HOLE or INHERIT for whole segments of one kind


class _Analyzed(NamedTuple):
    entries: bytes
    new: list[tuple[bytes, codec.Buffer, int, int]]         # (chunk id, blob, plaintext
    stats: ScanStats                                        #  length, flags)
    length: int
    buf: mmap.mmap | None      # the segment's buffer, which raw blobs are views of
    stretch: Kind | None       # a stretch of holes or inherited blocks (`entries` empty)
    first_block: int
    blocks: int


_zeros: dict[int, tuple[bytes, bytes]] = {}   # block length -> (zero block, its xxh3-128)


def _is_hole(block: memoryview, digest: bytes) -> bool:
    n = len(block)
    zero = _zeros.get(n)
    if zero is None:
        z = bytes(n)
        zero = _zeros[n] = (z, xxhash.xxh3_128_digest(z))
    # The digest keeps the byte comparison off non-zero blocks; the comparison keeps a
    # crafted xxh3 collision from passing for a hole. startswith() compares without a copy.
    return digest == zero[1] and zero[0].startswith(block)


def runs_of(kinds: bytearray, kind: Kind) -> Iterator[tuple[int, int]]:
    """The [first, end) index ranges where kinds[i] == kind."""
    return ones(kinds.translate(_MASKS[kind]))


_MASKS = {k: bytes(int(i == k) for i in range(256)) for k in Kind}


def _cut(runs: Iterator[Run], per_seg: int, nblocks: int, stretches: frozenset[Kind]
         ) -> Iterator[tuple[int, int, bytearray | Kind]]:
    """The block map cut into segments: (first block, blocks, kinds per block), or, where
    a run of one of the `stretches` kinds covers whole segments, one (first block, blocks,
    kind) for all of them, so that a long hole or unchanged stretch costs a few steps
    whatever its length."""
    run: Run | None = None
    pos = 0
    while pos < nblocks:
        if run is None or run.blocks == 0:
            run = next(runs)
        if run.kind in stretches:
            span = min(run.blocks, nblocks - pos)
            take = span if pos + span == nblocks else span - span % per_seg
            if take:
                yield pos, take, Kind(run.kind)
                pos += take
                run = Run(run.kind, run.first + take, run.blocks - take)
                continue
        kinds = bytearray()
        want = min(per_seg, nblocks - pos)
        while len(kinds) < want:
            if run is None or run.blocks == 0:
                run = next(runs)
            take = min(run.blocks, want - len(kinds))
            kinds += bytes([run.kind]) * take
            run = Run(run.kind, run.first + take, run.blocks - take)
        yield pos, want, kinds
        pos += want
    for _ in runs:  # let the map's own checks run to its end
        pass


def write_backup(repo: Repository, source: BlockSource, parent: Manifest | None,
                 backup_id: str, finish: Callable[[ScanStats], Mapping[str, Any]], *,
                 workers: int, level: int, progress: Callable[[int, Packer], None] | None = None
                 ) -> ScanStats:
    """Back `source` up as `backup_id`: its chunks and manifest pages into packs, indexed,
    then its manifest, whose record `finish(stats)` returns once everything else is stored
    (it may raise to refuse the backup: nothing then names what was stored). Killed or
    failed at any point, what was stored is indexed for a rerun to reuse."""
    packer = repo.packer(backup_id)
    writer = ManifestWriter(repo.storage, backup_id, repo.codec,
                            lambda page_id, page: packer.add_if_missing(page_id, page, level))
    try:
        stats = backup_blocks(repo, packer, source, parent, writer, workers=workers,
                              level=level,
                              progress=(lambda done: progress(done, packer)) if progress else None)
        writer.flush()
        packer.commit()
        stats.stored_bytes = packer.stored_bytes
        record = finish(stats)
        writer.close({"block_size": repo.block_size, "size": source.size, "backup": record})
        crash_point("manifest-written")
    except BaseException:
        # Index what this run did store, so a rerun reuses it; the original failure is the
        # one to report.
        with contextlib.suppress(Exception):
            packer.commit()
        raise
    return stats


def backup_blocks(repo: Repository, packer: Packer, source: BlockSource,
                  parent: Manifest | None, out: ManifestWriter, *, workers: int, level: int,
                  progress: Progress | None = None) -> ScanStats:
    """Read `source` into `out` and `packer`; return what was read and stored."""
    bs, size = repo.block_size, source.size
    per_seg = max(1, SEGMENT // bs)
    seg_bytes = per_seg * bs
    nblocks = (size + bs - 1) // bs
    stop = threading.Event()
    buffers = BufferPool(DEPTH + 2, seg_bytes, stop)
    runs = checked(source.block_map(bs), size, bs, parent.size if parent else None)
    # Unchanged blocks whose chunk was found damaged are stored again, not inherited: then
    # each inherited entry is looked at, else whole stretches take the parent's entries.
    damaged = repo.index.damaged_ids() if parent is not None else set()
    stretches = frozenset({Kind.HOLE} if damaged else {Kind.HOLE, Kind.INHERIT})

    def segments() -> Iterator[_Segment]:
        for first, count, kinds in _cut(runs, per_seg, nblocks, stretches):
            offset = first * bs
            length = min(count * bs, size - offset)
            if isinstance(kinds, Kind):
                yield _Segment(first, offset, length, bytearray(), None, Entries(b""), count,
                               kinds)
                continue
            pe = parent.entries_at(first, count) if parent is not None else Entries(b"")
            if damaged:
                for i, j in runs_of(kinds, Kind.INHERIT):
                    for k in range(i, j):
                        if k >= len(pe) or pe.chunk_id(k) in damaged:
                            kinds[k] = Kind.READ
            yield _Segment(first, offset, length, kinds, buffers.get(), pe, count, None)

    def analyze(seg: _Segment) -> _Analyzed:
        # Workers read their own segments: reads from several threads keep up with the
        # hashing where one reader thread could not.
        if seg.buf is None:      # a stretch
            stats = (ScanStats(hole_bytes=seg.length) if seg.stretch == Kind.HOLE
                     else ScanStats(unchanged_bytes=seg.length))
            return _Analyzed(b"", [], stats, seg.length, None, seg.stretch, seg.first_block,
                             seg.blocks)
        try:
            view = memoryview(seg.buf)
            for i, j in runs_of(seg.kinds, Kind.READ):
                source.readinto(view[i * bs:min(j * bs, seg.length)], seg.offset + i * bs)
            crash_point("read-segment")
            return _analyze(seg, bs, packer, level, damaged, repo.codec)
        except BaseException:
            buffers.put(seg.buf)
            raise

    total = ScanStats()
    recent: deque[set[bytes]] = deque(maxlen=DEPTH + workers + 2)
    done = 0
    try:
        for result in ordered_map(analyze, segments(), workers, DEPTH, stop):
            if result.stretch == Kind.HOLE:
                out.append_holes(result.blocks)
            elif result.stretch == Kind.INHERIT:
                assert parent is not None   # checked(): no inheriting without a parent
                out.inherit(parent, result.first_block, result.blocks)
            else:
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
            recent.append(added)
            if result.buf is not None:
                buffers.put(result.buf)  # raw blobs were views of it; the packer copied them
            total.add(result.stats)
            done += result.length
            if progress:
                progress(done)
    finally:
        stop.set()
    source.check_size()
    return total


def _analyze(seg: _Segment, bs: int, packer: Packer, level: int,
             damaged: set[bytes], chunks: codec.Codec) -> _Analyzed:
    assert seg.buf is not None   # stretches never come here
    view = memoryview(seg.buf)
    entries = bytearray()
    candidates: dict[bytes, memoryview] = {}
    stats = ScanStats()
    pe = seg.parent
    name, encode = chunks.chunk_id, chunks.encode
    for i, off in enumerate(range(0, seg.length, bs)):
        kind = seg.kinds[i]
        n = min(bs, seg.length - off)
        if kind == Kind.HOLE:
            entries += HOLE
            stats.hole_bytes += n
            continue
        if kind == Kind.INHERIT:
            entries += pe.entry(i)
            stats.unchanged_bytes += n
            continue
        block = view[off:off + n]
        stats.bytes_read += n
        digest = xxhash.xxh3_128_digest(block)
        if _is_hole(block, digest):
            entries += HOLE
            stats.hole_bytes += n
            continue
        same = pe.same_block(i, digest)
        if same is not None and same[16:] not in damaged:
            entries += same
            stats.unchanged_bytes += n
            continue
        cid = name(block)
        entries += entry(digest, cid)
        if cid in candidates:
            stats.reused_bytes += n
        else:
            candidates[cid] = block
    new = []
    missing = packer.missing(list(candidates)) if candidates else set()
    for cid, block in candidates.items():
        if cid not in missing:
            stats.reused_bytes += len(block)
            continue
        blob, flags = encode(cid, block, level)
        new.append((cid, blob, len(block), flags))
        stats.new_bytes += len(block)
    return _Analyzed(bytes(entries), new, stats, seg.length, seg.buf, None, seg.first_block,
                     seg.blocks)
