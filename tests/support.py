"""Helpers shared by the test modules; conftest.py exposes them as fixtures.

(This is a module of its own, not conftest.py, because tests/lvm has a conftest.py too and
`import conftest` would be ambiguous.)

Everything here drives the *installed* `lvbackup` command as a subprocess, exactly as cron
and shell scripts do, with a per-test configuration file; images are built deterministically
from a seed, in 1 MiB stretches of random data, zeros (holes) and compressible text.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * 1024
BLOCK_SIZE = 64 * KiB          # the tests' repositories use `init --block-size 64K`

LVBACKUP = Path(sys.executable).parent / "lvbackup"

# docs/format.md, "Manifests": the JSON field names of a backup record, plus
# has_dependent_backups.
RECORD_FIELDS = ("id", "name", "description", "volume_id", "volume_name", "snapshot_id",
                 "snapshot_name", "parent_id", "is_incremental", "data_timestamp", "created_at",
                 "updated_at", "status", "fail_reason", "size", "block_size", "stored_bytes",
                 "num_dependent_backups", "labels", "protected", "change_source",
                 "change_fallback", "bytes_read", "source_snapshot_id", "source_snapshot_time",
                 "source_pool_id", "group_id", "group_name")
OUTPUT_FIELDS = RECORD_FIELDS + ("has_dependent_backups",)
STATUSES = ("creating", "available", "error", "restoring", "deleting", "deleted",
            "error_deleting")

# UTC with microseconds (docs/lineage.md, rule 9).
UTC_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(\+00:00|Z)$")

_SUMMARY = re.compile(r"reused ([\d.]+) (B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": 1024 * MiB, "TiB": 1024 * 1024 * MiB}


# --- images --------------------------------------------------------------------------------

def _text_stretch(rng: random.Random, n: int) -> bytes:
    """n bytes of compressible, non-repeating text."""
    words = ("backup", "volume", "snapshot", "chunk", "pack", "index", "manifest", "restore",
             "lvm", "thin", "origin", "catalog", "block", "hole", "zstd", "blake3")
    out = bytearray()
    line = 0
    while len(out) < n:
        out += (f"{line:07d} " + " ".join(rng.choice(words) for _ in range(8))
                + f" {rng.randrange(1 << 32):08x}\n").encode()
        line += 1
    return bytes(out[:n])


def image_bytes(mib: int, seed: int, tail: int = 0) -> bytes:
    """A deterministic image of `mib` MiB (+ `tail` bytes): 1 MiB stretches of random data,
    zeros and text. The first four stretches are random, text, zero, random, so every image
    of 4 MiB or more has each kind; later ones are drawn from the seed."""
    rng = random.Random(seed)
    order = ["random", "text", "zero", "random"]
    parts = []
    for i in range(mib):
        kind = order[i] if i < len(order) else rng.choice(order)
        if kind == "random":
            parts.append(rng.randbytes(MiB))
        elif kind == "text":
            parts.append(_text_stretch(rng, MiB))
        else:
            parts.append(bytes(MiB))
    if tail:
        parts.append(rng.randbytes(tail))
    return b"".join(parts)


def make_image(path: Path, mib: int, seed: int, tail: int = 0) -> bytes:
    """Write image_bytes(mib, seed, tail) to `path` and return the bytes."""
    data = image_bytes(mib, seed, tail)
    Path(path).write_bytes(data)
    return data


def apply_change(path: Path, seed: int, fraction: float = 0.01, length: int = 64 * KiB
                 ) -> bytes:
    """Overwrite about `fraction` of the file with scattered `length`-byte random writes
    (4 KiB aligned, so most touch two 64 KiB blocks). Returns the new content."""
    rng = random.Random(seed)
    data = bytearray(Path(path).read_bytes())
    count = max(1, round(len(data) * fraction / length))
    for _ in range(count):
        off = rng.randrange(0, (len(data) - length) // 4096) * 4096
        data[off:off + length] = rng.randbytes(length)
    Path(path).write_bytes(data)
    return bytes(data)


def zero_range(path: Path, offset: int, length: int) -> bytes:
    data = bytearray(Path(path).read_bytes())
    data[offset:offset + length] = bytes(length)
    Path(path).write_bytes(data)
    return bytes(data)


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1, f"{path} has no byte {offset}"
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


# --- an S3 repository on the test server (tests/s3server.py) ---------------------------------

def write_secret(path: Path, text: str) -> Path:
    """A passphrase or key file as lvbackup accepts one: its first line `text`, mode 0600."""
    path = Path(path)
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def s3_section(server: Any, secret: str | None = None) -> dict[str, str]:
    """The `s3:` section of a configuration for the test server."""
    from s3server import ACCESS_KEY, SECRET_KEY

    return {"endpoint_url": server.endpoint, "region": "us-east-1",
            "addressing_style": "path", "access_key_id": ACCESS_KEY,
            "secret_access_key": secret or SECRET_KEY}


def s3_settings(server: Any) -> Any:
    from lvbackup.config import S3Settings

    return S3Settings(**s3_section(server))


# --- running the command ------------------------------------------------------------------

# LVBACKUP_TEST_ENCRYPTED=1 runs the command-line suites on encrypted repositories: every
# Workdir's `init` adds --encryption and every command gets the passphrase.
ENCRYPTED = os.environ.get("LVBACKUP_TEST_ENCRYPTED") == "1"


def clean_env() -> dict[str, str]:
    """The environment without LVBACKUP_* overrides (config.py honours them), but with the
    passphrase when the suites run encrypted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LVBACKUP_")}
    if ENCRYPTED:
        env["LVBACKUP_PASSPHRASE"] = "encrypted test suite"
    return env


def write_config(path: Path, repository: Path, catalog: Path, **extra: Any) -> Path:
    # JSON-quoted strings are valid YAML scalars, whatever the path contains.
    lines = [f"repository: {json.dumps(str(repository))}",
             f"catalog: {json.dumps(str(catalog))}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def describe(p: subprocess.CompletedProcess) -> str:
    out, err = p.stdout, p.stderr
    if isinstance(out, bytes):
        out = out[:2000].decode(errors="replace")
    if isinstance(err, bytes):
        err = err.decode(errors="replace")
    return (f"{' '.join(map(str, p.args))}\nexit {p.returncode}\nstderr:\n{err}\n"
            f"stdout:\n{out[:4000]}")


def assert_one_line_error(p: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The failure contract: exit `code`, exactly one line on stderr (containing every
    fragment), never a traceback. Returns that line."""
    err = p.stderr.decode(errors="replace") if isinstance(p.stderr, bytes) else p.stderr
    out = p.stdout.decode(errors="replace") if isinstance(p.stdout, bytes) else p.stdout
    assert p.returncode == code, describe(p)
    assert "Traceback" not in err and "Traceback" not in out, describe(p)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr:\n{describe(p)}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# --- waiting for other processes ----------------------------------------------------------

def wait_until(predicate: Callable[[], Any], what: str, *procs: subprocess.Popen,
               timeout: float = 120.0) -> None:
    """Poll until `predicate()` holds: a deadline instead of a fixed sleep, so that a loaded
    machine only makes the test slower, never wrong. Fails naming `what` when `timeout`
    seconds pass first, or when one of `procs` ends before (with what it printed)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                text = err.decode(errors="replace") if isinstance(err, bytes) else err
                raise AssertionError(f"{proc.args} ended (exit {proc.returncode}) before "
                                     f"{what}:\n{text}")
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def lock_holders(path: Path) -> dict[int, str]:
    """{pid: 'READ' | 'WRITE'} of the flock locks the kernel lists for the file at `path`."""
    try:
        ino = path.stat().st_ino
    except FileNotFoundError:
        return {}
    out = {}
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and int(parts[5].rsplit(":", 1)[1]) == ino:
                out[int(parts[4])] = parts[3]
    return out


def holds_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has the file at `path` open (a run waiting for a lock keeps
    the lock file open while it retries)."""
    target = str(Path(path).resolve())
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, PermissionError):
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:
            continue   # closed meanwhile
    return False


def reused_bytes(stderr: str) -> int:
    """The 'reused' figure of create's summary line on stderr."""
    m = _SUMMARY.search(stderr)
    assert m, f"no 'reused ...' summary on stderr: {stderr!r}"
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def job_and_two_backups(root: Path, seed: int, **job: Any) -> tuple[Workdir, Path, str, str]:
    """A repository with a job `nightly` (`job` added to it) that backs up an image, and
    two backups of that image: (workdir, image, full id, incremental id)."""
    img = root / "disk.img"
    make_image(img, 3, seed=seed)
    wd = Workdir(root / "wd", jobs={"nightly": {"device": str(img), "incremental": True,
                                                **job}})
    wd.init("64K")
    full = wd.create(img)
    incr = wd.create(img, "--incremental")
    return wd, img, full["id"], incr["id"]


class Workdir:
    """A directory with a config file (repository and catalog inside it) and helpers that
    run `lvbackup --config <it> ...`. The cache (index cache, locks) is <dir>/cache."""

    def __init__(self, path: Path, repository: str | None = None,
                 s3: dict[str, str] | None = None, **extra: Any):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # A URL (s3://...) in place of the local directory (files() then sees nothing),
        # and the `s3:` section every config file of this workdir carries.
        self.repo: Any = repository or self.path / "repo"
        self.place: dict[str, Any] = {"s3": s3} if s3 else {}
        self.catalog = self.path / "catalog.db"
        self.cache = self.path / "cache"
        self.extra = extra
        self.config = self.config_with("lvbackup.yaml", **extra)

    def config_with(self, name: str, **extra: Any) -> Path:
        """Another config file for the same repository and catalog, with other settings."""
        return write_config(self.path / name, self.repo, self.catalog, **self.place, **extra)

    # running

    def run(self, *args: Any, config: Path | None = None, input: str | bytes | None = None,
            binary: bool = False, timeout: float = 300, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """`lvbackup --config <config> ARGS`; `env` adds variables (e.g. LVBACKUP_FAULT)."""
        argv = [str(LVBACKUP), "--config", str(config or self.config), *map(str, args)]
        return subprocess.run(argv, input=input, capture_output=True, text=not binary,
                              timeout=timeout, env={**clean_env(), **(env or {})})

    def run_json(self, *args: Any, **kw: Any) -> Any:
        """`lvbackup --json ARGS`: must exit 0 and print exactly one JSON document."""
        p = self.run("--json", *args, **kw)
        assert p.returncode == 0, describe(p)
        try:
            return json.loads(p.stdout)
        except ValueError:
            raise AssertionError(f"stdout is not one JSON document:\n{describe(p)}") from None

    def popen(self, *args: Any, config: Path | None = None) -> subprocess.Popen:
        argv = [str(LVBACKUP), "--config", str(config or self.config), *map(str, args)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=clean_env())

    def init(self, block_size: str | None = "64K") -> dict:
        return self.run_json("init", *(["--block-size", block_size] if block_size else []),
                             *(["--encryption"] if ENCRYPTED else []))

    def create(self, device: Path, *args: Any, config: Path | None = None) -> dict:
        rec = self.run_json("create", "--device", device, *args, config=config)
        assert rec["status"] == "available", rec
        return rec

    def show(self, backup_id: str) -> dict:
        return self.run_json("show", backup_id)

    def list(self, *args: Any) -> list[dict]:
        return self.run_json("list", *args)

    def restore_bytes(self, backup_id: str) -> bytes:
        """The image of a backup, streamed with `restore --to-file -`."""
        p = self.run("restore", backup_id, "--to-file", "-", binary=True)
        assert p.returncode == 0, describe(p)
        return p.stdout

    def verify(self, *args: Any) -> subprocess.CompletedProcess:
        return self.run("verify", *args)

    def assert_restores(self, backup_id: str, expected: bytes) -> None:
        """verify --deep of the backup passes and its restored image is bit-exact."""
        self.assert_intact({backup_id: expected}, backup_id)

    def assert_intact(self, expected: Mapping[str, bytes], *verify_args: Any,
                      env: dict[str, str] | None = None) -> None:
        """`verify --deep` passes (of every backup, or of those `verify_args` name), then
        each backup of `expected` ({id: image}) restores bit-exactly."""
        p = self.run("verify", "--deep", *verify_args, env=env)
        assert p.returncode == 0, describe(p)
        for backup_id, data in expected.items():
            p = self.run("restore", backup_id, "--to-file", "-", binary=True, env=env)
            assert p.returncode == 0, describe(p)
            assert len(p.stdout) == len(data), (backup_id, len(p.stdout), len(data))
            assert p.stdout == data, \
                f"restore of {backup_id} differs at byte {first_diff(p.stdout, data)}"

    # looking inside

    def files(self, sub: str) -> dict[str, int]:
        """{relative path: size} of the files under repo/<sub>."""
        base = self.repo / sub
        if not base.is_dir():
            return {}
        return {p.relative_to(self.repo).as_posix(): p.stat().st_size
                for p in base.rglob("*") if p.is_file()}

    def pack_bytes(self) -> int:
        return sum(self.files("packs").values())

    def catalog_rows(self) -> list[dict]:
        """The catalog's rows, read directly (a fresh read-only connection each time)."""
        db = sqlite3.connect(f"file:{self.catalog}?mode=ro", uri=True, timeout=30)
        try:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM backups ORDER BY created_at")]
        finally:
            db.close()

    def cache_db(self) -> Path:
        found = sorted(self.cache.glob("index-*.sqlite"))
        assert len(found) == 1, found
        return found[0]

    def clone(self, dest: Path) -> Workdir:
        """A copy of this workdir (repository, catalog, cache) with its own config file."""
        shutil.copytree(self.path, dest)
        return Workdir(dest, repository=None if isinstance(self.repo, Path) else self.repo,
                       **self.place, **self.extra)


def first_diff(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    n = min(len(a), len(b))
    step = 1 << 16
    for off in range(0, n, step):
        if a[off:off + step] != b[off:off + step]:
            for i in range(off, min(off + step, n)):
                if a[i] != b[i]:
                    return i
    return n


@dataclass
class Chain:
    """A repository holding full, incremental, incremental of one image, and one full
    backup of a second image."""

    wd: Workdir
    image: Path
    versions: list[bytes]      # the image's content at each backup
    ids: list[str]             # full, incr, incr
    records: list[dict]        # as `create --json` printed them
    other: Path
    other_data: bytes
    other_id: str
    zeroed: tuple[int, int]    # (offset, length) that the third version zeroed


def build_chain(base: Path) -> Chain:
    """Build a Chain under `base` (images in base/images, the workdir in base/wd)."""
    images = base / "images"
    images.mkdir(parents=True, exist_ok=True)
    wd = Workdir(base / "wd")
    wd.init("64K")
    img = images / "disk.img"
    # 6 MiB + an odd tail: the last block is short.
    v1 = make_image(img, 6, seed=11, tail=12345)
    r1 = wd.create(img)
    v2 = apply_change(img, seed=12)
    r2 = wd.create(img, "--incremental")
    apply_change(img, seed=13)
    # Zero a region that held random data in the earlier versions (stretch 0 is random).
    zeroed = (256 * KiB, 512 * KiB)
    v3 = zero_range(img, *zeroed)
    assert v2[zeroed[0]:sum(zeroed)].count(0) < zeroed[1] // 2
    r3 = wd.create(img, "--incremental")
    other = images / "other.img"
    od = make_image(other, 2, seed=21)
    ro = wd.create(other)
    return Chain(wd, img, [v1, v2, v3], [r1["id"], r2["id"], r3["id"]], [r1, r2, r3],
                 other, od, ro["id"], zeroed)
