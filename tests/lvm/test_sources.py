"""Volume and snapshot backups of real LVs, classic (COW) and thin, and restores of them onto
LVs: existing, new linear, new thin, and the default new `restore_backup_<id>`.

One VG, one repository and four backups are shared by the module (see lvbhelpers): the
linear volume `lin` with a classic snapshot `lsnap`, the thin volume `thin` (pool `pool`)
with a thin snapshot `tsnap`; the origins change after the snapshots are taken, so a
snapshot backup that read its origin instead would restore the wrong bytes.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from lvbhelpers import (
    Lvb,
    MiB,
    assert_refused,
    garbage,
    has_open,
    held_open,
    lv_time_iso,
    mixed,
    module_vg,
    ok_json,
    sha,
)

pytestmark = pytest.mark.lvm

SIZE = 24 * MiB


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    lvb = Lvb(tmp / "lvb", workers=1)
    init = lvb.start("init")  # in the background while LVM sets up
    with module_vg(tmp) as vg:
        vg.create_lv("lin", SIZE)
        vg.create_thin_pool("pool", 128 * MiB)
        vg.create_thin_lv("thin", SIZE, "pool")
        at_snap = {"lin": mixed(SIZE, b"lin"), "thin": mixed(SIZE, b"thin")}
        for name, data in at_snap.items():
            vg.write(name, data)
        vg.snapshot("lin", "lsnap", 8 * MiB)
        vg.snapshot("thin", "tsnap")
        now = {}
        for name, data in at_snap.items():
            change = os.urandom(MiB)
            vg.write(name, change, offset=MiB // 2)
            now[name] = data[:MiB // 2] + change + data[MiB // 2 + MiB:]
        lvs = {r["lv_name"]: r for r in vg.lvs("lv_uuid", "lv_time", "segtype")}
        finish(init)

        vol = dict(zip(("lin", "thin"), lvb.parallel(
            ("--json", "create", "--volume", f"{vg.name}/lin"),
            ("--json", "create", "--volume", f"{vg.name}/thin")), strict=True))
        snap = dict(zip(("lsnap", "tsnap"), lvb.parallel(
            ("--json", "create", "--snapshot", f"{vg.name}/lsnap"),
            ("--json", "create", "--snapshot", lvs["tsnap"]["lv_uuid"])), strict=True))
        yield SimpleNamespace(vg=vg, lvb=lvb, lvs=lvs, at_snap=at_snap, now=now, vol=vol,
                              snap=snap, tsnap_attr_after=vg.lv("tsnap")["lv_attr"])


def finish(p) -> None:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode(errors="replace")


@pytest.mark.parametrize("name", ["lin", "thin"])
def test_volume_backup_record(world, name):
    rec = ok_json(world.vol[name])
    lv = world.lvs[name]
    assert rec["status"] == "available", rec
    assert rec["volume_id"] == lv["lv_uuid"], rec
    assert rec["volume_name"] == f"{world.vg.name}/{name}", rec
    assert rec["snapshot_id"] is None and rec["snapshot_name"] is None, rec
    assert rec["data_timestamp"] == rec["created_at"], rec
    assert rec["parent_id"] is None and rec["is_incremental"] is False, rec
    assert rec["size"] == SIZE, rec


@pytest.mark.parametrize("name,origin", [("lsnap", "lin"), ("tsnap", "thin")])
def test_snapshot_backup_record(world, name, origin):
    rec = ok_json(world.snap[name])
    snap = world.lvs[name]
    assert rec["status"] == "available", rec
    assert rec["volume_id"] == world.lvs[origin]["lv_uuid"], rec
    assert rec["volume_name"] == f"{world.vg.name}/{origin}", rec
    assert rec["snapshot_id"] == snap["lv_uuid"], rec
    assert rec["snapshot_name"] == f"{world.vg.name}/{name}", rec
    assert rec["data_timestamp"] == lv_time_iso(snap["lv_time"]), (rec, snap["lv_time"])
    assert rec["data_timestamp"] < rec["created_at"], rec
    assert rec["size"] == SIZE, rec


def test_thin_snapshot_is_activated_for_reading_and_left_inactive(world):
    before = world.lvs["tsnap"]["lv_attr"]
    assert before[0] == "V" and before[4] == "-" and before[9] == "k", before
    assert world.tsnap_attr_after == before
    assert world.vg.lv("lsnap")["lv_attr"][4] == "a"  # the classic one was active: still is


def test_volume_and_snapshot_together(world):
    vg, lvs = world.vg, world.lvs
    match, mismatch = world.lvb.parallel(
        ("--json", "create", "--volume", f"{vg.name}/thin", "--snapshot", f"{vg.name}/tsnap"),
        ("--json", "create", "--volume", f"{vg.name}/lin", "--snapshot", f"{vg.name}/tsnap"))
    rec = ok_json(match)
    assert (rec["volume_id"], rec["snapshot_id"]) == (lvs["thin"]["lv_uuid"],
                                                      lvs["tsnap"]["lv_uuid"])
    assert_refused(mismatch, f"Volume {lvs['lin']['lv_uuid']} does not match with "
                             f"snapshot.volume_id {lvs['thin']['lv_uuid']}.")
    assert vg.lv("tsnap")["lv_attr"][4] == "-"


def test_inactive_sources_are_activated_and_deactivated(world):
    """An inactive classic snapshot (lvm2 activates it only with its origin) and an
    inactive thin volume are activated for the backup and left inactive."""
    vg, lvs = world.vg, world.lvs
    vg.lvm("lvchange", "-an", f"{vg.name}/lin", f"{vg.name}/thin")
    try:
        snap, volume = world.lvb.parallel(
            ("--json", "create", "--snapshot", f"{vg.name}/lsnap"),
            ("--json", "create", "--volume", f"{vg.name}/thin"))
        attrs = {r["lv_name"]: r["lv_attr"] for r in vg.lvs()}
    finally:
        vg.lvm("lvchange", "-ay", f"{vg.name}/lin", f"{vg.name}/thin")
    assert ok_json(snap)["snapshot_id"] == lvs["lsnap"]["lv_uuid"]
    assert ok_json(volume)["volume_id"] == lvs["thin"]["lv_uuid"]
    assert [attrs[n][4] for n in ("lin", "lsnap", "thin")] == ["-", "-", "-"], attrs


# --- invalid classic snapshots -----------------------------------------------------------

VICTIM = 96 * MiB


@pytest.fixture(scope="module")
def tiny(world):
    """A 4 MiB classic snapshot `tiny` of a 96 MiB origin `victim`: 8 MiB of writes
    to the origin overflow it."""
    vg = world.vg
    vg.create_lv("victim", VICTIM)
    vg.write("victim", os.urandom(8 * MiB))
    vg.snapshot("victim", "tiny", 4 * MiB)
    return "tiny"


def overflow(vg) -> None:
    vg.write("victim", os.urandom(8 * MiB), offset=32 * MiB)


def test_snapshot_overflowing_during_backup_fails_it(world, tiny):
    vg, lvb = world.vg, world.lvb
    p = lvb.start("--json", "create", "--snapshot", f"{vg.name}/{tiny}")
    deadline = time.monotonic() + 120
    while not has_open(p.pid, vg.path(tiny)):  # it is reading the snapshot now
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    overflow(vg)
    out, err = p.communicate(timeout=300)
    assert vg.lv(tiny)["lv_attr"][4] == "I"
    assert p.returncode == 1, (p.returncode, err, out)
    assert b"Traceback" not in err
    rows = [r for r in lvb.rows() if r["snapshot_name"] == f"{vg.name}/{tiny}"]
    assert [r["status"] for r in rows] == ["error"], rows
    assert rows[0]["fail_reason"], rows


def test_invalid_snapshot_is_refused(world, tiny):
    from lvbackup import lvm
    from lvbackup.base.errors import LvbackupError
    from lvbackup.volumes import sources

    vg = world.vg
    if vg.lv(tiny)["lv_attr"][4] != "I":
        overflow(vg)
    snap = lvm.find_lv(f"{vg.name}/{tiny}")
    assert snap.attr[4] == "I" and snap.state == "invalid", snap
    with pytest.raises(LvbackupError, match="became invalid"):
        sources._still_valid(snap)()

    before = len(world.lvb.rows())
    p = world.lvb("create", "--snapshot", f"{vg.name}/{tiny}", check=False)
    assert_refused(p, 'Snapshot to be backed up must be available, but the current status '
                      'is "invalid".')
    assert len(world.lvb.rows()) == before  # refused up front: no backup row


# --- restores onto LVs -------------------------------------------------------------------

def test_restore_to_new_volumes(world):
    """--new-volume: linear over a PV area full of garbage (lvcreate does not zero it), and
    thin in a pool; both bit-exact, zero regions included."""
    vg, lvb = world.vg, world.lvb
    vg.create_lv("junk", SIZE)  # the PV area the next linear LV gets
    where = vg.lv("junk", "seg_pe_ranges")["seg_pe_ranges"]
    vg.write("junk", garbage(SIZE))
    vg.lvm("lvremove", "-q", "-y", f"{vg.name}/junk")

    lin_id, thin_id = ok_json(world.vol["lin"])["id"], ok_json(world.vol["thin"])["id"]
    r_lin, r_thin = lvb.parallel(
        ("--json", "restore", lin_id, "--new-volume", f"{vg.name}/lin_copy"),
        ("--json", "restore", thin_id, "--new-volume", f"{vg.name}/thin_copy",
         "--thin-pool", "pool"))
    assert ok_json(r_lin)["backup_id"] == lin_id
    assert ok_json(r_thin)["backup_id"] == thin_id

    lin_copy = vg.lv("lin_copy", "seg_pe_ranges", "segtype")
    assert lin_copy["seg_pe_ranges"] == where, "test precondition: garbage under the new LV"
    assert lin_copy["segtype"] == "linear" and int(lin_copy["lv_size"]) == SIZE
    assert sha(vg.read("lin_copy")) == sha(world.now["lin"])

    thin_copy = vg.lv("thin_copy", "segtype")
    assert thin_copy["segtype"] == "thin" and thin_copy["pool_lv"] == "pool", thin_copy
    assert int(thin_copy["lv_size"]) == SIZE
    assert sha(vg.read("thin_copy")) == sha(world.now["thin"])


def test_restore_without_target_and_onto_existing_lv(world):
    """No target: a new LV restore_backup_<id> in the volume's VG. --to VG/LV: an existing,
    larger LV full of garbage is overwritten bit-exactly up to the backup's size."""
    vg, lvb = world.vg, world.lvb
    vg.create_lv("target", SIZE + 8 * MiB)
    junk = garbage(SIZE + 8 * MiB)
    vg.write("target", junk)

    classic_id, thin_id = ok_json(world.snap["lsnap"])["id"], ok_json(world.snap["tsnap"])["id"]
    r_new, r_to = lvb.parallel(("--json", "restore", classic_id),
                               ("--json", "restore", thin_id, "--to", f"{vg.name}/target"))
    said = ok_json(r_new)   # names the LV it made (docs/json.md, RestoreResult)
    assert (said["backup_id"], said["target"], said["target_kind"], said["created"]) \
        == (classic_id, f"{vg.name}/restore_backup_{classic_id}", "volume", True)
    assert ok_json(r_to)["backup_id"] == thin_id

    new = vg.lv(f"restore_backup_{classic_id}")
    assert int(new["lv_size"]) == SIZE
    assert sha(vg.read(f"restore_backup_{classic_id}")) == sha(world.at_snap["lin"])

    got = vg.read("target")
    assert sha(got[:SIZE]) == sha(world.at_snap["thin"])
    assert got[SIZE:] == junk[SIZE:]  # nothing written past the backup's size


def test_restore_refusals(world):
    """--to an open LV without --force, --to a smaller LV, --new-volume naming an existing
    LV: exit 2, nothing written."""
    vg, lvb = world.vg, world.lvb
    vg.create_lv("busy", SIZE)
    vg.create_lv("small", 8 * MiB)
    before = {"busy": garbage(SIZE), "small": garbage(8 * MiB)}
    for name, data in before.items():
        vg.write(name, data)
    lin_id, thin_id = ok_json(world.vol["lin"])["id"], ok_json(world.vol["thin"])["id"]
    with held_open(vg.path("busy")):
        assert vg.lv("busy")["lv_attr"][5] == "o"
        busy, small, exists = lvb.parallel(
            ("restore", lin_id, "--to", f"{vg.name}/busy"),
            ("restore", thin_id, "--to", f"{vg.name}/small"),
            ("restore", ok_json(world.snap["lsnap"])["id"], "--new-volume", f"{vg.name}/small"))
    assert_refused(busy, f"{vg.name}/busy is in use")
    assert_refused(small, f"volume size {8 * MiB} is too small to restore backup of size {SIZE}.")
    assert_refused(exists, f"logical volume {vg.name}/small already exists")
    for name, data in before.items():
        assert vg.read(name) == data, f"{name} was written to"
    assert {r["status"] for r in lvb.rows() if r["snapshot_name"] != f"{vg.name}/tiny"} \
        == {"available"}
