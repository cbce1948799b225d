#!/usr/bin/env python3
"""Where lvbackup's time goes: py-spy profiles of one full backup and one incremental.

    .venv/bin/python bench/profile.py [--size-gib 2] [--work DIR] [--out DIR] [--rate 100]

Uses the benchmark's test image and day of changes (bench/run.py), records each run with
`py-spy record --threads --native -f raw`, once more with `--gil --idle` (how long the GIL
is held) and once more with `--nonblocking` (Python lines only, nothing paused), keeps the
raw collapsed stacks in --out, and prints a per-thread summary: reader, workers, main
(coordinator), each split into cost categories. Needs py-spy in the
venv (`.venv/bin/pip install py-spy`).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    VENV_BIN,
    GiB,
    MiB,
    apply_changes,
    change_plan,
    ensure_image,
    lvbackup_cmd,
    remove,
    run,
    warm,
    write_lvbackup_config,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- summarising collapsed stacks ------------------------------------------------------

WAIT_LEAF = re.compile(r"pthread_cond_(timed)?wait|sem_(timed)?wait|PyThread_acquire_lock|"
                       r"futex|epoll_wait|\bselect\b|\bpoll\b|nanosleep|clock_nanosleep")
GIL = re.compile(r"PyEval_RestoreThread|take_gil|PyEval_AcquireThread|PyGILState_Ensure")
ANON = re.compile(r"^0x[0-9a-f]+ \((.*)\)$")
PYFRAME = re.compile(r"^(.*) \(([^()]*\.py):\d+\)$")

# (category, pattern over one frame); the frame nearest the leaf that matches decides.
RULES = [
    ("Python cyclic GC",
     re.compile(r"gc_collect_main|gc_collect_with_callback|collect_generations")),
    ("zstd decompress", re.compile(r"ZSTD_decompress|ZSTD_decode|HUF_decompress|FSE_decompress|"
                                   r"ZstdDecompressor|decompressor\.c|decompressobj")),
    ("zstd compress", re.compile(r"\(zstd\.c:|ZstdCompressor|compressor\.c|compressionwriter\.c")),
    ("BLAKE3", re.compile(r"blake3", re.I)),
    ("xxh3", re.compile(r"xxh|XXH", re.I)),
    ("read source (preadv)", re.compile(r"preadv|os_preadv")),
    ("pread (repository)", re.compile(r"\bpread64\b|os_pread\b")),
    ("posix_fadvise", re.compile(r"fadvise")),
    ("fsync", re.compile(r"fsync|fdatasync")),
    ("write/pwrite",
     re.compile(r"^(pwrite64|write|__write|os_write|os_pwrite|_io_FileIO_write)\b")),
    ("SQLite", re.compile(r"sqlite", re.I)),
]
WAKE_LEAF = re.compile(r"^(sem_post|pthread_cond_signal|pthread_cond_broadcast|"
                       r"pthread_mutex_unlock|syscall|futex_wake)\b")
COPY_LEAF = re.compile(r"^(realloc|malloc|free|memcpy|memmove|memset|memcmp|__memcpy|__memmove|"
                       r"__memset|__memcmp|_int_malloc|_int_realloc|_int_free|munmap|mmap)")


def categorize(frames: list[str]) -> tuple[str, bool]:
    """(category, is_wait) of one sample's stack (root first)."""
    if any("_find_and_load" in f or "_call_with_frames_removed" in f for f in frames):
        return "startup: imports", False
    tail = frames[-5:]
    if any(WAIT_LEAF.search(f) for f in tail):
        if any(GIL.search(f) for f in frames[-6:]):
            return "wait: GIL", True
        return "wait: idle (queue, lock, future)", True
    for f in reversed(frames):
        for name, pat in RULES:
            if pat.search(f):
                return name, False
        if PYFRAME.match(f):
            break
    if WAKE_LEAF.match(frames[-1]):
        return "thread hand-off (waking a waiter)", False
    pyf = next((PYFRAME.match(f) for f in reversed(frames) if PYFRAME.match(f)), None)
    where = f"{pyf.group(1)} ({pyf.group(2)})" if pyf else frames[-1]
    leaf = frames[-1]
    m = ANON.match(leaf)
    if (m and "libc" in m.group(1)) or COPY_LEAF.match(leaf):
        return f"memcpy/alloc (libc) in {where}", False
    if m or not PYFRAME.match(leaf):
        return f"native in {where}", False
    return f"Python: {where}", False


def thread_group(root: str) -> str:
    m = re.match(r"thread \((\w+)\)(?:: (.*))?", root)
    name = (m.group(2) or "") if m else root
    if name.startswith("lvbackup-worker"):
        return "workers"
    if name.startswith("lvbackup-reader"):
        return "reader"
    if name == "MainThread":
        return "main"
    return f"other ({name or 'unnamed'})"


def read_raw(path: Path) -> tuple[dict[str, str], list[tuple[str, list[str], int]]]:
    """A py-spy raw (collapsed) profile: thread names by thread id, and per line (thread id,
    frames, samples)."""
    names: dict[str, str] = {}
    rows = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        m = re.match(r"thread \((\w+)\)(?:: (.*))?", frames[0])
        if m and m.group(2):
            names[m.group(1)] = m.group(2)
        rows.append((m.group(1) if m else "", frames, int(n)))
    return names, rows


def parse_raw(path: Path):
    """Samples per (thread group, category); thread names are resolved by thread id."""
    names, rows = read_raw(path)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for tid, frames, n in rows:
        root = f"thread ({tid}): {names.get(tid, '')}" if tid else frames[0]
        frames = [f for f in frames[1:] if not re.match(r"thread \(", f)]
        group = thread_group(root)
        cat, _ = categorize(frames or [root])
        counts[group][cat] += n
    return counts


def summarize(counts, wall: float, rate: int, gil_samples: int | None, top: int = 8) -> str:
    ticks = wall * rate
    out = []
    busy_total = sum(n for c in counts.values() for k, n in c.items() if not k.startswith("wait:"))
    out.append(f"wall {wall:.2f} s under py-spy; busy samples = {busy_total / ticks:.2f} cores on "
               "average" + (f"; the GIL held {gil_samples / ticks * 100:.0f} % of the time"
                            if gil_samples is not None else ""))
    order = ["reader", "workers", "main"]
    groups = sorted(counts, key=lambda g: (order.index(g) if g in order else 9, g))
    for g in groups:
        c = counts[g]
        busy = sum(n for k, n in c.items() if not k.startswith("wait:"))
        gilw = c.get("wait: GIL", 0)
        idle = c.get("wait: idle (queue, lock, future)", 0)
        out.append(f"- {g}: busy {busy / ticks:.2f} cores-worth of the wall time, waiting for the "
                   f"GIL {gilw / ticks:.2f}, idle {idle / ticks:.2f}")
        for k, n in sorted(((k, n) for k, n in c.items() if not k.startswith("wait:")),
                           key=lambda kv: -kv[1])[:top]:
            out.append(f"    - {n / busy * 100:4.1f} %  {k}  ({n / rate:.2f} s)")
    return "\n".join(out)


def _source(file: str, line: int) -> str:
    import linecache
    import sysconfig
    roots = [Path(__file__).resolve().parents[1], Path(sysconfig.get_paths()["stdlib"]),
             Path(sysconfig.get_paths()["purelib"])]
    for root in roots:
        text = linecache.getline(str(root / file), line).strip()
        if text:
            return text
    return ""


def python_lines(path: Path, wall: float, rate: int, top: int = 6) -> str:
    """Per thread group, the Python lines most often on top of the stack (busy samples only:
    without --idle, py-spy leaves out threads that wait)."""
    names, rows = read_raw(path)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for tid, frames, n in rows:
        group = thread_group(f"thread ({tid}): {names.get(tid, '')}")
        if any("_find_and_load" in f for f in frames):
            counts[group]["startup: imports"] += n
            continue
        m = re.match(r"^(.*) \(([^()]*\.py):(\d+)\)$", frames[-1])
        key = (f"{m.group(2)}:{m.group(3)} {_source(m.group(2), int(m.group(3)))}" if m
               else frames[-1])
        counts[group][key] += n
    ticks = wall * rate
    out = []
    order = ["reader", "workers", "main"]
    for g in sorted(counts, key=lambda g: (order.index(g) if g in order else 9, g)):
        c = counts[g]
        busy = sum(c.values())
        out.append(f"- {g}: on CPU or in a system call {busy / ticks:.2f} cores-worth of the "
                   "wall time")
        for k, n in c.most_common(top):
            out.append(f"    - {n / ticks * 100:4.1f} % of wall  `{k}`  ({n / rate:.2f} s)")
    return "\n".join(out)


def total_samples(path: Path) -> int:
    return sum(int(line.rpartition(" ")[2]) for line in path.read_text().splitlines() if line)


# --- recording -------------------------------------------------------------------------

def pyspy() -> str:
    exe = VENV_BIN / "py-spy"
    found = str(exe) if exe.exists() else shutil.which("py-spy")
    if not found:
        sys.exit("py-spy not found: .venv/bin/pip install py-spy")
    return found


def record(out: Path, argv: list, rate: int, extra: list[str]) -> tuple[float, bool]:
    """Record argv; (wall seconds, whether --native worked)."""
    for native in (["--native"], []):
        cmd = [pyspy(), "record", "--threads", *native, *extra, "-r", str(rate), "-f", "raw",
               "-o", str(out), "--", *argv]
        t = time.perf_counter()
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode == 0 and out.exists() and out.stat().st_size:
            return wall, bool(native)
        log(f"py-spy {' '.join(native + extra)} failed: {r.stderr.strip()[-400:]}")
        if not native:
            raise RuntimeError("py-spy record failed")
    raise AssertionError


def record_plain(out: Path, argv: list, rate: int, extra: list[str]) -> float:
    cmd = [pyspy(), "record", "--threads", *extra, "-r", str(rate), "-f", "raw", "-o", str(out),
           "--", *argv]
    t = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"py-spy failed: {r.stderr.strip()[-400:]}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--work", default="/var/tmp/lvbackup-bench")
    ap.add_argument("--out", default=None, help="where the raw profiles go (default WORK/profile)")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--rate", type=int, default=100, help="samples per second (default 100)")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve() if args.out else work / "profile"
    out.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GiB) // MiB * MiB
    base = work / "base.img"
    ensure_image(base, size, args.seed, log)
    st = work / "profile-state"
    remove(st)
    st.mkdir()
    disk = st / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(base), str(disk)], check=True)
    lvb = lvbackup_cmd()
    cfg_a = write_lvbackup_config(st / "a")      # profiled with --native
    cfg_b = write_lvbackup_config(st / "b")      # profiled with --gil
    cfg_c = write_lvbackup_config(st / "c")      # profiled with --nonblocking, Python only
    for cfg in (cfg_a, cfg_b, cfg_c):
        run([lvb, "--config", cfg, "init"]).check("lvbackup init")

    report = []
    for phase, flags in (("full", []), ("incremental", ["--incremental"])):
        if phase == "incremental":
            apply_changes(disk, change_plan(size, args.seed))
        os.sync()
        warm(disk)
        raw = out / f"{phase}.raw.txt"
        wall, native = record(raw, [lvb, "--config", cfg_a, "--quiet", "create", "--device", disk,
                                    *flags], args.rate, [])
        os.sync()
        warm(disk)
        gil_raw = out / f"{phase}.gil.raw.txt"
        gil_wall, _ = record(gil_raw, [lvb, "--config", cfg_b, "--quiet", "create", "--device",
                                       disk, *flags], args.rate, ["--gil", "--idle"])
        os.sync()
        warm(disk)
        nb_raw = out / f"{phase}.nonblocking.raw.txt"
        nb_wall = record_plain(nb_raw, [lvb, "--config", cfg_c, "--quiet", "create", "--device",
                                        disk, *flags], args.rate, ["--nonblocking"])
        counts = parse_raw(raw)
        text = summarize(counts, wall, args.rate, None)
        gil_pct = total_samples(gil_raw) / (gil_wall * args.rate) * 100
        report.append(f"### {phase} backup ({size / GiB:g} GiB image"
                      f"{', native frames' if native else ''}, {args.rate} Hz)\n\n{text}\n"
                      f"- GIL (separate --gil run, {gil_wall:.2f} s): held {gil_pct:.0f} % of the "
                      "time\n"
                      f"- Python lines on top of the stack (separate `--nonblocking` run without "
                      f"native frames, which pauses nothing, {nb_wall:.2f} s):\n"
                      + "\n".join("  " + x for x in python_lines(nb_raw, nb_wall,
                                                                     args.rate).splitlines())
                      + "\n")
        log(f"{phase}: {raw}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("\n".join(report))
    remove(st)
    return 0


if __name__ == "__main__":
    sys.exit(main())
