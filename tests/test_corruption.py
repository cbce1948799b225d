"""Damage in the repository or the catalog is found and reported, never silently used.

A pristine repository holds a full and an incremental backup of one image; each case works on
a copy of it, damages one file, and checks that `verify --deep` exits 3 (damage found, told
apart from other failures) naming the damaged backup (and for chunk damage the block), that
restoring a damaged backup exits 3 with one line and no traceback, and that an undamaged
backup still restores bit-exactly.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest

from lvbackup.base.errors import CorruptionError
from lvbackup.repository.backends import LocalBackend
from lvbackup.repository.codec import PLAIN, seal, unseal
from lvbackup.repository.index import decode_index, encode_index
from lvbackup.repository.manifest import MAGIC as MANIFEST_MAGIC
from lvbackup.repository.pack import ENTRY, FOOTER, PACK_END, pack_name, read_trailer
from lvbackup.repository.repo import REPO_MAGIC

from support import (
    BLOCK_SIZE,
    Workdir,
    apply_change,
    assert_one_line_error,
    describe,
    flip_byte,
    make_image,
)

DAMAGED = 3   # the exit status for damage found in backed-up data (docs/operations.md)


def block_ids(data: bytes) -> list[bytes | None]:
    """Per block: its chunk id (BLAKE3-256 of the plaintext), None for a hole."""
    out = []
    for off in range(0, len(data), BLOCK_SIZE):
        block = data[off:off + BLOCK_SIZE]
        out.append(None if block.count(0) == len(block) else blake3.blake3(block).digest())
    return out


@dataclass
class Pristine:
    wd: Workdir
    image: Path                     # holds the incremental's version
    ids: list[str]                  # full, incremental
    versions: list[bytes]
    blocks: list[list[bytes | None]]
    packs: list[set[str]]           # pack files each backup added
    indexes: list[set[str]]         # index files each backup added


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    root = tmp_path_factory.mktemp("pristine")
    img = root / "disk.img"
    wd = Workdir(root / "wd")
    wd.init("64K")
    v1 = make_image(img, 5, seed=61, tail=5000)
    full = wd.create(img)
    packs1, index1 = set(wd.files("packs")), set(wd.files("index"))
    v2 = apply_change(img, seed=62, fraction=0.05)
    inc = wd.create(img, "--incremental")
    packs2, index2 = set(wd.files("packs")) - packs1, set(wd.files("index")) - index1
    assert len(packs1) == len(packs2) == 1 and len(index1) == len(index2) == 1
    assert inc["parent_id"] == full["id"]
    return Pristine(wd, img, [full["id"], inc["id"]], [v1, v2], [block_ids(v1), block_ids(v2)],
                    [packs1, packs2], [index1, index2])


@pytest.fixture
def case(pristine, tmp_path) -> Pristine:
    return Pristine(pristine.wd.clone(tmp_path / "wd"), pristine.image, pristine.ids,
                    pristine.versions, pristine.blocks, pristine.packs, pristine.indexes)


def verify_fails(wd: Workdir, bad: dict[str, str | None], good: list[str],
                 deep: bool = True) -> str:
    """verify exits 3 (damage found); each bad backup's FAILED line contains its id and the
    given words; each good one is reported ok. Returns the output."""
    p = wd.run("verify", *(["--deep"] if deep else []))
    assert p.returncode == DAMAGED, describe(p)
    assert "Traceback" not in p.stdout + p.stderr
    err_lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1, describe(p)
    lines = p.stdout.splitlines()
    for bid, words in bad.items():
        assert bid in err_lines[0], describe(p)
        mine = [ln for ln in lines if bid in ln]
        assert mine and mine[0].startswith("FAILED"), describe(p)
        if words:
            assert words in mine[0], f"{words!r} not in {mine[0]!r}"
    for bid in good:
        assert bid not in err_lines[0], describe(p)
        mine = [ln for ln in lines if bid in ln]
        assert mine and mine[0].startswith("ok"), describe(p)
    return p.stdout


def restore_fails(wd: Workdir, bid: str, *words: str, to_file: bool = False) -> None:
    p = wd.run("restore", bid, "--to-file", "-", binary=True)
    assert_one_line_error(p, DAMAGED, bid, *words)
    if to_file:
        p = wd.run("restore", bid, "--to-file", wd.path / "restored.img")
        assert_one_line_error(p, DAMAGED, bid, *words)
    # A failed restore is not a state change of the backup.
    assert {r["id"]: r["status"] for r in wd.catalog_rows()}[bid] == "available"


def restores(wd: Workdir, bid: str, data: bytes) -> None:
    assert wd.restore_bytes(bid) == data


# --- chunks --------------------------------------------------------------------------------

def _pack_refs(wd: Workdir, pack: str):
    storage = LocalBackend(wd.repo)
    try:
        return read_trailer(storage, bytes.fromhex(Path(pack).name), PLAIN)
    finally:
        storage.close()


def _chunk_case(case: Pristine, which: str):
    """Pick a chunk: 'new' = one only the incremental has; 'shared' = one of the full's
    chunks that the incremental still uses. Returns (ref, pack name)."""
    inc_ids = set(case.blocks[1])
    pack = next(iter(case.packs[1 if which == "new" else 0]))
    refs = _pack_refs(case.wd, pack)
    if which == "new":
        ref = refs[len(refs) // 2]
    else:
        shared = [r for r in refs if r.chunk_id in inc_ids]
        ref = shared[len(shared) // 2]
    return ref, pack


@pytest.mark.parametrize("which", ["new", "shared"])
def test_flipped_byte_inside_a_chunk(case, which):
    ref, pack = _chunk_case(case, which)
    flip_byte(case.wd.repo / pack, ref.offset + ref.length // 2, 0x10)
    bad, good = {}, []
    for k, bid in enumerate(case.ids):
        if ref.chunk_id in case.blocks[k]:
            bad[bid] = f"block {case.blocks[k].index(ref.chunk_id)}"
        else:
            good.append(bid)
    assert list(bad) == (case.ids[1:] if which == "new" else case.ids)
    verify_fails(case.wd, bad, good)
    for bid, where in bad.items():
        restore_fails(case.wd, bid, where, to_file=True)
    for bid in good:
        restores(case.wd, bid, case.versions[case.ids.index(bid)])
    # The plain verify does not read chunks, so it passes; only --deep finds this.
    assert case.wd.verify().returncode == 0


# --- index files ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1])
def test_flipped_byte_in_an_index_file(case, k):
    index = next(iter(case.indexes[k]))
    path = case.wd.repo / index
    flip_byte(path, path.stat().st_size // 2)
    # The full's index lists the chunks both backups use; the incremental's only its own.
    bad = case.ids if k == 0 else case.ids[1:]
    good = [b for b in case.ids if b not in bad]
    out = verify_fails(case.wd, {b: "not in the repository index" for b in bad}, good)
    assert Path(index).name in out and "corrupt" in out
    for bid in bad:
        restore_fails(case.wd, bid)
    for bid in good:
        restores(case.wd, bid, case.versions[case.ids.index(bid)])


def test_corrupt_index_is_reported_even_when_backups_are_fine(case):
    """An index file listing a pack no backup needs is still damage worth exit 3."""
    index = next(iter(case.indexes[1]))
    storage = LocalBackend(case.wd.repo)
    groups = list(decode_index(index, storage.get(index), PLAIN))
    storage.close()
    assert len(groups) == 1
    case.wd.run_json("delete", case.ids[1])
    flip_byte(case.wd.repo / index, 10)
    p = case.wd.run("verify", "--deep")
    assert p.returncode == DAMAGED, describe(p)
    assert Path(index).name in p.stdout
    restores(case.wd, case.ids[0], case.versions[0])


# --- manifests ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1])
def test_flipped_byte_in_a_manifest(case, k):
    bid = case.ids[k]
    path = case.wd.repo / "manifests" / bid
    flip_byte(path, path.stat().st_size // 3)
    other = case.ids[1 - k]
    verify_fails(case.wd, {bid: "manifest"}, [other])
    verify_fails(case.wd, {bid: "manifest"}, [other], deep=False)
    restore_fails(case.wd, bid, "manifest")
    # Manifests are self-contained: damage to the parent's does not break the child.
    restores(case.wd, other, case.versions[1 - k])


def test_incremental_on_a_damaged_parent_fails_and_a_full_backup_works(case):
    parent = case.ids[1]
    flip_byte(case.wd.repo / "manifests" / parent, 50)
    p = case.wd.run("create", "--device", case.image, "--incremental")
    assert_one_line_error(p, DAMAGED, parent, "full backup")
    rows = case.wd.catalog_rows()
    assert len(rows) == 3 and rows[-1]["status"] == "error" and rows[-1]["fail_reason"]
    rec = case.wd.create(case.image)
    assert rec["parent_id"] is None
    restores(case.wd, rec["id"], case.versions[1])


def test_missing_manifest(case):
    bid = case.ids[1]
    (case.wd.repo / "manifests" / bid).unlink()
    verify_fails(case.wd, {bid: "missing"}, [case.ids[0]])
    restore_fails(case.wd, bid, "missing")


# --- packs: truncated, deleted ---------------------------------------------------------------

def test_truncated_pack(case):
    pack = case.wd.repo / next(iter(case.packs[0]))
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size // 2)
    bad = {bid: "truncated" for bid in case.ids}
    verify_fails(case.wd, bad, [])
    for bid in case.ids:
        restore_fails(case.wd, bid, "block")


# Regression test for BUG verify-truncated: plain verify checks a pack's size only against the
# first chunk it meets in that pack (operations/verify.py _verify_one), so a pack truncated after
# that chunk passes
def test_plain_verify_finds_a_truncated_pack(case):
    pack = case.wd.repo / next(iter(case.packs[0]))
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size // 2)
    verify_fails(case.wd, {bid: "truncated" for bid in case.ids}, [], deep=False)


def test_deleted_pack(case):
    pack = case.wd.repo / next(iter(case.packs[1]))
    pack.unlink()
    bad = {case.ids[1]: "missing"}
    verify_fails(case.wd, bad, [case.ids[0]])
    verify_fails(case.wd, bad, [case.ids[0]], deep=False)
    restore_fails(case.wd, case.ids[1], "block", "missing")
    restores(case.wd, case.ids[0], case.versions[0])


def test_restore_onto_existing_target_with_damaged_chunk_fails_loudly(case, tmp_path):
    ref, pack = _chunk_case(case, "new")
    flip_byte(case.wd.repo / pack, ref.offset + 1)
    target = tmp_path / "target.img"
    target.write_bytes(os.urandom(len(case.versions[1])))
    p = case.wd.run("restore", case.ids[1], "--to", target)
    assert_one_line_error(p, DAMAGED, case.ids[1], "block")


# --- repository config and catalog -----------------------------------------------------------

def test_corrupt_repository_config(case):
    flip_byte(case.wd.repo / "config", 12)
    for args in (("verify",), ("restore", case.ids[0], "--to-file", "-"), ("gc",),
                 ("init",)):
        assert_one_line_error(case.wd.run(*args), DAMAGED, "config", "corrupt")


def test_corrupt_catalog_then_rebuild(case):
    before = {r["id"]: r for r in case.wd.list()}
    case.wd.catalog.write_bytes(os.urandom(8192))
    for args in (("list",), ("show", case.ids[0]), ("restore", case.ids[0], "--to-file", "-"),
                 ("create", "--device", case.wd.path / "x")):
        p = case.wd.run(*args)
        assert p.returncode != 0, describe(p)
        assert_one_line_error(p, p.returncode, "catalog", "catalog rebuild")
    result = case.wd.run_json("catalog", "rebuild")
    assert result["recovered"] == 2
    assert result["old_catalog_moved_to"] and Path(result["old_catalog_moved_to"]).exists()
    after = {r["id"]: r for r in case.wd.list()}
    assert set(after) == set(before)
    for bid in before:
        for key in ("parent_id", "is_incremental", "data_timestamp", "created_at", "size",
                    "num_dependent_backups", "stored_bytes", "volume_id", "status"):
            assert after[bid][key] == before[bid][key], (bid, key)
    for k, bid in enumerate(case.ids):
        restores(case.wd, bid, case.versions[k])


def test_truncated_catalog_then_rebuild(case):
    data = case.wd.catalog.read_bytes()
    case.wd.catalog.write_bytes(data[:len(data) // 3])
    p = case.wd.run("list")
    assert p.returncode != 0 and "Traceback" not in p.stderr, describe(p)
    assert case.wd.run_json("catalog", "rebuild")["recovered"] == 2
    assert {r["id"] for r in case.wd.list()} == set(case.ids)


# Regression test for BUG gc-unreadable-pack: gc drops the index entries of a pack whose
# trailer is unreadable and deletes the old index files, so backups whose chunks are intact in
# that pack become unrestorable
@pytest.mark.slow
def test_gc_keeps_backups_whose_pack_trailer_is_damaged(tmp_path):
    """A flipped bit in a pack's trailer does not touch chunk data; gc must not turn it into
    unrestorable backups (it may refuse to run, or keep that pack's index entries)."""
    wd = Workdir(tmp_path / "wd")
    wd.init("64K")
    datas, ids = [], []
    for seed in (71, 72, 73):
        img = tmp_path / f"{seed}.img"
        datas.append(make_image(img, 1, seed=seed))
        ids.append(wd.create(img)["id"])
    target = next(p for p in wd.files("packs")
                  if any(r.chunk_id in set(block_ids(datas[0])) for r in _pack_refs(wd, p)))
    flip_byte(wd.repo / target, (wd.repo / target).stat().st_size - 60)
    assert wd.restore_bytes(ids[0]) == datas[0]      # the chunk data is intact
    p = wd.run("gc")
    assert "Traceback" not in p.stderr
    for bid, data in zip(ids, datas, strict=True):
        assert wd.restore_bytes(bid) == data


# Regression test for GAP verify-trailer: verify --deep re-hashes chunks but never checks pack
# trailers, so a flipped bit there goes unnoticed until gc or an index rebuild needs it
def test_verify_deep_finds_a_damaged_pack_trailer(case):
    pack = case.wd.repo / next(iter(case.packs[0]))
    flip_byte(pack, pack.stat().st_size - 60)
    p = case.wd.run("verify", "--deep")
    assert p.returncode == DAMAGED, describe(p)


# --- fields out of bounds, re-sealed (an unencrypted repository's checksums stop no one) ------

def _snapshot(wd: Workdir) -> tuple[dict[str, int], list[dict]]:
    """What a refused command must leave as it was: the repository's files (but for the
    leases a run takes and drops) and the catalog."""
    files = {p.relative_to(wd.repo).as_posix(): p.stat().st_size
             for p in wd.repo.rglob("*") if p.is_file()}
    return files, wd.catalog_rows()


def _reseal_config(wd: Workdir, **fields) -> None:
    path = wd.repo / "config"
    meta = json.loads(unseal(REPO_MAGIC, path.read_bytes(), "config"))
    path.write_bytes(seal(REPO_MAGIC, json.dumps({**meta, **fields}).encode()))


def _reseal_manifest(wd: Workdir, backup_id: str, **fields) -> None:
    path = wd.repo / "manifests" / backup_id
    body = unseal(MANIFEST_MAGIC, path.read_bytes(), "manifest")
    (hlen,) = struct.unpack_from("<I", body)
    head = json.loads(body[4:4 + hlen])
    new = json.dumps({**head, **fields}).encode()
    path.write_bytes(seal(MANIFEST_MAGIC, struct.pack("<I", len(new)) + new + body[4 + hlen:]))


@pytest.mark.parametrize("block_size", [0, -1, 3, 2**40])
def test_config_block_size_out_of_bounds(case, block_size):
    _reseal_config(case.wd, block_size=block_size)
    before = _snapshot(case.wd)
    out = case.wd.path / "out.img"
    for args in (("create", "--device", case.image), ("verify",), ("gc",),
                 ("restore", case.ids[0], "--to-file", out)):
        p = case.wd.run(*args)
        assert_one_line_error(p, DAMAGED, "config", "block size")
        assert _snapshot(case.wd) == before, args
        assert not out.exists()


@pytest.mark.parametrize("field", [{"block_size": 0}, {"block_size": 2**30},
                                   {"block_size": 4096}, {"size": 10**15},
                                   {"page_entries": 2**40}],
                         ids=["bs0", "bs2^30", "bs-other", "size1PB", "page-entries"])
def test_manifest_fields_out_of_bounds(case, field):
    bid = case.ids[0]
    _reseal_manifest(case.wd, bid, **field)
    before = _snapshot(case.wd)
    out = case.wd.path / "out.img"
    p = case.wd.run("restore", bid, "--to-file", out)
    assert_one_line_error(p, DAMAGED, bid, "manifest", "corrupt")
    assert not out.exists()
    assert _snapshot(case.wd) == before
    verify_fails(case.wd, {bid: "corrupt"}, [case.ids[1]], deep=False)
    restores(case.wd, case.ids[1], case.versions[1])


def test_index_offset_beyond_sqlite_integer(case):
    """An index entry's offset of 2^63 (which SQLite cannot hold) is a corrupt index file:
    verify names it, create and gc go on, and gc rewrites the index from the packs."""
    storage = LocalBackend(case.wd.repo)
    try:
        old = next(iter(case.indexes[0]))
        groups = list(decode_index(old, storage.get(old), PLAIN))
        pack_id, refs = groups[0]
        refs[0] = refs[0]._replace(offset=2**63)
        name, data = encode_index([(pack_id, refs)], PLAIN)
    finally:
        storage.close()
    (case.wd.repo / old).unlink()
    (case.wd.repo / name).write_bytes(data)
    p = case.wd.run("verify")
    assert p.returncode == DAMAGED and "Traceback" not in p.stdout + p.stderr, describe(p)
    assert f"index file {name} is corrupt" in p.stdout
    rec = case.wd.create(case.image)
    restores(case.wd, rec["id"], case.versions[1])
    assert case.wd.run_json("gc")["packs_kept"] >= 2
    assert not (case.wd.repo / name).exists()
    assert case.wd.verify("--deep").returncode == 0


def test_pack_trailer_offset_beyond_the_pack(case):
    """A pack whose trailer (re-digested, the pack named after it) places a chunk at 2^63:
    gc keeps it as unreadable rather than fail, and verify of the backups is clean."""
    src = case.wd.repo / next(iter(case.packs[0]))
    data = src.read_bytes()
    count = FOOTER.unpack_from(data, len(data) - FOOTER.size)[0]
    start = len(data) - FOOTER.size - count * ENTRY.size
    trailer = bytearray(data[start:len(data) - FOOTER.size])
    struct.pack_into("<Q", trailer, 32, 2**63)
    pack_id = blake3.blake3(trailer).digest()
    forged = case.wd.repo / pack_name(pack_id)
    forged.parent.mkdir(exist_ok=True)
    forged.write_bytes(data[:start] + trailer + FOOTER.pack(count, pack_id, PACK_END))
    storage = LocalBackend(case.wd.repo)
    try:
        with pytest.raises(CorruptionError, match="lies outside pack"):
            read_trailer(storage, pack_id, PLAIN)
    finally:
        storage.close()
    report = case.wd.run_json("gc")
    assert report["unreadable_packs"] == [pack_name(pack_id)]
    assert forged.exists()
    assert case.wd.verify("--deep").returncode == 0


def test_manifest_record_beyond_sqlite_integer(case):
    """A record whose numbers SQLite cannot hold is a corrupt manifest to catalog rebuild
    (reported, the others recovered), never an OverflowError."""
    bid = case.ids[1]
    path = case.wd.repo / "manifests" / bid
    body = unseal(MANIFEST_MAGIC, path.read_bytes(), "manifest")
    (hlen,) = struct.unpack_from("<I", body)
    head = json.loads(body[4:4 + hlen])
    head["backup"]["stored_bytes"] = 10**30
    new = json.dumps(head).encode()
    path.write_bytes(seal(MANIFEST_MAGIC, struct.pack("<I", len(new)) + new + body[4 + hlen:]))
    case.wd.catalog.unlink()
    result = case.wd.run_json("catalog", "rebuild")
    assert result["recovered"] == 1
    assert len(result["corrupt_manifests"]) == 1 and bid in result["corrupt_manifests"][0]
    assert [r["id"] for r in case.wd.list()] == [case.ids[0]]
    restores(case.wd, case.ids[0], case.versions[0])
