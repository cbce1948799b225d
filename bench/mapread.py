"""Sequential read of a mapped backup against a restore to a pipe, side by side.

    .venv/bin/python bench/mapread.py [--size-mib 256] [--work DIR] [--json out.json]

Needs root, nbdkit, nbdkit-plugin-python, nbd-client and the nbd module (in the test VM:
tests/vm/run -- .venv/bin/python bench/mapread.py --size-mib 128). Builds the benchmark's
test image (benchlib), backs it up once, then times `lvbackup restore ID --to-file -` and
`dd` of the device `lvbackup map ID` prints (buffered, 1 MiB reads, a fresh map, so every
block is fetched from the repository), each output hashed and checked against the image.
The figure that matters is the ratio: the map must read at least half as fast.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import MiB, build_image, lvbackup_cmd, run, sync, warm, write_lvbackup_config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lvbackup-mapread-"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / "base.img"
    size = args.size_mib * MiB
    expected = build_image(image, size, args.seed)
    config = write_lvbackup_config(work / "lvb")
    lvb = [lvbackup_cmd(), "--config", str(config)]
    run([*lvb, "init"]).check("init")
    created = run([*lvb, "--json", "create", "--device", str(image)], stdout="capture")
    backup_id = json.loads(created.check("create").stdout)["id"]
    repo = work / "lvb" / "repo"

    sync()
    warm(*[p for p in repo.rglob("*") if p.is_file()])
    restore = run([*lvb, "restore", backup_id, "--to-file", "-"], stdout="hash")
    restore.check("restore")
    # Not timed, and not through run(): the nbdkit daemon map leaves would be adopted by
    # this process and could be the child run() waits for.
    mapped = subprocess.run([*lvb, "--json", "map", backup_id], capture_output=True,
                            check=True)
    device = json.loads(mapped.stdout)["device"]
    try:
        warm(*[p for p in repo.rglob("*") if p.is_file()])
        dd = run(["dd", f"if={device}", "bs=1M", "status=none"], stdout="hash")
        dd.check("dd of the mapped device")
    finally:
        subprocess.run([*lvb, "unmap", device], check=True)

    rows = {"restore --to-file -": restore, f"dd of {device}": dd}
    result = {"size_bytes": size, "steps": {}}
    print(f"{'step':<24} {'wall s':>8} {'MiB/s':>8} {'cpu s':>8}  check")
    ok = True
    for name, r in rows.items():
        good = r.out_hash == expected and r.out_bytes == size
        ok &= good
        rate = size / MiB / r.wall
        print(f"{name:<24} {r.wall:8.2f} {rate:8.1f} {r.cpu:8.2f}  "
              f"{'ok' if good else '*** MISMATCH ***'}")
        result["steps"][name.split(" of ")[0]] = {"wall": r.wall, "mib_s": rate, "cpu": r.cpu,
                                                 "ok": good}
    ratio = restore.wall / dd.wall
    result["map_speed_vs_restore"] = ratio
    print(f"mapped device reads at {ratio:.2f}x the speed of restore --to-file -")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
