"""Backup manifests: the backup's record and, per block, a hole or (xxh3-128, chunk id).

Object `manifests/<backup id>`, all integers little-endian:

    "LVBMAN01"                                  8 bytes
    entries: one zstd frame holding `blocks` entries of 48 bytes each:
             xxh3-128 digest (16, big-endian as xxhash prints it) | chunk id (32)
             a hole (an all-zero block) is 48 zero bytes
    header: UTF-8 JSON, H bytes                 {"format": 1, "block_size", "size",
                                                 "blocks", "backup": {catalog record}}
    H (u32)                                     4 bytes
    BLAKE3-256 of everything above              32 bytes

The header comes last so that a manifest is written in one pass while the volume is read.

Block i covers bytes [i * block_size, min((i + 1) * block_size, size)). A manifest names
every block, so restoring a backup needs nothing but it, the index and the chunks.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Iterator

import blake3
import zstandard

from .errors import CorruptionError
from .repository.backends import MissingObject

MAGIC = b"LVBMAN01"
ENTRY_SIZE = 48
HOLE = bytes(ENTRY_SIZE)
FORMAT = 1
_LEN = struct.Struct("<I")
_READ = 4 * 1024 * 1024


def manifest_name(backup_id: str) -> str:
    return f"manifests/{backup_id}"


class _Hashing:
    """A file wrapper that hashes what passes through it."""

    def __init__(self, f):
        self.f = f
        self.h = blake3.blake3()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)


class ManifestWriter:
    """Streams a manifest into the repository; it appears only when close() succeeds."""

    def __init__(self, storage, backup_id: str):
        self._storage, self._name = storage, manifest_name(backup_id)
        self._file = io.BytesIO()
        self._out = _Hashing(self._file)
        self._out.write(MAGIC)
        self._z = zstandard.ZstdCompressor(level=3).stream_writer(self._out, closefd=False)
        self.blocks = 0

    def append(self, entries: bytes) -> None:
        self._z.write(entries)
        self.blocks += len(entries) // ENTRY_SIZE

    def close(self, header: dict) -> None:
        """Finish with `header` (block_size, size, backup record) and publish."""
        self._z.flush(zstandard.FLUSH_FRAME)
        head = json.dumps({"format": FORMAT, "blocks": self.blocks, **header},
                          sort_keys=True).encode()
        self._out.write(head + _LEN.pack(len(head)))
        self._file.write(self._out.h.digest())
        self._storage.put(self._name, self._file.getbuffer())

    def abort(self) -> None:
        self._file.close()


class Manifest:
    """A stored manifest, checked whole before any entry is used."""

    def __init__(self, storage, backup_id: str):
        self.storage = storage
        self.name = manifest_name(backup_id)
        self.what = f"manifest of backup {backup_id}"
        try:
            self.total = storage.size(self.name)
        except MissingObject:
            raise CorruptionError(f"{self.what} is missing from the repository") from None
        tail = len(MAGIC) + _LEN.size + 32
        if self.total < tail:
            raise CorruptionError(f"{self.what} is corrupt (truncated)")
        self._verify()
        (hlen,) = _LEN.unpack(storage.get_range(self.name, self.total - 36, 4))
        self._body_end = self.total - 36 - hlen
        if self._body_end < len(MAGIC) or storage.get_range(self.name, 0, 8) != MAGIC:
            raise CorruptionError(f"{self.what} is corrupt (bad header)")
        try:
            self.header = json.loads(storage.get_range(self.name, self._body_end, hlen))
            self.block_size: int = self.header["block_size"]
            self.size: int = self.header["size"]
            self.blocks: int = self.header["blocks"]
            self.record: dict = self.header["backup"]
        except (ValueError, KeyError, TypeError):
            raise CorruptionError(f"{self.what} is corrupt (bad header)") from None

    def _verify(self) -> None:
        h = blake3.blake3()
        end = self.total - 32
        for off in range(0, end, _READ):
            h.update(self.storage.get_range(self.name, off, min(_READ, end - off)))
        if h.digest() != self.storage.get_range(self.name, end, 32):
            raise CorruptionError(f"{self.what} is corrupt (checksum mismatch)")

    def entries(self, per_batch: int) -> Iterator[bytes]:
        """The entry table in slices of `per_batch` entries (the last may be shorter)."""
        body = _RangeFile(self.storage, self.name, len(MAGIC), self._body_end)
        want = per_batch * ENTRY_SIZE
        buf = bytearray()
        seen = 0
        try:
            for piece in zstandard.ZstdDecompressor().read_to_iter(body, read_size=_READ):
                buf += piece
                while len(buf) >= want:
                    yield bytes(buf[:want])
                    del buf[:want]
                    seen += per_batch
        except zstandard.ZstdError:
            raise CorruptionError(f"{self.what} is corrupt (bad entry table)") from None
        if buf:
            seen += len(buf) // ENTRY_SIZE
            yield bytes(buf)
        if seen != self.blocks:
            raise CorruptionError(f"{self.what} is corrupt (has {seen} of {self.blocks} blocks)")


class _RangeFile:
    """A read()-able byte range of a stored object."""

    def __init__(self, storage, name: str, start: int, end: int):
        self.storage, self.name, self.pos, self.end = storage, name, start, end

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        if n <= 0:
            return b""
        data = self.storage.get_range(self.name, self.pos, n)
        self.pos += n
        return data
