#!/usr/bin/env python3
"""The index cache built cold: CPU per chunk of a first sync, at 10^4 .. 10^6 entries.

    .venv/bin/python bench/coldcache.py [--sizes 10000,100000,1000000] [--work DIR]

Writes index files of N synthetic entries (random chunk ids, packs of 4,096 chunks, files
of 65,536 entries, as gc writes them) into a repository in memory, then times one sync
into an empty cache, each size in a child process of its own so that its peak RSS is its
own. Prints the CPU seconds (user + system) of the sync, the CPU per chunk relative to the
smallest size, and the child's peak RSS. Issue 25's target: per chunk within 1.2x from
10^4 to 10^6, and 10^6 chunks in under 3 CPU s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK_CHUNKS = 4096
FILE_ENTRIES = 65536


def child(n: int, work: Path) -> dict:
    from lvbackup.repository.backends import MemoryBackend
    from lvbackup.repository.codec import PLAIN
    from lvbackup.repository.index import ChunkIndex, encode_index
    from lvbackup.repository.pack import ChunkRef

    storage = MemoryBackend(f"coldcache-{os.getpid()}")
    rand = os.urandom
    groups: list[tuple[bytes, list[ChunkRef]]] = []
    in_file = 0
    for start in range(0, n, PACK_CHUNKS):
        pack = rand(32)
        count = min(PACK_CHUNKS, n - start)
        groups.append((pack, [ChunkRef(rand(32), pack, 8 + 4096 * i, 4096, 4096, 0)
                              for i in range(count)]))
        in_file += count
        if in_file >= FILE_ENTRIES or start + count >= n:
            name, data = encode_index(groups, PLAIN)
            storage.put(name, data)
            groups, in_file = [], 0
    cache = ChunkIndex(work / f"index-{n}.sqlite")
    cpu, wall = time.process_time(), time.perf_counter()
    problems = cache.sync(storage, PLAIN)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert not problems and cache.count_chunks() == n, (problems, cache.count_chunks())
    cache.close()
    size = (work / f"index-{n}.sqlite").stat().st_size
    return {"n": n, "cpu": cpu, "wall": wall, "cache_bytes": size,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--work", type=Path, default=None, help="where the caches go (default: a "
                    "temporary directory on /var/tmp)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.work)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.work or "/var/tmp") as tmp:
        rows = []
        for n in (int(s) for s in args.sizes.split(",")):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--work", tmp],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out))
            for f in Path(tmp).iterdir():
                f.unlink()
    base = rows[0]["cpu"] / rows[0]["n"]
    print(f"{'chunks':>9} {'CPU s':>7} {'wall s':>7} {'us/chunk':>9} {'ratio':>6} "
          f"{'RSS MiB':>8} {'cache MiB':>9}")
    for r in rows:
        per = r["cpu"] / r["n"]
        print(f"{r['n']:>9} {r['cpu']:>7.2f} {r['wall']:>7.2f} {per * 1e6:>9.2f} "
              f"{per / base:>6.2f} {r['rss_mib']:>8.0f} {r['cache_bytes'] / 2**20:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
