#!/usr/bin/env python3
"""Change-tracked incrementals against full-scan ones, on real LVM (run inside the test VM):

    tests/vm/run -- .venv/bin/python bench/changes.py [--sizes 1,8] [--kinds thin,classic]
        [--json out.json]

For each kind (thin: thin snapshots and thin_delta; classic: classic snapshots and the
COW store) and each volume size: a volume filled with data (a 4 MiB random buffer,
repeated: cheap to write and to back up in the emulated guest), a snapshot and its full
backup, then 16 MiB of scattered changes (128 whole 128 KiB blocks, the repository's block
size, at seeded random positions, new random bytes), a second snapshot, and two timed
incrementals of it: one change-tracked, one (`change_tracking: false`, a second
configuration on the same repository and catalog) that reads every block. Prints wall
seconds, bytes read, repository growth of the change-tracked one, and the targets:
tracked(8 GiB) <= 1.5x tracked(1 GiB); scan(8 GiB) >= 5x tracked(8 GiB); growth <= 2x the
changed bytes. Exits 1 when one is missed or a restore differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "lvm"))
import conftest as lvmtest  # noqa: E402 - the LVM tests' VG helpers

MiB, GiB = 1 << 20, 1 << 30
BLOCK = 128 * 1024
CHANGED_BLOCKS = 128            # 16 MiB
LVBACKUP = Path(sys.executable).parent / "lvbackup"


def config(directory: Path, repo: Path, catalog: Path, **extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lvbackup.yaml"
    lines = {"repository": str(repo), "catalog": str(catalog), **extra}
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in lines.items()))
    return path


def lvbackup(cfg: Path, *args: str) -> tuple[float, dict]:
    start = time.monotonic()
    p = subprocess.run([str(LVBACKUP), "--config", str(cfg), "--json", *args],
                       capture_output=True)
    wall = time.monotonic() - start
    if p.returncode != 0:
        raise SystemExit(f"lvbackup {' '.join(args)} failed: {p.stderr.decode()}")
    return wall, json.loads(p.stdout) if p.stdout.strip() else {}


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fill(device: str, size: int) -> None:
    buf = random.Random(1).randbytes(4 * MiB)
    fd = os.open(device, os.O_WRONLY)
    try:
        for off in range(0, size, len(buf)):
            os.pwrite(fd, buf[:size - off], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def scatter(device: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(device, os.O_WRONLY)
    try:
        for block in rng.sample(range(size // BLOCK), CHANGED_BLOCKS):
            os.pwrite(fd, rng.randbytes(BLOCK), block * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha_of_device(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def measure(vg, kind: str, size: int, work: Path) -> dict:
    name = f"{kind[:2]}{size // GiB}g"
    if kind == "thin":
        vg.create_thin_lv(name, size, "pool")
        snap_size = None
    else:
        vg.create_lv(name, size)
        snap_size = 256 * MiB
    fill(vg.path(name), size)
    d = work / name
    repo, catalog = d / "repo", d / "catalog.db"
    tracked = config(d / "tracked", repo, catalog)
    scanner = config(d / "scan", repo, catalog, change_tracking=False)
    lvbackup(tracked, "init")
    vg.snapshot(name, f"{name}-0", snap_size)
    lvbackup(tracked, "create", "--snapshot", f"{vg.name}/{name}-0")
    scatter(vg.path(name), size, seed=size // GiB)
    time.sleep(1.1)    # the new snapshot must be a second younger (lv_time resolution)
    vg.snapshot(name, f"{name}-1", snap_size)
    before = tree_bytes(repo)
    t_wall, t_rec = lvbackup(tracked, "create", "--incremental", "--snapshot",
                             f"{vg.name}/{name}-1")
    growth = tree_bytes(repo) - before
    s_wall, s_rec = lvbackup(scanner, "create", "--incremental", "--snapshot",
                             f"{vg.name}/{name}-1")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        out = Path(tmp) / "restored"
        lvbackup(tracked, "restore", t_rec["id"], "--to-file", str(out))
        if t_rec["change_source"] != ("thin_delta" if kind == "thin" else "cow"):
            raise SystemExit(f"{name}: change source {t_rec['change_source']}: "
                             f"{t_rec['change_fallback']}")
        if t_rec["size"] != size or sha_of_device(str(out)) != sha_of_device(
                vg.activate(f"{name}-1") if kind == "thin" else vg.path(f"{name}-1")):
            raise SystemExit(f"{name}: the restore differs from the snapshot")
    vg.lvm("lvremove", "-q", "-y", f"{vg.name}/{name}-0", f"{vg.name}/{name}-1",
           f"{vg.name}/{name}")
    return {"kind": kind, "size": size, "tracked_s": t_wall, "scan_s": s_wall,
            "tracked_read": t_rec["bytes_read"], "scan_read": s_rec["bytes_read"],
            "growth": growth, "changed": CHANGED_BLOCKS * BLOCK}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8", help="volume sizes in GiB (first: the small)")
    ap.add_argument("--kinds", default="thin,classic", help="thin, classic or both")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    args = ap.parse_args(argv)
    sizes = [int(s) * GiB for s in args.sizes.split(",")]
    kinds = [k for k in ("thin", "classic") if k in args.kinds.split(",")]
    rows = []
    need = 2 * sum(sizes) + 4 * GiB
    with tempfile.TemporaryDirectory(dir=args.work) as tmp, \
            lvmtest.throwaway_vg(Path(tmp), "lvbbench", need) as vg:
        vg.create_thin_pool("pool", sum(sizes) + GiB)
        for kind in kinds:
            for size in sizes:
                rows.append(measure(vg, kind, size, Path(tmp)))
                r = rows[-1]
                print(f"{kind:8} {size // GiB:3} GiB  tracked {r['tracked_s']:6.2f} s "
                      f"(read {r['tracked_read'] / MiB:7.1f} MiB)  scan {r['scan_s']:6.2f} s "
                      f"(read {r['scan_read'] / MiB:7.1f} MiB)  growth "
                      f"{r['growth'] / MiB:5.1f} MiB of {r['changed'] / MiB:.0f} MiB changed",
                      flush=True)
    ok = True
    for kind in kinds:
        small, large = (r for r in rows if r["kind"] == kind and r["size"] in
                        (sizes[0], sizes[-1]))
        checks = [
            ("tracked large / tracked small <= 1.5", large["tracked_s"] / small["tracked_s"],
             1.5, True),
            ("scan large / tracked large >= 5", large["scan_s"] / large["tracked_s"], 5, False),
            ("growth / changed <= 2", large["growth"] / large["changed"], 2, True),
        ]
        for what, value, limit, at_most in checks:
            met = value <= limit if at_most else value >= limit
            ok &= met
            print(f"{kind:8} {what:40} {value:6.2f}  {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
