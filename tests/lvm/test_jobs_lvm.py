"""`lvbackup run` with real LVM sources: `snapshot_of:` (the newest snapshot of a volume)
and `volume:` with `force` (an open volume read through a temporary snapshot), retention
after success, and re-parenting of a kept incremental."""

from __future__ import annotations

import pytest

from lvbhelpers import (
    Lvb,
    MiB,
    describe,
    held_open,
    info,
    mixed,
    next_second,
    ok_json,
    temp_snapshots,
)

pytestmark = pytest.mark.lvm

SIZE = 8 * MiB


def _image(lvb: Lvb, backup_id: str) -> bytes:
    p = lvb("restore", backup_id, "--to-file", "-", check=False)
    assert p.returncode == 0, describe(p)
    return p.stdout


def test_run_snapshot_of_and_forced_volume_jobs(vg, tmp_path):
    vg.create_lv("data", SIZE)
    vg.write("data", mixed(SIZE, b"v1"))
    vg.snapshot("data", "s-a", 4 * MiB)
    next_second(vg, "s-a")
    vg.write("data", mixed(MiB, b"v2"), offset=MiB)
    v2 = vg.read("data")
    vg.snapshot("data", "s-b", 4 * MiB)        # the newest snapshot: holds v2
    vg.write("data", mixed(MiB, b"v3"), offset=3 * MiB)
    v3 = vg.read("data")
    s_b = info(vg, "s-b")["lv_uuid"]

    volume = f"{vg.name}/data"
    lvb = Lvb(tmp_path / "lvb", workers=1, jobs={
        "snap": {"snapshot_of": volume, "incremental": True},
        "vol": {"volume": volume, "force": True, "incremental": True, "keep": {"last": 1}}})
    lvb("init")
    with held_open(vg.path("data")):
        first = ok_json(lvb("--json", "run", check=False))
    jobs = {j["job"]: j for j in first["jobs"]}
    assert first["exit_code"] == 0 and {j["status"] for j in first["jobs"]} == {"ok"}, first
    snap_rec, vol_rec = jobs["snap"]["backup"], jobs["vol"]["backup"]
    assert snap_rec["snapshot_id"] == s_b and snap_rec["snapshot_name"] == f"{vg.name}/s-b"
    assert jobs["snap"]["kind"] == "full"
    # The volume was open: read through a temporary snapshot, since removed.
    assert vol_rec["volume_name"] == volume and vol_rec["snapshot_id"] is None
    assert jobs["vol"]["kind"] == "incremental" and vol_rec["parent_id"] == snap_rec["id"]
    assert temp_snapshots(vg) == []
    assert _image(lvb, snap_rec["id"]) == v2
    assert _image(lvb, vol_rec["id"]) == v3

    # Again: the newest snapshot is already backed up (skipped); the volume gets another
    # incremental, and `keep: {last: 1}` prunes the job's first one, re-parenting the new
    # one onto the snapshot backup.
    second = ok_json(lvb("--json", "run", check=False))
    jobs = {j["job"]: j for j in second["jobs"]}
    assert jobs["snap"]["status"] == "skipped" and jobs["snap"]["backup"] is None
    new = jobs["vol"]["backup"]
    assert jobs["vol"]["pruned"] == [vol_rec["id"]]
    rows = {r["id"]: r for r in lvb.rows()}
    assert rows[vol_rec["id"]]["status"] == "deleted"
    assert rows[new["id"]]["parent_id"] == snap_rec["id"]
    assert _image(lvb, new["id"]) == v3
