#!/usr/bin/env python3
"""How each step's time grows with the image: two `bench/run.py --json` results compared.

    .venv/bin/python bench/run.py --json small.json                      # 2 GiB
    .venv/bin/python bench/run.py --size-gib 8 --work /var/tmp/lvbackup-bench8 --json large.json
    .venv/bin/python bench/scaling.py small.json large.json

Prints, per step and tool, the wall seconds of both runs and their ratio. The target
(issue 7): for every lvbackup step, at most 1.1x the ratio of the image sizes (4.4x for
2 GiB -> 8 GiB). Exits 1 when an lvbackup step misses it or is absent from either run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SLACK = 1.1   # 8 GiB may take 4.4x, not just 4x, the time of 2 GiB


def load(path: Path) -> tuple[int, dict[tuple[str, str], dict]]:
    doc = json.loads(path.read_text())
    rows = {(r["step"], r["tool"]): r for r in doc["rows"]}
    size = next(r["source_bytes"] for r in doc["rows"] if r.get("source_bytes"))
    return size, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("small", type=Path)
    ap.add_argument("large", type=Path)
    args = ap.parse_args(argv)
    small_size, small = load(args.small)
    large_size, large = load(args.large)
    limit = large_size / small_size * SLACK
    print(f"image {small_size / 2**30:g} GiB -> {large_size / 2**30:g} GiB; "
          f"lvbackup target: every step <= {limit:.2f}x")
    print(f"{'step':16} {'tool':16} {'small s':>8} {'large s':>8} {'ratio':>6}  verdict")
    ok = True
    for key, a in small.items():
        if key[0] == "init":
            continue
        b = large.get(key)
        mine = key[1].startswith("lvbackup")
        if not b or a["status"] != "ok" or b["status"] != "ok" or not a["wall_s"]:
            print(f"{key[0]:16} {key[1]:16} {'-':>8} {'-':>8} {'-':>6}  "
                  f"{'MISSING' if mine else 'n/a'}")
            ok = ok and not mine
            continue
        ratio = b["wall_s"] / a["wall_s"]
        verdict = ("met" if ratio <= limit else "MISSED") if mine else ""
        ok = ok and verdict != "MISSED"
        print(f"{key[0]:16} {key[1]:16} {a['wall_s']:8.2f} {b['wall_s']:8.2f} {ratio:5.2f}x  "
              f"{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
