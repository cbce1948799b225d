#!/usr/bin/env python3
"""lvbackup against zstd, borg and restic, side by side, on the same data in one run.

    .venv/bin/python bench/run.py [--size-gib 2] [--json out.json] [--work DIR]
    .venv/bin/python bench/run.py --encryption [--repeat 3]   # encrypted vs unencrypted

Builds a deterministic test image and a deterministic day of changes, installs the peers
it lacks from Debian, then times every step (full backup, incremental, restore into a pipe,
restore to a file) for every tool, and prints one table. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    CHANGE,
    GiB,
    MiB,
    apply_changes,
    change_plan,
    ensure_image,
    ensure_peers,
    hash_file,
    lvbackup_cmd,
    machine_info,
    remove,
    run,
    sync,
    tree_size,
    version_of,
    warm,
    write_lvbackup_config,
)

LVB = "lvbackup"
LVB3 = "lvbackup zstd-3"
LVBE = "lvbackup encrypted"
# The same with a key file instead of a passphrase: no scrypt when the repository is
# opened, which is the whole of an encrypted incremental's extra cost (docs/performance.md).
LVBK = "lvbackup encrypted, key file"



@dataclass
class Row:
    step: str
    tool: str
    status: str = "ok"          # ok | FAILED | MISMATCH | missing
    wall_s: float | None = None
    cpu_s: float | None = None
    user_s: float | None = None
    sys_s: float | None = None
    peak_rss_mib: float | None = None
    repo_growth_mib: float | None = None           # du-style allocated bytes
    repo_growth_apparent_mib: float | None = None  # sum of file sizes
    source_bytes: int = 0
    load1: float | None = None
    command: str = ""
    note: str = ""
    wall_samples: list | None = None

    @property
    def mbps(self) -> float | None:
        return self.source_bytes / self.wall_s / 1e6 if self.wall_s and self.source_bytes else None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args, work: Path, peers: dict, size: int, base: Path, base_hash: str):
        self.args = args
        self.work = work
        self.peers = peers
        self.size = size
        self.base = base
        self.base_hash = base_hash
        self.rows: list[Row] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("LVBACKUP_", "BORG_",
                                                                              "RESTIC_"))}

    # one timed step ------------------------------------------------------------------

    def step(self, step: str, tool: str, argv: list, *, env=None, stdin=None, stdout="devnull",
             warm_paths=(), repo: Path | None = None, expect: str | None = None,
             out_file: Path | None = None) -> tuple[Row, object]:
        sync()                       # earlier steps' dirty pages are not this step's cost
        warm(*warm_paths)            # inputs in page cache, as `cat IMG > /dev/null` would
        before = tree_size(repo) if repo is not None else (0, 0)
        row = Row(step, tool, source_bytes=self.size, load1=round(os.getloadavg()[0], 2),
                  command=" ".join(str(a) for a in argv) + (f" < {stdin}" if stdin else "")
                  + (" | (hash)" if stdout == "hash" else ""))
        log(f"{step:16} {tool:16} ...")
        r = run(argv, env=env or self.env, stdin=stdin, stdout=stdout)
        row.wall_s, row.user_s, row.sys_s = r.wall, r.user, r.sys
        row.cpu_s = r.cpu
        row.peak_rss_mib = r.maxrss_kib / 1024
        if repo is not None:
            after = tree_size(repo)
            row.repo_growth_mib = (after[0] - before[0]) / MiB
            row.repo_growth_apparent_mib = (after[1] - before[1]) / MiB
        if r.rc != 0:
            row.status = "FAILED"
            row.note = f"exit {r.rc}: " + " ".join(r.stderr.strip().splitlines()[-3:])[-300:]
        elif expect is not None:
            got = r.out_hash if out_file is None else hash_file(out_file)
            if stdout == "hash" and r.out_bytes != self.size:
                row.status, row.note = "MISMATCH", f"got {r.out_bytes} bytes, want {self.size}"
            elif got != expect:
                row.status, row.note = "MISMATCH", f"xxh3-128 {got} != image's {expect}"
            else:
                row.note = "bit for bit"
        if out_file is not None:
            remove(out_file)
        log(f"{'':16} {'':16} {row.wall_s:7.2f} s  cpu {row.cpu_s:6.2f} s  "
            f"rss {row.peak_rss_mib:6.1f} MiB  {row.status} {row.note}")
        self.rows.append(row)
        return row, r

    def missing(self, step: str, tool: str, why: str = "not installed") -> None:
        self.rows.append(Row(step, tool, status="missing", note=why, source_bytes=self.size))

    # one round: every tool, every step ---------------------------------------------

    def round(self) -> list[Row]:
        self.rows = []
        w = self.work / "round"
        remove(w)
        w.mkdir(parents=True)
        disk = self.work / "disk.img"          # the "volume": one path, changed in place
        out = w / "out"
        out.mkdir()
        remove(disk)
        subprocess.run(["cp", "--sparse=always", str(self.base), str(disk)], check=True)
        lvb = lvbackup_cmd()
        cfg1 = write_lvbackup_config(w / "lvb")
        cfg3 = write_lvbackup_config(w / "lvb3", level=3)
        zstd, borg, restic = self.peers["zstd"], self.peers["borg"], self.peers["restic"]
        z1, z3 = w / "zstd" / "disk.img.1.zst", w / "zstd" / "disk.img.3.zst"
        z1.parent.mkdir()
        borg_repo = w / "borg" / "repo"
        borg_env = {**self.env, "BORG_BASE_DIR": str(w / "borg" / "home"),
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        restic_repo = w / "restic" / "repo"
        restic_env = {**self.env, "RESTIC_REPOSITORY": str(restic_repo),
                      "RESTIC_CACHE_DIR": str(w / "restic" / "cache")}
        restic_pw: list[str] = []
        if restic:
            if "insecure-no-password" in version_of_help([restic, "--help"]):
                restic_pw = ["--insecure-no-password"]
            else:
                restic_env["RESTIC_PASSWORD"] = "lvbackup-bench"

        # init ---------------------------------------------------------------------------
        self.step("init", LVB, [lvb, "--config", cfg1, "--json", "init"], repo=w / "lvb" / "repo")
        run([lvb, "--config", cfg3, "init"], env=self.env)   # a failure shows at its full backup
        if borg:
            borg_repo.parent.mkdir()
            self.step("init", "borg", [borg, "init", "-e", "none", borg_repo], env=borg_env,
                      repo=borg_repo)
        else:
            self.missing("init", "borg")
        if restic:
            self.step("init", "restic", [restic, *restic_pw, "init"], env=restic_env,
                      repo=restic_repo)
        else:
            self.missing("init", "restic")

        # full backup --------------------------------------------------------------------
        ids = {}
        create = [lvb, "--config", cfg1, "--json", "--quiet", "create", "--device", disk]
        row, r = self.step("full backup", LVB, create,
                           stdout="capture", warm_paths=[disk], repo=w / "lvb" / "repo")
        ids["full"] = record_id(row, r)
        self.step("full backup", LVB3, [lvb, "--config", cfg3, "--json", "--quiet", "create",
                                        "--device", disk],
                  stdout="capture", warm_paths=[disk], repo=w / "lvb3" / "repo")
        if zstd:
            self.step("full backup", "zstd -1 -T0", [zstd, "-T0", "-1", "-q", "-f", disk, "-o", z1],
                      warm_paths=[disk], repo=z1)
            self.step("full backup", "zstd -3 -T0", [zstd, "-T0", "-3", "-q", "-f", disk, "-o", z3],
                      warm_paths=[disk], repo=z3)
        else:
            self.missing("full backup", "zstd -1 -T0")
            self.missing("full backup", "zstd -3 -T0")
        borg_create = [borg, "create", "--read-special", "--chunker-params", "fixed,4194304",
                       "--compression", "zstd,3", "--files-cache=disabled"]
        if borg:
            self.step("full backup", "borg", borg_create + [f"{borg_repo}::full", disk],
                      env=borg_env, warm_paths=[disk], repo=borg_repo)
        else:
            self.missing("full backup", "borg")
        restic_backup = [restic, *restic_pw, "backup", "-q", "--stdin", "--stdin-filename", "img"]
        if restic:
            self.step("full backup", "restic", restic_backup, env=restic_env, stdin=disk,
                      warm_paths=[disk], repo=restic_repo)
        else:
            self.missing("full backup", "restic")

        # a day of changes, in place (the volume id is derived from the path) -------------
        apply_changes(disk, self.plan)
        changed_hash = hash_file(disk)

        # incremental --------------------------------------------------------------------
        row, r = self.step("incremental", LVB, [*create, "--incremental"],
                           stdout="capture", warm_paths=[disk], repo=w / "lvb" / "repo")
        if record_id(row, r):
            rec = json.loads(r.stdout)
            ids["incr"] = rec["id"]
            if not rec.get("is_incremental") or rec.get("parent_id") != ids.get("full"):
                row.status = "FAILED"
                row.note = f"not an incremental of the full backup: {rec.get('parent_id')}"
        if borg:
            self.step("incremental", "borg", borg_create + [f"{borg_repo}::incr", disk],
                      env=borg_env, warm_paths=[disk], repo=borg_repo)
        else:
            self.missing("incremental", "borg")
        if restic:
            self.step("incremental", "restic", restic_backup, env=restic_env, stdin=disk,
                      warm_paths=[disk], repo=restic_repo)
        else:
            self.missing("incremental", "restic")

        # restore into a pipe (every stream hashed and compared) -------------------------
        incr = ids.get("incr")
        if incr:
            self.step("restore to pipe", LVB, [lvb, "--config", cfg1, "--quiet", "restore", incr,
                                               "--to-file", "-"],
                      stdout="hash", warm_paths=[w / "lvb"], expect=changed_hash)
        else:
            self.missing("restore to pipe", LVB, "no incremental backup to restore")
        if zstd:
            self.step("restore to pipe", "zstd -d -c", [zstd, "-d", "-c", "-q", z1], stdout="hash",
                      warm_paths=[z1], expect=self.base_hash)
        else:
            self.missing("restore to pipe", "zstd -d -c")
        if borg:
            self.step("restore to pipe", "borg",
                      [borg, "extract", "--stdout", f"{borg_repo}::incr"], env=borg_env,
                      stdout="hash", warm_paths=[borg_repo], expect=changed_hash)
        else:
            self.missing("restore to pipe", "borg")
        if restic:
            self.step("restore to pipe", "restic", [restic, *restic_pw, "dump", "latest", "img"],
                      env=restic_env, stdout="hash", warm_paths=[restic_repo], expect=changed_hash)
        else:
            self.missing("restore to pipe", "restic")

        # restore to a file ----------------------------------------------------------------
        target = out / "restored.img"
        if incr:
            self.step("restore to file", LVB, [lvb, "--config", cfg1, "--quiet", "restore", incr,
                                               "--to-file", target],
                      warm_paths=[w / "lvb"], expect=changed_hash, out_file=target)
        else:
            self.missing("restore to file", LVB, "no incremental backup to restore")
        if zstd:
            self.step("restore to file", "zstd -d", [zstd, "-d", "-q", "-f", z1, "-o", target],
                      warm_paths=[z1], expect=self.base_hash, out_file=target)
            self.step("restore to file", "zstd -d + fsync",
                      ["sh", "-c", 'zstd -d -q -f "$1" -o "$2" && sync "$2"', "sh", z1, target],
                      warm_paths=[z1], expect=self.base_hash, out_file=target)
        else:
            self.missing("restore to file", "zstd -d")
            self.missing("restore to file", "zstd -d + fsync")

        if not self.args.keep:
            remove(w)
            remove(disk)
        return self.rows


    def encryption_round(self) -> list[Row]:
        """lvbackup on an unencrypted repository and two encrypted ones (a passphrase, a key
        file), step by step, each step run on all in turn (so that a change in the
        machine's load touches them alike)."""
        self.rows = []
        w = self.work / "round-enc"
        remove(w)
        w.mkdir(parents=True)
        disk = self.work / "disk.img"
        remove(disk)
        subprocess.run(["cp", "--sparse=always", str(self.base), str(disk)], check=True)
        lvb = lvbackup_cmd()
        (w / "passphrase").write_text("lvbackup-bench\n")
        (w / "passphrase").chmod(0o600)   # lvbackup refuses a secret others can read
        cfgs = {LVB: write_lvbackup_config(w / "plain"),
                LVBE: write_lvbackup_config(w / "enc", passphrase_file=w / "passphrase"),
                LVBK: write_lvbackup_config(w / "enck", key_file=w / "key")}
        repos = {tool: cfg.parent / "repo" for tool, cfg in cfgs.items()}
        for tool, cfg in cfgs.items():
            self.step("init", tool, [lvb, "--config", cfg, "--json", "init",
                                     *(["--encryption"] if tool != LVB else [])],
                      repo=repos[tool])
        ids: dict[str, dict[str, str | None]] = {tool: {} for tool in cfgs}
        for tool, cfg in cfgs.items():
            row, r = self.step("full backup", tool, [lvb, "--config", cfg, "--json", "--quiet",
                                                     "create", "--device", disk],
                               stdout="capture", warm_paths=[disk], repo=repos[tool])
            ids[tool]["full"] = record_id(row, r)
        apply_changes(disk, self.plan)
        changed_hash = hash_file(disk)
        for tool, cfg in cfgs.items():
            row, r = self.step("incremental", tool, [lvb, "--config", cfg, "--json", "--quiet",
                                                     "create", "--device", disk, "--incremental"],
                               stdout="capture", warm_paths=[disk], repo=repos[tool])
            ids[tool]["incr"] = record_id(row, r)
        target = w / "restored.img"
        for step, to, kw in (("restore to pipe", "-", {"stdout": "hash"}),
                             ("restore to file", str(target), {"out_file": target})):
            for tool, cfg in cfgs.items():
                incr = ids[tool].get("incr")
                if incr is None:
                    self.missing(step, tool, "no incremental backup to restore")
                    continue
                self.step(step, tool, [lvb, "--config", cfg, "--quiet", "restore", incr,
                                       "--to-file", to],
                          warm_paths=[repos[tool]], expect=changed_hash, **kw)
        if not self.args.keep:
            remove(w)
            remove(disk)
        return self.rows


def record_id(row: Row, r) -> str | None:
    """The backup id in `lvbackup --json create` output; marks the row failed if there is none."""
    if row.status != "ok":
        return None
    try:
        return json.loads(r.stdout)["id"]
    except (ValueError, KeyError, TypeError):
        row.status = "FAILED"
        row.note = f"no backup record on stdout: {r.stdout.strip()[:200]!r}"
        return None


def version_of_help(argv: list) -> str:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    return r.stdout + r.stderr


# --- comparison ------------------------------------------------------------------------

COMPARE = {("full backup", "zstd -3 -T0"): LVB3}   # everything else compares with LVB


def lvb_row(rows: list[Row], step: str, tool: str) -> Row | None:
    want = COMPARE.get((step, tool), LVB)
    return next((r for r in rows if r.step == step and r.tool == want), None)


def find(rows, step, tool) -> Row | None:
    return next((r for r in rows if r.step == step and r.tool == tool), None)


def speedup(rows, step, tool, by: str = "wall_s") -> float | None:
    """How many times faster lvbackup is than `tool` at `step` (peer seconds / lvbackup's);
    by="cpu_s" compares CPU seconds instead (steadier on a busy machine)."""
    peer, mine = find(rows, step, tool), lvb_row(rows, step, tool)
    if not peer or not mine or peer.status != "ok" or mine.status != "ok" or not getattr(mine, by):
        return None
    return getattr(peer, by) / getattr(mine, by)


# The encrypted repository's cost, as the ratio of its wall time to the unencrypted one's.
ENCRYPTION_LIMITS = {"full backup": 1.25, "incremental": 1.1, "restore to pipe": 1.25,
                     "restore to file": 1.25}


def encryption_targets(rows: list[Row]) -> list[dict]:
    out = []
    for tool, what in ((LVBE, "encrypted"), (LVBK, "encrypted (key file)")):
        for step, limit in ENCRYPTION_LIMITS.items():
            plain, enc = find(rows, step, LVB), find(rows, step, tool)
            ok = plain and enc and plain.status == enc.status == "ok" and plain.wall_s
            got = enc.wall_s / plain.wall_s if ok else None
            cpu = enc.cpu_s / plain.cpu_s if ok and plain.cpu_s else None
            out.append({"target": f"{what} {step} within {limit:g}x of unencrypted",
                        "want": f"<= {limit:g}x", "got": None if got is None else round(got, 3),
                        "cpu_ratio": None if cpu is None else round(cpu, 3),
                        "status": "n/a (a step failed)" if got is None else
                        "met" if got <= limit else "MISSED"})
    return out


def targets(rows: list[Row], changed_bytes: int) -> list[dict]:
    out = []

    def ratio_target(name, step, tool, want):
        got = speedup(rows, step, tool)
        cpu = speedup(rows, step, tool, "cpu_s")
        peer = find(rows, step, tool)
        status = ("n/a (peer missing)" if peer is None or peer.status == "missing" else
                  "n/a (a step failed)" if got is None else "met" if got >= want else "MISSED")
        out.append({"target": name, "want": f">= {want:g}x", "got": None if got is None else
                    round(got, 2), "status": status,
                    "cpu_ratio": None if cpu is None else round(cpu, 2)})

    ratio_target("full backup >= 3x faster than borg", "full backup", "borg", 3)
    ratio_target("full backup >= 4x faster than restic", "full backup", "restic", 4)
    ratio_target("full backup at zstd 3 >= as fast as zstd -3 -T0", "full backup", "zstd -3 -T0", 1)
    ratio_target("incremental >= 6x faster than borg", "incremental", "borg", 6)
    ratio_target("incremental >= 8x faster than restic", "incremental", "restic", 8)
    inc = find(rows, "incremental", LVB)
    if inc and inc.status == "ok" and inc.repo_growth_mib is not None:
        g = inc.repo_growth_mib * MiB / changed_bytes
        out.append({"target": f"incremental repo growth <= 5x the changed bytes "
                              f"({changed_bytes / MiB:.1f} MiB)", "want": "<= 5x",
                    "got": round(g, 2), "status": "met" if g <= 5 else "MISSED"})
    ratio_target("restore to pipe >= 3x borg's speed", "restore to pipe", "borg", 3)
    ratio_target("restore to pipe within 0.8x of zstd -d -c", "restore to pipe", "zstd -d -c", 0.8)
    ratio_target("restore to file >= as fast as zstd -d to a file", "restore to file", "zstd -d", 1)
    mine = [r for r in rows if r.tool in (LVB, LVB3)]
    rss = [r.peak_rss_mib for r in mine if r.peak_rss_mib is not None]
    if any(r.status != "ok" for r in mine):
        out.append({"target": "peak RSS <= 128 MiB (every lvbackup step)", "want": "<= 128 MiB",
                    "got": round(max(rss), 1) if rss else None, "status": "n/a (a step failed)"})
    elif rss:
        out.append({"target": "peak RSS <= 128 MiB (every lvbackup step)", "want": "<= 128 MiB",
                    "got": round(max(rss), 1), "status": "met" if max(rss) <= 128 else "MISSED"})
    return out


def median_rows(rounds: list[list[Row]]) -> list[Row]:
    """Per (step, tool), the round whose wall time is the median (lower median if even)."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for row in rounds[0]:
        same = [r for rs in rounds for r in rs if r.step == row.step and r.tool == row.tool]
        bad = [r for r in same if r.status != "ok"]
        if bad:
            merged.append(bad[0])
            continue
        same.sort(key=lambda r: r.wall_s)
        pick = same[(len(same) - 1) // 2]
        pick.wall_samples = [round(r.wall_s, 3) for r in same]
        merged.append(pick)
    return merged


# --- output ----------------------------------------------------------------------------

def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def render(rows: list[Row], size: int) -> str:
    head = ["step", "tool", "wall s", "MB/s", "CPU s", "cores", "RSS MiB", "repo +MiB",
            "lvb faster", "load", "check"]
    body = []
    for r in rows:
        sp = None if r.tool in (LVB, LVB3) else speedup(rows, r.step, r.tool)
        if r.status == "missing":
            body.append([r.step, r.tool, "missing", "", "", "", "", "", "", "", r.note])
            continue
        check = r.status if r.status != "ok" else (r.note or "ok")
        if r.status in ("FAILED", "MISMATCH"):
            note = r.note if len(r.note) <= 70 else r.note[:67] + "..."
            check = f"*** {r.status} *** {note}"
        body.append([r.step, r.tool, fmt(r.wall_s, ".2f"),
                     fmt(r.mbps, ".0f") if r.step != "init" and r.status == "ok" else "-",
                     fmt(r.cpu_s, ".2f"),
                     fmt(r.cpu_s / r.wall_s if r.wall_s else None, ".2f"),
                     fmt(r.peak_rss_mib, ".0f"),
                     fmt(r.repo_growth_mib, ".1f"),
                     "-" if sp is None else f"{sp:.1f}x", fmt(r.load1, ".1f"), check])
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    right = {2, 3, 4, 5, 6, 7, 8, 9}

    def line(cells):
        return "  ".join(str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for cells in body:
        if prev is not None and cells[0] != prev:
            out.append("")
        prev = cells[0]
        out.append(line(cells))
    return "\n".join(out)


def show(path: Path) -> int:
    doc = json.loads(path.read_text())
    rows = [Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__})
            for r in doc["rows"]]
    p, m = doc["params"], doc["machine"]
    print(f"{p['size_bytes'] / GiB:.2f} GiB image, seed {p['seed']}, {p['changes']} x 64 KiB "
          f"changed; {m['nproc']} CPUs {m['cpu']}, kernel {m['kernel']}, Python {m['python']}; "
          f"load {m['loadavg_at_start'][0]:.2f} at start, {m['loadavg_at_end'][0]:.2f} at end"
          + (f"; median of {p['repeat']} rounds" if p.get("repeat", 1) > 1 else ""))
    print(render(rows, p["size_bytes"]))
    for t in targets(rows, p["changed_bytes"]):
        cpu = f"cpu {t['cpu_ratio']:>5}" if t.get("cpu_ratio") is not None else " " * 9
        got = "-" if t["got"] is None else t["got"]
        print(f"  {t['target']:60}  want {t['want']:>10}  got {str(got):>7}  {cpu}  "
              f"{t['status']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0, help="test image size (default 2)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--work", metavar="DIR", default="/var/tmp/lvbackup-bench",
                    help="scratch directory (default /var/tmp/lvbackup-bench); the pristine "
                         "image is kept there and reused by later runs")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every step N times (fresh repositories each time) and report "
                         "the median; default 1")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install missing peers (they are reported missing)")
    ap.add_argument("--keep", action="store_true", help="keep the repositories afterwards")
    ap.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    ap.add_argument("--encryption", action="store_true",
                    help="compare lvbackup on an encrypted repository with an unencrypted one "
                         "(no peers)")
    ap.add_argument("--show", metavar="FILE", help="print the table and targets of a JSON written "
                    "by --json, and exit")
    args = ap.parse_args(argv)
    if args.show:
        return show(Path(args.show))

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GiB) // MiB * MiB
    if size < 16 * MiB:
        ap.error("--size-gib must be at least 1/64")
    free = shutil.disk_usage(work).free
    if free < 6 * size:
        log(f"warning: {free / GiB:.1f} GiB free in {work}; a run needs about {6 * size / GiB:.0f}")

    info = machine_info(work)
    log(f"{info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}, Python {info['python']}, "
        f"load average {' '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}")
    peers = ({"zstd": None, "borg": None, "restic": None} if args.encryption
             else ensure_peers(not args.no_install, log))
    versions = {"lvbackup": version_of([lvbackup_cmd(), "--version"])}
    for cmd, argv_v in (("zstd", ["zstd", "--version"]), ("borg", ["borg", "--version"]),
                        ("restic", ["restic", "version"])):
        versions[cmd] = version_of(argv_v) if peers[cmd] else "missing"
    rev = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "describe",
                          "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    versions["lvbackup_git"] = rev or "?"
    for k, v in versions.items():
        log(f"  {k}: {v}")

    base = work / "base.img"
    base_hash = ensure_image(base, size, args.seed, log)
    bench = Bench(args, work, peers, size, base, base_hash)
    bench.plan = change_plan(size, args.seed)
    changed_bytes = len(bench.plan) * CHANGE

    rounds = []
    for i in range(args.repeat):
        if args.repeat > 1:
            log(f"round {i + 1} of {args.repeat}")
        rounds.append(bench.encryption_round() if args.encryption else bench.round())
    rows = median_rows(rounds)
    tg = encryption_targets(rows) if args.encryption else targets(rows, changed_bytes)
    info["loadavg_at_end"] = list(os.getloadavg())

    print(f"lvbackup benchmark: {size / GiB:.2f} GiB image (25 % holes, 35 % text, 40 % random, "
          f"seed {args.seed}); day of changes: {len(bench.plan)} x 64 KiB = "
          f"{changed_bytes / MiB:.1f} MiB")
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}, {info['memory']}, kernel "
          f"{info['kernel']}, {info['distro']}, Python {info['python']}, {info['work_fs']} at "
          f"{work}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"load average: start {' '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}, "
          f"end {' '.join(f'{x:.2f}' for x in info['loadavg_at_end'])}"
          + (f"; median of {args.repeat} rounds" if args.repeat > 1 else ""))
    busiest = max(r.load1 or 0 for r in rows)
    if busiest > (info["nproc"] or 1) / 2:
        print(f"WARNING: the machine was busy (1-minute load up to {busiest:.1f} on "
              f"{info['nproc']} CPUs): wall times are slow and noisy; compare CPU seconds too")
    print()
    print(render(rows, size))
    print()
    print("MB/s: image bytes (apparent size) / wall seconds, 1 MB = 10^6 B. CPU s: user+sys of the "
          "child (wait4). RSS: its ru_maxrss.\nrepo +MiB: growth of the repository directory "
          "(zstd: the output file), allocated bytes as du counts them.\nlvb faster: the peer's "
          "seconds / lvbackup's for the same step (zstd -3 compares with lvbackup at zstd 3).")
    inc = find(rows, "incremental", LVB)
    scan = None
    if inc and inc.status == "ok":
        scan = size / inc.wall_s / 1e9
        print(f"lvbackup incremental scanned the source at {scan:.2f} GB/s; repo growth "
              f"{inc.repo_growth_mib:.1f} MiB = {inc.repo_growth_mib * MiB / changed_bytes:.2f}x "
              f"the {changed_bytes / MiB:.1f} MiB changed")
    print()
    print("targets (got: from wall seconds; cpu: the same ratio of CPU seconds, for reference):")
    tw = max(len(t["target"]) for t in tg)
    for t in tg:
        got = "-" if t["got"] is None else t["got"]
        cpu = f"cpu {t['cpu_ratio']:>5}" if t.get("cpu_ratio") is not None else " " * 9
        print(f"  {t['target']:{tw}}  want {t['want']:>10}  got {str(got):>7}  {cpu}  "
              f"{t['status']}")

    bad = [r for r in rows if r.status in ("FAILED", "MISMATCH")]
    bad += [r for rs in rounds for r in rs if r.status in ("FAILED", "MISMATCH") and r not in bad]
    if bad:
        print()
        for r in bad:
            print(f"*** {r.status}: {r.step} / {r.tool}: {r.note}")
    if args.json:
        doc = {"machine": info, "versions": versions,
               "params": {"size_bytes": size, "seed": args.seed, "repeat": args.repeat,
                          "image_xxh3_128": base_hash, "changes": len(bench.plan),
                          "changed_bytes": changed_bytes,
                          "mix": {"holes": 0.25, "text": 0.35, "random": 0.40}},
               "units": {"wall_s": "seconds", "mbps": "10^6 bytes of source per second",
                         "repo_growth_mib": "MiB allocated on disk (du)",
                         "repo_growth_apparent_mib": "MiB of file sizes"},
               "rows": [{**asdict(r), "mbps": r.mbps,
                         "lvbackup_speedup": None if r.tool in (LVB, LVB3)
                         else speedup(rows, r.step, r.tool),
                         "lvbackup_cpu_ratio": None if r.tool in (LVB, LVB3)
                         else speedup(rows, r.step, r.tool, "cpu_s")} for r in rows],
               "incremental_scan_gbps": scan, "targets": tg, "ok": not bad}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    if bad:
        return 1
    if args.strict and any(t["status"] == "MISSED" for t in tg):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
