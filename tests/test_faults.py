"""Crashes at exact steps (lvbackup/base/faults.py: LVBACKUP_FAULT=POINT[:N] makes the process
SIGKILL itself there). After each crash: the next command settles the catalog truthfully,
every `available` backup verifies --deep, the backups restore bit-exactly, and a rerun
succeeds, reusing what the dead run had recorded.

This complements test_crash.py, whose kills land wherever the timing puts them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
from dataclasses import dataclass

import pytest

from support import (
    MiB,
    Workdir,
    apply_change,
    assert_one_line_error,
    describe,
    make_image,
    reused_bytes,
)


@dataclass
class Repo:
    wd: Workdir
    kept: dict[str, bytes]          # backup id -> image, for backups that must survive


def crash(wd: Workdir, point: str, *args, nth: int = 1) -> None:
    p = wd.run(*args, env={"LVBACKUP_FAULT": f"{point}:{nth}"}, binary=True)
    assert p.returncode == -signal.SIGKILL, f"no crash at {point}:\n{describe(p)}"


def intact(r: Repo, restore: str | None = None) -> None:
    """verify --deep passes (it re-hashes every chunk of every available backup), and
    `restore` (default: every kept backup) restores bit-exactly."""
    r.wd.assert_intact({bid: r.kept[bid] for bid in ([restore] if restore else r.kept)})


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Repo:
    """A full and an incremental backup, plus (for gc) a pack to delete whole and one to
    repack: a full backup of an image of which only 1/8 survives into the next full backup,
    which stays, while the first is deleted."""
    root = tmp_path_factory.mktemp("faults")
    wd = Workdir(root / "wd")
    wd.init("64K")
    img = root / "disk.img"
    v1 = make_image(img, 3, seed=301, tail=333)
    full = wd.create(img)
    v2 = apply_change(img, seed=302)
    inc = wd.create(img, "--incremental")
    rimg = root / "r.img"
    r1 = os.urandom(4 * MiB)
    rimg.write_bytes(r1)
    first = wd.create(rimg)
    r2 = os.urandom(3 * MiB + MiB // 2) + r1[3 * MiB + MiB // 2:]
    rimg.write_bytes(r2)
    second = wd.create(rimg)
    wd.run_json("delete", first["id"])
    return Repo(wd, {full["id"]: v1, inc["id"]: v2, second["id"]: r2})


@pytest.fixture
def repo(template, tmp_path) -> Repo:
    return Repo(template.wd.clone(tmp_path / "wd"), dict(template.kept))


# --- backup ----------------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["read-segment", "pack-stored", "pack-pending",
                                   "index-written", "manifest-written"])
def test_backup_crash(repo, tmp_path, point):
    wd = repo.wd
    new = tmp_path / "new.img"
    data = make_image(new, 3, seed=303)         # new data: this run writes a pack
    crash(wd, point, "--json", "create", "--device", new)
    rows = wd.list()                            # settles the dead run's row
    assert not [r for r in rows if r["status"] == "creating"], rows
    victims = [r for r in rows if r["volume_name"] == str(new.resolve())]
    assert len(victims) == 1
    victim = victims[0]
    if point == "manifest-written":
        # The backup was complete: the next command finds its manifest.
        assert victim["status"] == "available" and victim["fail_reason"] is None
        assert victim["stored_bytes"] > 0
        repo.kept[victim["id"]] = data
        intact(repo, victim["id"])
    else:
        assert victim["status"] == "error" and victim["fail_reason"]
        assert not (wd.repo / "manifests" / victim["id"]).exists()
        p = wd.verify("--deep")
        assert p.returncode == 0, describe(p)
    p = wd.run("--json", "create", "--device", new)
    assert p.returncode == 0, describe(p)
    rec = json.loads(p.stdout)
    if point in ("pack-pending", "index-written", "manifest-written"):
        # The dead run's pack was recorded: the rerun reuses all of it.
        assert reused_bytes(p.stderr) >= 2 * MiB, p.stderr
        assert rec["stored_bytes"] == 0
    repo.kept[rec["id"]] = data
    intact(repo, rec["id"])


def test_incremental_completed_by_recovery_counts_as_a_dependent(tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 2, seed=304)
    parent = wd.create(img)
    data = apply_change(img, seed=305)
    crash(wd, "manifest-written", "create", "--device", img, "--incremental")
    child = wd.list()[-1]
    assert child["status"] == "available" and child["parent_id"] == parent["id"]
    assert wd.show(parent["id"])["num_dependent_backups"] == 1
    assert wd.restore_bytes(child["id"]) == data


# --- restore and delete ------------------------------------------------------------------------

def test_restore_crash(repo, tmp_path):
    bid = next(iter(repo.kept))
    out = tmp_path / "out.img"
    crash(repo.wd, "restore-segment", "restore", bid, "--to-file", out)
    assert repo.wd.show(bid)["status"] == "available"
    assert repo.wd.run("restore", bid, "--to-file", out).returncode == 0
    assert out.read_bytes() == repo.kept[bid]


def test_delete_crash_before_the_manifest_is_removed(repo):
    wd = repo.wd
    bid = list(repo.kept)[1]                    # the incremental
    crash(wd, "delete-marked", "delete", bid)
    rec = wd.show(bid)
    assert rec["status"] == "error_deleting" and rec["fail_reason"]
    assert_one_line_error(wd.run("delete", bid), 2, "Backup status must be available or error")
    assert wd.run_json("delete", bid, "--force")["status"] == "deleted"
    del repo.kept[bid]
    intact(repo, list(repo.kept)[0])


def test_delete_crash_after_the_manifest_is_removed(repo):
    wd = repo.wd
    parent, bid = list(repo.kept)[:2]
    crash(wd, "delete-manifest-removed", "delete", bid)
    assert wd.show(bid)["status"] == "deleted"
    assert wd.show(parent)["num_dependent_backups"] == 0
    del repo.kept[bid]
    intact(repo, parent)


# --- gc: "a crash mid-gc loses nothing" --------------------------------------------------------

@pytest.mark.parametrize("point", ["gc-repacked", "gc-index-rewritten", "gc-old-index-deleted",
                                   "gc-pack-deleted"])
def test_gc_crash(repo, point):
    wd = repo.wd
    before = wd.pack_bytes()
    repacked = list(repo.kept)[-1]
    crash(wd, point, "gc")
    intact(repo, repacked)
    wd.run_json("gc")
    assert wd.pack_bytes() < before
    # Nothing is left to collect after a complete gc, and nothing was lost.
    again = wd.run_json("gc")
    assert again["packs_deleted"] == 0 and again["packs_repacked"] == 0
    intact(repo)


def test_gc_crash_then_fresh_cache(repo):
    """The repository alone (no local cache) is consistent after a crash mid-gc."""
    wd = repo.wd
    crash(wd, "gc-index-rewritten", "gc")
    shutil.rmtree(wd.cache)
    intact(repo)


def test_cold_index_cache_crash(repo):
    """Killed while it fills an empty index cache (the entries in, not committed): the
    next command finds the cache as it was, empty, and builds it whole."""
    wd = repo.wd
    shutil.rmtree(wd.cache)
    crash(wd, "index-cache-filled", "verify")
    intact(repo)
    db = sqlite3.connect(f"file:{wd.cache_db()}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT count(*) FROM chunks").fetchone()[0] > 0
        assert db.execute("SELECT count(*) FROM index_files WHERE ok = 1").fetchone()[0] > 0
    finally:
        db.close()


def test_a_misspelt_crash_point_is_refused(tmp_path):
    """A fault the tests ask for that no crash point is named after would never fire (the
    test would pass for the wrong reason); a point the code names that faults.POINTS does
    not list, likewise."""
    from lvbackup.base import faults

    wd = Workdir(tmp_path / "wd")
    wd.init()
    image = tmp_path / "disk.img"
    make_image(image, 1, seed=1)
    p = wd.run("create", "--device", image, env={"LVBACKUP_FAULT": "pack-stord"})
    assert_one_line_error(p, 2, "LVBACKUP_FAULT", "pack-stord")
    assert wd.list() == []
    with pytest.raises(ValueError, match="unknown crash point"):
        faults.crash_point("pack-stord")
