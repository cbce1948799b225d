#!/usr/bin/env python3
"""How lvbackup's costs grow with the repository and the catalog (issue 25).

    .venv/bin/python bench/scale.py [--work DIR] [--max 100000] [--max-backups 10000]
                                    [--json out.json]

Chunks: for 10^4, 10^5 (and 10^6 with --max-chunks 1000000) chunks, a repository of 4 KiB
blocks holding one image of that many blocks of random data; then timed, as commands:
the full backup, an incremental after 1 % of the blocks changed, a cold-cache open (`diff`
of the incremental after the index cache is deleted: it rebuilds the cache from the index
files; the warm `diff` is timed too), `verify`, `verify --deep --sample 10`, and `gc`
(nothing to collect).

Backups: a repository of 4 KiB blocks and a 64 KiB image, with 10, 100, 1,000, 10,000
backups of it (made in a helper process that imports lvbackup: ten thousand commands would
spend hours starting up; a full backup every 1,000, so the newest is at the end of a chain
of up to 1,000); then timed: one more backup, `list`, `list --json`, `show` of the newest
(its chain), `prune --keep-last 1 -n`, and `catalog rebuild`.

Each step's wall and CPU seconds and peak RSS (bench/benchlib.run), and per 10x step the
growth of its CPU seconds (the machine this runs on is shared: CPU time is the steadier
figure). Results: docs/performance.md, "Scale".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402 - after the path is set
    VENV_BIN,
    Run,
    lvbackup_cmd,
    machine_info,
    remove,
    run,
    write_lvbackup_config,
)

BLOCK = 4096
CHUNKS = (10**4, 10**5, 10**6)
BACKUPS = (10, 100, 1000, 10000)
FULL_EVERY = 1000
PIECE = 16 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_image(path: Path, blocks: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = blocks * BLOCK
        while left:
            n = min(left, PIECE)
            f.write(rng.randbytes(n))
            left -= n


def change_blocks(path: Path, blocks: int, share: float, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in rng.sample(range(blocks), max(1, int(blocks * share))):
            os.pwrite(fd, rng.randbytes(BLOCK), b * BLOCK)
    finally:
        os.close(fd)


class Steps:
    """Timed lvbackup commands of one configuration, collected as rows."""

    def __init__(self, config: Path, scale: str, n: int, rows: list[dict]):
        self.config, self.scale, self.n, self.rows = config, scale, n, rows

    def run(self, step: str, *args: str, stdout: str = "devnull") -> Run:
        r = run([lvbackup_cmd(), "--config", str(self.config), *args], stdout=stdout)
        row = {"scale": self.scale, "n": self.n, "step": step, "rc": r.rc,
               "wall_s": round(r.wall, 3), "cpu_s": round(r.cpu, 3),
               "rss_mib": round(r.maxrss_kib / 1024, 1), "load": round(os.getloadavg()[0], 1)}
        self.rows.append(row)
        log(f"  {self.scale} {self.n:>8} {step:<22} {'ok' if r.rc == 0 else f'exit {r.rc}':8}"
            f" wall {r.wall:8.2f} s  cpu {r.cpu:8.2f} s  rss {row['rss_mib']:7.1f} MiB"
            f"  load {row['load']}")
        if r.rc != 0:
            log("    " + r.stderr.strip()[-300:])
        return r


def chunk_scale(work: Path, n: int, rows: list[dict]) -> None:
    base = work / f"chunks-{n}"
    remove(base)
    cfg = write_lvbackup_config(base)
    image = base / "disk.img"
    log(f"building a {n * BLOCK >> 20} MiB image of {n} random blocks ...")
    make_image(image, n, seed=n)
    s = Steps(cfg, "chunks", n, rows)
    s.run("init", "init", "--block-size", "4K").check("init")
    s.run("backup", "create", "--device", str(image)).check("backup")
    change_blocks(image, n, 0.01, seed=n + 1)
    incr = s.run("incremental", "--json", "create", "--device", str(image), "--incremental",
                 stdout="capture").check("incremental")
    incr_id = json.loads(incr.stdout)["id"]
    for cache in (base / "cache").glob("index-*.sqlite*"):
        cache.unlink()
    s.run("cold-cache open", "diff", incr_id)
    s.run("warm open", "diff", incr_id)
    s.run("verify", "verify")
    s.run("sampled verify 10%", "verify", "--deep", "--sample", "10")
    s.run("gc", "gc")
    remove(image)


def add_backups(config: Path, image: Path, count: int, made: int) -> None:
    """`count` more backups of `image` (`made` exist), in a helper process."""
    code = ("import sys\n"
            "from lvbackup.config import load_config\n"
            "from lvbackup.operations.create import create_backup, select_source\n"
            "from lvbackup.session import Session\n"
            "s = Session(load_config(sys.argv[1]))\n"
            "src, name = select_source(s.config, device=sys.argv[2])\n"
            "for i in range(int(sys.argv[3]), int(sys.argv[4])):\n"
            f"    create_backup(s, src, incremental=i % {FULL_EVERY} != 0, source_name=name)\n"
            "s.close()\n")
    subprocess.run([str(VENV_BIN / "python"), "-c", code, str(config), str(image),
                    str(made), str(made + count)], check=True)


def backup_scale(work: Path, sizes: list[int], rows: list[dict]) -> None:
    base = work / "backups"
    remove(base)
    cfg = write_lvbackup_config(base)
    image = base / "disk.img"
    image.write_bytes(random.Random(7).randbytes(16 * BLOCK))
    Steps(cfg, "backups", 0, rows).run("init", "init", "--block-size", "4K").check("init")
    made = 0
    for n in sizes:
        t0 = time.monotonic()
        add_backups(cfg, image, n - 1 - made, made)
        log(f"made {n - 1 - made} backups in {time.monotonic() - t0:.0f} s")
        s = Steps(cfg, "backups", n, rows)
        s.run("backup", "create", "--device", str(image), "--incremental").check("backup")
        made = n
        newest = json.loads(s.run("list --json", "--json", "list", stdout="capture")
                            .check("list").stdout)[-1]["id"]
        s.run("list", "list")
        s.run("show", "show", newest)
        s.run("prune -n", "prune", "--keep-last", "1", "-n")
        s.run("catalog rebuild", "catalog", "rebuild")


def growth(rows: list[dict]) -> list[str]:
    """Per step, CPU seconds at each size and the factor per 10x."""
    out = []
    keys = dict.fromkeys((r["scale"], r["step"]) for r in rows if r["n"])
    for scale, step in keys:
        mine = [r for r in rows if (r["scale"], r["step"]) == (scale, step) and r["rc"] == 0]
        figures = "  ".join(f"{r['n']:>6}: {r['cpu_s']:7.2f} s {r['rss_mib']:6.0f} MiB"
                            for r in mine)
        factors = ", ".join(f"{b['cpu_s'] / a['cpu_s']:.1f}x" if a["cpu_s"] else "-"
                            for a, b in zip(mine, mine[1:], strict=False))
        out.append(f"{scale:8} {step:22} {figures}   per 10x: {factors}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/lvbackup-scale"))
    ap.add_argument("--max-chunks", "--max", type=int, default=10**5,
                    help="the largest repository built (10^6 takes a while)")
    ap.add_argument("--min-chunks", "--min", type=int, default=0,
                    help="the smallest repository built (to run 10^6 alone)")
    ap.add_argument("--max-backups", type=int, default=10**4)
    ap.add_argument("--skip-chunks", action="store_true")
    ap.add_argument("--skip-backups", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    info = machine_info(args.work)
    log(f"{info['nproc']} CPUs, {info['cpu']}, load {info['loadavg_at_start']}")
    try:
        if not args.skip_chunks:
            for n in CHUNKS:
                if args.min_chunks <= n <= args.max_chunks:
                    chunk_scale(args.work, n, rows)
        if not args.skip_backups:
            backup_scale(args.work, [n for n in BACKUPS if n <= args.max_backups], rows)
    finally:
        print("\n".join(growth(rows)))
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
