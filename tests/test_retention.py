"""Retention: the pure selection function, and `prune` / `protect` / `unprotect` through the
installed command, including re-parenting a kept incremental whose parent is pruned."""

from __future__ import annotations

import json
import sqlite3
import uuid

import pytest

from lvbackup.catalog.retention import Policy, new_parents, select

from support import Workdir, assert_one_line_error, describe

# --- select(): pure ------------------------------------------------------------------------

def _row(ts: str, volume: str = "vol-a", status: str = "available", protected: bool = False,
         parent: str | None = None) -> dict:
    return {"id": str(uuid.uuid4()), "volume_id": volume, "status": status,
            "data_timestamp": ts, "created_at": ts, "protected": protected, "parent_id": parent}


def _days(*stamps: str, **kw) -> list[dict]:
    return [_row(f"{s}+00:00", **kw) for s in stamps]


def test_keep_last_keeps_the_newest_by_data_timestamp():
    rows = _days("2026-01-01T00:00:00.000000", "2026-01-03T00:00:00.000000",
                 "2026-01-02T00:00:00.000000")
    plan = select(rows, Policy(last=2))
    assert set(plan.keep) == {rows[1]["id"], rows[2]["id"]}
    assert plan.remove == [rows[0]["id"]]
    assert plan.keep[rows[1]["id"]] == ["last 1"]


def test_keep_daily_keeps_the_newest_of_each_day():
    rows = _days("2026-03-01T08:00:00.000000", "2026-03-01T20:00:00.000000",
                 "2026-03-02T09:00:00.000000", "2026-03-04T23:59:59.000000",
                 "2026-03-04T00:00:00.000000")
    plan = select(rows, Policy(daily=2))
    # Days with a backup, newest first: 03-04 (23:59 one), 03-02; 03-01 is the third.
    assert set(plan.keep) == {rows[3]["id"], rows[2]["id"]}
    assert set(plan.remove) == {rows[0]["id"], rows[1]["id"], rows[4]["id"]}


def test_hourly_weekly_monthly_yearly_buckets():
    rows = _days("2025-12-31T23:30:00.000000",   # ISO week 2026-W01, year 2025
                 "2026-01-01T00:10:00.000000",   # same ISO week, other year, other hour
                 "2026-01-01T00:50:00.000000",   # same hour as the previous one
                 "2026-02-15T12:00:00.000000")
    weekly = select(rows, Policy(weekly=5))
    # Weeks: 2026-W07 (02-15) and 2026-W01 (the three others: its newest is 00:50).
    assert set(weekly.keep) == {rows[3]["id"], rows[2]["id"]}
    yearly = select(rows, Policy(yearly=5))
    assert set(yearly.keep) == {rows[3]["id"], rows[0]["id"]}
    monthly = select(rows, Policy(monthly=2))
    assert set(monthly.keep) == {rows[3]["id"], rows[2]["id"]}
    hourly = select(rows, Policy(hourly=3))
    assert set(hourly.keep) == {rows[3]["id"], rows[2]["id"], rows[0]["id"]}


def test_rules_combine_and_protected_backups_are_always_kept():
    rows = _days("2026-05-01T00:00:00.000000", "2026-05-02T00:00:00.000000",
                 "2026-05-03T00:00:00.000000")
    rows[0]["protected"] = True
    plan = select(rows, Policy(last=1))
    assert plan.keep[rows[0]["id"]] == ["protected"]
    assert plan.keep[rows[2]["id"]] == ["last 1"]
    assert plan.remove == [rows[1]["id"]]


def test_volumes_are_pruned_independently_and_only_available_backups_count():
    a = _days("2026-06-01T00:00:00.000000", "2026-06-02T00:00:00.000000", volume="A")
    b = _days("2026-06-01T00:00:00.000000", volume="B")
    broken = _row("2026-06-03T00:00:00.000000+00:00", volume="A", status="error")
    plan = select(a + b + [broken], Policy(last=1))
    assert set(plan.keep) == {a[1]["id"], b[0]["id"]}
    assert plan.remove == [a[0]["id"]]
    assert broken["id"] not in plan.keep and broken["id"] not in plan.remove


def test_empty_policy_removes_nothing():
    rows = _days("2026-07-01T00:00:00.000000", "2026-07-02T00:00:00.000000")
    assert select(rows, Policy()).remove == []


def test_policy_rejects_negative_counts():
    with pytest.raises(ValueError):
        Policy(daily=-1)


def test_new_parents_skip_every_removed_ancestor():
    full = _row("2026-01-01T00:00:00+00:00")
    i1 = _row("2026-01-02T00:00:00+00:00", parent=full["id"])
    i2 = _row("2026-01-03T00:00:00+00:00", parent=i1["id"])
    i3 = _row("2026-01-04T00:00:00+00:00", parent=i2["id"])
    rows = [full, i1, i2, i3]
    assert new_parents(rows, [i1["id"], i2["id"]]) == {i3["id"]: full["id"]}
    assert new_parents(rows, [full["id"], i1["id"], i2["id"]]) == {i3["id"]: None}


# --- prune through the command ---------------------------------------------------------------

@pytest.fixture
def lineage(workdir, make_image, change, tmp_path):
    """full <- i1 <- i2 <- i3 of one image, each version different; and a full backup of
    another image. Returns (workdir, ids, versions, other id)."""
    workdir.init("64K")
    img = tmp_path / "disk.img"
    versions = [make_image(img, 4, seed=31)]
    ids = [workdir.create(img)["id"]]
    for seed in (32, 33, 34):
        versions.append(change(img, seed=seed, fraction=0.05))
        ids.append(workdir.create(img, "--incremental")["id"])
    other = tmp_path / "other.img"
    make_image(other, 4, seed=35)
    other_id = workdir.create(other)["id"]
    return workdir, ids, versions, other_id


def _rows(wd: Workdir) -> dict[str, dict]:
    return {r["id"]: r for r in wd.catalog_rows()}


def test_prune_keep_last_reparents_the_kept_incremental_and_it_restores(lineage):
    wd, ids, versions, other_id = lineage
    report = wd.run_json("prune", "--keep-last", "1")
    assert set(report["deleted"]) == set(ids[:3])
    assert {k["id"] for k in report["keep"]} == {ids[3], other_id}
    rows = _rows(wd)
    for bid in ids[:3]:
        assert rows[bid]["status"] == "deleted"
    # Its whole chain is gone: the kept incremental is a full backup from now on.
    kept = wd.show(ids[3])
    assert kept["parent_id"] is None and kept["is_incremental"] is False
    assert rows[ids[3]]["parent_id"] is None
    wd.assert_restores(ids[3], versions[3])
    wd.assert_restores(other_id, wd.restore_bytes(other_id))


def test_prune_reparents_to_the_nearest_kept_ancestor(lineage):
    wd, ids, versions, _ = lineage
    wd.run_json("protect", ids[0])
    report = wd.run_json("prune", "--keep-last", "1", "--volume", wd.show(ids[0])["volume_name"])
    assert set(report["deleted"]) == {ids[1], ids[2]}
    assert {"id": ids[3], "old_parent_id": ids[2], "new_parent_id": ids[0]} in report["reparented"]
    kept = wd.show(ids[3])
    assert kept["parent_id"] == ids[0] and kept["is_incremental"] is True
    full = wd.show(ids[0])
    assert full["num_dependent_backups"] == 1 and full["protected"] is True
    wd.assert_restores(ids[3], versions[3])
    wd.assert_restores(ids[0], versions[0])
    # Space comes back with gc, and the kept backups still restore after it.
    assert wd.run("gc").returncode == 0
    wd.assert_restores(ids[3], versions[3])


def test_prune_dry_run_changes_nothing(lineage):
    wd, ids, _, _ = lineage
    before = _rows(wd)
    report = wd.run_json("prune", "--keep-last", "2", "--dry-run")
    assert report["dry_run"] is True
    assert {r["id"] for r in report["remove"]} == {ids[0], ids[1]}
    assert report["reparented"] == [{"id": ids[2], "old_parent_id": ids[1],
                                     "new_parent_id": None}]
    assert _rows(wd) == before


def test_prune_with_a_label_touches_only_labelled_backups(workdir, make_image, tmp_path):
    workdir.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 2, seed=41)
    plain = workdir.create(img)["id"]
    tagged = [workdir.create(img, "--label", "tier=gold")["id"] for _ in range(3)]
    listed = workdir.list("--label", "tier=gold")
    assert [r["id"] for r in listed] == tagged
    assert listed[0]["labels"] == {"tier": "gold"}
    report = workdir.run_json("prune", "--keep-last", "1", "--label", "tier=gold")
    assert set(report["deleted"]) == set(tagged[:2])
    left = {r["id"] for r in workdir.list()}
    assert left == {plain, tagged[2]}


def test_protected_backup_cannot_be_deleted_until_unprotected(lineage):
    wd, ids, _, other_id = lineage
    rec = wd.run_json("protect", other_id[:8])
    assert rec["protected"] is True
    assert_one_line_error(wd.run("delete", other_id), 2, "protected", "unprotect")
    assert_one_line_error(wd.run("delete", other_id, "--force"), 2, "protected")
    assert wd.show(other_id)["status"] == "available"
    report = wd.run_json("prune", "--keep-last", "1")
    assert other_id not in report["deleted"]
    assert wd.run_json("unprotect", other_id)["protected"] is False
    assert wd.run_json("delete", other_id)["status"] == "deleted"


def test_plain_delete_still_refuses_a_backup_with_dependents(lineage):
    wd, ids, _, _ = lineage
    assert_one_line_error(wd.run("delete", ids[0]), 2, "Incremental backups exist")


def test_prune_needs_a_keep_option(lineage):
    wd = lineage[0]
    assert_one_line_error(wd.run("prune"), 2, "--keep-")
    assert_one_line_error(wd.run("prune", "--keep-last", "0"), 2, "--keep-")
    assert_one_line_error(wd.run("prune", "--keep-last", "-1"), 2)


def test_catalog_rebuild_after_prune_records_the_orphan_as_full(lineage):
    wd, ids, versions, other_id = lineage
    wd.run_json("prune", "--keep-last", "1", "--volume", wd.show(ids[0])["volume_name"])
    wd.run_json("protect", other_id)
    # Over the existing catalog: the protection (a catalog-only fact) is kept.
    wd.run_json("catalog", "rebuild")
    assert wd.show(other_id)["protected"] is True
    # From the repository alone: the manifest of ids[3] still names ids[2] as its parent,
    # which is gone; the rebuilt catalog records it as the full backup it now is.
    wd.catalog.unlink()
    wd.run_json("catalog", "rebuild")
    rec = wd.show(ids[3])
    assert rec["parent_id"] is None and rec["is_incremental"] is False
    wd.assert_restores(ids[3], versions[3])


def test_migration_adds_labels_and_protection_to_an_old_catalog(workdir, make_image, tmp_path):
    """A catalog made before m002 (only m001 applied) gains the columns on first use."""
    import sqlite_utils

    from lvbackup.catalog.catalog import migrations

    workdir.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 2, seed=51)
    bid = workdir.create(img)["id"]
    # Rewind the catalog to schema 1: drop the new columns and forget m002.
    db = sqlite3.connect(workdir.catalog)
    db.execute("ALTER TABLE backups DROP COLUMN labels")
    db.execute("ALTER TABLE backups DROP COLUMN protected")
    db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm002_labels_protection'")
    db.commit()
    db.close()
    assert "labels" not in sqlite_utils.Database(workdir.catalog)["backups"].columns_dict
    rec = workdir.show(bid)
    assert rec["labels"] == {} and rec["protected"] is False
    cols = sqlite_utils.Database(workdir.catalog)["backups"].columns_dict
    assert "labels" in cols and "protected" in cols
    assert any(m.name == "m002_labels_protection"
               for m in migrations.applied(sqlite_utils.Database(workdir.catalog)))
    assert workdir.run_json("protect", bid)["protected"] is True


def test_labels_are_validated(workdir, make_image, tmp_path):
    workdir.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=61)
    assert_one_line_error(workdir.run("create", "--device", img, "--label", "novalue"), 2,
                          "KEY=VALUE")
    assert_one_line_error(workdir.run("create", "--device", img, "--label", "bad key=x"), 2,
                          "label key")
    assert workdir.list() == []
    rec = workdir.create(img, "--label", "a=1", "--label", "b=x=y")
    assert rec["labels"] == {"a": "1", "b": "x=y"}
    # The labels are in the manifest's record too (catalog rebuild brings them back).
    workdir.catalog.unlink()
    workdir.run_json("catalog", "rebuild")
    assert workdir.show(rec["id"])["labels"] == {"a": "1", "b": "x=y"}
    p = workdir.run("list", "--label", "a=1")
    assert p.returncode == 0 and "a=1" in p.stdout, describe(p)
    assert json.loads(workdir.run("--json", "list", "--label", "a=2").stdout) == []
