"""Crash safety: a backup killed at any moment leaves no `available` backup that cannot be
restored, earlier backups intact, a truthful catalog after the next command, and packs that
a rerun reuses (docs/format.md, "Order of writes, and what a crash leaves").

The victim is a real `lvbackup create` of a 36 MiB image of random data, slowed down with
`workers: 1` and `compression_level: 19` (zstd at level 19 runs at some 10-15 MB/s, so the
run lasts a few seconds and writes a pack every 16 MiB); it is killed with SIGKILL at
several moments, or stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest

from lvbackup.repository.backends import LocalBackend
from lvbackup.repository.codec import FLAG_RAW, PLAIN
from lvbackup.repository.index import ChunkIndex, decode_index
from lvbackup.repository.pack import ChunkRef
from lvbackup.repository.repo import Repository

from support import (
    MiB,
    Workdir,
    apply_change,
    assert_one_line_error,
    describe,
    make_image,
    reused_bytes,
    wait_until,
)

# Every test here runs the slowed-down victim backup of a 36 MiB image.
pytestmark = pytest.mark.slow

NO_PARENT = "No backups available to do an incremental backup."
BIG_MIB = 36


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-images")
    big = root / "big.img"
    rng = random.Random(81)
    big_data = rng.randbytes(BIG_MIB * MiB)
    big.write_bytes(big_data)
    small = root / "small.img"
    v1 = make_image(small, 2, seed=82)
    return big, big_data, small, v1


@dataclass
class Setup:
    wd: Workdir
    slow: Path                      # config that makes the victim slow
    big: Path
    big_data: bytes
    small: Path
    earlier: list[tuple[str, bytes]]
    procs: list = field(default_factory=list)


@pytest.fixture
def setup(images, tmp_path):
    big, big_data, small, v1 = images
    wd = Workdir(tmp_path / "wd")
    wd.init("64K")
    slow = wd.config_with("slow.yaml", workers=1, compression_level=19)
    full = wd.create(small)
    own_small = tmp_path / "small.img"
    own_small.write_bytes(v1)
    v2 = apply_change(own_small, seed=83)
    inc = wd.create(own_small)
    s = Setup(wd, slow, big, big_data, own_small, [(full["id"], v1), (inc["id"], v2)])
    yield s
    for proc in s.procs:   # a test that failed while its victim ran leaves no process behind
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def creating_row_exists(wd: Workdir) -> bool:
    try:
        return any(r["status"] == "creating" for r in wd.catalog_rows())
    except sqlite3.Error:
        return False


def cache_packs_of(wd: Workdir, run_id: str) -> list[str]:
    """Hex ids of the packs the index cache attributes to a run. A run records a pack
    there (as pending) only once the pack is stored whole."""
    if not list(wd.cache.glob("index-*.sqlite")):
        return []
    db = sqlite3.connect(f"file:{wd.cache_db()}?mode=ro", uri=True, timeout=30)
    try:
        return [p.hex() for (p,) in db.execute("SELECT id FROM packs WHERE run = ?",
                                               (run_id,))]
    except sqlite3.Error:
        return []
    finally:
        db.close()


def victim_id(s: Setup) -> str | None:
    try:
        rows = s.wd.catalog_rows()
    except sqlite3.Error:
        return None
    ids = [r["id"] for r in rows if r["volume_name"] == str(s.big.resolve())]
    return ids[0] if ids else None


def indexed_packs(wd: Workdir) -> set[str]:
    """Hex ids of the packs that the repository's index files list."""
    storage = LocalBackend(wd.repo)
    try:
        return {pack_id.hex() for name in wd.files("index")
                for pack_id, _ in decode_index(name, storage.get(name), PLAIN)}
    finally:
        storage.close()


def new_packs(s: Setup, before: set[str]) -> set[str]:
    return set(s.wd.files("packs")) - before


def check_aftermath(s: Setup, packs_before: set[str]) -> None:
    """Everything the contract promises after a killed backup."""
    wd = s.wd
    # What the dead run had stored and registered, read before any command runs.
    dead = victim_id(s)
    completed = cache_packs_of(wd, dead) if dead else []
    listed = wd.run_json("list")           # settles the dead run's row (rule 11)
    assert not [r for r in listed if r["status"] == "creating"], listed
    victims = [r for r in wd.catalog_rows() if r["volume_name"] == str(s.big.resolve())]
    assert len(victims) <= 1, victims
    victim = victims[0] if victims else None
    assert (victim and victim["id"]) == dead
    if victim is not None:
        assert victim["status"] in ("error", "available"), victim
        if victim["status"] == "error":
            assert victim["fail_reason"], victim
            assert not (wd.repo / "manifests" / victim["id"]).exists()
        shown = wd.show(victim["id"])
        assert shown["status"] == victim["status"]

    # No available backup that fails verify --deep; earlier backups restore bit-exactly.
    wd.assert_intact(dict(s.earlier))
    if victim is not None and victim["status"] == "available":
        assert wd.restore_bytes(victim["id"]) == s.big_data
        assert victim["stored_bytes"] >= len(s.big_data), victim   # random data: no savings

    # Packs the dead run had registered are indexed in the repository now (verify synced).
    assert set(completed) <= indexed_packs(wd), "a dead run's packs were not indexed"
    assert {f"packs/{h[:2]}/{h}" for h in completed} <= new_packs(s, packs_before)

    # Error rows are no parents: an incremental has none unless the victim completed.
    p = wd.run("--json", "create", "--device", s.big, "--incremental")
    if victim is not None and victim["status"] == "available":
        assert p.returncode == 0, describe(p)
        assert wd.restore_bytes(victim["id"]) == s.big_data
        return
    assert_one_line_error(p, 2, NO_PARENT)

    # A rerun succeeds and reuses what the killed run stored.
    p = wd.run("--json", "create", "--device", s.big)
    assert p.returncode == 0, describe(p)
    if completed:
        assert reused_bytes(p.stderr) > 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["status"] == "available"
    assert wd.restore_bytes(rec["id"]) == s.big_data


def start_victim(s: Setup):
    proc = s.wd.popen("--json", "create", "--device", s.big, config=s.slow)
    s.procs.append(proc)
    return proc


def kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# --- SIGKILL at several moments --------------------------------------------------------------

def test_kill_immediately_after_start(setup):
    before = set(setup.wd.files("packs"))
    proc = start_victim(setup)
    kill(proc)
    check_aftermath(setup, before)


def test_kill_after_the_first_pack(setup):
    before = set(setup.wd.files("packs"))
    proc = start_victim(setup)
    wait_until(lambda: new_packs(setup, before), "a pack", proc)
    time.sleep(0.2)   # let it register the pack in the index cache
    kill(proc)
    assert new_packs(setup, before)
    check_aftermath(setup, before)


def test_kill_after_two_packs_then_gc(setup):
    wd = setup.wd
    before = set(wd.files("packs"))
    proc = start_victim(setup)
    wait_until(lambda: len(new_packs(setup, before)) >= 2, "two packs", proc)
    kill(proc)
    check_aftermath(setup, before)
    # gc removes what killed runs left in tmp/ and keeps every backup whole. The kill may
    # fall between two puts (the manifest is put whole at the end), so what a put killed
    # midway leaves is added.
    (wd.repo / "tmp").mkdir(exist_ok=True)
    (wd.repo / "tmp" / "0123456789abcdef.tmp").write_bytes(b"a pack killed midway")
    wd.run_json("gc")
    assert not [p for p in (wd.repo / "tmp").iterdir()]
    wd.assert_intact(dict(setup.earlier))


def test_kill_at_a_random_moment(setup):
    """A moment drawn from a seed (LVBACKUP_TEST_SEED reruns another one, or a failed one)
    within the run: the victim runs for a few seconds even on a fast machine, longer on a
    loaded one, so it is still running when killed, and dies by the SIGKILL."""
    seed = int(os.environ.get("LVBACKUP_TEST_SEED", "24"))
    delay = random.Random(seed).uniform(0.05, 1.5)
    print(f"LVBACKUP_TEST_SEED={seed}: killing after {delay:.2f} s")
    before = set(setup.wd.files("packs"))
    proc = start_victim(setup)
    time.sleep(delay)
    assert proc.poll() is None, f"the victim ended (exit {proc.returncode}) before the kill"
    kill(proc)      # and it died by it: exit -9, not 0 from a run that had just finished
    check_aftermath(setup, before)


# --- SIGTERM ---------------------------------------------------------------------------------

def test_sigterm_marks_the_backup_error_and_keeps_its_packs(setup):
    wd = setup.wd
    proc = start_victim(setup)
    wait_until(lambda: victim_id(setup) is not None, "the creating row", proc)
    bid = victim_id(setup)
    wait_until(lambda: cache_packs_of(wd, bid), "a pack in the index cache", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    err = err.decode(errors="replace")
    assert proc.returncode != 0, err
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    # The process itself recorded the failure (no later command has run yet).
    rows = [r for r in wd.catalog_rows() if r["id"] == bid]
    assert len(rows) == 1 and rows[0]["status"] == "error", rows
    assert rows[0]["fail_reason"]
    shown = wd.show(bid)
    assert shown["status"] == "error" and shown["fail_reason"] == rows[0]["fail_reason"]
    assert not (wd.repo / "manifests" / bid).exists()
    assert wd.verify("--deep").returncode == 0
    # What it stored is indexed now, and the next run reuses it.
    assert set(cache_packs_of(wd, bid)) <= indexed_packs(wd)
    p = wd.run("create", "--device", setup.big)
    assert p.returncode == 0, describe(p)
    assert reused_bytes(p.stderr) >= 8 * MiB, p.stderr
    # Rule 13: an `error` backup may be deleted.
    assert wd.run_json("delete", bid)["status"] == "deleted"
    for earlier, data in setup.earlier:
        assert wd.restore_bytes(earlier) == data


# --- concurrent runs (docs/lineage.md rule 4; exit 75) ------------------------------------------

def test_concurrent_runs_while_a_backup_is_running(setup, tmp_path):
    wd = setup.wd
    proc = start_victim(setup)
    wait_until(lambda: creating_row_exists(wd), "the creating row", proc)
    # The same volume is busy: exit 75 at once, no row.
    p = wd.run("create", "--device", setup.big)
    assert_one_line_error(p, 75, "locked")
    # gc needs the repository to itself.
    assert_one_line_error(wd.run("gc"), 75, "locked")
    # The running backup cannot be deleted (rule 13), not even with --force (its run lock).
    bid = victim_id(setup)
    assert_one_line_error(wd.run("delete", bid), 2, "Backup status must be available or error")
    assert_one_line_error(wd.run("delete", bid, "--force"), 75)
    # Another volume can be backed up meanwhile, and restored.
    other = tmp_path / "other.img"
    data = make_image(other, 1, seed=84)
    rec = wd.create(other)
    assert wd.restore_bytes(rec["id"]) == data
    assert proc.poll() is None, "the victim should still be running"
    kill(proc)
    rows = wd.catalog_rows()
    assert len([r for r in rows if r["volume_name"] == str(setup.big.resolve())]) == 1
    assert wd.verify("--deep").returncode == 0


# --- a restore killed or stopped midway (rule 11: `restoring` goes back to `available`) ------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_restore_stopped_midway(setup, sig):
    wd = setup.wd
    bid, data = setup.earlier[0]
    # Nobody reads the pipe, so the restore blocks once the pipe is full, mid-image.
    proc = wd.popen("restore", bid, "--to-file", "-")
    setup.procs.append(proc)

    def restoring() -> bool:
        try:
            return any(r["id"] == bid and r["status"] == "restoring" for r in wd.catalog_rows())
        except sqlite3.Error:
            return False

    wait_until(restoring, "the restoring status", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert len(out) < len(data)
    assert "Traceback" not in err.decode(errors="replace")
    if sig == signal.SIGTERM:   # the process itself put the status back
        assert {r["id"]: r["status"] for r in wd.catalog_rows()}[bid] == "available"
    assert wd.show(bid)["status"] == "available"
    assert wd.restore_bytes(bid) == data


# --- the index cache under a crash (unit level) -----------------------------------------------

# Regression test for BUG index-cache-autocommit: ChunkIndex opens SQLite with
# isolation_level=None, so `with db:` is no transaction and a run killed inside
# add_indexed/sync/reset left a half-written cache
def test_index_cache_add_indexed_is_all_or_nothing(tmp_path):
    idx = ChunkIndex(tmp_path / "cache.sqlite")
    pack = b"\x01" * 32
    refs = [ChunkRef(bytes([i + 1]) * 32, pack, 8 + i, 1, 1, 0) for i in range(10)]
    refs[6] = refs[6]._replace(offset=object())   # fails mid-way, like a kill would
    with pytest.raises(sqlite3.ProgrammingError):
        idx.add_indexed("index/x", "1:1", [(pack, refs)])
    assert idx.refs_in_pack(pack) == []
    assert idx.lookup([r.chunk_id for r in refs[:6]]) == {}
    idx.close()


# Regression test for BUG index-cache-pending: indexing a dead run's pending pack
# (Repository._index_pending) writes the index file from the trailer but leaves the cache with
# only the chunk rows it already had
def test_rerun_finds_every_chunk_of_a_dead_runs_pack(tmp_path):
    repo, _ = Repository.init(tmp_path / "repo", tmp_path / "cache", 65536)
    rng = random.Random(91)
    packer = repo.packer("dead-run")
    ids = []
    for _ in range(20):
        data = rng.randbytes(1000)
        cid = blake3.blake3(data).digest()
        packer.add(cid, data, len(data), FLAG_RAW)
        ids.append(cid)
    packer.flush()                       # stored and pending, not yet in an index file
    assert repo.index.pending_packs("dead-run") == packer.pack_ids
    assert repo.index.lookup(ids) == {}, "a pending pack's chunks are indexed only with it"
    repo.close()
    repo = Repository.open(tmp_path / "repo", tmp_path / "cache")
    repo.sync_index(tmp_path / "locks")  # the dead run's lock is not held
    try:
        assert len(list(repo.storage.list("index/"))) == 1
        assert set(repo.index.lookup(ids)) == set(ids)
    finally:
        repo.close()
