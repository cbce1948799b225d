"""Delete a backup: `delete` (and prune's deletions)."""

from __future__ import annotations

from typing import TypedDict

from .. import events as ev
from ..base.errors import LvbackupError, UsageError
from ..base.faults import crash_point
from ..base.lifecycle import Status
from ..base.locks import RunLock
from ..catalog.catalog import (
    MIN_PREFIX_TO_CHANGE,
    BackupRecord,
    to_record,
)
from ..nbd.registry import refuse_if_mapped, registry
from ..repository.manifest import manifest_name
from ..session import Session, reason, recover_dead_runs


def delete_backup(session: Session, backup_id: str, *, force: bool = False) -> BackupRecord:
    """Remove a backup's manifest and mark it deleted (its chunks go at the next gc)."""
    # The lock before the catalog, in every operation: a run that holds the repository
    # exclusively may be in the middle of rewriting the catalog.
    session.refuse_if_append_only("delete")
    session.release_reserve()   # a full disk: the catalog must take the delete
    with session.shared_lock():
        cat = session.catalog
        row = cat.resolve(backup_id, min_prefix=MIN_PREFIX_TO_CHANGE)
        recover_dead_runs(session)
        return delete_row(session, cat.get(row["id"]), force=force)[0]


class Reparented(TypedDict):
    id: str
    old_parent_id: str
    new_parent_id: str | None


def delete_row(session: Session, row: BackupRecord, *, force: bool = False,
               reparent: bool = False) -> tuple[BackupRecord, list[Reparented]]:
    """Delete one backup (the caller holds the repository lock); (its record, the children
    re-parented). A protected backup is refused. Children refuse the delete (Cinder's rule
    14) unless `reparent`: then, since manifests are self-contained, each child's parent
    becomes the deleted backup's parent (none: the child is a full backup from then on),
    recorded in the catalog in the same transaction that marks the backup `deleting`."""
    cat = session.catalog
    if row["status"] == Status.DELETED:
        raise UsageError(f"backup {row['id']} is already deleted")
    if row["protected"]:
        raise UsageError(f"backup {row['id']} is protected; run 'lvbackup unprotect "
                         f"{row['id']}' first")
    if row["status"] not in (Status.AVAILABLE, Status.ERROR) and not force:
        raise UsageError(f"Backup status must be available or error (backup {row['id']} "
                         f"is {row['status']}); pass --force to delete it anyway")
    children = cat.children(row["id"])
    if children and not reparent:
        ids = ", ".join(c["id"] for c in children)
        raise UsageError(f"Incremental backups exist for this backup. "
                         f"(backup {row['id']} has dependents: {ids}; delete them first)")
    moved: list[Reparented] = []
    with RunLock(session.lock_dir, row["id"]).acquire():
        # Under the map registry's lock: a map starting now sees `deleting` and refuses.
        with registry(session.lock_dir):
            refuse_if_mapped(session.lock_dir, row["id"], f"delete backup {row['id']}")
            session.events.emit(ev.DELETE_START, to_record(row))
            with cat.write():
                cat.transition(row["id"], Status.DELETING)
                for child in children:
                    cat.update(child["id"], parent_id=row["parent_id"],
                               is_incremental=row["parent_id"] is not None)
                    moved.append({"id": child["id"], "old_parent_id": row["id"],
                                  "new_parent_id": row["parent_id"]})
                cat.refresh_dependents(row["id"])
                cat.refresh_dependents(row["parent_id"])
        crash_point("delete-marked")
        try:
            session.repo.storage.delete(manifest_name(row["id"]))
            crash_point("delete-manifest-removed")
        except OSError as e:
            cat.transition(row["id"], Status.ERROR_DELETING, fail_reason=reason(e))
            session.events.emit(ev.DELETE_ERROR, {**to_record(cat.get(row["id"])),
                                             "reason": reason(e)})
            raise LvbackupError(f"cannot delete backup {row['id']}: {reason(e)}") from None
        with cat.write():
            cat.transition(row["id"], Status.DELETED)
            cat.refresh_dependents(row["parent_id"])
    rec = to_record(cat.get(row["id"]))
    session.events.emit(ev.DELETE_END, rec)
    return rec, moved
