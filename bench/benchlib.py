"""Shared pieces of the benchmark scripts: test data, timed child processes, sizes, peers.

Nothing here imports lvbackup: the benchmark drives the installed `lvbackup` command like
any user, so it measures the same process a user runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import xxhash

MiB = 1 << 20
GiB = 1 << 30
STRETCH = MiB                 # the image is built of 1 MiB stretches
CHANGE = 64 * 1024            # a "day of changes" is made of 64 KiB writes
CHANGE_SHARE = 0.01           # ... covering 1 % of the image
GENERATOR_VERSION = 1         # bump when the image or the changes would come out differently
SHARES = {"hole": 0.25, "text": 0.35, "random": 0.40}
VENV_BIN = Path(sys.executable).parent


# --- test data -------------------------------------------------------------------------

def text_pool(seed: int, size: int = 8 * MiB) -> bytes:
    """Text-like bytes: Zipf-distributed pseudo-words in lines, some numbers and punctuation."""
    rng = random.Random(seed ^ 0x7E47)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    lw = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0,
          2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07]
    vocab = ["".join(rng.choices(letters, lw, k=rng.randint(1, 11))) for _ in range(6000)]
    vocab += [str(rng.randint(0, 99999)) for _ in range(500)]
    vocab += ["the", "and", "of", "to", "a", "in", "is", "for", "on", "with", "as", "by"]
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    rng.shuffle(vocab)
    cum = list(_accumulate(weights))
    words = rng.choices(vocab, cum_weights=cum, k=size // 5)
    seps = rng.choices([" ", " ", " ", " ", " ", " ", ", ", ". ", "\n", ": ", "; ", " - "],
                       k=len(words))
    out = "".join(w + s for w, s in zip(words, seps, strict=True)).encode()
    while len(out) < size:
        out += out
    return out[:size]


def _accumulate(values):
    total = 0.0
    for v in values:
        total += v
        yield total


def stretch_kinds(size: int, seed: int) -> list[str]:
    """The kind of each 1 MiB stretch: exactly the SHARES (rounded), in a seeded order."""
    n = size // STRETCH
    holes = round(n * SHARES["hole"])
    text = round(n * SHARES["text"])
    kinds = ["hole"] * holes + ["text"] * text + ["random"] * (n - holes - text)
    random.Random(seed).shuffle(kinds)
    return kinds


def build_image(path: Path, size: int, seed: int) -> str:
    """Write the test image (sparse holes; text from a pool; random bytes); return its hash."""
    kinds = stretch_kinds(size, seed)
    pool = text_pool(seed)
    rng = random.Random(seed + 1)
    h = xxhash.xxh3_128()
    zero = bytes(STRETCH)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i, kind in enumerate(kinds):
            if kind == "hole":
                h.update(zero)
                continue
            if kind == "text":
                off = rng.randrange(len(pool) - STRETCH)
                data = pool[off:off + STRETCH]
            else:
                data = rng.randbytes(STRETCH)
            os.pwrite(fd, data, i * STRETCH)
            h.update(data)
    finally:
        os.close(fd)
    return h.hexdigest()


def change_plan(size: int, seed: int) -> list[tuple[int, bytes]]:
    """A day of changes: 1 % of the image in scattered, 64 KiB-aligned writes of new random data."""
    rng = random.Random(seed + 2)
    count = math.ceil(size * CHANGE_SHARE / CHANGE)
    slots = sorted(rng.sample(range(size // CHANGE), count))
    return [(s * CHANGE, rng.randbytes(CHANGE)) for s in slots]


def apply_changes(path: Path, plan: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, data in plan:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def ensure_image(path: Path, size: int, seed: int, log) -> str:
    """Build the pristine image, or reuse one built earlier with the same parameters."""
    meta_path = path.with_suffix(".json")
    want = {"generator": GENERATOR_VERSION, "size": size, "seed": seed}
    if path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if {k: meta.get(k) for k in want} == want and path.stat().st_size == size:
            t = time.perf_counter()
            if hash_file(path) == meta.get("xxh3_128"):
                log(f"reusing {path} ({time.perf_counter() - t:.1f} s to check its hash)")
                return meta["xxh3_128"]
    t = time.perf_counter()
    digest = build_image(path, size, seed)
    meta_path.write_text(json.dumps({**want, "xxh3_128": digest}) + "\n")
    log(f"built {path}: {size / GiB:.2f} GiB in {time.perf_counter() - t:.1f} s")
    return digest


# --- files -----------------------------------------------------------------------------

def hash_file(path: Path) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def warm(*paths: Path) -> None:
    """Read files (or every file under directories) once, so they sit in the page cache."""
    buf = bytearray(4 * MiB)
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else [Path(d) / f for d, _, fs in os.walk(p) for f in fs]
        for f in files:
            try:
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
            except OSError:
                pass


def tree_size(path: Path) -> tuple[int, int]:
    """(allocated bytes, du-style: st_blocks * 512; apparent bytes: sum of st_size)."""
    alloc = apparent = 0
    p = Path(path)
    if not p.exists():
        return 0, 0
    if p.is_file():
        st = p.stat()
        return st.st_blocks * 512, st.st_size
    for d, dirs, files in os.walk(p):
        for name in files + dirs:
            try:
                st = os.lstat(os.path.join(d, name))
            except FileNotFoundError:
                continue
            alloc += st.st_blocks * 512
            if name in files:
                apparent += st.st_size
    return alloc, apparent


def remove(path: Path) -> None:
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


# --- timed children --------------------------------------------------------------------

@dataclass
class Run:
    argv: list[str]
    rc: int = 0
    wall: float = 0.0
    user: float = 0.0
    sys: float = 0.0
    maxrss_kib: int = 0
    out_bytes: int = 0
    out_hash: str | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def check(self, what: str) -> Run:
        if self.rc != 0:
            raise RuntimeError(f"{what} failed (exit {self.rc}): {' '.join(self.argv)}\n"
                               f"{self.stderr.strip()[-2000:]}")
        return self


_subreaper = False


def _become_subreaper() -> None:
    """Adopt orphaned descendants (PR_SET_CHILD_SUBREAPER), so children can be started
    through `setsid -f`: see run()."""
    global _subreaper
    if not _subreaper:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(36, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        _subreaper = True


def _reap_orphans() -> None:
    """Reap zombies adopted earlier (e.g. from apt-get), so wait4(-1) finds only ours."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run(argv: list[str], *, env: dict | None = None, stdin: Path | None = None,
        stdout: str = "devnull", cwd: Path | None = None) -> Run:
    """Run argv and measure it: wall seconds, and the child's own rusage from wait4
    (user + sys CPU, ru_maxrss), which covers its waited-for descendants too.

    A forked child starts with its parent's resident set as its ru_maxrss, and this Python
    process is large, so the command is started by `setsid -f` (a ~1 MiB process that forks
    it and exits); this process, a child subreaper, adopts the command and waits for it.

    stdout: "devnull", "capture" (small text), or "hash" (a pipe this process drains,
    hashing every byte with xxh3-128: how a restore into a pipe is checked).
    """
    _become_subreaper()
    _reap_orphans()
    r = Run([str(a) for a in argv])
    want_pipe = stdout in ("capture", "hash")
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(tempfile.TemporaryFile())
        fin = (stack.enter_context(open(stdin, "rb")) if stdin is not None
               else subprocess.DEVNULL)
        try:
            t0 = time.perf_counter()
            p = subprocess.Popen(["setsid", "-f", *r.argv], stdin=fin,
                                 stdout=subprocess.PIPE if want_pipe else subprocess.DEVNULL,
                                 stderr=err, env=env, cwd=cwd, close_fds=True)
            _, status, _ = os.wait4(p.pid, 0)      # setsid itself: exits once it has forked
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode != 0:
                if p.stdout:
                    p.stdout.close()
                r.rc = p.returncode
                return r
            if want_pipe:
                fd = p.stdout.fileno()
                if stdout == "hash":
                    h = xxhash.xxh3_128()
                    buf = bytearray(MiB)
                    view = memoryview(buf)
                    while n := os.readv(fd, [buf]):
                        h.update(view[:n])
                        r.out_bytes += n
                    r.out_hash = h.hexdigest()
                else:
                    chunks = []
                    while data := os.read(fd, 1 << 16):
                        chunks.append(data)
                    raw = b"".join(chunks)
                    r.out_bytes = len(raw)
                    r.stdout = raw.decode(errors="replace")
                p.stdout.close()
            _, status, ru = os.wait4(-1, 0)        # the command, adopted
            r.wall = time.perf_counter() - t0
            r.rc = os.waitstatus_to_exitcode(status)
            r.user, r.sys, r.maxrss_kib = ru.ru_utime, ru.ru_stime, ru.ru_maxrss
        finally:
            err.seek(0)
            r.stderr = err.read().decode(errors="replace")
    return r


def sync() -> None:
    os.sync()


# --- peers -----------------------------------------------------------------------------

PEERS = {"zstd": "zstd", "restic": "restic", "borg": "borgbackup"}   # command: Debian package


def ensure_peers(install: bool, log) -> dict[str, str | None]:
    """Path of each peer command, installing the missing ones from Debian; None if missing."""
    missing = {cmd: pkg for cmd, pkg in PEERS.items() if not shutil.which(cmd)}
    if missing and install:
        if os.geteuid() != 0:
            log(f"not root: cannot install {', '.join(missing.values())}")
        else:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            log(f"installing {' '.join(missing.values())} from Debian ...")
            cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
            r = subprocess.run(cmd + list(missing.values()), env=env, capture_output=True,
                               text=True)
            if r.returncode != 0:
                log("apt-get install failed; running apt-get update and retrying one by one")
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                for pkg in missing.values():
                    r = subprocess.run(cmd + [pkg], env=env, capture_output=True, text=True)
                    if r.returncode != 0:
                        log(f"  could not install {pkg}: {r.stderr.strip()[-300:]}")
    return {cmd: shutil.which(cmd) for cmd in PEERS}


def version_of(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr).strip() else "?"


def _field(path: str, prefix: str, sep: str) -> str | None:
    """The value after `sep` on the first line of `path` that starts with `prefix`."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(sep, 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(work: Path) -> dict:
    cpu = _field("/proc/cpuinfo", "model name", ":") or "?"
    mem_kib = _field("/proc/meminfo", "MemTotal", ":")
    mem = f"{int(mem_kib.split()[0]) / MiB:.1f} GiB" if mem_kib else "?"
    distro = (_field("/etc/os-release", "PRETTY_NAME=", "=") or "?").strip('"')
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(work)],
                        capture_output=True, text=True)
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "distro": distro, "python": platform.python_version(),
            "work_dir": str(work), "work_fs": " ".join(fs.stdout.split()) or "?",
            "loadavg_at_start": list(os.getloadavg())}


def lvbackup_cmd() -> str:
    exe = VENV_BIN / "lvbackup"
    return str(exe) if exe.exists() else (shutil.which("lvbackup") or "lvbackup")


def write_lvbackup_config(dir_: Path, level: int | None = None, **extra) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    lines = [f"repository: {dir_ / 'repo'}", f"catalog: {dir_ / 'catalog.db'}",
             f"cache_dir: {dir_ / 'cache'}"]
    if level is not None:
        lines.append(f"compression_level: {level}")
    lines += [f"{k}: {v}" for k, v in extra.items()]
    cfg = dir_ / "lvbackup.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg
