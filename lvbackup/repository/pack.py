"""Pack files: many compressed chunks followed by a trailer that lists them.

Layout (all integers little-endian):

    "LVBPACK1"                                     8 bytes
    chunk blobs, back to back                      (zstd frame, or the raw block)
    trailer: N entries of ENTRY (see below)        N * 49 bytes
    footer:  N (u32) | BLAKE3-256(trailer) | "LVBPEND1"   44 bytes

ENTRY = chunk id (32 bytes, BLAKE3-256 of the plaintext) | offset (u64, from the start of
the file) | stored length (u32) | plaintext length (u32) | flags (u8: 0 raw, 1 zstd;
see codec.py).

In an encrypted repository every blob is sealed (codec.SealingCodec) and the digest is a
keyed BLAKE3 (the codec's trailer_digest), so that no one without the key can make a
trailer that passes.

A pack is named by the BLAKE3-256 of its trailer entries (the digest its footer holds): the
entries name every chunk by its hash and place it, so they identify the content, and naming
a pack costs no second pass over its bytes. Its trailer can be read on its own (last 44
bytes, then N * 49 before them) to rebuild the index; its blobs are checked chunk by chunk.
"""

from __future__ import annotations

import ctypes
import operator
import struct
from collections.abc import Callable
from typing import NamedTuple

from ..base.diskio import aligned_buffer
from ..base.errors import CorruptionError
from .backends import Backend
from .codec import Buffer, Codec
from .manifest import MAX_BLOCK_SIZE

PACK_MAGIC = b"LVBPACK1"
PACK_END = b"LVBPEND1"
ENTRY = struct.Struct("<32sQIIB")
_OFFSET, _LENGTH, _RAW = (operator.itemgetter(i) for i in (1, 2, 3))   # of an ENTRY
FOOTER = struct.Struct("<I32s8s")
# Far above any pack (a writer fills one to 16 MiB and one block): the end of the byte
# range an index file may place a chunk at, where the pack's own size is not at hand.
MAX_PACK_BYTES = 1 << 30


class ChunkRef(NamedTuple):
    """Where a chunk lives: its pack, byte range, plaintext length and encoding."""

    chunk_id: bytes
    pack_id: bytes
    offset: int
    length: int
    raw_length: int
    flags: int


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


class PackBuilder:
    """Fills one pack at a time in a fixed, page-aligned buffer that is reused for the next.

    A fixed buffer costs no reallocation and no fresh page faults per pack, and its page
    alignment lets the local backend write the pack with O_DIRECT (see backends/local.py).
    """

    def __init__(self, capacity: int, digest: Callable[[Buffer], bytes]):
        self.capacity = capacity
        self.digest = digest      # names the pack: its codec's trailer_digest
        self._mem = aligned_buffer(capacity)
        self.view = memoryview(self._mem)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        self.reset()

    def reset(self) -> None:
        """Start a new, empty pack in the same buffer."""
        self.view[:len(PACK_MAGIC)] = PACK_MAGIC
        self.size = len(PACK_MAGIC)
        self.entries: list[tuple[bytes, int, int, int, int]] = []
        self.ids: set[bytes] = set()

    def room(self, blob_length: int) -> bool:
        """Whether a blob of that length still fits, with the trailer of one more entry."""
        trailer = (len(self.entries) + 1) * ENTRY.size + FOOTER.size
        return self.size + blob_length + trailer <= self.capacity

    def add(self, chunk_id: bytes, blob: Buffer, raw_length: int, flags: int) -> None:
        if not self.room(len(blob)):
            raise ValueError(f"a {len(blob)}-byte blob does not fit in the pack buffer")
        end = self.size + len(blob)
        self._copy_in(blob)
        self.entries.append((chunk_id, self.size, len(blob), raw_length, flags))
        self.ids.add(chunk_id)
        self.size = end

    def _copy_in(self, blob: Buffer) -> None:
        """Append `blob`'s bytes at self.size; with ctypes.memmove, which runs without the
        GIL, so that the workers go on while the coordinator fills a pack."""
        src: bytes | int
        if isinstance(blob, bytes):
            src = blob   # ctypes passes a pointer to its buffer, not a copy
        elif not memoryview(blob).readonly:
            src = ctypes.addressof(ctypes.c_char.from_buffer(blob))
        else:
            self.view[self.size:self.size + len(blob)] = blob
            return
        ctypes.memmove(self._base + self.size, src, len(blob))

    def __len__(self) -> int:
        return self.size

    def finish(self) -> tuple[bytes, memoryview, list[ChunkRef]]:
        """(pack id, the pack's bytes, refs of its chunks); the bytes are a view of the
        buffer, valid until reset()."""
        trailer = b"".join(ENTRY.pack(*e) for e in self.entries)
        pack_id = self.digest(trailer)
        footer = FOOTER.pack(len(self.entries), pack_id, PACK_END)
        end = self.size + len(trailer) + len(footer)
        self.view[self.size:end] = trailer + footer
        data = self.view[:end]
        refs = [ChunkRef(cid, pack_id, off, ln, raw, fl) for cid, off, ln, raw, fl in self.entries]
        return pack_id, data, refs


def read_trailer(storage: Backend, pack_id: bytes, codec: Codec) -> list[ChunkRef]:
    """The refs listed in a stored pack's trailer (two ranged reads, not the whole pack),
    checked against the pack's name."""
    name = pack_name(pack_id)
    what = f"pack {pack_id.hex()}"
    size = storage.size(name)
    if size < len(PACK_MAGIC) + FOOTER.size:
        raise CorruptionError(f"{what} is truncated")
    count, digest, end = FOOTER.unpack(storage.get_range(name, size - FOOTER.size, FOOTER.size))
    trailer_len = count * ENTRY.size
    if end != PACK_END or trailer_len > size - len(PACK_MAGIC) - FOOTER.size:
        raise CorruptionError(f"{what} is truncated or its footer is damaged")
    start = size - FOOTER.size - trailer_len
    trailer = storage.get_range(name, start, trailer_len)
    if digest != pack_id or codec.trailer_digest(trailer) != digest:
        raise CorruptionError(f"{what} has a corrupt trailer")
    return parse_entries(trailer, pack_id, start, f"{what}'s trailer")


def parse_entries(entries: Buffer, pack_id: bytes, end: int, what: str) -> list[ChunkRef]:
    """The refs that trailer entries (from a trailer or an index file, `what`) give for
    the chunks of a pack whose blobs end by `end` (see `entry_rows`)."""
    return [ChunkRef(cid, pack_id, off, ln, raw, fl)
            for cid, off, ln, raw, fl in entry_rows(entries, pack_id, end, what)]


def entry_rows(entries: Buffer, pack_id: bytes, end: int, what: str
               ) -> list[tuple[bytes, int, int, int, int]]:
    """Trailer entries as (chunk id, offset, length, raw length, flags), checked: each
    blob must lie between the pack's magic and `end`, and hold at most a block, or
    CorruptionError (nothing is sized, cached or read from a number alone). Plain tuples,
    for the index cache, which stores millions of them."""
    rows = list(ENTRY.iter_unpack(entries))
    # Checked in bulk (map over C functions), then, if that fails, one by one for the
    # first bad entry's message.
    if not rows or (min(map(_OFFSET, rows)) >= len(PACK_MAGIC)
                    and max(map(_RAW, rows)) <= MAX_BLOCK_SIZE
                    and max(map(operator.add, map(_OFFSET, rows), map(_LENGTH, rows))) <= end):
        return rows
    for cid, off, ln, raw, _ in rows:
        if off < len(PACK_MAGIC) or off + ln > end:
            raise CorruptionError(f"{what} is corrupt (chunk {cid.hex()} at offset "
                                  f"{off}, {ln} bytes, lies outside pack {pack_id.hex()})")
        if raw > MAX_BLOCK_SIZE:
            raise CorruptionError(f"{what} is corrupt (chunk {cid.hex()} claims "
                                  f"{raw} bytes)")
    return rows
