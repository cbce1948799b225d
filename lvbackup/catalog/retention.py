"""Retention: which backups a `--keep-*` policy keeps (a pure function), and applying it.

The policy follows restic's and borg's `--keep-last/hourly/daily/weekly/monthly/yearly`:
per volume, the backups are taken newest first (by `data_timestamp`, the time their data
was current); `last N` keeps the N newest; `daily N` keeps the newest backup of each of the
N most recent days that have one; and so on for hours, ISO weeks, months and years (UTC).
A backup kept by any rule is kept. Protected backups are always kept. Only `available`
backups are considered: a backup in any other state is neither kept nor removed here.

Applying a plan (operations/prune.py) deletes the other backups through the delete
operation. Manifests are
self-contained, so removing a backup never breaks another: a kept incremental whose
parent goes is re-parented in the catalog to its nearest remaining ancestor, or becomes a
full backup (parent null, is_incremental false) when none remains.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime

from ..base.lifecycle import Status
from ..base.timeutil import parse_iso
from .catalog import BackupRecord

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

    Pure: reads `id`, `volume_id`, `status`, `data_timestamp`, `created_at`, `protected`
    and `group_id` of each row. An empty policy keeps everything (it never means "remove
    all"). A group backup is kept or removed as a whole: one member kept keeps them all.
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
    group_of = {r["id"]: r.get("group_id") for rows in by_volume.values() for r in rows}
    kept_groups = {group_of[k] for k in plan.keep} - {None}
    for bid in [b for b in plan.remove if group_of[b] in kept_groups]:
        plan.remove.remove(bid)
        plan.keep[bid] = [f"group {group_of[bid]}"]
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
