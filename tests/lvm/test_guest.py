"""The test VM really has lvm2 and device-mapper: linear LVs, classic and thin snapshots,
and the thin metadata snapshot + thin_delta that incremental backups rely on."""

import os
import re
import subprocess

import pytest

pytestmark = pytest.mark.lvm

MiB = 1 << 20


def dmsetup_message(device: str, message: str) -> None:
    subprocess.run(["dmsetup", "message", device, "0", message], check=True)


def test_snapshots_and_thin_delta(vg):
    # Linear LV + classic (COW) snapshot.
    vg.create_lv("lin", 16 * MiB)
    vg.snapshot("lin", "lin_snap", size=8 * MiB)

    # Thin pool, thin LV with data, thin snapshot.
    vg.create_thin_pool("pool", 64 * MiB)
    vg.create_thin_lv("thin", 32 * MiB, "pool")
    before = os.urandom(4 * MiB)
    vg.write("thin", before)
    vg.snapshot("thin", "thin_snap")

    lvs = {row["lv_name"]: row for row in vg.lvs("thin_id", "chunk_size")}
    assert lvs["lin_snap"]["origin"] == "lin"
    assert lvs["lin_snap"]["lv_attr"][0] == "s"  # classic snapshot
    assert lvs["lin"]["lv_attr"][0] == "o"  # origin of a classic snapshot
    assert lvs["pool"]["lv_attr"][0] == "t"
    assert lvs["thin"]["lv_attr"][0] == "V" and lvs["thin"]["pool_lv"] == "pool"
    snap = lvs["thin_snap"]
    assert snap["origin"] == "thin" and snap["pool_lv"] == "pool"
    assert snap["lv_attr"][0] == "V"  # thin volume
    assert snap["lv_attr"][9] == "k"  # activation skip: lvm2 creates thin snapshots inactive
    assert snap["lv_attr"][4] == "-"  # ... and so it is not active
    assert int(lvs["lin"]["lv_size"]) == 16 * MiB  # --units b --nosuffix: a string of bytes

    vg.activate("thin_snap")
    assert vg.lv("thin_snap")["lv_attr"][4] == "a"
    assert vg.read("thin_snap", len(before)) == before

    # Change the origin after the snapshot: overwrite one chunk, write a new one far away.
    chunk = int(lvs["pool"]["chunk_size"])
    vg.write("thin", os.urandom(chunk), offset=2 * chunk)
    vg.write("thin", os.urandom(chunk), offset=16 * MiB)

    pool = vg.dm_name("pool") + "-tpool"
    dmsetup_message(pool, "reserve_metadata_snap")
    try:
        out = subprocess.run(
            ["thin_delta", "-m", "--snap1", snap["thin_id"], "--snap2", lvs["thin"]["thin_id"],
             f"/dev/mapper/{vg.dm_name('pool_tmeta')}"],
            capture_output=True, text=True, check=True).stdout
    finally:
        dmsetup_message(pool, "release_metadata_snap")

    # thin_delta reports ranges in pool chunks (data blocks).
    ranges = {(kind, int(begin), int(length))
              for kind, begin, length in re.findall(r'<(\w+) begin="(\d+)" length="(\d+)"', out)}
    assert ("different", 2, 1) in ranges, out
    assert ("right_only", 16 * MiB // chunk, 1) in ranges, out
    assert {kind for kind, _, _ in ranges} <= {"same", "different", "right_only"}, out
