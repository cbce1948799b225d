"""Backup records: export, import, protection, lineage."""

from __future__ import annotations

import base64
import binascii
import json
import os
import uuid

from ..base.errors import CorruptionError, LvbackupError, UsageError
from ..base.lifecycle import Status
from ..base.timeutil import now_iso
from ..catalog.catalog import (
    COLUMNS,
    MIN_PREFIX_TO_CHANGE,
    BackupRecord,
    as_record,
    require_available,
    to_record,
)
from ..session import Session, recover_dead_runs
from .groups import group_backups


def export_record(session: Session, backup_id: str) -> tuple[str, str]:
    """(the backup's id, base64 of a JSON object with every catalog field of the available
    backup) (rule 19)."""
    row = require_available(session.catalog.resolve(backup_id))
    rec = {k: v for k, v in to_record(row).items() if k in COLUMNS}
    return row["id"], base64.b64encode(json.dumps(rec, sort_keys=True).encode()).decode()


def parse_record(text: str) -> dict:
    """The record in export_record's output; UsageError if it is not one."""
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("Can't decode backup record.") from None
    try:
        rec = json.loads(raw)
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            raise ValueError
        uuid.UUID(rec["id"])
        if not rec.get("volume_id") or not isinstance(rec.get("size"), int):
            raise ValueError
        for key in COLUMNS:
            if key in rec and key != "labels" and not isinstance(
                    rec[key], (str, int, float, bool, type(None))):
                raise ValueError
        labels = rec.get("labels") or {}
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UsageError("Can't parse backup record.") from None
    return rec


def import_record(session: Session, text: str) -> BackupRecord:
    """Re-create a catalog row from export_record's output (rule 20)."""
    rec = parse_record(text)
    with session.shared_lock():
        cat = session.catalog
        existing = cat.find(rec["id"])
        if existing is not None and existing["status"] != Status.DELETED:
            raise UsageError("Backup already exists in database.")
        try:
            manifest = session.repo.manifest(rec["id"])
        except CorruptionError as e:
            raise LvbackupError(f"cannot import backup {rec['id']}: {e}; copy its manifest "
                                f"into {session.config.repository} first") from None
        row = as_record(rec, fail_reason=None, updated_at=now_iso(), size=manifest.size,
                        block_size=manifest.block_size,
                        is_incremental=bool(rec.get("parent_id")), num_dependent_backups=0)
        for key in ("created_at", "data_timestamp"):
            row[key] = row[key] or manifest.record.get(key) or now_iso()
        with cat.write():
            cat.put(row, Status.AVAILABLE)
            cat.refresh_dependents(row["id"])
            cat.refresh_dependents(row["parent_id"])
    return to_record(cat.get(row["id"]))


def set_protected(session: Session, backup_id: str, protected: bool) -> BackupRecord:
    """Protect a backup from prune and delete, or lift that protection."""
    cat = session.catalog
    row = cat.resolve(backup_id, min_prefix=MIN_PREFIX_TO_CHANGE)
    if row["status"] == Status.DELETED:
        raise UsageError(f"backup {row['id']} is deleted")
    cat.update(row["id"], protected=int(protected))
    return to_record(cat.get(row["id"]))


def list_backups(session: Session, volume: str | None = None, status: str | None = None,
                 labels: dict[str, str] | None = None, group: str | None = None
                 ) -> list[BackupRecord]:
    """Backups (of a volume given by name, id or image path; in a status; with labels;
    members of the group backups a group name or id names)."""
    recover_dead_runs(session)
    names = [volume] if volume else []
    if volume and os.path.exists(volume):  # an image path as given to create --device
        names.append(os.path.realpath(volume))
    rows = [to_record(r) for r in session.catalog.list(volumes=names, status=status,
                                                       labels=labels or {})]
    if group is not None:
        members = {m["id"] for m in group_backups(session, group)}
        rows = [r for r in rows if r["id"] in members]
    return rows


def show_backup(session: Session, backup_id: str
                ) -> tuple[BackupRecord, list[BackupRecord], list[BackupRecord]]:
    """A backup's record, its chain back to its full backup, and its dependents."""
    recover_dead_runs(session)
    rec = to_record(session.catalog.resolve(backup_id))
    lineage = [to_record(r) for r in session.catalog.chain(rec["id"])]
    dependents = [to_record(r) for r in session.catalog.children(rec["id"])]
    return rec, lineage, dependents
