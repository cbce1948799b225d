"""The command line contract (README.md, docs/user-guide.md), driven through the installed command
on image files: init, create, list, show, restore, delete, verify, gc, export/import,
catalog rebuild, and the JSON output.
"""

from __future__ import annotations

import base64
import ctypes
import json
import mmap
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from support import (
    BLOCK_SIZE,
    ENCRYPTED,
    OUTPUT_FIELDS,
    RECORD_FIELDS,
    UTC_ISO,
    Chain,
    KiB,
    MiB,
    Workdir,
    apply_change,
    assert_one_line_error,
    build_chain,
    describe,
    image_bytes,
    make_image,
)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    """Read-only for the tests that use it directly; tests that change the repository or
    catalog work on chain.wd.clone(...)."""
    return build_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture
def own(chain, tmp_path) -> Workdir:
    """A private copy of the chain's workdir (same image paths, so same volume ids)."""
    return chain.wd.clone(tmp_path / "wd")


# --- init ----------------------------------------------------------------------------------

def test_init_is_idempotent(workdir):
    first = workdir.init("64K")
    assert first["created"] is True and first["block_size"] == 64 * KiB
    assert (workdir.repo / "config").is_file() and workdir.catalog.is_file()
    again = workdir.init("64K")
    assert again["created"] is False
    assert again["repository_id"] == first["repository_id"]
    plain = workdir.init(None)
    assert plain["created"] is False and plain["block_size"] == 64 * KiB


def test_init_default_block_size_is_128k(workdir):
    assert workdir.init(None)["block_size"] == 128 * KiB


def test_init_refuses_another_block_size_on_an_existing_repository(workdir):
    info = workdir.init("64K")
    p = workdir.run("init", "--block-size", "128K")
    assert_one_line_error(p, 2, "block size")
    again = workdir.init(None)
    assert again["block_size"] == 64 * KiB and again["repository_id"] == info["repository_id"]


@pytest.mark.parametrize("bad", [
    "3000", "abc", "32M", "-4K",
    "0",   # regression: 0 used to mean "the default" (repo.py: `block_size or DEFAULT`)
])
def test_init_refuses_a_bad_block_size(workdir, bad):
    assert_one_line_error(workdir.run("init", "--block-size", bad), 2)
    assert not (workdir.repo / "config").exists()


# --- create --------------------------------------------------------------------------------

def test_full_then_incrementals(chain):
    full, inc1, inc2 = (chain.wd.show(i) for i in chain.ids)
    assert full["parent_id"] is None and full["is_incremental"] is False
    assert inc1["parent_id"] == full["id"] and inc1["is_incremental"] is True
    assert inc2["parent_id"] == inc1["id"] and inc2["is_incremental"] is True
    assert full["num_dependent_backups"] == 1 and full["has_dependent_backups"] is True
    assert inc1["num_dependent_backups"] == 1 and inc1["has_dependent_backups"] is True
    assert inc2["num_dependent_backups"] == 0 and inc2["has_dependent_backups"] is False
    for rec, data in zip((full, inc1, inc2), chain.versions, strict=True):
        _check_record(rec)
        assert rec["status"] == "available"
        assert rec["size"] == len(data)
        assert rec["block_size"] == BLOCK_SIZE
        assert rec["volume_name"] == str(chain.image.resolve())
        assert rec["volume_id"] == full["volume_id"]
        assert rec["snapshot_id"] is None and rec["snapshot_name"] is None
        assert rec["data_timestamp"] == rec["created_at"]
    assert full["data_timestamp"] < inc1["data_timestamp"] < inc2["data_timestamp"]
    other = chain.wd.show(chain.other_id)
    assert other["volume_id"] != full["volume_id"]
    assert other["parent_id"] is None


def test_incremental_stores_much_less_than_full(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 8, seed=31)
    full = workdir.create(img)
    apply_change(img, seed=32, fraction=0.01)
    inc = workdir.create(img, "--incremental")
    assert full["stored_bytes"] > 2 * MiB
    assert 0 < inc["stored_bytes"] < full["stored_bytes"] / 3, (inc, full)


def test_unchanged_incremental_stores_nothing(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 4, seed=33)
    workdir.create(img)
    p = workdir.run("--json", "create", "--device", img, "--incremental")
    assert p.returncode == 0, describe(p)
    assert json.loads(p.stdout)["stored_bytes"] == 0
    assert "stored 0 B" in p.stderr


def test_full_after_existing_backups_has_no_parent(chain, own):
    rec = own.create(chain.image)
    assert rec["parent_id"] is None and rec["is_incremental"] is False
    # ... and, being unchanged, it stores nothing new (dedup against the repository).
    assert rec["stored_bytes"] == 0
    assert own.show(chain.ids[2])["num_dependent_backups"] == 0


def test_incremental_parent_is_the_latest_backup_even_a_full_one(chain, own):
    newest_full = own.create(chain.image)
    inc = own.create(chain.image, "--incremental")
    assert inc["parent_id"] == newest_full["id"]


def test_identical_blocks_are_stored_once(workdir, tmp_path):
    """Dedup: eight copies of the same random MiB store about one MiB."""
    workdir.init("64K")
    img = tmp_path / "same.img"
    stretch = os.urandom(MiB)
    img.write_bytes(stretch * 8)
    rec = workdir.create(img)
    assert MiB <= rec["stored_bytes"] < 1.1 * MiB
    workdir.assert_restores(rec["id"], stretch * 8)


def test_name_and_description(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "d.img"
    make_image(img, 1, seed=34)
    rec = workdir.create(img, "--name", "nightly", "--description", "before upgrade")
    assert (rec["name"], rec["description"]) == ("nightly", "before upgrade")
    assert workdir.show(rec["id"])["name"] == "nightly"


def test_grown_and_shrunk_volume_incrementals_restore(workdir, tmp_path):
    """docs/lineage.md rule 10: lvbackup allows incrementals of a grown or shrunk volume."""
    workdir.init("64K")
    img = tmp_path / "g.img"
    v1 = make_image(img, 3, seed=35, tail=1000)
    r1 = workdir.create(img)
    v2 = v1 + os.urandom(MiB + 4321)
    img.write_bytes(v2)
    r2 = workdir.create(img, "--incremental")
    v3 = v2[:MiB + 77]
    img.write_bytes(v3)
    r3 = workdir.create(img, "--incremental")
    assert (r2["parent_id"], r3["parent_id"]) == (r1["id"], r2["id"])
    assert (r1["size"], r2["size"], r3["size"]) == (len(v1), len(v2), len(v3))
    for rec, data in ((r1, v1), (r2, v2), (r3, v3)):
        workdir.assert_restores(rec["id"], data)


def test_empty_image(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "empty.img"
    img.write_bytes(b"")
    rec = workdir.create(img)
    assert rec["size"] == 0
    out = tmp_path / "out.img"
    out.write_bytes(b"old content")
    assert workdir.run("restore", rec["id"], "--to-file", out, "--force").returncode == 0
    assert out.read_bytes() == b""


def _sparse_image(path: Path) -> bytes:
    """8 MiB with data only at [2, 3) MiB (random) and [5, 6) MiB (text); the rest holes."""
    data = image_bytes(2, seed=44)
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(data[:MiB])
        f.seek(5 * MiB)
        f.write(data[MiB:])
    return path.read_bytes()


def test_holes_of_a_sparse_file_are_not_read(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "sparse.img"
    content = _sparse_image(img)
    p = workdir.run("create", "--device", img)
    assert p.returncode == 0, describe(p)
    assert "read 2.0 MiB, holes 6.0 MiB" in p.stderr, p.stderr
    rec = workdir.list()[0]
    workdir.assert_restores(rec["id"], content)


def test_restore_to_a_new_file_writes_holes_sparsely(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "sparse.img"
    content = _sparse_image(img)
    rec = workdir.create(img)
    out = tmp_path / "restored.img"
    assert workdir.run("restore", rec["id"], "--to-file", out).returncode == 0
    assert out.read_bytes() == content
    assert out.stat().st_blocks * 512 <= 3 * MiB, "the 6 MiB of holes were written"


def _cached_fraction(path: Path) -> float:
    """The share of the file's pages in the page cache (mincore over a mapping of it)."""
    size = path.stat().st_size
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(-(-size // page))
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    return sum(b & 1 for b in vec.raw) / len(vec.raw)


def _drop_from_cache(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def test_backup_leaves_the_page_cache_as_it_found_it(workdir, tmp_path):
    """Pages the backup had to read from the disk are dropped again; pages that were
    cached already (someone else's working set) stay."""
    workdir.init("64K")
    img = tmp_path / "cache.img"
    make_image(img, 8, seed=45)
    _drop_from_cache(img)
    if _cached_fraction(img) > 0.1:
        pytest.skip("this filesystem keeps the file cached after POSIX_FADV_DONTNEED")
    workdir.create(img)
    assert _cached_fraction(img) < 0.1, "the backup left what it read in the page cache"
    img.read_bytes()
    assert _cached_fraction(img) > 0.9
    workdir.create(img, "--incremental")
    assert _cached_fraction(img) > 0.9, "the backup evicted pages it did not bring in"


# --- restore -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 2])
def test_restore_to_file_is_bit_exact(chain, tmp_path, k):
    out = tmp_path / "restored.img"
    p = chain.wd.run("restore", chain.ids[k], "--to-file", out)
    assert p.returncode == 0, describe(p)
    assert out.read_bytes() == chain.versions[k]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_restore_to_stdout_is_bit_exact(chain, k):
    assert chain.wd.restore_bytes(chain.ids[k]) == chain.versions[k]


def test_restore_to_file_replaces_an_existing_file_with_force(chain, tmp_path):
    out = tmp_path / "restored.img"
    out.write_bytes(os.urandom(len(chain.versions[2]) + 3 * MiB))
    assert chain.wd.run("restore", chain.ids[2], "--to-file", out).returncode == 2
    assert chain.wd.run("restore", chain.ids[2], "--to-file", out, "--force").returncode == 0
    assert out.read_bytes() == chain.versions[2]


@pytest.mark.parametrize("extra", [0, MiB + 3])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_restore_onto_existing_garbage_writes_the_zeros_too(chain, tmp_path, k, extra):
    """Rule 18: onto an existing target the holes must be written as zeros (the third
    version zeroed a region that held data before)."""
    size = len(chain.versions[k])
    garbage = os.urandom(size + extra)
    target = tmp_path / "target.img"
    target.write_bytes(garbage)
    p = chain.wd.run("restore", chain.ids[k], "--to", target)
    assert p.returncode == 0, describe(p)
    got = target.read_bytes()
    assert len(got) == size + extra, "restore --to must not truncate or grow the target"
    assert got[:size] == chain.versions[k]
    assert got[size:] == garbage[size:]
    if k == 2:
        off, length = chain.zeroed
        assert got[off:off + length] == bytes(length)


def test_restore_later_version_onto_the_earlier_one(chain, tmp_path):
    """The Cinder bug of rule 18: restoring v3 over v2 must not leave v2's data where v3
    has zeros."""
    target = tmp_path / "target.img"
    target.write_bytes(chain.versions[1])
    assert chain.wd.run("restore", chain.ids[2], "--to", target).returncode == 0
    assert target.read_bytes() == chain.versions[2]


def test_restore_onto_a_smaller_target_is_refused(chain, tmp_path):
    target = tmp_path / "small.img"
    content = os.urandom(len(chain.versions[0]) - 1)
    target.write_bytes(content)
    p = chain.wd.run("restore", chain.ids[0], "--to", target)
    assert_one_line_error(p, 2, "too small")
    assert target.read_bytes() == content, "a refused restore must not touch the target"


def test_restore_json_output_names_the_target_and_holds_the_record(chain, tmp_path):
    out = tmp_path / "r.img"
    result = chain.wd.run_json("restore", chain.ids[1], "--to-file", out)
    assert (result["backup_id"], result["target"], result["target_kind"]) \
        == (chain.ids[1], str(out), "file")
    rec = result["record"]
    assert tuple(rec) == OUTPUT_FIELDS or set(rec) == set(OUTPUT_FIELDS)
    assert rec["id"] == chain.ids[1] and rec["status"] == "available"


def test_restore_needs_exactly_one_target(chain, tmp_path):
    assert_one_line_error(chain.wd.run("restore", chain.ids[0]), 2)
    p = chain.wd.run("restore", chain.ids[0], "--to", tmp_path / "a", "--to-file",
                     tmp_path / "b")
    assert_one_line_error(p, 2)


def test_restore_json_with_stdout_target_is_refused(chain):
    assert_one_line_error(chain.wd.run("--json", "restore", chain.ids[0], "--to-file", "-"), 2)


# --- list / show ---------------------------------------------------------------------------

def test_list_is_a_json_array_of_records(chain):
    recs = chain.wd.list()
    assert isinstance(recs, list)
    assert {r["id"] for r in recs} == set(chain.ids) | {chain.other_id}
    for r in recs:
        assert set(r) == set(OUTPUT_FIELDS)


def test_list_filters_by_volume_path_and_id(chain):
    by_path = chain.wd.list("--volume", chain.image.resolve())
    assert {r["id"] for r in by_path} == set(chain.ids)
    vid = by_path[0]["volume_id"]
    assert {r["id"] for r in chain.wd.list("--volume", vid)} == set(chain.ids)
    assert [r["id"] for r in chain.wd.list("--volume", chain.other.resolve())] == [chain.other_id]
    assert chain.wd.list("--volume", "/no/such/volume") == []


# Regression test for BUG list-volume-path: list --volume PATH compares PATH with the stored
# (resolved) volume_name as given, so the path used with create (relative, or a symlink such as
# /dev/disk/by-id/...) finds nothing
def test_list_filters_by_the_path_as_given_to_create(chain, tmp_path):
    link = tmp_path / "by-id-disk"
    link.symlink_to(chain.image)
    rel = os.path.relpath(chain.image, os.getcwd())
    for given in (str(link), rel):
        p = chain.wd.run("--json", "list", "--volume", given)
        assert p.returncode == 0, describe(p)
        assert {r["id"] for r in json.loads(p.stdout)} == set(chain.ids), given


def test_list_filters_by_status(chain, own):
    assert {r["id"] for r in own.list("--status", "available")} == set(chain.ids) | {chain.other_id}
    assert own.list("--status", "error") == []
    own.run_json("delete", chain.other_id)
    assert [r["id"] for r in own.list("--status", "deleted")] == [chain.other_id]
    assert chain.other_id not in {r["id"] for r in own.list()}
    assert_one_line_error(own.run("list", "--status", "bogus"), 2)


def test_show_accepts_a_unique_prefix(chain):
    ids = chain.ids + [chain.other_id]
    for k, bid in enumerate(ids):
        n = next(n for n in range(1, 37)
                 if sum(other.startswith(bid[:n]) for other in ids) == 1)
        prefix = bid[:max(n, 4)]
        assert chain.wd.show(prefix.upper() if k == 0 else prefix)["id"] == bid


def test_show_unknown_id(chain):
    p = chain.wd.run("show", "ffffffff-0000-4000-8000-000000000000")
    assert_one_line_error(p, 2, "not found")


def test_show_human_output(chain):
    p = chain.wd.run("show", chain.ids[1])
    assert p.returncode == 0, describe(p)
    assert chain.ids[1] in p.stdout and chain.ids[0] in p.stdout  # its parent


# --- JSON records and times --------------------------------------------------------------

def _check_record(rec: dict) -> None:
    assert list(rec) == list(OUTPUT_FIELDS) or set(rec) == set(OUTPUT_FIELDS), sorted(rec)
    assert rec["has_dependent_backups"] == (rec["num_dependent_backups"] > 0)
    assert rec["is_incremental"] == (rec["parent_id"] is not None)
    assert isinstance(rec["is_incremental"], bool)
    assert isinstance(rec["has_dependent_backups"], bool)
    for key in ("data_timestamp", "created_at", "updated_at"):
        assert UTC_ISO.match(rec[key]), f"{key}={rec[key]!r} is not UTC ISO 8601 with microseconds"
        ts = datetime.fromisoformat(rec[key].replace("Z", "+00:00"))
        assert ts.utcoffset() == timedelta(0)
    assert rec["created_at"] <= rec["updated_at"]


def test_create_prints_one_json_record(chain):
    """(show's records are checked in test_full_then_incrementals.)"""
    for rec in chain.records:
        _check_record(rec)
    created = datetime.fromisoformat(chain.records[0]["created_at"])
    assert abs((datetime.now(created.tzinfo) - created).total_seconds()) < 3600


# --- delete --------------------------------------------------------------------------------

def test_delete_marks_deleted_and_hides_from_list(chain, own):
    child = chain.ids[2]
    rec = own.run_json("delete", child)
    assert rec["id"] == child and rec["status"] == "deleted"
    assert own.show(child)["status"] == "deleted"
    listed = {r["id"]: r for r in own.list()}
    assert child not in listed
    assert listed[chain.ids[1]]["num_dependent_backups"] == 0
    assert listed[chain.ids[1]]["has_dependent_backups"] is False
    # The deleted backup can no longer be restored or deleted; its parent still restores.
    assert_one_line_error(own.run("restore", child, "--to-file", own.path / "x"), 2,
                          "must be available")
    assert_one_line_error(own.run("delete", child), 2)
    assert own.restore_bytes(chain.ids[1]) == chain.versions[1]


@pytest.mark.slow
def test_delete_a_parent_with_dependents_is_refused(chain, own):
    p = own.run("delete", chain.ids[0])
    line = assert_one_line_error(p, 2, "Incremental backups exist for this backup.")
    assert chain.ids[1] in line
    p = own.run("delete", chain.ids[1], "--force")
    line = assert_one_line_error(p, 2, "Incremental backups exist for this backup.")
    assert chain.ids[2] in line
    for bid in chain.ids:
        assert own.show(bid)["status"] == "available"
    own.assert_restores(chain.ids[0], chain.versions[0])


def test_delete_the_whole_chain_newest_first(chain, own):
    for bid in reversed(chain.ids):
        assert own.run_json("delete", bid)["status"] == "deleted"
    assert [r["id"] for r in own.list()] == [chain.other_id]


# --- verify --------------------------------------------------------------------------------

@pytest.mark.slow
def test_verify_all_and_deep(chain):
    for args in ((), ("--deep",), (chain.ids[1],), (chain.ids[2], "--deep")):
        p = chain.wd.verify(*args)
        assert p.returncode == 0, describe(p)
    report = chain.wd.run_json("verify", "--deep")
    assert report["ok"] is True and report["deep"] is True
    assert {b["id"] for b in report["backups"]} == set(chain.ids) | {chain.other_id}
    assert all(b["ok"] for b in report["backups"])


# --- gc ------------------------------------------------------------------------------------

def test_gc_after_delete_shrinks_the_repository(chain, own):
    before = own.pack_bytes()
    own.run_json("delete", chain.ids[2])
    stats = own.run_json("gc")
    after = own.pack_bytes()
    assert after < before, (before, after, stats)
    assert stats["bytes_freed"] > 0
    own.assert_intact({**dict(zip(chain.ids[:2], chain.versions[:2], strict=True)),
                       chain.other_id: chain.other_data})


def test_gc_with_nothing_to_collect_keeps_the_chain(chain, own):
    stats = own.run_json("gc")
    assert stats["packs_deleted"] == 0 and stats["bytes_freed"] == 0
    p = own.verify("--deep")
    assert p.returncode == 0, describe(p)


# Regression test for BUG gc-index-name: gc rewrites an index file with the same content (hence
# the same name) as an old one, then deletes it
def test_gc_with_nothing_to_collect_keeps_a_single_backup(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "one.img"
    data = make_image(img, 2, seed=44)
    rec = workdir.create(img)
    workdir.run_json("gc")
    workdir.assert_restores(rec["id"], data)


# Regression test for BUG gc-index-name: after deleting one volume's only backup, gc's
# rewritten index equals the other volume's index file and is deleted with the old ones
def test_gc_after_deleting_another_volume_keeps_the_chain(workdir, tmp_path):
    workdir.init("64K")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    da = make_image(a, 2, seed=41)
    make_image(b, 2, seed=42)
    ra, rb = workdir.create(a), workdir.create(b)
    workdir.run_json("delete", rb["id"])
    before = workdir.pack_bytes()
    workdir.run_json("gc")
    assert workdir.pack_bytes() < before
    workdir.assert_restores(ra["id"], da)


# Regression test for BUG gc-repack: gc deletes the packs its repack just wrote (fate 'new' is
# swept with 'delete' and 'repack')
def test_gc_repacks_a_mostly_dead_pack_without_losing_data(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "r.img"
    v1 = os.urandom(4 * MiB)
    img.write_bytes(v1)
    first = workdir.create(img)
    v2 = os.urandom(3 * MiB + MiB // 2) + v1[3 * MiB + MiB // 2:]   # 1/8 of v1 survives
    img.write_bytes(v2)
    second = workdir.create(img)          # a full backup: shares the last 512 KiB
    before = workdir.pack_bytes()
    workdir.run_json("delete", first["id"])
    stats = workdir.run_json("gc")
    assert stats["packs_repacked"] == 1
    assert workdir.pack_bytes() < before
    workdir.assert_restores(second["id"], v2)


# --- export-record / import-record --------------------------------------------------------

def _export(wd: Workdir, bid: str) -> str:
    p = wd.run("export-record", bid)
    assert p.returncode == 0, describe(p)
    return p.stdout


def test_export_record_is_base64_json_of_every_field(chain):
    text = _export(chain.wd, chain.ids[1])
    assert len(text.strip().splitlines()) == 1
    rec = json.loads(base64.b64decode(text.strip(), validate=True))
    shown = chain.wd.show(chain.ids[1])
    assert set(RECORD_FIELDS) <= set(rec)
    for key in RECORD_FIELDS:
        if key != "is_incremental":
            assert rec[key] == shown[key], key
    assert bool(rec["is_incremental"]) is True


def test_import_refuses_an_existing_backup(chain, own):
    text = _export(own, chain.ids[0])
    p = own.run("import-record", "-", input=text)
    assert_one_line_error(p, 2, "Backup already exists in database.")


@pytest.mark.slow
def test_import_into_a_fresh_catalog(chain, own):
    records = {r["id"]: r for r in own.list()}
    texts = {bid: _export(own, bid) for bid in chain.ids}
    own.catalog.unlink()
    own.init(None)
    assert own.list() == []
    # Children first: the parent's dependents count must come out right anyway.
    for bid in reversed(chain.ids):
        path = own.path / f"{bid}.record"
        path.write_text(texts[bid])
        rec = own.run_json("import-record", path)
        assert rec["id"] == bid and rec["status"] == "available"
    now = {r["id"]: r for r in own.list()}
    assert set(now) == set(chain.ids)
    for bid in chain.ids:
        for key in ("id", "parent_id", "is_incremental", "volume_id", "volume_name",
                    "data_timestamp", "created_at", "size", "block_size",
                    "num_dependent_backups", "has_dependent_backups"):
            assert now[bid][key] == records[bid][key], key
    assert own.restore_bytes(chain.ids[2]) == chain.versions[2]


@pytest.mark.slow
def test_import_revives_a_deleted_backup(chain, own):
    bid = chain.ids[2]
    text = _export(own, bid)
    manifest = own.repo / "manifests" / bid
    saved = manifest.read_bytes()
    own.run_json("delete", bid)
    assert not manifest.exists()
    # Without its manifest the record cannot land `available`.
    p = own.run("import-record", "-", input=text)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert own.show(bid)["status"] == "deleted"
    manifest.write_bytes(saved)
    rec = own.run_json("import-record", "-", input=text)
    assert rec["status"] == "available" and rec["id"] == bid
    assert own.show(chain.ids[1])["num_dependent_backups"] == 1
    own.assert_restores(bid, chain.versions[2])


@pytest.mark.parametrize("text", ["%%% not base64 %%%", "YWJj=ZGVm", "\x00\x01"])
def test_import_garbage_cannot_be_decoded(chain, text):
    p = chain.wd.run("import-record", "-", input=text)
    assert_one_line_error(p, 2, "Can't decode backup record.")


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'{"id": "not-a-uuid"}',
                                     b'{"no": "id"}', b"\xff\xfe\x00"])
def test_import_base64_of_non_record_cannot_be_parsed(chain, payload):
    p = chain.wd.run("import-record", "-", input=base64.b64encode(payload).decode())
    assert_one_line_error(p, 2, "Can't parse backup record.")


def test_import_record_from_a_missing_file(chain, tmp_path):
    p = chain.wd.run("import-record", tmp_path / "nope.record")
    assert p.returncode != 0
    assert_one_line_error(p, p.returncode, "nope.record")


# --- catalog rebuild -----------------------------------------------------------------------

def test_catalog_rebuild_recovers_every_backup(chain, own):
    own.run_json("delete", chain.other_id)
    before = {r["id"]: r for r in own.list()}
    assert set(before) == set(chain.ids)
    own.catalog.unlink()
    result = own.run_json("catalog", "rebuild")
    assert result["recovered"] == len(chain.ids)
    after = {r["id"]: r for r in own.list("--status", "available")}
    assert set(after) == set(before)
    for bid in before:
        for key in RECORD_FIELDS + ("has_dependent_backups",):
            if key != "updated_at":
                assert after[bid][key] == before[bid][key], (bid, key)
    # The deleted backup does not come back.
    assert chain.other_id not in {r["id"] for r in own.list()}
    own.assert_intact({chain.ids[2]: chain.versions[2]})
    # And the lineage goes on: a new incremental's parent is the newest backup.
    assert own.create(chain.image, "--incremental")["parent_id"] == chain.ids[2]


# --- in-process (CliRunner) --------------------------------------------------------------

# `init` as the suite runs it: encrypted under LVBACKUP_TEST_ENCRYPTED=1, where the passphrase
# in the environment refuses an unencrypted repository.
INIT = ("init", *(["--encryption"] if ENCRYPTED else []))


def test_in_process_init_and_empty_list(invoke, workdir):
    r = invoke("--json", *INIT, "--block-size", "64K")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["block_size"] == 64 * KiB
    r = invoke("--json", "list")
    assert r.exit_code == 0 and json.loads(r.stdout) == []


def test_in_process_errors_map_to_exit_2(invoke, workdir):
    assert invoke(*INIT).exit_code == 0
    r = invoke("show", "0123")
    assert r.exit_code == 2
    assert "not found" in r.stderr and "Traceback" not in r.output
    bad = workdir.path / "bad.yaml"
    bad.write_text("repository: /tmp/x\nfrobnicate: 1\n")
    r = invoke("list", config=bad)
    assert r.exit_code == 2 and "frobnicate" in r.stderr


def test_in_process_help_lists_the_commands(invoke):
    r = invoke("--help")
    assert r.exit_code == 0
    for command in ("init", "create", "list", "show", "restore", "delete", "verify", "gc",
                    "export-record", "import-record", "catalog"):
        assert command in r.stdout


def test_config_check_prints_the_effective_config(invoke, workdir):
    r = invoke("--json", "config", "check")
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.stdout)
    assert cfg["repository"] == str(workdir.repo) and cfg["catalog"] == str(workdir.catalog)


def test_relative_config_paths_are_relative_to_the_config_file(workdir, tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    cfg = sub / "rel.yaml"
    cfg.write_text("repository: ../relrepo\ncatalog: cat.db\n")
    assert workdir.run(*INIT, config=cfg).returncode == 0
    assert (tmp_path / "relrepo" / "config").is_file() and (sub / "cat.db").is_file()


def test_summary_line_on_stderr_and_quiet(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "q.img"
    make_image(img, 1, seed=43)
    p = workdir.run("create", "--device", img)
    assert p.returncode == 0 and "read 1.0 MiB" in p.stderr and "stored" in p.stderr
    p = workdir.run("--quiet", "--json", "create", "--device", img)
    assert p.returncode == 0 and p.stderr == ""
    json.loads(p.stdout)
