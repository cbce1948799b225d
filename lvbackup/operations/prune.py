"""Apply a retention policy: `prune` (and the `keep:` of jobs)."""

from __future__ import annotations

import os
from contextlib import ExitStack

from ..base.lifecycle import Status
from ..base.locks import volume_lock
from ..catalog.catalog import BackupRecord
from ..catalog.retention import Policy, new_parents, select
from ..session import Session, recover_dead_runs
from .delete import Reparented, delete_row


def prune(session: Session, policy: Policy, *, volumes: list[str] | None = None,
          labels: dict[str, str] | None = None, dry_run: bool = False) -> dict:
    """Select with `policy` among the available backups (of `volumes`: names, ids or id
    prefixes, or paths of images and devices, however given; carrying every one of
    `labels`) and, unless `dry_run`, delete the others, re-parenting their children.

    Like gc, prune holds the repository lock exclusively: nothing else that writes runs
    meanwhile (a running incremental reads its parent's manifest). Returns a report.
    """
    session.refuse_if_append_only("prune")
    report: dict = {"dry_run": dry_run, "policy": policy.as_dict(), "labels": labels or {},
                    "keep": [], "remove": [], "reparented": []}
    if not dry_run:
        session.release_reserve()   # a full disk: the catalog must take the deletions
    with session.exclusive_lock("prune") as held:
        cat = session.catalog
        recover_dead_runs(session)
        names = list(volumes or [])
        names += [os.path.realpath(v) for v in names if os.path.exists(v)]
        rows = cat.list(volumes=names, status=Status.AVAILABLE, labels=labels)
        # A group backup is kept or dropped as a whole: its members outside the selection
        # are decided with it.
        seen = {r["id"] for r in rows}
        for group_id in sorted({r["group_id"] or "" for r in rows} - {""}):
            rows += [m for m in cat.group(group_id)
                     if m["id"] not in seen and m["status"] == Status.AVAILABLE]
        plan = select(rows, policy)
        by_id = {r["id"]: r for r in rows}
        for bid, why in plan.keep.items():
            report["keep"].append({**_brief(by_id[bid]), "reasons": why})
        for bid in plan.remove:
            report["remove"].append(_brief(by_id[bid]))
        order = sorted(plan.remove, key=lambda i: (by_id[i]["volume_id"],
                                                   by_id[i]["created_at"]))
        if dry_run:
            touched = sorted({by_id[i]["volume_id"] for i in order})
            every = cat.list(volumes=touched) if touched else []
            recorded = {r["id"]: r["parent_id"] for r in every}
            report["reparented"] = [{"id": c, "old_parent_id": recorded[c], "new_parent_id": p}
                                    for c, p in new_parents(every, order).items()]
            return report
        moves: dict[str, Reparented] = {}
        with ExitStack() as stack:
            # Every lock first, in a fixed order: a busy volume stops the prune before it
            # has deleted anything, never half-way through.
            for volume_id in sorted({by_id[i]["volume_id"] for i in order}):
                name = next(by_id[i]["volume_name"] for i in order
                            if by_id[i]["volume_id"] == volume_id)
                lock = volume_lock(session.lock_dir, volume_id, name or volume_id)
                stack.enter_context(lock.acquire(session.wait))
            for bid in order:
                if held is not None:
                    held.check()
                _, moved = delete_row(session, cat.get(bid), reparent=True)
                for m in moved:  # a child may move more than once: first old, last new
                    moves[m["id"]] = {**m, "old_parent_id": moves.get(m["id"], m)["old_parent_id"]}
        report["deleted"] = order
        report["reparented"] = [m for c, m in moves.items() if c not in plan.remove]
    return report


def _brief(row: BackupRecord) -> dict:
    return {"id": row["id"], "volume_name": row["volume_name"],
            "data_timestamp": row["data_timestamp"], "parent_id": row["parent_id"],
            "is_incremental": bool(row["is_incremental"])}
