"""Hardened parsing: a seeded mutation loop over real objects of a real repository
(unencrypted and encrypted) — truncations, bit flips, huge lengths, wrong counts — fed to
every parser of stored or imported bytes: manifests, pack trailers, index files, the
sealed config, key slots, key exports and exported records. Each must end in a clean error
(an LvbackupError: one line, an exit status) or a result, never another exception, and
never allocate beyond a bound; pytest-timeout turns a hang into a failure.

The length, offset and size fields are also mutated one by one, to values a parser must
refuse (zero, negative, not a power of two, past the object, beyond what SQLite holds):
block sizes and sizes in the config and manifests, page counts, and the offsets and
lengths of trailer and index entries.

The mutations are made both to the stored bytes (which the seal or MAC must catch) and to
the payload re-sealed with the repository's own codec (what a forger who can seal could
make: an unencrypted repository's checksums stop no one), so the parsers behind the seals
are exercised too."""

from __future__ import annotations

import base64
import json
import random
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lvbackup.base.errors import CorruptionError, LvbackupError
from lvbackup.operations.records import parse_record
from lvbackup.repository.backends import MemoryBackend
from lvbackup.repository.codec import PLAIN, Codec
from lvbackup.repository.index import INDEX_MAGIC, INDEX_SEAL_NAME, ChunkIndex, decode_index
from lvbackup.repository.keys import (
    PASSPHRASE,
    SLOT_MAGIC,
    Secret,
    export_text,
    open_slot,
    parse_export,
    parse_slot,
    read_slots,
)
from lvbackup.repository.manifest import MAGIC as MANIFEST_MAGIC
from lvbackup.repository.manifest import MAX_BLOCK_SIZE, Manifest, manifest_name
from lvbackup.repository.pack import (
    ENTRY,
    FOOTER,
    MAX_PACK_BYTES,
    PACK_END,
    pack_name,
    read_trailer,
)
from lvbackup.repository.repo import REPO_MAGIC, Repository

from support import MiB, Workdir, make_image, write_secret

PASS = "fuzz passphrase"
ROUNDS = 150
ALLOC_BOUND = 64 * MiB
pytestmark = pytest.mark.timeout(600)


def mutations(data: bytes, rng: random.Random, rounds: int = ROUNDS) -> Iterator[bytes]:
    """Seeded damage: truncations, flipped bits, u32/u64 fields set huge, bytes cut out or
    repeated (wrong counts), and garbage appended."""
    for _ in range(rounds):
        b = bytearray(data)
        kind = rng.randrange(6)
        if kind == 0 and b:
            del b[rng.randrange(len(b)):]
        elif kind == 1 and b:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif kind == 2 and len(b) >= 8:
            i = rng.randrange(len(b) - 7)
            b[i:i + 8] = struct.pack("<Q", rng.choice([2**32 - 1, 2**63 - 1, 2**31, 10**12]))
        elif kind == 3 and len(b) >= 4:
            i = rng.randrange(len(b) - 3)
            b[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 2**32 - 1, 2**31, 16385]))
        elif kind == 4 and b:
            i, n = rng.randrange(len(b)), rng.randint(1, 64)
            b[i:i] = b[i:i + n] if rng.random() < 0.5 else b""
            del b[i:i + (0 if rng.random() < 0.5 else n)]
        else:
            b += rng.randbytes(rng.randint(1, 100))
        yield bytes(b)


def bounded(parse: Callable[[bytes], object], data: bytes) -> None:
    """`parse(data)` ends in a result or an LvbackupError, within the allocation bound."""
    tracemalloc.start()
    try:
        parse(data)
    except LvbackupError as e:
        assert str(e) and "\n" not in str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < ALLOC_BOUND, f"{peak} bytes allocated parsing {len(data)} bytes"


@pytest.fixture(scope="module", params=["plain", "encrypted"])
def repo(request, tmp_path_factory) -> Iterator[tuple[Repository, Workdir, list[str]]]:
    tmp = tmp_path_factory.mktemp(request.param)
    write_secret(tmp / "pw", PASS)
    extra = {"passphrase_file": str(tmp / "pw")} if request.param == "encrypted" else {}
    wd = Workdir(tmp, **extra)
    args = ["--encryption"] if extra else []
    assert wd.run("init", "--block-size", "64K", *args).returncode == 0
    make_image(tmp / "img", 3, seed=40)
    ids = [wd.create(tmp / "img")["id"]]
    make_image(tmp / "img", 3, seed=41)
    ids.append(wd.create(tmp / "img", "--incremental")["id"])
    r = Repository.open(wd.repo, tmp / "fuzzcache",
                        lambda: [Secret(PASSPHRASE, PASS.encode(), "test")])
    r.sync_index(tmp / "locks")
    yield r, wd, ids
    r.close()


def _forged(codec: Codec, magic: bytes, payload: bytes, name: str,
            rng: random.Random) -> Iterator[bytes]:
    for bad in mutations(payload, rng):
        yield codec.seal(magic, bad, name)


def _parse_manifest(r: Repository, store: MemoryBackend, backup_id: str, data: bytes,
                    rng: random.Random) -> None:
    name = manifest_name(backup_id)
    store.delete(name)
    store.put(name, data)
    m = Manifest(store, backup_id, r.codec, r.read_pages)
    for _ in m.entries(4096):
        pass
    m.entries_at(rng.randrange(max(1, m.blocks)), 300)


def test_manifests(repo) -> None:
    r, _, ids = repo
    rng = random.Random(1)
    for backup_id in ids:
        name = manifest_name(backup_id)
        stored = r.storage.get(name)
        payload = r.codec.unseal(MANIFEST_MAGIC, stored, "m", name)
        store = MemoryBackend(f"fuzz-manifest-{r.id}-{backup_id}")
        for data in [*mutations(stored, rng), *_forged(r.codec, MANIFEST_MAGIC, payload,
                                                        name, rng)]:
            bounded(lambda d, s=store, b=backup_id: _parse_manifest(r, s, b, d, rng), data)


def _parse_pack(r: Repository, store: MemoryBackend, pack_id: bytes, pack: bytes) -> None:
    """Its trailer, then every chunk it lists, read through the repository's read path."""
    store.delete(pack_name(pack_id))
    store.put(pack_name(pack_id), pack)
    saved, r.storage = r.storage, store
    try:
        for ref in read_trailer(store, pack_id, r.codec)[:50]:
            r.read_chunk(ref)
    finally:
        r.storage = saved


def test_pack_trailers(repo) -> None:
    r, _, _ = repo
    rng = random.Random(2)
    for pname, _ in list(r.storage.list("packs/"))[:3]:
        pack_id = bytes.fromhex(pname.rsplit("/", 1)[1])
        data = r.storage.get(pname)
        store = MemoryBackend(f"fuzz-pack-{pack_id.hex()}")
        count = struct.unpack_from("<I", data, len(data) - FOOTER.size)[0]
        start = len(data) - FOOTER.size - count * 49
        body, trailer = data[:start], data[start:len(data) - FOOTER.size]
        for pack in (data[:-400] + m for m in mutations(data[-400:], rng)):
            bounded(lambda p, s=store, i=pack_id: _parse_pack(r, s, i, p), pack)
        # Trailers a forger who holds the trailer key could write: they pass the digest,
        # and every chunk read through them must still fail cleanly or be right.
        for bad in mutations(trailer, rng):
            if len(bad) % 49:
                continue
            pid = r.codec.trailer_digest(bad)
            footer = FOOTER.pack(len(bad) // 49, pid, PACK_END)
            bounded(lambda p, s=store, i=pid: _parse_pack(r, s, i, p), body + bad + footer)


def test_index_files(repo) -> None:
    r, _, _ = repo
    rng = random.Random(3)
    for name, _ in r.storage.list("index/"):
        stored = r.storage.get(name)
        payload = r.codec.unseal(INDEX_MAGIC, stored, "i", INDEX_SEAL_NAME)
        for data in [*mutations(stored, rng), *_forged(r.codec, INDEX_MAGIC, payload,
                                                        INDEX_SEAL_NAME, rng)]:
            bounded(lambda d, n=name: list(decode_index(n, d, r.codec)), data)


def _open_config(config: bytes, slots: dict[str, bytes], store_name: str,
                 cache: Path) -> None:
    store = MemoryBackend(store_name)
    store.put("config", config)
    for slot, slot_data in slots.items():
        store.put(slot, slot_data)
    Repository.open(f"mem://{store_name}", cache,
                    lambda: [Secret(PASSPHRASE, PASS.encode(), "t")]).close()


@pytest.mark.slow
def test_repository_config(repo, tmp_path: Path) -> None:
    r, _, _ = repo
    rng = random.Random(4)
    stored = r.storage.get("config")
    slots = read_slots(r.storage)
    payload = PLAIN.unseal(REPO_MAGIC, stored, "c", "config")
    for n, data in enumerate([*mutations(stored, rng),
                              *_forged(PLAIN, REPO_MAGIC, payload, "config", rng)]):
        name = f"fuzz-config-{r.id}-{n}"
        bounded(lambda d, m=name: _open_config(d, slots, m, tmp_path), data)


@pytest.mark.slow
def test_key_slots_and_exports(tmp_path: Path) -> None:
    secret = Secret(PASSPHRASE, PASS.encode(), "t")
    r, _ = Repository.init("mem://fuzz-slots", tmp_path, None, lambda: [secret], encrypt=True)
    rng = random.Random(5)
    ((name, stored),) = read_slots(r.storage).items()
    payload = PLAIN.unseal(SLOT_MAGIC, stored, "s", name)

    def slot(data: bytes) -> None:
        open_slot(name, parse_slot(name, data), secret, r.id)

    # Each one that parses costs an scrypt: fewer rounds.
    for data in [*mutations(stored, rng, 60), *_forged(PLAIN, SLOT_MAGIC, payload, name,
                                                        random.Random(6))][:120]:
        bounded(slot, data)
    text = export_text(r.id, {name: stored}).encode()
    for data in mutations(text, rng):
        bounded(lambda d: parse_export(d.decode("utf-8", "replace")), data)
    r.close()


def test_exported_records(repo) -> None:
    _, wd, ids = repo
    text = wd.run("export-record", ids[0]).stdout.strip()
    raw = base64.b64decode(text)
    rng = random.Random(7)
    for data in [*mutations(text.encode(), rng), *(base64.b64encode(m) for m in
                                                   mutations(raw, rng))]:
        bounded(lambda d: parse_record(d.decode("utf-8", "replace")), data)


# --- the length, offset and size fields, one at a time ---------------------------------------

HUGE = [2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1, 10**15, 10**30]
BAD_BLOCK_SIZES = [0, -1, 1, 3, 4095, 4097, 65535, 2**25, 2**30, *HUGE, "65536", None, 1.5]


def _manifest_parts(r: Repository, backup_id: str) -> tuple[dict, bytes]:
    name = manifest_name(backup_id)
    body = r.codec.unseal(MANIFEST_MAGIC, r.storage.get(name), "m", name)
    (hlen,) = struct.unpack_from("<I", body)
    return json.loads(body[4:4 + hlen]), body[4 + hlen:]


def _manifest_with(r: Repository, backup_id: str, header: dict, table: bytes) -> bytes:
    head = json.dumps(header).encode()
    return r.codec.seal(MANIFEST_MAGIC, struct.pack("<I", len(head)) + head + table,
                        manifest_name(backup_id))


def test_manifest_size_fields(repo) -> None:
    """Block size, size, blocks and page entries out of bounds, each alone: refused."""
    r, _, ids = repo
    rng = random.Random(8)
    for backup_id in ids:
        header, table = _manifest_parts(r, backup_id)
        store = MemoryBackend(f"fuzz-manifest-fields-{r.id}-{backup_id}")
        bad = ([("block_size", v) for v in BAD_BLOCK_SIZES]
               + [("size", v) for v in [-1, header["size"] + header["block_size"],
                                        header["size"] * 1000, *HUGE]]
               + [("blocks", v) for v in [-1, 0, header["blocks"] + 1, *HUGE]]
               + [("page_entries", v) for v in [0, -1, 257, *HUGE]])
        rng.shuffle(bad)
        for field, value in bad:
            data = _manifest_with(r, backup_id, {**header, field: value}, table)
            with pytest.raises(CorruptionError):
                _parse_manifest(r, store, backup_id, data, rng)


def _entry_fields(rng: random.Random, entries: bytes) -> Iterator[bytes]:
    """Trailer entries with one entry's offset, stored length or plain length changed so
    that it lies outside any pack or claims more than a block."""
    count = len(entries) // ENTRY.size
    for _ in range(ROUNDS // 3):
        b = bytearray(entries)
        at = rng.randrange(count) * ENTRY.size
        field = rng.choice(["offset", "length", "raw"])
        if field == "offset":
            value = rng.choice([0, 7, MAX_PACK_BYTES, *(v for v in HUGE if v < 2**64)])
            struct.pack_into("<Q", b, at + 32, value)
        elif field == "length":
            value = rng.choice([MAX_PACK_BYTES, 2**31, 2**32 - 1])
            struct.pack_into("<I", b, at + 40, value)
        else:
            value = rng.choice([MAX_BLOCK_SIZE + 1, 2**31, 2**32 - 1])
            struct.pack_into("<I", b, at + 44, value)
        yield bytes(b)


def test_pack_trailer_fields(repo) -> None:
    """A trailer entry outside its pack, or claiming more than a block, is refused when the
    trailer is read; forged so that the trailer's digest still holds."""
    r, _, _ = repo
    rng = random.Random(9)
    pname, _ = next(iter(r.storage.list("packs/")))
    data = r.storage.get(pname)
    count = struct.unpack_from("<I", data, len(data) - FOOTER.size)[0]
    start = len(data) - FOOTER.size - count * ENTRY.size
    body, trailer = data[:start], data[start:len(data) - FOOTER.size]
    store = MemoryBackend(f"fuzz-trailer-fields-{r.id}")
    # A length that ends past the trailer's start, but within MAX_PACK_BYTES.
    last = bytearray(trailer)
    struct.pack_into("<I", last, len(last) - ENTRY.size + 40, start)
    for bad in [*_entry_fields(rng, trailer), bytes(last)]:
        pid = r.codec.trailer_digest(bad)
        if not store.exists(pack_name(pid)):
            store.put(pack_name(pid), body + bad + FOOTER.pack(count, pid, PACK_END))
        with pytest.raises(CorruptionError, match="outside pack|claims"):
            read_trailer(store, pid, r.codec)


def test_index_entry_fields(repo, tmp_path: Path) -> None:
    """An index entry past any pack (among them offsets SQLite cannot hold) or claiming
    more than a block makes a corrupt index file, never an OverflowError: a sync leaves it
    out and reports it, and goes on with the others."""
    r, _, _ = repo
    rng = random.Random(10)
    name, _ = next(iter(r.storage.list("index/")))
    payload = r.codec.unseal(INDEX_MAGIC, r.storage.get(name), "i", INDEX_SEAL_NAME)
    # The first group's entries, after its pack id and count.
    end = 36 + struct.unpack_from("<I", payload, 32)[0] * ENTRY.size
    store = MemoryBackend(f"fuzz-index-fields-{r.id}")
    for n, bad in enumerate(_entry_fields(rng, payload[36:end])):
        data = r.codec.seal(INDEX_MAGIC, payload[:36] + bad + payload[end:], INDEX_SEAL_NAME)
        with pytest.raises(CorruptionError, match="outside pack|claims"):
            list(decode_index(name, data, r.codec))
        store.put(f"index/{n:04d}", data)
    cache = ChunkIndex(tmp_path / "index.sqlite")
    try:
        problems = cache.sync(store, r.codec)
    finally:
        cache.close()
    assert len(problems) == ROUNDS // 3 and all("is corrupt" in p for p in problems)


def test_repository_config_block_size(repo, tmp_path: Path) -> None:
    r, _, _ = repo
    slots = read_slots(r.storage)
    meta = json.loads(PLAIN.unseal(REPO_MAGIC, r.storage.get("config"), "c", "config"))
    for n, value in enumerate(BAD_BLOCK_SIZES):
        data = PLAIN.seal(REPO_MAGIC, json.dumps({**meta, "block_size": value}).encode(),
                          "config")
        with pytest.raises(CorruptionError, match="config"):
            _open_config(data, slots, f"fuzz-config-bs-{r.id}-{n}", tmp_path)
