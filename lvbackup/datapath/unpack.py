"""The restore data path: a backup's blocks back into an image, segment by segment.

Worker threads each assemble one segment: look up its chunks in the index, read them (one
vectored read per run of chunks stored back to back), check every block against its
manifest digest, and optionally write the segment where it belongs themselves.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

from ..base.errors import CorruptionError
from ..repository.manifest import Entries, Manifest
from ..repository.pack import ChunkRef
from ..repository.repo import ChunkError, Repository
from .blockmap import ones
from .pipeline import DEPTH, SEGMENT, BufferPool, ordered_map


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


def fetch_blocks(repo: Repository, entries: Entries, first: int, bs: int,
                 outs: list[memoryview], by_id: bool = False) -> bytearray:
    """Read the blocks `entries` names into `outs` (one buffer per entry, of the block's
    length; holes are left as they are); returns per block 1 if it holds data, 0 for a
    hole. Each block is checked against its manifest digest, or with `by_id` its chunk
    against the chunk id; a missing or damaged one raises BlockError naming the block
    (`first` is the index of entries[0] in the backup), and a damaged copy is quarantined."""
    data = bytearray(len(entries))
    refs = repo.index.lookup(entries.chunk_ids())
    wanted: list[tuple[ChunkRef, memoryview, bytes | None]] = []
    where: dict[bytes, int] = {}                 # chunk id -> its first block here
    copies: list[tuple[int, int]] = []           # (block, earlier block of the same chunk)
    for i, digest, cid in entries.chunks():
        data[i] = 1
        if cid in where:
            copies.append((i, where[cid]))
            continue
        ref = refs.get(cid)
        if ref is None:
            block = first + i
            raise BlockError(f"block {block} (byte {block * bs}): chunk {cid.hex()} "
                             "is not in the repository index")
        where[cid] = i
        wanted.append((ref, outs[i], None if by_id else digest))
    try:
        repo.read_chunks_into(wanted)
    except ChunkError as e:
        if e.damaged:
            repo.quarantine(e.ref)
        block = first + where[e.ref.chunk_id]
        raise BlockError(f"block {block} (byte {block * bs}): {e}") from None
    for i, j in copies:  # a block repeated here: read once
        outs[i][:] = outs[j][:len(outs[i])]
    return data


def restore_blocks(repo: Repository, manifest: Manifest, *, workers: int,
                   fill_holes: bool, by_id: bool = False,
                   write: Callable[[Restored], None] | None = None) -> Iterator[Restored]:
    """The image, segment by segment, in order. A segment's buffer is reused once the
    caller asks for the next one. `write`, if given, is called with each segment by the
    worker that assembled it, in no particular order (writes to a file or device then
    run in parallel). Every block is checked (fetch_blocks)."""
    bs, size = manifest.block_size, manifest.size
    per_seg = max(1, SEGMENT // bs)
    stop = threading.Event()
    buffers = BufferPool(DEPTH + 2, per_seg * bs, stop)

    def items() -> Iterator[tuple[int, Entries, mmap.mmap]]:
        first = 0
        for entries in manifest.entries(per_seg):
            yield first, entries, buffers.get()
            first += len(entries)

    def fetch(item: tuple[int, Entries, mmap.mmap]) -> Restored:
        first, entries, buf = item
        try:
            length = min(len(buf), size - first * bs)
            view = memoryview(buf)[:length]
            outs = [view[i * bs:(i + 1) * bs] for i in range(len(entries))]
            data = fetch_blocks(repo, entries, first, bs, outs, by_id)
            if fill_holes:
                for i, j in ones(data.translate(_HOLES)):
                    view[i * bs:j * bs] = bytes(len(view[i * bs:j * bs]))
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


_HOLES = bytes([1, 0]) + bytes(254)   # translate: hole -> 1, data -> 0
