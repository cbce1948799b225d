"""Random access to a backup: read(offset, length) of its image, from the manifest (one
page read reaches any block), the index and the packs, through a bounded block cache.

For mapping a backup as a block device and for restoring single files: everything a
reader returns was checked against the block digests in the manifest, and a missing or
damaged chunk raises BlockError for the range, never yields wrong data.
"""

from __future__ import annotations

import threading

from ..base.errors import UsageError
from ..base.lru import LRU
from ..repository.manifest import Manifest
from ..repository.repo import Repository
from .unpack import fetch_blocks

DEFAULT_CACHE = 32 * 1024 * 1024


class BackupReader:
    def __init__(self, repo: Repository, manifest: Manifest, cache_bytes: int = DEFAULT_CACHE):
        self.repo = repo
        self.manifest = manifest
        self.size = manifest.size
        self.block_size = manifest.block_size
        self._cache: LRU[int, bytes] = LRU(cache_bytes)   # block index -> its bytes
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        """The bytes [offset, offset + length) of the backed-up image; the range must lie
        within it."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"read of {length} bytes at {offset} is outside the backup's "
                             f"{self.size} bytes")
        if length == 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        blocks = self._blocks(first, last - first + 1)
        data = b"".join(blocks)
        start = offset - first * bs
        return data[start:start + length]

    def _blocks(self, first: int, count: int) -> list[bytes]:
        bs = self.block_size
        with self._lock:
            found = {b: data for b in range(first, first + count)
                     if (data := self._cache.get(b)) is not None}
        missing = [b for b in range(first, first + count) if b not in found]
        if missing:
            lo, hi = missing[0], missing[-1] + 1
            entries = self.manifest.entries_at(lo, hi - lo)
            bufs = [bytearray(min(bs, self.size - (lo + i) * bs)) for i in range(hi - lo)]
            fetch_blocks(self.repo, entries, lo, bs, [memoryview(b) for b in bufs])
            for i, buf in enumerate(bufs):
                found.setdefault(lo + i, bytes(buf))
            self._remember({b: found[b] for b in missing})
        return [found[b] for b in range(first, first + count)]

    def _remember(self, blocks: dict[int, bytes]) -> None:
        with self._lock:
            for b, data in blocks.items():
                if b not in self._cache:
                    self._cache.put(b, data, len(data))
