"""Pack files: many compressed chunks followed by a trailer that lists them.

Layout (all integers little-endian):

    "LVBPACK1"                                     8 bytes
    chunk blobs, back to back                      (zstd frame, or the raw block)
    trailer: N entries of ENTRY (see below)        N * 49 bytes
    footer:  N (u32) | BLAKE3-256(trailer) | "LVBPEND1"   44 bytes

ENTRY = chunk id (32 bytes, BLAKE3-256 of the plaintext) | offset (u64, from the start of
the file) | stored length (u32) | plaintext length (u32) | flags (u8: 0 raw, 1 zstd).

A pack is named by the BLAKE3-256 of its whole content, so it can be verified as a whole, and
its trailer can be read on its own (last 44 bytes, then N * 49 before them) to rebuild the index.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import blake3

from ..errors import CorruptionError

PACK_MAGIC = b"LVBPACK1"
PACK_END = b"LVBPEND1"
ENTRY = struct.Struct("<32sQIIB")
FOOTER = struct.Struct("<I32s8s")

FLAG_RAW = 0
FLAG_ZSTD = 1


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
    """Accumulates chunk blobs in memory until the pack is big enough to write."""

    def __init__(self) -> None:
        self.buf = bytearray(PACK_MAGIC)
        self.entries: list[tuple[bytes, int, int, int, int]] = []
        self.ids: set[bytes] = set()

    def add(self, chunk_id: bytes, blob: bytes, raw_length: int, flags: int) -> None:
        self.entries.append((chunk_id, len(self.buf), len(blob), raw_length, flags))
        self.ids.add(chunk_id)
        self.buf += blob

    def __len__(self) -> int:
        return len(self.buf)

    def finish(self) -> tuple[bytes, bytearray, list[ChunkRef]]:
        """(pack id, the pack's bytes, refs of its chunks)."""
        trailer = b"".join(ENTRY.pack(*e) for e in self.entries)
        self.buf += trailer
        self.buf += FOOTER.pack(len(self.entries), blake3.blake3(trailer).digest(), PACK_END)
        pack_id = blake3.blake3(self.buf, max_threads=blake3.blake3.AUTO).digest()
        refs = [ChunkRef(cid, pack_id, off, ln, raw, fl) for cid, off, ln, raw, fl in self.entries]
        return pack_id, self.buf, refs


def read_trailer(storage, pack_id: bytes) -> list[ChunkRef]:
    """The refs listed in a stored pack's trailer (two ranged reads, not the whole pack)."""
    name = pack_name(pack_id)
    what = f"pack {pack_id.hex()}"
    size = storage.size(name)
    if size < len(PACK_MAGIC) + FOOTER.size:
        raise CorruptionError(f"{what} is truncated")
    count, digest, end = FOOTER.unpack(storage.get_range(name, size - FOOTER.size, FOOTER.size))
    trailer_len = count * ENTRY.size
    if end != PACK_END or trailer_len > size - len(PACK_MAGIC) - FOOTER.size:
        raise CorruptionError(f"{what} is truncated or its footer is damaged")
    trailer = storage.get_range(name, size - FOOTER.size - trailer_len, trailer_len)
    if blake3.blake3(trailer).digest() != digest:
        raise CorruptionError(f"{what} has a corrupt trailer")
    return [ChunkRef(cid, pack_id, off, ln, raw, fl)
            for cid, off, ln, raw, fl in ENTRY.iter_unpack(trailer)]
