"""`lvbackup snapshot create/list/delete`, `lvbackup volumes`, and LVM-related errors
(unknown VG or LV, forbidden names, lvm2 missing): exit 2, one line on stderr, no traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lvbhelpers import Lvb, MiB, assert_refused, info, lv_time_iso, mixed, module_vg, ok_json

pytestmark = pytest.mark.lvm

SIZE = 16 * MiB


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snapcmds")
    lvb = Lvb(tmp / "lvb", workers=1)
    init = lvb.start("init")
    with module_vg(tmp) as vg:
        vg.create_lv("lin", SIZE)
        vg.create_thin_pool("pool", 64 * MiB)
        vg.create_thin_lv("thin", SIZE, "pool")
        vg.write("lin", mixed(SIZE, b"lin"))
        vg.write("thin", mixed(SIZE, b"thin"))
        out, err = init.communicate(timeout=120)
        assert init.returncode == 0, err
        yield SimpleNamespace(vg=vg, lvb=lvb, tmp=tmp, made={}, refusals={})


def test_snapshot_create(site):
    vg = site.vg
    classic, thin = site.lvb.parallel(
        ("--json", "snapshot", "create", f"{vg.name}/lin", "--name", "s1", "--size", "8m"),
        ("--json", "snapshot", "create", f"{vg.name}/thin"))
    classic, thin = site.made["classic"], site.made["thin"] = ok_json(classic), ok_json(thin)

    lvs = {r["lv_name"]: r for r in vg.lvs("lv_uuid", "lv_time", "segtype", "seg_size")}
    assert classic["full_name"] == f"{vg.name}/s1"
    s1 = lvs["s1"]
    assert s1["lv_attr"][0] == "s" and s1["origin"] == "lin", s1  # classic (COW)
    assert int(s1["seg_size"]) == 8 * MiB, s1  # the COW area: --size
    assert classic["thin"] is False and classic["origin"] == "lin"

    assert re.fullmatch(r"thin-snap-\d{8}T\d{6}", thin["name"]), thin
    t = lvs[thin["name"]]
    assert t["lv_attr"][0] == "V" and t["origin"] == "thin" and t["pool_lv"] == "pool", t
    assert thin["thin"] is True and thin["origin"] == "thin"

    for rec in (classic, thin):
        row = lvs[rec["name"]]
        assert rec["uuid"] == row["lv_uuid"], (rec, row)
        assert rec["created_at"] == lv_time_iso(row["lv_time"]), (rec, row)


def test_snapshot_create_refusals(site):
    vg = site.vg
    assert "classic" in site.made, "needs test_snapshot_create's snapshots"
    sized_thin, of_snapshot = site.lvb.parallel(
        ("snapshot", "create", f"{vg.name}/thin", "--size", "8m"),
        ("snapshot", "create", f"{vg.name}/s1"))
    assert_refused(sized_thin, "a thin snapshot takes no --size")
    assert_refused(of_snapshot, f"{vg.name}/s1 is a snapshot", code=None)
    site.refusals["snapshot create of a snapshot"] = of_snapshot
    assert visible_lvs(vg) == sorted(["lin", "pool", "thin", "s1", site.made["thin"]["name"]])


def visible_lvs(vg) -> list[str]:
    return sorted(r["lv_name"] for r in vg.lvs() if not r["lv_name"].startswith("["))


def test_snapshot_list(site):
    vg = site.vg
    assert "classic" in site.made, "needs test_snapshot_create's snapshots"
    every, of_lin = site.lvb.parallel(("--json", "snapshot", "list"),
                                      ("--json", "snapshot", "list", f"{vg.name}/lin"))
    every, of_lin = ok_json(every), ok_json(of_lin)
    mine = [s for s in every if s["vg"] == vg.name]
    made = site.made
    assert sorted(s["uuid"] for s in mine) == sorted([made["classic"]["uuid"],
                                                      made["thin"]["uuid"]])
    for s in mine:
        assert {"uuid", "origin", "created_at", "full_name"} <= s.keys(), s
        assert s["origin"] in ("lin", "thin")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000000\+00:00", s["created_at"]), s
    assert [s["uuid"] for s in of_lin] == [made["classic"]["uuid"]]
    assert of_lin[0]["origin"] == "lin" and of_lin[0]["full_name"] == f"{vg.name}/s1"


def test_volumes_and_snapshot_delete(site):
    """`volumes --json` lists each LV with its snapshots and the last backup of each; then
    `snapshot delete` removes a snapshot and refuses a volume that is not one."""
    vg, lvb, made = site.vg, site.lvb, site.made
    assert "classic" in made, "needs test_snapshot_create's snapshots"
    vol_b, snap_b = lvb.parallel(
        ("--json", "create", "--volume", f"{vg.name}/lin"),
        ("--json", "create", "--snapshot", f"{vg.name}/{made['thin']['name']}"))
    vol_b, snap_b = ok_json(vol_b), ok_json(snap_b)

    # With cron's PATH, which lacks the sbin directories where the LVM tools are.
    volumes, deleted, refused = lvb.parallel(("--json", "volumes"),
                                             ("--json", "snapshot", "delete", f"{vg.name}/s1"),
                                             ("snapshot", "delete", f"{vg.name}/lin"),
                                             env={**os.environ, "PATH": "/usr/bin:/bin"})
    volumes = {v["full_name"]: v for v in ok_json(volumes) if v["vg"] == vg.name}
    assert sorted(volumes) == [f"{vg.name}/lin", f"{vg.name}/thin"], volumes  # no pool, no snaps
    lin, thin = volumes[f"{vg.name}/lin"], volumes[f"{vg.name}/thin"]
    assert lin["uuid"] == info(vg, "lin")["lv_uuid"]
    assert lin["last_backup"]["id"] == vol_b["id"]
    snaps = {s["name"]: s for s in lin["snapshots"]}
    assert set(snaps) <= {"s1"}  # the parallel delete may already have removed it
    assert [s["name"] for s in thin["snapshots"]] == [made["thin"]["name"]]
    assert thin["snapshots"][0]["uuid"] == made["thin"]["uuid"]
    assert thin["snapshots"][0]["last_backup"]["id"] == snap_b["id"]

    assert ok_json(deleted)["uuid"] == made["classic"]["uuid"]
    assert "s1" not in visible_lvs(vg)
    assert_refused(refused, f"{vg.name}/lin is not a snapshot", code=None)
    site.refusals["snapshot delete of a volume"] = refused
    assert "lin" in visible_lvs(vg)


def test_snapshot_refusals_exit_2(site):
    assert len(site.refusals) >= 2, "needs the refusals of the tests above"
    assert {k: p.returncode for k, p in site.refusals.items()} == {k: 2 for k in site.refusals}


def test_lvm_errors(site):
    vg, lvb = site.vg, site.lvb
    rows_before = lvb.rows() if lvb.catalog.exists() else []
    nopath = site.tmp / "no-lvm-here"
    nopath.mkdir(exist_ok=True)
    # lvbackup also looks in the sbin directories (cron's PATH lacks them): hide those too.
    missing = subprocess.Popen(
        [sys.executable, "-c", "import sys, lvbackup.base.proc as m; m._SBIN_DIRS = (); "
         "from lvbackup.cli import main; sys.argv[0] = 'lvbackup'; main()",
         "--config", lvb.config, "volumes"],
        env={**os.environ, "PATH": str(nopath)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cases = {
        ("create", "--volume", "nosuchvg/lin"): "volume group nosuchvg not found",
        ("create", "--volume", f"{vg.name}/nosuch"): f"logical volume {vg.name}/nosuch not found",
        ("create", "--volume", f"{vg.name}/bad$name"): "invalid LVM volume name 'bad$name'",
    }
    results = lvb.parallel(*cases)
    out, err = missing.communicate(timeout=120)
    for p, message in zip(results, cases.values(), strict=True):
        assert_refused(p, message)
    assert_refused(subprocess.CompletedProcess(missing.args, missing.returncode, out, err),
                   "lvm2 is not installed (lvs not found)")
    assert lvb.rows() == rows_before  # refused before any backup row was made
