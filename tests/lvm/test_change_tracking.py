"""Incrementals that read only what LVM says changed (lvbackup/changes/tracker.py), on real
thin pools and classic snapshots:

- over a chain of write patterns (scattered, sequential, unaligned 512-byte writes,
  discards of whole and partial blocks, writes into the parent's snapshot itself, a grown
  volume), each change-tracked incremental has, block for block, the manifest of a
  full-scan incremental of the same snapshot (`lvbackup diff` between the two is empty),
  and restores bit-exact;
- a wrong pairing (the parent's snapshot replaced by a new one of the same name, for thin
  with its thin id reused) and a wrong change list (LVBACKUP_FAULT=drop-changes) fall back
  to a full scan, saying why;
- the pool's metadata snapshot is released after success and SIGTERM, and the next run
  releases the one a kill -9 left;
- --keep-snapshot keeps one base per volume whatever fails or is killed in between.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from types import SimpleNamespace

import pytest

from lvbhelpers import KiB, Lvb, MiB, describe, mixed, module_vg, next_second, ok_json, sha

pytestmark = pytest.mark.lvm

SIZE = 48 * MiB


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    lvb = Lvb(tmp / "lvb", workers=2)
    init = lvb.start("init")
    with module_vg(tmp) as vg:
        vg.create_thin_pool("pool", 640 * MiB)
        out, err = init.communicate(timeout=120)
        assert init.returncode == 0, err
        # The same repository and catalog, re-reading every block a change list calls
        # unchanged (an audit run).
        shared = {"repository": str(tmp / "lvb" / "repo"),
                  "catalog": str(tmp / "lvb" / "catalog.db")}
        audit = Lvb(tmp / "audit", **shared, change_sample=100)
        # ... reading every block, comparing it with the parent's (change_tracking: false).
        scanner = Lvb(tmp / "scanner", **shared, change_tracking=False)
        yield SimpleNamespace(vg=vg, lvb=lvb, audit=audit, scanner=scanner, tmp=tmp)


def env_with(**kv) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LVBACKUP_")}, **kv}


def run(lvb: Lvb, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    p = lvb.start(*args, env=env or env_with())
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def create(lvb: Lvb, *args, env: dict | None = None, full: bool = False) -> dict:
    kind = () if full else ("--incremental",)
    return ok_json(run(lvb, "--json", "create", *kind, *args, env=env))


def device_sha(vg, lv: str) -> str:
    if vg.lv(lv)["lv_attr"][4] != "a":
        vg.activate(lv)
    return sha(vg.read(lv))


def restored_sha(lvb: Lvb, backup_id: str) -> str:
    p = run(lvb, "restore", backup_id, "--to-file", "-")
    assert p.returncode == 0, describe(p)
    return sha(p.stdout)


def held_root(vg) -> str:
    out = subprocess.run(["dmsetup", "status", f"{vg.dm_name('pool')}-tpool"],
                         capture_output=True, check=True, text=True).stdout.split()
    return out[out.index("thin-pool") + 4]


def write_at(vg, lv: str, spots: list[tuple[int, int]], seed: int) -> None:
    rng = random.Random(seed)
    for offset, length in spots:
        vg.write(lv, rng.randbytes(length), offset)


def discard(vg, lv: str, offset: int, length: int) -> None:
    subprocess.run(["blkdiscard", "-o", str(offset), "-l", str(length), vg.path(lv)],
                   capture_output=True, check=False)


def same_as_a_full_scan(site, snap: str, tracked: dict) -> None:
    """A second backup of `snap` that reads every block and compares it with its parent's
    must have the change-tracked one's manifest, and both restore what `snap` holds."""
    scan = create(site.scanner, "--snapshot", f"{site.vg.name}/{snap}")
    assert scan["change_source"] == "scan" and scan["change_fallback"] is None, scan
    assert scan["bytes_read"] == scan["size"], scan
    d = ok_json(run(site.lvb, "--json", "diff", tracked["id"], scan["id"]))
    assert d["ranges"] == [] and d["size"] == d["other_size"], d
    assert restored_sha(site.lvb, tracked["id"]) == device_sha(site.vg, snap)


def thin_patterns(vg, lv: str, prev: str):
    """(name, apply) pairs, applied in order to the thin volume `lv`; `prev()` names the
    snapshot the last backup was read from."""
    return [
        ("scattered", lambda: write_at(vg, lv, [(random.Random(i).randrange(SIZE - 4 * KiB),
                                                 4 * KiB) for i in range(24)], 1)),
        ("sequential", lambda: write_at(vg, lv, [(5 * MiB + 4 * KiB, 3 * MiB)], 2)),
        ("unaligned", lambda: write_at(vg, lv, [(128 * KiB * k - 256, 512)
                                                for k in range(3, 40, 7)], 3)),
        ("discards", lambda: (discard(vg, lv, 8 * MiB, 2 * MiB),          # whole pool blocks
                              discard(vg, lv, 20 * MiB + 4 * KiB, 8 * KiB))),  # part of one
        ("into-snapshot", lambda: (vg.activate(prev()),
                                   write_at(vg, prev(), [(30 * MiB, 64 * KiB)], 5),
                                   write_at(vg, lv, [(31 * MiB, 4 * KiB)], 6))),
        ("grown", lambda: (vg.lvm("lvextend", "-q", "-L", f"{SIZE // MiB + 8}m",
                                  f"{vg.name}/{lv}"),
                           write_at(vg, lv, [(SIZE + MiB, 256 * KiB)], 7))),
    ]


def test_thin_incrementals_equal_full_scans(site):
    vg, lvb = site.vg, site.lvb
    vg.create_thin_lv("tv", SIZE, "pool")
    write_at(vg, "tv", [(k * 4 * MiB, 512 * KiB) for k in range(12)], 0)  # 6 MiB mapped
    vg.snapshot("tv", "tv-s0")
    full = create(lvb, "--snapshot", f"{vg.name}/tv-s0", full=True)
    # A full backup of a thin snapshot reads only what the pool maps for it.
    assert full["change_source"] == "full" and full["bytes_read"] <= 7 * MiB, full
    assert held_root(vg) == "-"
    names = ["tv-s0"]
    for n, (pattern, apply) in enumerate(thin_patterns(vg, "tv", lambda: names[-1]), 1):
        apply()
        next_second(vg, names[-1])
        snap = f"tv-s{n}"
        vg.snapshot("tv", snap)
        rec = create(lvb, "--snapshot", f"{vg.name}/{snap}")
        assert rec["change_source"] == "thin_delta" and rec["change_fallback"] is None, \
            (pattern, json.dumps(rec))
        # What changed, plus the sample check's 16 blocks; the volume is 48 MiB or more.
        assert rec["bytes_read"] < 8 * MiB, (pattern, rec)
        assert held_root(vg) == "-", pattern
        same_as_a_full_scan(site, snap, rec)
        names.append(snap)


def classic_patterns(vg, lv: str, prev):
    return [
        ("scattered", lambda: write_at(vg, lv, [(random.Random(i).randrange(SIZE - 4 * KiB),
                                                 4 * KiB) for i in range(24)], 11)),
        ("sequential", lambda: write_at(vg, lv, [(7 * MiB + 512, 2 * MiB)], 12)),
        ("unaligned", lambda: write_at(vg, lv, [(128 * KiB * k - 256, 512)
                                                for k in range(2, 40, 5)], 13)),
        ("into-snapshot", lambda: (write_at(vg, prev(), [(33 * MiB, 64 * KiB)], 14),
                                   write_at(vg, lv, [(40 * MiB, 4 * KiB)], 15))),
    ]


def test_classic_incrementals_equal_full_scans(site):
    vg, lvb = site.vg, site.lvb
    vg.create_lv("cl", SIZE)
    vg.write("cl", mixed(SIZE, b"cl"))
    vg.snapshot("cl", "cl-s0", 16 * MiB)
    full = create(lvb, "--snapshot", f"{vg.name}/cl-s0", full=True)
    assert full["change_source"] == "full", full
    names = ["cl-s0"]
    for n, (pattern, apply) in enumerate(classic_patterns(vg, "cl", lambda: names[-1]), 1):
        apply()
        next_second(vg, names[-1])
        snap = f"cl-s{n}"
        vg.snapshot("cl", snap, 16 * MiB)
        rec = create(lvb, "--snapshot", f"{vg.name}/{snap}")
        assert rec["change_source"] == "cow" and rec["change_fallback"] is None, \
            (pattern, json.dumps(rec))
        assert rec["bytes_read"] < 8 * MiB, (pattern, rec)
        same_as_a_full_scan(site, snap, rec)
        # The older snapshot served its purpose: fewer snapshots, cheaper origin writes.
        vg.lvm("lvremove", "-q", "-y", f"{vg.name}/{names[-1]}")
        names.append(snap)


@pytest.mark.parametrize("kind", ["thin", "classic"])
def test_a_replaced_parent_snapshot_is_not_paired(site, kind):
    vg, lvb = site.vg, site.lvb
    lv = f"rp{kind[0]}"
    size = None if kind == "thin" else 8 * MiB
    if kind == "thin":
        vg.create_thin_lv(lv, 16 * MiB, "pool")
    else:
        vg.create_lv(lv, 16 * MiB)
    vg.write(lv, mixed(16 * MiB, lv.encode()))
    vg.snapshot(lv, f"{lv}-a", size)
    first = create(lvb, "--snapshot", f"{vg.name}/{lv}-a", full=True)
    ids = thin_ids(vg) if kind == "thin" else {}
    vg.lvm("lvremove", "-q", "-y", f"{vg.name}/{lv}-a")
    write_at(vg, lv, [(MiB, 64 * KiB)], 21)
    next_second(vg, lv)
    vg.snapshot(lv, f"{lv}-a", size)     # the same name (and, thin, the same thin id)
    if kind == "thin":
        assert thin_ids(vg)[f"{lv}-a"] == ids[f"{lv}-a"], "LVM did not reuse the thin id"
    next_second(vg, f"{lv}-a")
    vg.snapshot(lv, f"{lv}-b", size)
    rec = create(lvb, "--snapshot", f"{vg.name}/{lv}-b")
    assert rec["parent_id"] == first["id"] and rec["change_source"] == "scan", rec
    assert "no longer exists" in rec["change_fallback"], rec
    assert restored_sha(lvb, rec["id"]) == device_sha(vg, f"{lv}-b")


def thin_ids(vg) -> dict[str, int]:
    rows = vg.lvs("thin_id")
    return {r["lv_name"]: int(r["thin_id"]) for r in rows if r.get("thin_id")}


@pytest.mark.parametrize("kind", ["thin", "classic"])
@pytest.mark.parametrize("audit", [False, True])
def test_a_change_list_that_drops_changes_is_caught(site, kind, audit):
    vg = site.vg
    lvb = site.audit if audit else site.lvb
    lv = f"dr{kind[0]}{int(audit)}"
    size = None if kind == "thin" else 16 * MiB
    if kind == "thin":
        vg.create_thin_lv(lv, 16 * MiB, "pool")
    else:
        vg.create_lv(lv, 16 * MiB)
    vg.write(lv, mixed(16 * MiB, lv.encode()))
    vg.snapshot(lv, f"{lv}-a", size)
    create(lvb, "--snapshot", f"{vg.name}/{lv}-a", full=True)
    # Audit: one changed block in 128, which only reading every unchanged block finds
    # for sure; else half of them, which the default sample of 16 misses 1 time in 65536.
    step = 128 if audit else 2
    write_at(vg, lv, [(b * 128 * KiB + 100, 4 * KiB) for b in range(0, 128, step)], 31)
    next_second(vg, f"{lv}-a")
    vg.snapshot(lv, f"{lv}-b", size)
    rec = create(lvb, "--snapshot", f"{vg.name}/{lv}-b",
                 env=env_with(LVBACKUP_FAULT="drop-changes"))
    assert rec["change_source"] == "scan" and "differs from the parent" in rec["change_fallback"]
    assert restored_sha(lvb, rec["id"]) == device_sha(vg, f"{lv}-b")


def test_the_metadata_snapshot_is_always_released(site):
    vg, lvb = site.vg, site.lvb
    vg.create_thin_lv("ms", 16 * MiB, "pool")
    vg.write("ms", mixed(16 * MiB, b"ms"))
    vg.snapshot("ms", "ms-0")
    create(lvb, "--snapshot", f"{vg.name}/ms-0", full=True)
    assert held_root(vg) == "-"
    next_second(vg, "ms-0")
    vg.snapshot("ms", "ms-1")
    # SIGTERM while it is reserved: lvbackup unwinds, releasing it, and exits 143.
    p = run(lvb, "create", "--incremental", "--snapshot", f"{vg.name}/ms-1",
            env=env_with(LVBACKUP_FAULT="metadata-reserved:1:TERM"))
    assert p.returncode == 128 + signal.SIGTERM, describe(p)
    assert held_root(vg) == "-"
    # kill -9 while it is reserved: it stays reserved, until the next run releases it.
    p = run(lvb, "create", "--incremental", "--snapshot", f"{vg.name}/ms-1",
            env=env_with(LVBACKUP_FAULT="metadata-reserved"))
    assert p.returncode == -signal.SIGKILL, describe(p)
    assert held_root(vg) != "-"
    rec = create(lvb, "--snapshot", f"{vg.name}/ms-1")
    assert rec["change_source"] == "thin_delta", rec
    assert held_root(vg) == "-"
    statuses = [r["status"] for r in lvb.rows() if r["volume_name"] == f"{vg.name}/ms"]
    assert statuses.count("error") == 2 and statuses.count("available") == 2, statuses


def bases(vg, lv: str) -> list[str]:
    return [r["lv_name"] for r in vg.lvs("lv_tags")
            if r["origin"] == lv and "lvbackup_base" in r["lv_tags"].split(",")]


@pytest.mark.parametrize("kind", ["thin", "classic"])
def test_keep_snapshot_keeps_one_base_per_volume(site, kind):
    vg, lvb = site.vg, site.lvb
    lv = f"kp{kind[0]}"
    if kind == "thin":
        vg.create_thin_lv(lv, 16 * MiB, "pool")
    else:
        vg.create_lv(lv, 16 * MiB)
    vg.write(lv, mixed(16 * MiB, lv.encode()))
    args = ("--volume", f"{vg.name}/{lv}", "--force", "--keep-snapshot")
    tracked = "thin_delta" if kind == "thin" else "cow"
    # Not in use, yet a snapshot is taken and kept: the next run needs a base.
    first = create(lvb, *args, full=True)
    assert first["change_source"] == "full" and len(bases(vg, lv)) == 1
    for n in range(3):
        write_at(vg, lv, [(n * MiB + 4 * KiB, 8 * KiB)], 40 + n)
        next_second(vg, bases(vg, lv)[0])
        # A killed run, then one stopped by SIGTERM: the old base stays, theirs go.
        for fault, code in (("read-segment", -signal.SIGKILL),
                            ("read-segment:1:TERM", 128 + signal.SIGTERM)):
            p = run(lvb, "create", "--incremental", *args, env=env_with(LVBACKUP_FAULT=fault))
            assert p.returncode == code, describe(p)
        rec = create(lvb, *args)
        assert rec["change_source"] == tracked, rec
        assert len(bases(vg, lv)) == 1, vg.lvs("lv_tags")
        assert not [r for r in vg.lvs("lv_tags") if "lvbackup_temp" in r["lv_tags"]]
    assert restored_sha(lvb, rec["id"]) == sha(vg.read(lv))
    volumes = ok_json(run(lvb, "--json", "volumes"))
    mine = next(v for v in volumes if v["full_name"] == f"{vg.name}/{lv}")
    assert [s["name"] for s in mine["snapshots"] if s["base"]] == bases(vg, lv)
    assert mine["snapshots"][0]["last_backup"]["id"] == rec["id"], json.dumps(mine)
