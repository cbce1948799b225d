#!/usr/bin/env python3
"""A repository in S3 (a local SeaweedFS server) against one in a local directory, side by
side in one run: full backup, incremental, restore into a pipe.

    .venv/bin/python bench/s3.py [--size-gib 1] [--work DIR] [--json out.json] [--strict]

Starts `weed mini` (tests/s3server.py: loopback, free ports, a temporary data directory)
with its data in WORK, builds the benchmark image (bench/benchlib.py), and times each step
for both repositories on the same bytes. Targets: a backup to S3 at least half as fast as
to a local directory, a restore from S3 at least half as fast as from a local one. Every
restore is hashed and compared with the image. Exit 1 on a failed step or mismatch, 3 with
--strict when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from s3server import ACCESS_KEY, SECRET_KEY, SeaweedServer  # noqa: E402

from benchlib import (  # noqa: E402
    GiB,
    MiB,
    apply_changes,
    change_plan,
    ensure_image,
    hash_file,
    lvbackup_cmd,
    machine_info,
    remove,
    run,
    sync,
    warm,
)

TARGETS = {"full backup": 0.5, "incremental": 0.5, "restore to pipe": 0.5}
CEILING_OBJECTS = 16          # of 16 MiB, put and got by CEILING_THREADS threads
CEILING_THREADS = 2           # as many as the S3 backend keeps in flight


def server_ceiling(server: SeaweedServer, bucket: str) -> dict[str, float]:
    """MB/s of plain boto3 PUTs and GETs of pack-sized objects: what the server (sharing
    this machine's CPUs) takes and gives at best, whoever the client; and the server's own
    CPU seconds per GB of each."""
    client = server.client()
    body = random.Random(7).randbytes(16 * MiB)
    names = [f"ceiling/{i}" for i in range(CEILING_OBJECTS)]
    gb = len(names) * len(body) / 1e9
    out = {}
    with ThreadPoolExecutor(CEILING_THREADS) as pool:
        for what, request in (
                ("put", lambda n: client.put_object(Bucket=bucket, Key=n, Body=body)),
                ("get", lambda n: client.get_object(Bucket=bucket, Key=n)["Body"].read())):
            cpu, t = server.cpu_seconds(), time.perf_counter()
            list(pool.map(request, names))
            out[f"{what}_mb_per_s"] = round(gb * 1e3 / (time.perf_counter() - t), 1)
            out[f"{what}_server_cpu_s_per_gb"] = round((server.cpu_seconds() - cpu) / gb, 2)
    for n in names:
        client.delete_object(Bucket=bucket, Key=n)
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_config(dir_: Path, repository: str, s3: dict | None) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    doc = {"repository": repository, "catalog": str(dir_ / "catalog.db"),
           "cache_dir": str(dir_ / "cache"), "gc_grace_period": 0}
    if s3:
        doc["s3"] = s3
    cfg = dir_ / "lvbackup.yaml"
    cfg.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in doc.items()))
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lvb-bench-s3")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GiB)
    base = work / "base.img"
    base_hash = ensure_image(base, size, seed=1, log=log)
    disk = work / "disk.img"
    lvb = lvbackup_cmd()
    server = SeaweedServer(work / f"seaweedfs-{uuid.uuid4().hex[:6]}").start()
    rows: list[dict] = []
    ceiling: dict[str, float] = {}
    failed = False
    try:
        bucket = server.new_bucket()
        ceiling = server_ceiling(server, bucket)
        log(f"server ceiling: PUT {ceiling['put_mb_per_s']} MB/s, GET "
            f"{ceiling['get_mb_per_s']} MB/s (16 MiB objects, {CEILING_THREADS} threads); "
            f"server CPU per GB: PUT {ceiling['put_server_cpu_s_per_gb']} s, GET "
            f"{ceiling['get_server_cpu_s_per_gb']} s")
        s3 = {"endpoint_url": server.endpoint, "region": "us-east-1",
              "addressing_style": "path", "access_key_id": ACCESS_KEY,
              "secret_access_key": SECRET_KEY}
        configs = {"local": write_config(work / "local", str(work / "local" / "repo"), None),
                   "s3": write_config(work / "s3", f"s3://{bucket}/bench", s3)}
        for where in ("local", "s3"):
            for sub in ("repo", "catalog.db", "catalog.db-wal", "catalog.db-shm", "cache"):
                remove(work / where / sub)
        subprocess.run(["cp", "--sparse=always", str(base), str(disk)], check=True)
        plan = change_plan(size, seed=1)
        for where, cfg in configs.items():
            run([lvb, "--config", cfg, "init"]).check(f"{where} init")
        ids: dict[str, dict[str, str]] = {w: {} for w in configs}
        for step in ("full backup", "incremental", "restore to pipe"):
            if step == "incremental":
                apply_changes(disk, plan)
            expect = hash_file(disk) if step == "restore to pipe" else None
            for where, cfg in configs.items():
                sync()
                warm(disk)
                server_cpu = server.cpu_seconds()
                if step == "restore to pipe":
                    argv = [lvb, "--config", cfg, "restore", ids[where]["incremental"],
                            "--to-file", "-"]
                    r = run(argv, stdout="hash")
                else:
                    argv = [lvb, "--config", cfg, "--json", "create", "--device", disk,
                            *(["--incremental"] if step == "incremental" else [])]
                    r = run(argv, stdout="capture")
                status = "ok" if r.rc == 0 else f"FAILED (exit {r.rc})"
                stored = None
                if r.rc == 0 and step != "restore to pipe":
                    rec = json.loads(r.stdout)
                    ids[where][step] = rec["id"]
                    stored = rec["stored_bytes"]
                if expect is not None and r.rc == 0 and r.out_hash != expect:
                    status = "MISMATCH"
                failed |= status != "ok"
                if status != "ok":
                    log(f"{where} {step}: {status}: {r.stderr.strip()[-500:]}")
                rows.append({"step": step, "repository": where, "status": status,
                             "wall_s": round(r.wall, 3), "cpu_s": round(r.cpu, 3),
                             # The server runs on the same CPUs: its share of the step.
                             "server_cpu_s": round(server.cpu_seconds() - server_cpu, 3),
                             "peak_rss_mib": round(r.maxrss_kib / 1024, 1),
                             "mb_per_s": round(size / r.wall / 1e6, 1) if r.wall else None,
                             "stored_bytes": stored,
                             "stored_mb_per_s": (round(stored / r.wall / 1e6, 1)
                                                 if stored and r.wall else None)})
                log(f"{where:5} {step:16} {r.wall:7.2f} s  {status}")
    finally:
        server.stop()
        remove(server.root)
    print(f"{'step':18} {'local s':>8} {'S3 s':>8} {'local MB/s':>11} {'S3 MB/s':>9} "
          f"{'S3/local speed':>15} {'target':>7}")
    missed = []
    for step, target in TARGETS.items():
        local, s3row = (next(r for r in rows if r["step"] == step and r["repository"] == w)
                        for w in ("local", "s3"))
        ratio = local["wall_s"] / s3row["wall_s"] if s3row["wall_s"] else 0.0
        ok = ratio >= target
        if not ok:
            missed.append(step)
        print(f"{step:18} {local['wall_s']:8.2f} {s3row['wall_s']:8.2f} "
              f"{local['mb_per_s']:11.1f} {s3row['mb_per_s']:9.1f} {ratio:15.2f} "
              f">={target:<5} {'ok' if ok else 'MISSED'}")
    cpus = os.cpu_count() or 1
    for row in rows:
        if row["repository"] != "s3":
            continue
        # The least time the step could take if every CPU second, lvbackup's and the
        # server's, ran in parallel on this machine's CPUs.
        floor = (row["cpu_s"] + row["server_cpu_s"]) / cpus
        print(f"{row['step']} to S3: lvbackup {row['cpu_s']:.2f} CPU s + server "
              f"{row['server_cpu_s']:.2f} CPU s = {floor:.2f} s on {cpus} CPUs at best"
              + (f"; stored {row['stored_mb_per_s']} MB/s (server ceiling "
                 f"{ceiling['put_mb_per_s']} MB/s)" if row["stored_mb_per_s"] else ""))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(work), "size": size,
                                         "server_ceiling": ceiling,
                                         "image_hash": base_hash, "rows": rows,
                                         "missed": missed}, indent=2) + "\n")
    if failed:
        return 1
    return 3 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
