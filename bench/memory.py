#!/usr/bin/env python3
"""Memory check: lvbackup's peak RSS must not grow with the volume size.

    .venv/bin/python bench/memory.py [--sizes 1,64] [--json out.json] [--work DIR]

Backs up a 1 GiB and a 64 GiB sparse file (truncate; mostly holes, the same few MiB of
data scattered in each), then an incremental after a few writes, then restores to a new
file (checked bit for bit), and prints each step's peak RSS and the ratio between the
largest and the smallest size (target: within 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import GiB, MiB, lvbackup_cmd, machine_info, remove, run, write_lvbackup_config  # noqa: E402

DATA_STRETCHES = 16
STRETCH = 256 * 1024          # 16 x 256 KiB = 4 MiB of data in every image
TARGET = 1.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_sparse(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i in range(DATA_STRETCHES):
            # spread over the whole file: one stretch in each 1/16th, at a seeded 4 KiB offset
            lo = size * i // DATA_STRETCHES
            off = lo + rng.randrange((size // DATA_STRETCHES - STRETCH) // 4096) * 4096
            os.pwrite(fd, rng.randbytes(STRETCH), off)
    finally:
        os.close(fd)


def change_sparse(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed + 1)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(8):
            os.pwrite(fd, rng.randbytes(64 * 1024), rng.randrange(size // 65536) * 65536)
    finally:
        os.close(fd)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:          # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def same_sparse(a: Path, b: Path) -> bool:
    """Bit-for-bit equality of two sparse files, reading only where either holds data."""
    sa, sb = a.stat().st_size, b.stat().st_size
    if sa != sb:
        return False
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        ranges = sorted(data_extents(fa.fileno(), sa) + data_extents(fb.fileno(), sb))
        for start, end in ranges:
            pos = start
            while pos < end:
                n = min(8 * MiB, end - pos)
                if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                    return False
                pos += n
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,64", help="GiB, comma separated (default 1,64)")
    ap.add_argument("--work", default="/var/tmp/lvbackup-bench/memory")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    sizes = [int(float(s) * GiB) for s in args.sizes.split(",")]
    work = Path(args.work).resolve()
    remove(work)
    work.mkdir(parents=True)
    lvb = lvbackup_cmd()
    info = machine_info(work)
    results = []
    failed = False
    for size in sizes:
        d = work / f"{size // GiB}G"
        img, out = d / "sparse.img", d / "restored.img"
        cfg = write_lvbackup_config(d)
        make_sparse(img, size, args.seed)
        run([lvb, "--config", cfg, "init"]).check("lvbackup init")
        res = {"size_gib": size / GiB, "data_mib": DATA_STRETCHES * STRETCH / MiB}
        create = [lvb, "--config", cfg, "--json", "--quiet", "create", "--device", img]
        steps = [("full backup", create),
                 ("incremental", [*create, "--incremental"]),
                 ("restore to file", None)]
        backup_id = None
        for step, argv_ in steps:
            if step == "incremental":
                change_sparse(img, size, args.seed)
            if step == "restore to file":
                argv_ = [lvb, "--config", cfg, "--quiet", "restore", backup_id, "--to-file", out]
            log(f"{size / GiB:g} GiB: {step} ...")
            os.sync()
            r = run(argv_, stdout="capture")
            ok = r.rc == 0
            if ok and step != "restore to file":
                backup_id = json.loads(r.stdout)["id"]
            if ok and step == "restore to file":
                ok = same_sparse(img, out)
                remove(out)
            if not ok:
                failed = True
                log(f"  FAILED: exit {r.rc} {r.stderr.strip()[-500:]}")
            res[step] = {"wall_s": round(r.wall, 2), "cpu_s": round(r.cpu, 2),
                         "peak_rss_mib": round(r.maxrss_kib / 1024, 1), "ok": ok}
            log(f"  {r.wall:.1f} s, cpu {r.cpu:.1f} s, peak RSS {r.maxrss_kib / 1024:.1f} MiB"
                f"{'' if ok else '  *** FAILED ***'}")
            if backup_id is None:
                break
        results.append(res)
        remove(d)

    print(f"lvbackup memory check: sparse images of "
          f"{', '.join(f'{s / GiB:g}' for s in sizes)} GiB, "
          f"each with {DATA_STRETCHES} x {STRETCH // 1024} KiB of random data; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'step':16} " + "".join(f"{f'{s / GiB:g} GiB: s / RSS MiB':>26}" for s in sizes)
          + f"{'RSS ratio':>11}")
    verdicts = []
    for step in ("full backup", "incremental", "restore to file"):
        cells, rss = [], []
        for res in results:
            m = res.get(step)
            cells.append(f"{m['wall_s']:8.1f} s / {m['peak_rss_mib']:6.1f}"
                         f"{'' if m['ok'] else ' FAIL'}" if m else "-")
            rss.append(m["peak_rss_mib"] if m else None)
        ratio = rss[-1] / rss[0] if None not in rss and rss[0] else None
        verdicts.append({"step": step, "rss_mib": rss, "ratio": ratio,
                         "status": ("n/a" if ratio is None
                                    else "met" if ratio <= TARGET else "MISSED")})
        print(f"{step:16} " + "".join(f"{c:>26}" for c in cells)
              + f"{'-' if ratio is None else f'{ratio:.2f}x':>11}")
    print(f"target: peak RSS of the largest within {TARGET}x of the smallest: "
          + ", ".join(f"{v['step']} {v['status']}" for v in verdicts))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results,
                                               "verdicts": verdicts, "target_ratio": TARGET,
                                               "ok": not failed}, indent=2) + "\n")
    remove(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
