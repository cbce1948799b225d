#!/usr/bin/env python3
"""What S3 Object Lock (`s3.object_lock`) costs: requests and time of a backup, an
incremental and a gc into a locked repository against an unlocked one in the same
SeaweedFS server, and of the lock upkeep of a repository of N objects (extension of every
lock due, a pass with none due, the release pass of gc over N deleted objects still held).

    .venv/bin/python bench/objectlock.py [--size-mib 256] [--objects 10000] [--json out.json]

The command-line steps run the installed lvbackup through a wrapper that counts the S3
requests botocore makes, by operation; the upkeep steps call the S3 backend directly.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
from s3server import ACCESS_KEY, SECRET_KEY, SeaweedServer  # noqa: E402

from lvbackup.config import ObjectLock, S3Settings  # noqa: E402
from lvbackup.repository.backends.s3 import S3Backend  # noqa: E402

MiB = 1024 * 1024

# Runs lvbackup's main() with every botocore API call counted; the counts go to $COUNTS.
_COUNTING = """
import atexit, collections, json, os, sys
import botocore.client
counts = collections.Counter()
call = botocore.client.BaseClient._make_api_call
def counted(self, name, params):
    counts[name] += 1
    return call(self, name, params)
botocore.client.BaseClient._make_api_call = counted
atexit.register(lambda: open(os.environ["COUNTS"], "w").write(json.dumps(counts)))
sys.argv = ["lvbackup", *sys.argv[1:]]
from lvbackup.cli import main
main()
"""


def settings(server: SeaweedServer, lock: ObjectLock | None = None) -> S3Settings:
    return S3Settings(endpoint_url=server.endpoint, region="us-east-1",
                      addressing_style="path", access_key_id=ACCESS_KEY,
                      secret_access_key=SECRET_KEY, object_lock=lock)


def config(dir_: Path, server: SeaweedServer, bucket: str, lock: dict | None) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    s3 = {"endpoint_url": server.endpoint, "region": "us-east-1", "addressing_style": "path",
          "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY}
    if lock:
        s3["object_lock"] = lock
    cfg = dir_ / "lvbackup.yaml"
    cfg.write_text(json.dumps({"repository": f"s3://{bucket}/{uuid.uuid4().hex[:8]}",
                               "catalog": str(dir_ / "catalog.db"),
                               "cache_dir": str(dir_ / "cache"), "gc_grace_period": 0,
                               "s3": s3}))
    return cfg


def cli(cfg: Path, *args: str) -> tuple[float, dict[str, int]]:
    counts = cfg.parent / "counts.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _COUNTING, "--config", str(cfg), *args],
                   check=True, stdout=subprocess.DEVNULL,
                   env={"COUNTS": str(counts), "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - start, json.loads(counts.read_text())


class Counted:
    """Count a backend's requests by operation."""

    def __init__(self, backend: S3Backend):
        self.counts: Counter[str] = Counter()
        backend._client.meta.events.register(
            "before-call.s3.*", lambda model, **_: self.counts.update([model.name]))

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out


def backup_steps(server: SeaweedServer, work: Path, size: int) -> dict:
    image = work / "disk.img"
    rng = random.Random(1)
    image.write_bytes(rng.randbytes(size))
    plain_bucket, locked_bucket = server.new_bucket(), server.new_bucket(locked=True)
    out = {}
    for label, bucket, lock in (("unlocked", plain_bucket, None),
                                ("locked", locked_bucket, {"mode": "compliance", "days": 30})):
        cfg = config(work / label, server, bucket, lock)
        cli(cfg, "init")
        steps = {}
        with image.open("r+b") as f:
            steps["full backup"] = cli(cfg, "create", "--device", str(image))
            for _ in range(size // MiB // 100 + 1):       # 1 %: 64 KiB writes
                f.seek(rng.randrange(0, size // 65536) * 65536)
                f.write(rng.randbytes(65536))
        steps["incremental"] = cli(cfg, "create", "--device", str(image), "--incremental")
        steps["gc"] = cli(cfg, "gc")
        out[label] = {k: {"seconds": round(t, 2), "requests": sum(c.values()), "by_op": c}
                      for k, (t, c) in steps.items()}
    return out


def upkeep_steps(server: SeaweedServer, objects: int) -> dict:
    bucket = server.new_bucket(locked=True)
    return {mode: upkeep(server, bucket, mode, objects) for mode in ("compliance", "governance")}


def upkeep(server: SeaweedServer, bucket: str, mode: str, objects: int) -> dict:
    prefix = f"{mode}-{uuid.uuid4().hex[:6]}"
    backend = S3Backend(bucket, prefix + "/", settings(server, ObjectLock(mode, 1)))
    counted = Counted(backend)
    names = [f"packs/{i % 256:02x}/{uuid.uuid4().hex}" for i in range(objects)]
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: backend.put(n, b"x" * 1024), names))
    step = {"put (8 threads)": (time.perf_counter() - start, counted.take())}
    start = time.perf_counter()
    backend.extend_locks()
    step["extension pass, none due"] = (time.perf_counter() - start, counted.take())
    if mode == "governance":
        # As if written long ago: every lock ends within days/2 (setup, not timed).
        client = server.client()
        soon = datetime.now(UTC) + timedelta(hours=1)

        def shorten(name: str) -> None:
            client.put_object_retention(
                Bucket=bucket, Key=f"{prefix}/{name}",
                Retention={"Mode": "GOVERNANCE", "RetainUntilDate": soon},
                BypassGovernanceRetention=True)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(shorten, names))
        start = time.perf_counter()
        extended = backend.extend_locks()
        assert extended == objects, extended
        step["extension of every lock"] = (time.perf_counter() - start, counted.take())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(backend.delete, names))
    counted.take()
    start = time.perf_counter()
    held = backend.release_expired()
    assert held.objects == objects, held
    step["gc release pass, all held"] = (time.perf_counter() - start, counted.take())
    backend.close()
    return {k: {"seconds": round(t, 2), "requests": sum(c.values()), "by_op": c}
            for k, (t, c) in step.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--objects", type=int, default=10000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lvb-objlock-") as tmp:
        work = Path(tmp)
        server = SeaweedServer(work / "seaweedfs").start()
        try:
            result = {"backup": backup_steps(server, work, args.size_mib * MiB),
                      "upkeep": upkeep_steps(server, args.objects),
                      "size_mib": args.size_mib, "objects": args.objects}
        finally:
            server.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
