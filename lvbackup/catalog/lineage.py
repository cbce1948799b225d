"""Backup lineage as OpenStack Cinder defines it (docs/lineage.md): which backup an
incremental builds on. Pure: it reads the records it is given and nothing else."""

from __future__ import annotations

from collections.abc import Iterable

from ..base.errors import UsageError
from ..base.lifecycle import Status
from .catalog import BackupRecord

NO_PARENT = "No backups available to do an incremental backup."


def choose_parent(candidates: Iterable[BackupRecord],
                  snapshot_time: str | None = None) -> BackupRecord:
    """The parent of an incremental backup (docs/lineage.md, rules 6-8).

    `candidates` are the non-deleted backups of the volume; `snapshot_time` is the
    creation time of the snapshot being backed up (None for a volume backup). Raises
    UsageError(NO_PARENT) if there is no usable parent.
    """
    candidates = [c for c in candidates if c["status"] != Status.DELETED]
    available = [c for c in candidates if c["status"] == Status.AVAILABLE]
    eligible = [c for c in available
                if snapshot_time is None or c["data_timestamp"] < snapshot_time]
    if eligible:
        return max(eligible, key=lambda c: (c["data_timestamp"], c["created_at"]))
    if snapshot_time is not None and available:
        # Rule 8: nothing is older than the snapshot, so fall back to the newest backup.
        newest = max(candidates, key=lambda c: c["created_at"])
        if newest["status"] == Status.AVAILABLE:
            return newest
    raise UsageError(NO_PARENT)
