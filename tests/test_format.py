"""The on-disk format: manifests, packs, index files and the sealed envelope.

Every file in the repository (pack, index, manifest, repository config) carries a checksum,
so any flipped bit is detected, never silently used (docs/format.md).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import struct
from pathlib import Path

import blake3
import pytest
import xxhash
import zstandard

from lvbackup.base.errors import CorruptionError
from lvbackup.repository.backends import LocalBackend, MissingObject
from lvbackup.repository.codec import FLAG_RAW, FLAG_ZSTD, PLAIN, seal, unseal
from lvbackup.repository.index import INDEX_MAGIC, decode_index, encode_index
from lvbackup.repository.manifest import (
    ENTRY_SIZE,
    HOLE,
    MAGIC,
    MAGIC_V1,
    NO_PAGE,
    PAGE_ENTRIES,
    Manifest,
    ManifestWriter,
    manifest_name,
)
from lvbackup.repository.pack import (
    FOOTER,
    PACK_END,
    PACK_MAGIC,
    ChunkRef,
    PackBuilder,
    pack_name,
    read_trailer,
)
from lvbackup.repository.repo import REPO_MAGIC, ChunkError, Repository

from support import Workdir, apply_change, make_image, zero_range

BACKUP_ID = "0b6d7a52-9c1e-4a55-8a0e-5d5f8d0c1e11"
OTHER_ID = "5e2a1f07-3b8d-4c6e-9f10-2a3b4c5d6e7f"


class BytesStorage:
    """The read side of the storage interface over in-memory objects (for bit-flip sweeps)."""

    def __init__(self, objects: dict[str, bytes] | None = None):
        self.objects = dict(objects or {})

    def size(self, name: str) -> int:
        if name not in self.objects:
            raise MissingObject(f"repository object {name} is missing")
        return len(self.objects[name])

    def get(self, name: str) -> bytes:
        if name not in self.objects:
            raise MissingObject(f"repository object {name} is missing")
        return self.objects[name]

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        data = self.get(name)[offset:offset + length]
        if len(data) != length:
            raise CorruptionError(f"repository object {name} is truncated")
        return data


def flipped(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << (pos % 8)
    return bytes(b)


def sweep_positions(n: int, limit: int = 4000) -> list[int]:
    """Every position of a small object; of a larger one, a spread plus both ends."""
    if n <= limit:
        return list(range(n))
    step = n // limit + 1
    return sorted(set(range(0, n, step)) | set(range(0, 256)) | set(range(n - 512, n)))


# --- manifests ---------------------------------------------------------------------------

def entries_for(rng: random.Random, n: int, hole_every: int = 3) -> bytes:
    out = bytearray()
    for i in range(n):
        if i % hole_every == 0:
            out += HOLE
        else:
            block = rng.randbytes(64)
            out += xxhash.xxh3_128_digest(block) + blake3.blake3(block).digest()
    return bytes(out)


def record(**kw) -> dict:
    rec = {"id": BACKUP_ID, "name": "nightly", "description": "d\u00e9j\u00e0 vu",
           "volume_id": "vol", "volume_name": "/srv/disk.img", "snapshot_id": None,
           "snapshot_name": None, "parent_id": None, "is_incremental": False,
           "data_timestamp": "2026-11-24T17:04:35.000000+00:00",
           "created_at": "2026-11-24T17:04:35.000000+00:00",
           "updated_at": "2026-11-24T17:04:36.000000+00:00", "status": "available",
           "fail_reason": None, "size": 1, "block_size": 65536, "stored_bytes": 0,
           "num_dependent_backups": 0}
    rec.update(kw)
    return rec


class Pages:
    """Where a manifest's pages go in these tests: a dict, read back by id."""

    def __init__(self):
        self.stored: dict[bytes, bytes] = {}

    def store(self, page_id: bytes, page: bytes) -> None:
        assert page_id == blake3.blake3(page).digest()
        self.stored.setdefault(page_id, page)

    def read(self, ids: list[bytes]) -> dict[bytes, bytes]:
        missing = [i for i in ids if i not in self.stored]
        if missing:
            raise CorruptionError(f"chunk {missing[0].hex()} is not in the repository index")
        return {i: self.stored[i] for i in ids}


def write_manifest(storage, entries: bytes, pieces: list[int], size: int, rec: dict,
                   backup_id: str = BACKUP_ID, pages: Pages | None = None) -> Pages:
    pages = pages or Pages()
    w = ManifestWriter(storage, backup_id, PLAIN, pages.store)
    pos = 0
    for n in pieces:
        w.append(entries[pos:pos + n * ENTRY_SIZE])
        pos += n * ENTRY_SIZE
    w.append(entries[pos:])
    w.close({"block_size": 65536, "size": size, "backup": rec})
    return pages


def write_v1_manifest(storage, entries: bytes, size: int, rec: dict) -> None:
    """A format-1 manifest as docs/format.md describes it (lvbackup writes format 2 now)."""
    head = json.dumps({"format": 1, "blocks": len(entries) // ENTRY_SIZE, "block_size": 65536,
                       "size": size, "backup": rec}).encode()
    body = (MAGIC_V1 + zstandard.ZstdCompressor(level=3).compress(entries) + head
            + struct.pack("<I", len(head)))
    storage.put(manifest_name(BACKUP_ID), body + blake3.blake3(body).digest())


def _all(m: Manifest, per: int) -> bytes:
    return b"".join(e.raw for e in m.entries(per))


def test_manifest_round_trip(tmp_path):
    storage = LocalBackend(tmp_path)
    rng = random.Random(1)
    n = 10_000
    entries = entries_for(rng, n)
    size = n * 65536 - 1000
    rec = record(size=size)
    pages = write_manifest(storage, entries, [1, 7, 300, 4096], size, rec)
    assert storage.exists(manifest_name(BACKUP_ID))
    m = Manifest(LocalBackend(tmp_path), BACKUP_ID, PLAIN, pages.read)
    assert (m.format, m.block_size, m.size, m.blocks) == (2, 65536, size, n)
    assert m.record == rec
    for per in (1, 7, 64, 4096, n, n + 5):
        slices = list(m.entries(per))
        assert all(len(s) == per for s in slices[:-1])
        assert 0 < len(slices[-1]) <= per
        assert b"".join(s.raw for s in slices) == entries
    rng = random.Random(5)
    for _ in range(200):  # random access: any run of blocks, one page read each
        first = rng.randrange(n)
        count = rng.randrange(1, 700)
        assert m.entries_at(first, count).raw == entries[first * 48:(first + count) * 48]
    assert m.entries_at(n - 1, 10).raw == entries[-48:]


def test_pages_read_in_order_come_in_batches_and_damage_ahead_is_left_alone(tmp_path):
    """An incremental reads its parent's entries segment by segment: one read per page
    would cost a round trip each on object storage."""
    storage = LocalBackend(tmp_path)
    n = 300 * PAGE_ENTRIES + 17
    entries = entries_for(random.Random(2), n)
    pages = write_manifest(storage, entries, [], n * 65536, record())
    batches: list[int] = []

    def read(ids: list[bytes]) -> dict[bytes, bytes]:
        batches.append(len(ids))
        return pages.read(ids)

    m = Manifest(storage, BACKUP_ID, PLAIN, read)
    for first in range(0, n, 32):   # 4 MiB segments of 128 KiB blocks
        assert m.entries_at(first, 32).raw == entries[first * 48:(first + 32) * 48]
    assert len(batches) <= 6 and sum(batches) == 301, batches
    batches.clear()
    assert m.entries_at(5 * PAGE_ENTRIES, 1).raw == entries[5 * PAGE_ENTRIES * 48:][:48]
    assert batches == [1], "a read out of order reads its own page only"

    # A damaged page ahead of the reader fails only the read that needs it.
    page_ids = m.page_ids()

    def damaged(ids: list[bytes]) -> dict[bytes, bytes]:
        if page_ids[3] in ids:
            raise CorruptionError("chunk fails its checksum")
        return pages.read(ids)

    m = Manifest(storage, BACKUP_ID, PLAIN, damaged)
    assert m.entries_at(0, 32).raw == entries[:32 * 48]
    assert m.entries_at(PAGE_ENTRIES, 32).raw == entries[PAGE_ENTRIES * 48:][:32 * 48]
    with pytest.raises(CorruptionError, match="fails its checksum"):
        m.entries_at(3 * PAGE_ENTRIES, 1)


def test_old_format_1_manifests_stay_readable(tmp_path):
    storage = LocalBackend(tmp_path)
    n = 3000
    entries = entries_for(random.Random(11), n)
    write_v1_manifest(storage, entries, n * 65536, record())
    m = Manifest(storage, BACKUP_ID, PLAIN)
    assert (m.format, m.blocks, m.page_ids()) == (1, n, [])
    assert _all(m, 100) == entries
    assert m.entries_at(1234, 99).raw == entries[1234 * 48:1333 * 48]
    m.close()


def test_manifest_layout(tmp_path):
    """docs/format.md: sealed "LVBMAN02", header length, JSON header, page table; pages are
    the entry table in pieces of PAGE_ENTRIES entries, each named by its BLAKE3."""
    storage = LocalBackend(tmp_path)
    n = PAGE_ENTRIES * 2 + 17
    entries = entries_for(random.Random(2), n)
    entries = entries[:PAGE_ENTRIES * 48] + HOLE * PAGE_ENTRIES + entries[2 * PAGE_ENTRIES * 48:]
    pages = write_manifest(storage, entries, [], n * 65536, record())
    data = (tmp_path / manifest_name(BACKUP_ID)).read_bytes()
    assert data[:8] == MAGIC
    assert blake3.blake3(data[:-32]).digest() == data[-32:]
    hlen = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12:12 + hlen])
    assert header["format"] == 2 and header["blocks"] == n and header["block_size"] == 65536
    assert header["page_entries"] == PAGE_ENTRIES and header["backup"]["id"] == BACKUP_ID
    table = data[12 + hlen:-32]
    ids = [table[i:i + 32] for i in range(0, len(table), 32)]
    assert len(ids) == 3 and ids[1] == NO_PAGE, "an all-hole page is not stored"
    assert ids[0] == blake3.blake3(entries[:PAGE_ENTRIES * 48]).digest()
    assert ids[2] == blake3.blake3(entries[2 * PAGE_ENTRIES * 48:]).digest()
    assert set(pages.stored) == {ids[0], ids[2]}


def test_an_incremental_stores_only_the_pages_that_changed(tmp_path):
    storage = LocalBackend(tmp_path)
    n = PAGE_ENTRIES * 10
    entries = entries_for(random.Random(7), n)
    pages = write_manifest(storage, entries, [], n * 65536, record())
    assert len(pages.stored) == 10
    changed = bytearray(entries)
    changed[5 * PAGE_ENTRIES * 48 + 100] ^= 1
    write_manifest(storage, bytes(changed), [], n * 65536, record(id=OTHER_ID),
                   backup_id=OTHER_ID, pages=pages)
    assert len(pages.stored) == 11
    assert _all(Manifest(storage, OTHER_ID, PLAIN, pages.read), 999) == bytes(changed)


def test_empty_manifest_round_trip(tmp_path):
    storage = LocalBackend(tmp_path)
    write_manifest(storage, b"", [], 0, record(size=0))
    m = Manifest(storage, BACKUP_ID, PLAIN)
    assert (m.size, m.blocks) == (0, 0)
    assert _all(m, 10) == b""


def test_manifest_appears_only_on_close(tmp_path):
    storage = LocalBackend(tmp_path)
    w = ManifestWriter(storage, BACKUP_ID, PLAIN, Pages().store)
    w.append(entries_for(random.Random(3), 50))
    assert not storage.exists(manifest_name(BACKUP_ID))
    with pytest.raises(CorruptionError, match="missing"):
        Manifest(storage, BACKUP_ID, PLAIN)


def _manifest_bytes(tmp_path: Path, n: int) -> tuple[bytes, Pages]:
    storage = LocalBackend(tmp_path)
    pages = write_manifest(storage, entries_for(random.Random(4), n), [5], n * 65536, record())
    return (tmp_path / manifest_name(BACKUP_ID)).read_bytes(), pages


def _read_all(storage, pages: Pages | None = None) -> None:
    m = Manifest(storage, BACKUP_ID, PLAIN, pages.read if pages else None)
    for _ in m.entries(16):
        pass


@pytest.mark.parametrize("n", [40, 3000])
def test_manifest_any_flipped_bit_is_detected(tmp_path, n):
    data, pages = _manifest_bytes(tmp_path, n)
    name = manifest_name(BACKUP_ID)
    _read_all(BytesStorage({name: data}), pages)  # the pristine one reads
    for pos in sweep_positions(len(data), limit=600):
        with pytest.raises(CorruptionError):
            _read_all(BytesStorage({name: flipped(data, pos)}), pages)


def test_old_manifest_any_flipped_bit_is_detected(tmp_path):
    storage = BytesStorage()
    storage.put = lambda name, data: storage.objects.__setitem__(name, data)
    write_v1_manifest(storage, entries_for(random.Random(4), 40), 40 * 65536, record())
    name = manifest_name(BACKUP_ID)
    data = storage.objects[name]
    _read_all(storage)
    for pos in sweep_positions(len(data)):
        with pytest.raises(CorruptionError):
            _read_all(BytesStorage({name: flipped(data, pos)}))


def test_manifest_truncated_or_extended_is_detected(tmp_path):
    data, pages = _manifest_bytes(tmp_path, 200)
    name = manifest_name(BACKUP_ID)
    for cut in {0, 1, 8, 12, 20, 43, 44, len(data) // 2, len(data) - 37, len(data) - 36,
                len(data) - 33, len(data) - 32, len(data) - 1}:
        with pytest.raises(CorruptionError):
            _read_all(BytesStorage({name: data[:cut]}), pages)
    for extra in (b"\0", b"x" * 100):
        with pytest.raises(CorruptionError):
            _read_all(BytesStorage({name: data + extra}), pages)


def test_a_damaged_or_missing_page_is_detected(tmp_path):
    data, pages = _manifest_bytes(tmp_path, PAGE_ENTRIES + 5)
    name = manifest_name(BACKUP_ID)
    first = sorted(pages.stored)[0]
    short = Pages()
    short.stored = {k: (v[:-48] if k == first else v) for k, v in pages.stored.items()}
    with pytest.raises(CorruptionError, match="wrong size"):
        _read_all(BytesStorage({name: data}), short)
    gone = Pages()
    gone.stored = {k: v for k, v in pages.stored.items() if k != first}
    with pytest.raises(CorruptionError, match="not in the repository index"):
        _read_all(BytesStorage({name: data}), gone)


def test_manifest_of_another_kind_is_refused(tmp_path):
    """A file that is not a manifest but carries a valid trailing hash is still refused."""
    body = b"LVBIDX01" + b"\0" * 100
    fake = body + blake3.blake3(body).digest()
    with pytest.raises(CorruptionError):
        _read_all(BytesStorage({manifest_name(BACKUP_ID): fake}))


def test_missing_manifest(tmp_path):
    with pytest.raises(CorruptionError, match="missing"):
        Manifest(LocalBackend(tmp_path), BACKUP_ID, PLAIN)


# --- packs -------------------------------------------------------------------------------

def build_pack(rng: random.Random, count: int = 20):
    """(pack id, bytes, refs, {chunk id: plaintext})."""
    builder = PackBuilder(1 << 20, PLAIN.trailer_digest)
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
    plain = {}
    for i in range(count):
        if i % 2:
            data = rng.randbytes(rng.randrange(1, 5000))      # incompressible: raw
            blob, flags = data, FLAG_RAW
        else:
            data = (b"text %d " % i) * rng.randrange(10, 800)  # compressible: zstd
            blob, flags = cctx.compress(data), FLAG_ZSTD
        cid = blake3.blake3(data).digest()
        builder.add(cid, blob, len(data), flags)
        plain[cid] = data
    pack_id, buf, refs = builder.finish()
    return pack_id, bytes(buf), refs, plain


@pytest.fixture
def repo(tmp_path) -> Repository:
    r, created = Repository.init(tmp_path / "repo", tmp_path / "cache", 65536)
    assert created
    yield r
    r.close()


def test_pack_round_trip(repo):
    pack_id, data, refs, plain = build_pack(random.Random(5))
    count = int.from_bytes(data[-44:-40], "little")
    trailer = data[-44 - 49 * count:-44]
    assert pack_id == blake3.blake3(trailer).digest() == data[-40:-8], \
        "a pack is named by the BLAKE3 of its trailer entries, which its footer holds"
    assert data.startswith(PACK_MAGIC) and data.endswith(PACK_END)
    repo.storage.put(pack_name(pack_id), data)
    assert pack_name(pack_id) == f"packs/{pack_id.hex()[:2]}/{pack_id.hex()}"
    assert read_trailer(repo.storage, pack_id, PLAIN) == refs
    assert [r.chunk_id for r in refs] == list(plain)
    for ref in refs:
        assert ref.pack_id == pack_id
        assert repo.read_chunk(ref) == plain[ref.chunk_id]
    # The trailer lists offsets that tile the body between magic and trailer.
    assert refs[0].offset == len(PACK_MAGIC)
    for a, b in itertools.pairwise(refs):
        assert a.offset + a.length == b.offset


def test_empty_pack_trailer(repo):
    pack_id, data, refs = PackBuilder(1 << 20, PLAIN.trailer_digest).finish()
    repo.storage.put(pack_name(pack_id), bytes(data))
    assert refs == [] and read_trailer(repo.storage, pack_id, PLAIN) == []


def test_pack_trailer_any_flipped_bit_is_detected(repo):
    pack_id, data, refs, _ = build_pack(random.Random(6))
    name = pack_name(pack_id)
    trailer_start = len(data) - FOOTER.size - len(refs) * 49
    assert read_trailer(BytesStorage({name: data}), pack_id, PLAIN) == refs
    for pos in range(trailer_start, len(data)):
        with pytest.raises(CorruptionError):
            read_trailer(BytesStorage({name: flipped(data, pos)}), pack_id, PLAIN)


def test_truncated_pack_is_detected(repo):
    pack_id, data, refs, _ = build_pack(random.Random(7))
    name = pack_name(pack_id)
    for cut in (0, 7, 8, 51, len(data) // 2, len(data) - FOOTER.size, len(data) - 1):
        with pytest.raises(CorruptionError):
            read_trailer(BytesStorage({name: data[:cut]}), pack_id, PLAIN)


def test_missing_pack_is_detected(repo):
    with pytest.raises(CorruptionError):
        read_trailer(repo.storage, b"\x11" * 32, PLAIN)


def test_flipped_chunk_byte_fails_its_checksum(repo):
    """A flip inside any chunk's stored bytes (raw or zstd) is caught by read_chunk."""
    pack_id, data, refs, plain = build_pack(random.Random(8), count=8)
    for ref in refs:
        for pos in (ref.offset, ref.offset + ref.length // 2, ref.offset + ref.length - 1):
            bad = flipped(data, pos)
            bad_id = blake3.blake3(bad).digest()
            repo.storage.put(pack_name(bad_id), bad)
            with pytest.raises(CorruptionError):
                repo.read_chunk(ref._replace(pack_id=bad_id))


def test_chunk_ref_with_wrong_lengths_is_refused(repo):
    pack_id, data, refs, _ = build_pack(random.Random(9), count=4)
    repo.storage.put(pack_name(pack_id), data)
    ref = refs[1]
    with pytest.raises(CorruptionError):
        repo.read_chunk(ref._replace(raw_length=ref.raw_length + 1))
    with pytest.raises(CorruptionError):
        repo.read_chunk(ref._replace(length=ref.length - 1))
    with pytest.raises(CorruptionError):
        repo.read_chunk(ref._replace(offset=len(data) - 3))


def test_block_digest_check_tells_a_damaged_chunk_from_a_wrong_digest(repo):
    """A restore checks each block against its manifest digest (xxh3-128). When that fails
    but the chunk matches its BLAKE3 id, the chunk is sound (not to be quarantined)."""
    pack_id, data, refs, plain = build_pack(random.Random(10), count=4)
    repo.storage.put(pack_name(pack_id), data)
    ref = refs[0]
    good = xxhash.xxh3_128_digest(plain[ref.chunk_id])
    out = memoryview(bytearray(ref.raw_length))
    repo.read_chunks_into([(ref, out, good)])
    assert bytes(out) == plain[ref.chunk_id]
    with pytest.raises(ChunkError) as wrong_digest:
        repo.read_chunks_into([(ref, out, bytes(16))])
    assert not wrong_digest.value.damaged
    bad_id = blake3.blake3(flipped(data, ref.offset)).digest()
    repo.storage.put(pack_name(bad_id), flipped(data, ref.offset))
    with pytest.raises(ChunkError) as damaged:
        repo.read_chunks_into([(ref._replace(pack_id=bad_id), out, good)])
    assert damaged.value.damaged


# --- index files -------------------------------------------------------------------------

def index_groups(rng: random.Random, packs: int = 3, per: int = 7):
    groups = []
    for _ in range(packs):
        pack_id = rng.randbytes(32)
        refs = [ChunkRef(rng.randbytes(32), pack_id, 8 + 1000 * i, 900 + i,
                         65536, i % 2) for i in range(per)]
        groups.append((pack_id, refs))
    return groups


def test_index_round_trip():
    groups = index_groups(random.Random(10))
    name, data = encode_index(groups, PLAIN)
    assert name == f"index/{blake3.blake3(data).hexdigest()}"
    assert data.startswith(INDEX_MAGIC)
    assert list(decode_index(name, data, PLAIN)) == groups


def test_index_round_trip_edge_cases():
    for groups in ([], [(b"\x01" * 32, [])], index_groups(random.Random(11), packs=1, per=1)):
        name, data = encode_index(groups, PLAIN)
        assert list(decode_index(name, data, PLAIN)) == groups


def test_index_is_named_by_content():
    g1, g2 = index_groups(random.Random(12)), index_groups(random.Random(13))
    assert encode_index(g1, PLAIN)[0] == encode_index(g1, PLAIN)[0]
    assert encode_index(g1, PLAIN)[0] != encode_index(g2, PLAIN)[0]


def test_index_any_flipped_bit_is_detected():
    name, data = encode_index(index_groups(random.Random(14), packs=2, per=5), PLAIN)
    for pos in range(len(data)):
        with pytest.raises(CorruptionError):
            list(decode_index(name, flipped(data, pos), PLAIN))


def test_index_truncation_is_detected():
    name, data = encode_index(index_groups(random.Random(15)), PLAIN)
    for cut in (0, 8, 39, 40, len(data) // 2, len(data) - 32, len(data) - 1):
        with pytest.raises(CorruptionError):
            list(decode_index(name, data[:cut], PLAIN))


def test_index_with_valid_seal_but_torn_group_is_refused():
    name, data = encode_index(index_groups(random.Random(16)), PLAIN)
    payload = unseal(INDEX_MAGIC, data, "index")
    for cut in (1, 35, 36 + 48, len(payload) - 1):
        bad = seal(INDEX_MAGIC, payload[:cut])
        with pytest.raises(CorruptionError):
            list(decode_index(name, bad, PLAIN))


def test_a_manifest_is_not_an_index_file():
    body = seal(b"LVBMAN01", b"\0" * 36)
    with pytest.raises(CorruptionError):
        list(decode_index("index/x", body, PLAIN))


# --- the sealed envelope and the repository config ---------------------------------------

@pytest.mark.parametrize("payload", [b"", b"x", os.urandom(1000)])
def test_seal_round_trip(payload):
    data = seal(b"TESTMAG1", payload)
    assert data[:8] == b"TESTMAG1" and len(data) == 8 + len(payload) + 32
    assert unseal(b"TESTMAG1", data, "thing") == payload


def test_seal_any_flip_truncation_or_wrong_kind_is_detected():
    data = seal(b"TESTMAG1", b"some payload")
    for pos in range(len(data)):
        with pytest.raises(CorruptionError, match="thing"):
            unseal(b"TESTMAG1", flipped(data, pos), "thing")
    for cut in range(len(data)):
        with pytest.raises(CorruptionError):
            unseal(b"TESTMAG1", data[:cut], "thing")
    with pytest.raises(CorruptionError):
        unseal(b"OTHERMG1", data, "thing")


def test_repository_config_is_sealed(tmp_path):
    r, _ = Repository.init(tmp_path / "repo", tmp_path / "cache", 131072)
    r.close()
    path = tmp_path / "repo" / "config"
    data = path.read_bytes()
    meta = json.loads(unseal(REPO_MAGIC, data, "config"))
    assert meta["block_size"] == 131072 and meta["version"] == 1
    r = Repository.open(tmp_path / "repo", tmp_path / "cache")
    assert r.block_size == 131072 and r.id == meta["id"]
    r.close()
    for pos in (0, 9, len(data) // 2, len(data) - 1):
        path.write_bytes(flipped(data, pos))
        with pytest.raises(CorruptionError):
            Repository.open(tmp_path / "repo", tmp_path / "cache")


# --- docs/format.md ------------------------------------------------------------------------
#
# docs/format.md says it "describes an lvbackup repository precisely enough to read one, and
# restore any backup from it, without lvbackup's code". These tests hold it to that: a reader
# written from the document alone (struct, json, zstandard, blake3) restores real backups.

FORMAT_DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"
DOC_RECORD_FIELDS = ("id", "name", "description", "volume_id", "volume_name", "snapshot_id",
                     "snapshot_name", "parent_id", "is_incremental", "data_timestamp",
                     "created_at", "updated_at", "status", "fail_reason", "size", "block_size",
                     "stored_bytes", "num_dependent_backups", "has_dependent_backups",
                     "labels", "protected", "change_source", "change_fallback", "bytes_read",
                     "source_snapshot_id", "source_snapshot_time", "source_pool_id",
                     "group_id", "group_name")


def doc_unseal(magic: bytes, data: bytes) -> bytes:
    assert data[:8] == magic
    assert blake3.blake3(data[:-32]).digest() == data[-32:]
    return data[8:-32]


def doc_read_index(repo: Path) -> dict[bytes, tuple]:
    """Step 1: chunk id -> (pack id, offset, length, plaintext length, flags)."""
    found = {}
    for path in sorted((repo / "index").iterdir()):
        data = path.read_bytes()
        assert path.name == blake3.blake3(data).hexdigest()
        payload = doc_unseal(b"LVBIDX01", data)
        pos = 0
        while pos < len(payload):
            pack_id = payload[pos:pos + 32]
            (m,) = struct.unpack_from("<I", payload, pos + 32)
            pos += 36
            for _ in range(m):
                cid, off, ln, raw, flags = struct.unpack_from("<32sQIIB", payload, pos)
                pos += 49
                found[cid] = (pack_id, off, ln, raw, flags)
    return found


def doc_chunk(repo: Path, index: dict, cid: bytes) -> bytes:
    """A chunk's plaintext: its pack, byte range, decompressed, checked against its id."""
    pack_id, off, ln, raw, flags = index[cid]
    with open(repo / "packs" / pack_id.hex()[:2] / pack_id.hex(), "rb") as f:
        f.seek(off)
        blob = f.read(ln)
    plain = zstandard.ZstdDecompressor().decompress(blob) if flags == 1 else blob
    assert len(plain) == raw and blake3.blake3(plain).digest() == cid
    return plain


def doc_restore(repo: Path, backup_id: str) -> tuple[dict, bytes]:
    """Steps 2 and 3: the header and the image of a backup (format 2)."""
    index = doc_read_index(repo)
    payload = doc_unseal(b"LVBMAN02", (repo / "manifests" / backup_id).read_bytes())
    (h,) = struct.unpack("<I", payload[:4])
    header = json.loads(payload[4:4 + h].decode())
    page_ids = payload[4 + h:]
    bs, size, per = header["block_size"], header["size"], header["page_entries"]
    table = b""
    for p in range(0, len(page_ids), 32):
        pid = page_ids[p:p + 32]
        n = min(per, header["blocks"] - p // 32 * per)
        table += bytes(48 * n) if pid == bytes(32) else doc_chunk(repo, index, pid)
    assert len(table) == 48 * header["blocks"]
    out = bytearray()
    for i in range(header["blocks"]):
        entry = table[48 * i:48 * (i + 1)]
        n = min(bs, size - i * bs)
        if entry == bytes(48):
            out += bytes(n)
            continue
        plain = doc_chunk(repo, index, entry[16:])
        assert len(plain) == n and xxhash.xxh3_128_digest(plain) == entry[:16]
        out += plain
    return header, bytes(out)


def doc_read_trailer(pack: Path) -> list[tuple]:
    data = pack.read_bytes()
    n, digest, end = struct.unpack("<I32s8s", data[-44:])
    assert end == b"LVBPEND1" and data[:8] == b"LVBPACK1"
    trailer = data[-44 - 49 * n:-44]
    assert blake3.blake3(trailer).digest() == digest
    assert pack.name == digest.hex(), "a pack is named by the BLAKE3 of its trailer entries"
    return [struct.unpack_from("<32sQIIB", trailer, 49 * i) for i in range(n)]


@pytest.fixture(scope="module")
def cli_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("format")
    img = root / "disk.img"
    wd = Workdir(root / "wd")
    wd.init("64K")
    v1 = make_image(img, 4, seed=201, tail=777)
    r1 = wd.create(img)
    apply_change(img, seed=202)
    v2 = zero_range(img, 0, 100_000)
    r2 = wd.create(img, "--incremental")
    return wd, [(r1, v1), (r2, v2)]


def test_format_doc_exists_and_names_the_magics():
    text = FORMAT_DOC.read_text()
    for magic in (MAGIC, MAGIC_V1, INDEX_MAGIC, PACK_MAGIC, PACK_END, REPO_MAGIC):
        assert magic.decode() in text, f"docs/format.md does not mention {magic!r}"
    assert "49 bytes" in text and "48 bytes" in text and "44 bytes" in text
    assert ENTRY_SIZE == 48 and FOOTER.size == 44
    for field in DOC_RECORD_FIELDS:
        assert f"`{field}`" in text, field


def test_format_doc_reader_restores_every_backup(cli_repo):
    wd, backups = cli_repo
    for rec, data in backups:
        header, image = doc_restore(wd.repo, rec["id"])
        assert image == data
        assert header["format"] == 2 and header["size"] == len(data)
        assert header["block_size"] == 64 * 1024
        assert set(header["backup"]) == set(DOC_RECORD_FIELDS)
        assert header["backup"]["id"] == rec["id"] and header["backup"]["status"] == "available"
        assert header["backup"]["parent_id"] == rec["parent_id"]


def test_format_doc_pack_trailers_rebuild_the_index(cli_repo):
    """'The index can always be rebuilt from the pack trailers'."""
    wd, _ = cli_repo
    from_trailers = {}
    for pack in (wd.repo / "packs").rglob("*"):
        if pack.is_file():
            assert pack.parent.name == pack.name[:2]
            for cid, off, ln, raw, flags in doc_read_trailer(pack):
                assert flags in (0, 1)
                from_trailers[cid] = (bytes.fromhex(pack.name), off, ln, raw, flags)
    assert from_trailers == doc_read_index(wd.repo)


def test_format_doc_config(cli_repo):
    wd, _ = cli_repo
    meta = json.loads(doc_unseal(b"LVBREPO1", (wd.repo / "config").read_bytes()))
    assert set(meta) == {"version", "id", "block_size", "created_at"}
    assert meta["version"] == 1 and meta["block_size"] == 64 * 1024


def test_format_doc_cache_is_not_part_of_the_repository(cli_repo, tmp_path):
    """'delete it and it is rebuilt from the index files'."""
    wd, backups = cli_repo
    clone = wd.clone(tmp_path / "wd")
    shutil.rmtree(clone.cache)
    for rec, data in backups:
        assert clone.restore_bytes(rec["id"]) == data


def test_appended_holes_make_the_same_manifest_as_hole_entries(tmp_path):
    rng = random.Random(12)
    pieces = [entries_for(rng, 10), HOLE * 700, entries_for(rng, 3), HOLE * PAGE_ENTRIES * 3,
              HOLE * 5, entries_for(rng, 300), HOLE * 1]
    a, b = Pages(), Pages()
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    wa = ManifestWriter(LocalBackend(tmp_path / "a"), BACKUP_ID, PLAIN, a.store)
    wb = ManifestWriter(LocalBackend(tmp_path / "b"), BACKUP_ID, PLAIN, b.store)
    for p in pieces:
        wa.append(p)
        if p.count(0) == len(p):
            wb.append_holes(len(p) // ENTRY_SIZE)
        else:
            wb.append(p)
    for w in (wa, wb):
        w.close({"block_size": 65536, "size": 1, "backup": record()})
    name = manifest_name(BACKUP_ID)
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.stored == b.stored
