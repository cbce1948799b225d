"""Backup manifests: the backup's record and, per block, a hole or (xxh3-128, chunk id).

Every block has a 48-byte entry: its xxh3-128 digest (16 bytes, big-endian as xxhash
prints it) then its chunk id (32); a hole (an all-zero block) is 48 zero bytes. Block i
covers bytes [i * block_size, min((i + 1) * block_size, size)).

Format 2 (written now), object `manifests/<backup id>`, sealed (codec: magic "LVBMAN02",
BLAKE3-256 of everything before the last 32 bytes):

    H (u32) | header: UTF-8 JSON, H bytes   {"format": 2, "block_size", "size", "blocks",
                                             "page_entries", "backup": {catalog record}}
    page table: ceil(blocks / page_entries) page ids of 32 bytes

The entries are stored in pages of `page_entries` entries (the last may be shorter), each
page a chunk in the packs like any block (named by the BLAKE3 of its bytes, compressed the
same way). An all-hole page is not stored: its id is 32 zero bytes. So a manifest costs 32
bytes per 256 blocks, an incremental stores only the pages whose entries changed (the
others have the parent's ids, already stored), and any block's entry is one page read away.

In an encrypted repository the manifest is sealed by the codec under its object name (so a
manifest replayed under another backup's name, or taken from another repository, fails),
and pages are chunks like any other (keyed ids, sealed blobs). Either way the record's id
must be the backup id the manifest is named for.

Format 1 (read only, never in an encrypted repository), "LVBMAN01": the entries as one zstd
frame right after the magic, then the JSON header, H (u32), and the BLAKE3-256 of
everything before.
"""

from __future__ import annotations

import json
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import IO, cast

import blake3
import zstandard

from ..base.errors import CorruptionError
from ..base.lru import LRU
from .backends import Backend, MissingObject
from .codec import Codec

MAGIC = b"LVBMAN02"
MAGIC_V1 = b"LVBMAN01"
ENTRY_SIZE = 48
HOLE = bytes(ENTRY_SIZE)
NO_PAGE = bytes(32)
PAGE_ENTRIES = 256
FORMAT = 2
_LEN = struct.Struct("<I")
_READ = 4 * 1024 * 1024
_PAGE_CACHE = 128    # pages a reader keeps (12 KiB each)
_READ_AHEAD = 64     # pages read at once by a reader going through them in order
_PAGE_BATCH = 64     # pages a writer stores together
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 16 * 1024 * 1024


def block_size_allowed(block_size: int) -> bool:
    """Whether a repository (and its manifests) may have this block size: a power of two
    from 4 KiB to 16 MiB."""
    return (type(block_size) is int and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
            and not block_size & (block_size - 1))


def manifest_name(backup_id: str) -> str:
    return f"manifests/{backup_id}"


class Entries:
    """A slice of a manifest's entry table: the one place that knows an entry's layout."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes):
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw) // ENTRY_SIZE

    def entry(self, i: int) -> bytes:
        return self.raw[i * ENTRY_SIZE:(i + 1) * ENTRY_SIZE]

    def is_hole(self, i: int) -> bool:
        return self.entry(i) == HOLE

    def chunk_id(self, i: int) -> bytes:
        return self.raw[i * ENTRY_SIZE + 16:(i + 1) * ENTRY_SIZE]

    def same_block(self, i: int, digest: bytes) -> bytes | None:
        """Entry i if it records a block with this xxh3-128 digest (not a hole), else None:
        the incremental's question for every block it reads, hence one call."""
        e = self.raw[i * ENTRY_SIZE:(i + 1) * ENTRY_SIZE]
        return e if e[:16] == digest and e != HOLE else None

    def chunks(self) -> Iterator[tuple[int, bytes, bytes]]:
        """(index, xxh3-128 digest, chunk id) of every block that is not a hole."""
        for i in range(len(self)):
            e = self.entry(i)
            if e != HOLE:
                yield i, e[:16], e[16:]

    def chunk_ids(self) -> set[bytes]:
        return {cid for _, _, cid in self.chunks()}

    def renamed(self, new_ids: Mapping[bytes, bytes]) -> bytes:
        """These entries with every chunk id replaced by its new name, digests and holes
        kept: a manifest rewritten for a repository with other chunk ids (copy)."""
        out = bytearray(self.raw)
        for i, _, cid in self.chunks():
            out[i * ENTRY_SIZE + 16:(i + 1) * ENTRY_SIZE] = new_ids[cid]
        return bytes(out)


def entry(digest: bytes, chunk_id: bytes) -> bytes:
    return digest + chunk_id


# Stores a page (id, bytes) if the repository lacks it: the packer's job, given by the caller.
StorePage = Callable[[bytes, bytes], None]
# Reads pages by id, checked against their ids: {page id: page bytes}.
ReadPages = Callable[[list[bytes]], dict[bytes, bytes]]


class ManifestWriter:
    """Collects a backup's entries into pages, has each new page stored as it fills, and
    writes the manifest (the page table and the record) at close()."""

    def __init__(self, storage: Backend, backup_id: str, codec: Codec, store_page: StorePage):
        self.storage = storage
        self.codec = codec
        self.name = manifest_name(backup_id)
        self.store_page = store_page
        self.blocks = 0
        self._page = bytearray()
        self._ids = bytearray()
        self._unstored: list[tuple[bytes, bytes]] = []

    def append(self, entries: bytes) -> None:
        self.blocks += len(entries) // ENTRY_SIZE
        self._page += entries
        size = PAGE_ENTRIES * ENTRY_SIZE
        while len(self._page) >= size:
            self._finish_page(bytes(self._page[:size]))
            del self._page[:size]

    def append_holes(self, count: int) -> None:
        """`count` hole entries, whole pages of them without writing their entries out."""
        size = PAGE_ENTRIES * ENTRY_SIZE
        fill = min(count, (size - len(self._page)) // ENTRY_SIZE) if self._page else 0
        if fill:
            self.append(HOLE * fill)
            count -= fill
        pages, rest = divmod(count, PAGE_ENTRIES)
        self.blocks += pages * PAGE_ENTRIES
        self._ids += NO_PAGE * pages
        if rest:
            self.append(HOLE * rest)

    def inherit(self, parent: Manifest, first: int, count: int) -> None:
        """The parent's entries of blocks first .. first+count-1, which come next: its pages
        that these cover whole are taken by id, without being read, hashed or stored."""
        assert first == self.blocks, "entries are appended in block order"
        pe = PAGE_ENTRIES
        whole_pages = parent.format == 2 and parent.page_entries == pe
        while count:
            if whole_pages and not self._page and count >= pe and first + pe <= parent.blocks:
                pages = min(count, parent.blocks - first) // pe
                self._ids += parent.page_table(first // pe, pages)
                self.blocks += pages * pe
                first, count = first + pages * pe, count - pages * pe
                continue
            take = min(count, pe - len(self._page) // ENTRY_SIZE)
            self.append(parent.entries_at(first, take).raw)
            first, count = first + take, count - take

    def _finish_page(self, page: bytes) -> None:
        if page.count(0) == len(page):
            self._ids += NO_PAGE
            return
        page_id = self.codec.chunk_id(page)
        self._ids += page_id
        # Stored a batch at a time, so that they lie together in the packs and a reader
        # fetches many with one read.
        self._unstored.append((page_id, page))
        if len(self._unstored) >= _PAGE_BATCH:
            self._store()

    def _store(self) -> None:
        for page_id, page in self._unstored:
            self.store_page(page_id, page)
        self._unstored.clear()

    def flush(self) -> None:
        """Store the last pages (before the caller commits its packs)."""
        if self._page:
            self._finish_page(bytes(self._page))
            self._page.clear()
        self._store()

    def close(self, header: dict) -> None:
        """Publish the manifest with `header` (block_size, size, backup record)."""
        self.flush()
        head = json.dumps({"format": FORMAT, "blocks": self.blocks,
                           "page_entries": PAGE_ENTRIES, **header}, sort_keys=True).encode()
        self.storage.put(self.name, self.codec.seal(
            MAGIC, _LEN.pack(len(head)) + head + bytes(self._ids), self.name))


def copy_manifest(source: Backend, src_codec: Codec, dest: Backend, dst_codec: Codec,
                  backup_id: str) -> None:
    """Store a backup's manifest in another repository whose chunk ids are this one's (so
    its entries and pages stand as they are): byte for byte between unencrypted ones; an
    encrypted one is unsealed and sealed anew, bound to the target repository."""
    name = manifest_name(backup_id)
    data = source.get(name)
    if not src_codec.encrypted and not dst_codec.encrypted:
        dest.put_content_addressed(name, data)
        return
    body = src_codec.unseal(MAGIC, data, f"manifest of backup {backup_id}", name)
    dest.put(name, dst_codec.seal(MAGIC, body, name))


class Manifest:
    """A stored manifest, checked whole (format 1) or its page table checked (format 2)
    before any entry is used; pages are checked against their ids as they are read."""

    def __init__(self, storage: Backend, backup_id: str, codec: Codec,
                 read_pages: ReadPages | None = None):
        self.storage = storage
        self.codec = codec
        self.name = manifest_name(backup_id)
        self.what = f"manifest of backup {backup_id}"
        self._read_pages = read_pages
        try:
            self.total = storage.size(self.name)
            magic = storage.get_range(self.name, 0, 8) if self.total >= 8 else b""
        except MissingObject:
            raise CorruptionError(f"{self.what} is missing from the repository") from None
        if magic == MAGIC:
            self.format = 2
            header = self._open_v2()
        elif magic == MAGIC_V1 and not codec.encrypted:
            self.format = 1
            header = self._open_v1()
        else:
            raise CorruptionError(f"{self.what} is corrupt (bad header or truncated)")
        try:
            self.header = header
            self.block_size: int = header["block_size"]
            self.size: int = header["size"]
            self.blocks: int = header["blocks"]
            self.record: dict = header["backup"]
            self.page_entries: int = header.get("page_entries", 0)
            ok = (isinstance(self.record, dict) and self.record.get("id") == backup_id
                  and all(type(v) is int and v >= 0 for v in (self.block_size, self.size,
                                                              self.blocks, self.page_entries)))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise CorruptionError(f"{self.what} is corrupt (bad header, or the manifest of "
                                  "another backup)")
        self._check_bounds()
        self._cache: LRU[int, bytes] = LRU(_PAGE_CACHE)
        self._last_miss = -1   # the last page that was not in the cache
        self._lock = threading.Lock()
        self._v1_table: IO[bytes] | None = None

    # --- opening ---------------------------------------------------------------------

    def _check_bounds(self) -> None:
        """The header's numbers agree with each other and with what is stored, so that
        nothing is sized from a number alone: the block size is one a repository may
        have, the size is what the blocks cover, and (format 2) the page table lists the
        pages of exactly those blocks, in pages no larger than a writer makes."""
        bs = self.block_size
        if not block_size_allowed(bs):
            raise CorruptionError(f"{self.what} is corrupt (block size {bs} is not a power "
                                  f"of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE})")
        if -(-self.size // bs) != self.blocks:
            raise CorruptionError(f"{self.what} is corrupt (size {self.size} is not "
                                  f"{self.blocks} blocks of {bs} bytes)")
        if self.format == 2:
            pe = self.page_entries
            pages = -(-self.blocks // pe) if 0 < pe <= PAGE_ENTRIES else -1
            if pages * 32 != len(self._page_table):
                raise CorruptionError(f"{self.what} is corrupt (page table does not match "
                                      "its header)")
        # The record becomes a catalog row (catalog rebuild): plain values, integers that
        # SQLite can hold, labels a mapping of strings.
        labels = self.record.get("labels") or {}
        if not (all(_plain_value(v) for k, v in self.record.items() if k != "labels")
                and isinstance(labels, dict)
                and all(isinstance(v, str) for v in labels.values())):
            raise CorruptionError(f"{self.what} is corrupt (bad record)")

    def _open_v2(self) -> dict:
        if self.total > 1 << 31:
            raise CorruptionError(f"{self.what} is corrupt (implausibly large)")
        body = self.codec.unseal(MAGIC, self.storage.get(self.name), self.what, self.name)
        if len(body) < _LEN.size:
            raise CorruptionError(f"{self.what} is corrupt (bad header)")
        (hlen,) = _LEN.unpack_from(body)
        end = _LEN.size + hlen
        header = _json(body[_LEN.size:end]) if end <= len(body) else None
        if header is None or header.get("format") != 2:
            raise CorruptionError(f"{self.what} is corrupt (bad header)")
        self._page_table = body[end:]
        return header

    def _open_v1(self) -> dict:
        tail = len(MAGIC) + _LEN.size + 32
        if self.total < tail:
            raise CorruptionError(f"{self.what} is corrupt (truncated)")
        h = blake3.blake3()
        end = self.total - 32
        for off in range(0, end, _READ):
            h.update(self.storage.get_range(self.name, off, min(_READ, end - off)))
        if h.digest() != self.storage.get_range(self.name, end, 32):
            raise CorruptionError(f"{self.what} is corrupt (checksum mismatch)")
        (hlen,) = _LEN.unpack(self.storage.get_range(self.name, self.total - 36, 4))
        self._body_end = self.total - 36 - hlen
        if self._body_end < len(MAGIC):
            raise CorruptionError(f"{self.what} is corrupt (bad header)")
        header = _json(self.storage.get_range(self.name, self._body_end, hlen))
        if header is None:
            raise CorruptionError(f"{self.what} is corrupt (bad header)")
        self._page_table = b""
        return header

    # --- pages -------------------------------------------------------------------------

    def page_ids(self) -> list[bytes]:
        """The ids of the stored pages (format 2), in order, without the all-hole ones."""
        t = self._page_table
        return [pid for pid in (t[o:o + 32] for o in range(0, len(t), 32)) if pid != NO_PAGE]

    def page_table(self, first: int, count: int) -> bytes:
        """The ids of pages first .. first+count-1 as stored (32 zero bytes: all holes)."""
        return self._page_table[first * 32:(first + count) * 32]

    def _page_len(self, p: int) -> int:
        return min(self.page_entries, self.blocks - p * self.page_entries) * ENTRY_SIZE

    def _pages(self, first: int, count: int) -> list[bytes]:
        """Pages first .. first+count-1 (format 2), read in one batch; checked."""
        ids = [self._page_table[p * 32:(p + 1) * 32] for p in range(first, first + count)]
        wanted = [pid for pid in ids if pid != NO_PAGE]
        if wanted and self._read_pages is None:
            raise CorruptionError(f"{self.what}: its pages cannot be read here")
        try:
            got = self._read_pages(wanted) if wanted and self._read_pages else {}
        except CorruptionError as e:
            last = min(self.blocks, (first + count) * self.page_entries) - 1
            raise CorruptionError(f"{self.what}, entries of blocks {first * self.page_entries}"
                                  f"-{last}: {e}") from None
        out = []
        for p, pid in zip(range(first, first + count), ids, strict=True):
            page = bytes(self._page_len(p)) if pid == NO_PAGE else got.get(pid)
            if page is None or len(page) != self._page_len(p):
                raise CorruptionError(f"{self.what} is corrupt (page {p} has the wrong size)")
            out.append(page)
        return out

    # --- entries -----------------------------------------------------------------------

    def entries(self, per_batch: int) -> Iterator[Entries]:
        """The entry table in slices of `per_batch` entries (the last may be shorter)."""
        source = self._v1_stream() if self.format == 1 else self._v2_stream()
        want = per_batch * ENTRY_SIZE
        buf = bytearray()
        seen = 0
        for piece in source:
            buf += piece
            while len(buf) >= want:
                yield Entries(bytes(buf[:want]))
                del buf[:want]
                seen += per_batch
        if buf:
            seen += len(buf) // ENTRY_SIZE
            yield Entries(bytes(buf))
        if seen != self.blocks:
            raise CorruptionError(f"{self.what} is corrupt (has {seen} of {self.blocks} blocks)")

    def _v2_stream(self) -> Iterator[bytes]:
        pages = len(self._page_table) // 32
        batch = max(1, _READ // (self.page_entries * ENTRY_SIZE))
        for first in range(0, pages, batch):
            yield from self._pages(first, min(batch, pages - first))

    def _v1_stream(self) -> Iterator[bytes]:
        body = _RangeFile(self.storage, self.name, len(MAGIC), self._body_end)
        try:
            # read_to_iter() needs only read(); the stubs ask for a whole IO[bytes].
            reader = cast(IO[bytes], body)
            yield from zstandard.ZstdDecompressor().read_to_iter(reader, read_size=_READ)
        except zstandard.ZstdError:
            raise CorruptionError(f"{self.what} is corrupt (bad entry table)") from None

    def entries_at(self, first: int, count: int) -> Entries:
        """Entries of blocks first .. first+count-1 (clipped to the backup), at random:
        one page read each (format 2, cached), or a local copy of the table (format 1)."""
        count = max(0, min(count, self.blocks - first))
        if count == 0:
            return Entries(b"")
        if self.format == 1:
            return Entries(self._v1_slice(first, count))
        pe = self.page_entries
        out = bytearray()
        for p in range(first // pe, (first + count - 1) // pe + 1):
            page = self._cached_page(p)
            lo = max(first, p * pe) - p * pe
            hi = min(first + count, (p + 1) * pe) - p * pe
            out += page[lo * ENTRY_SIZE:hi * ENTRY_SIZE]
        return Entries(bytes(out))

    def _cached_page(self, p: int) -> bytes:
        with self._lock:
            page = self._cache.get(p)
            if page is not None:
                return page
            # A reader going through the pages in order (an incremental against its
            # parent) gets the next ones in the same batch: stored together, they come in
            # one read, where one read per page costs a round trip each on object storage.
            ahead = p == self._last_miss + 1
            self._last_miss = p
        count = min(_READ_AHEAD, len(self._page_table) // 32 - p) if ahead else 1
        try:
            pages = self._pages(p, count)
        except CorruptionError:
            if count == 1:
                raise
            pages = self._pages(p, 1)   # a damaged page ahead is not this reader's concern
        with self._lock:
            for i, got in enumerate(pages):
                self._cache.put(p + i, got)
            # The next miss of an in-order reader is the page after this batch.
            self._last_miss = p + len(pages) - 1
        return pages[0]

    def _v1_slice(self, first: int, count: int) -> bytes:
        with self._lock:
            if self._v1_table is None:
                # A format-1 table can only be read front to back: keep one decompressed
                # copy in an unnamed temporary file for random access.
                table = tempfile.TemporaryFile()  # noqa: SIM115 - open until close()
                for piece in self.entries(_READ // ENTRY_SIZE):
                    table.write(piece.raw)
                self._v1_table = table
            self._v1_table.seek(first * ENTRY_SIZE)
            return self._v1_table.read(count * ENTRY_SIZE)

    def close(self) -> None:
        if self._v1_table is not None:
            self._v1_table.close()
            self._v1_table = None


def _plain_value(value: object) -> bool:
    if type(value) is int:
        return -(1 << 63) <= value < 1 << 63
    return value is None or isinstance(value, (str, float, bool))


def _json(raw: bytes) -> dict | None:
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


class _RangeFile:
    """A read()-able byte range of a stored object."""

    def __init__(self, storage: Backend, name: str, start: int, end: int):
        self.storage, self.name, self.pos, self.end = storage, name, start, end

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        if n <= 0:
            return b""
        data = self.storage.get_range(self.name, self.pos, n)
        self.pos += n
        return data

