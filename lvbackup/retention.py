"""Retention: which backups a `--keep-*` policy keeps (a pure function), and applying it.

The policy follows restic's and borg's `--keep-last/hourly/daily/weekly/monthly/yearly`:
per volume, the backups are taken newest first (by `data_timestamp`, the time their data
was current); `last N` keeps the N newest; `daily N` keeps the newest backup of each of the
N most recent days that have one; and so on for hours, ISO weeks, months and years (UTC).
A backup kept by any rule is kept. Protected backups are always kept. Only `available`
backups are considered: a backup in any other state is neither kept nor removed here.

Applying a plan deletes the other backups through the engine's delete path. Manifests are
self-contained, so removing a backup never breaks another: a kept incremental whose
parent goes is re-parented in the catalog to its nearest remaining ancestor, or becomes a
full backup (parent null, is_incremental false) when none remains.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Iterable

from .catalog import BackupRecord
from .lifecycle import Status
from .timeutil import parse_iso

KINDS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for kind in KINDS:
            value = getattr(self, kind)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"keep {kind} must be a whole number >= 0, not {value!r}")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, k) for k in KINDS)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _bucket(kind: str, ts: datetime) -> tuple:
    if kind == "hourly":
        return (ts.year, ts.month, ts.day, ts.hour)
    if kind == "daily":
        return (ts.year, ts.month, ts.day)
    if kind == "weekly":
        iso = ts.isocalendar()
        return (iso.year, iso.week)
    if kind == "monthly":
        return (ts.year, ts.month)
    return (ts.year,)


@dataclass
class Plan:
    """What a policy decides: kept backup id -> why; ids to remove (newest first)."""
    keep: dict[str, list[str]] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)


def select(backups: Iterable[BackupRecord], policy: Policy) -> Plan:
    """Apply `policy` to catalog rows (any mix of volumes; each volume on its own).

    Pure: reads `id`, `volume_id`, `status`, `data_timestamp`, `created_at` and
    `protected` of each row. An empty policy keeps everything (it never means "remove all").
    """
    plan = Plan()
    by_volume: dict[str, list[BackupRecord]] = {}
    for b in backups:
        if b.get("status") == Status.AVAILABLE:
            by_volume.setdefault(b["volume_id"], []).append(b)
    for rows in by_volume.values():
        rows.sort(key=lambda r: (r["data_timestamp"], r["created_at"], r["id"]), reverse=True)
        reasons: dict[str, list[str]] = {r["id"]: [] for r in rows}
        for r in rows:
            if r.get("protected"):
                reasons[r["id"]].append("protected")
        if policy.empty:
            for r in rows:
                reasons[r["id"]].append("no policy")
        for n, r in enumerate(rows[:policy.last]):
            reasons[r["id"]].append(f"last {n + 1}")
        for kind in KINDS[1:]:
            count = getattr(policy, kind)
            last_bucket = None
            for r in rows:
                if count <= 0:
                    break
                bucket = _bucket(kind, parse_iso(r["data_timestamp"]))
                if bucket != last_bucket:
                    reasons[r["id"]].append(f"{kind} {getattr(policy, kind) - count + 1}")
                    count -= 1
                    last_bucket = bucket
        for r in rows:
            if reasons[r["id"]]:
                plan.keep[r["id"]] = reasons[r["id"]]
            else:
                plan.remove.append(r["id"])
    return plan


def new_parents(rows: Iterable[BackupRecord], removed: Iterable[str]) -> dict[str, str | None]:
    """For each remaining backup whose recorded parent is removed: its nearest remaining
    ancestor (None: it becomes a full backup). Pure; used to report a dry run."""
    by_id = {r["id"]: r for r in rows}
    gone = set(removed)
    out: dict[str, str | None] = {}
    for r in by_id.values():
        if r["id"] in gone or r.get("parent_id") not in gone:
            continue
        parent, seen = r.get("parent_id"), set()
        while parent in gone and parent not in seen:
            seen.add(parent)
            parent = by_id[parent].get("parent_id") if parent in by_id else None
        out[r["id"]] = parent
    return out


# --- applying a plan ---------------------------------------------------------------------

def prune(lv, policy: Policy, *, volumes: list[str] | None = None,
          labels: dict[str, str] | None = None, dry_run: bool = False) -> dict:
    """Select with `policy` among the available backups (of `volumes`, carrying every one
    of `labels`) and, unless `dry_run`, delete the others, re-parenting their children.

    Like gc, prune holds the repository lock exclusively: nothing else that writes runs
    meanwhile (a running incremental reads its parent's manifest). Returns a report.
    """
    from . import engine  # local: config imports Policy from here, and engine imports config
    from .locks import volume_lock

    cat = lv.catalog
    report: dict = {"dry_run": dry_run, "policy": policy.as_dict(), "labels": labels or {},
                    "keep": [], "remove": [], "reparented": []}
    with lv.exclusive_lock():
        engine.recover_dead_runs(lv)
        rows = cat.list(volumes=volumes or [], status=Status.AVAILABLE, labels=labels)
        plan = select(rows, policy)
        by_id = {r["id"]: r for r in rows}
        for bid, why in plan.keep.items():
            report["keep"].append({**_brief(by_id[bid]), "reasons": why})
        for bid in plan.remove:
            report["remove"].append(_brief(by_id[bid]))
        order = sorted(plan.remove, key=lambda i: (by_id[i]["volume_id"],
                                                   by_id[i]["created_at"]))
        if dry_run:
            every = cat.list(volumes=[by_id[i]["volume_id"] for i in order]) if order else []
            recorded = {r["id"]: r["parent_id"] for r in every}
            report["reparented"] = [{"id": c, "old_parent_id": recorded[c], "new_parent_id": p}
                                    for c, p in new_parents(every, order).items()]
            return report
        moves: dict[str, engine.Reparented] = {}
        with ExitStack() as stack:
            # Every lock first, in a fixed order: a busy volume stops the prune before it
            # has deleted anything, never half-way through.
            for volume_id in sorted({by_id[i]["volume_id"] for i in order}):
                name = next(by_id[i]["volume_name"] for i in order
                            if by_id[i]["volume_id"] == volume_id)
                stack.enter_context(volume_lock(lv.lock_dir, volume_id, name).acquire(lv.wait))
            for bid in order:
                _, moved = engine.delete_row(lv, cat.get(bid), reparent=True)
                for m in moved:  # a child may move more than once: first old, last new
                    moves[m["id"]] = {**m, "old_parent_id": moves.get(m["id"], m)["old_parent_id"]}
        report["deleted"] = order
        report["reparented"] = [m for c, m in moves.items() if c not in plan.remove]
    return report


def _brief(row: BackupRecord) -> dict:
    return {"id": row["id"], "volume_name": row["volume_name"],
            "data_timestamp": row["data_timestamp"], "parent_id": row["parent_id"],
            "is_incremental": bool(row["is_incremental"])}
