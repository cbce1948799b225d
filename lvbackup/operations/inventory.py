"""What LVM holds: `volumes` (with each one's last backup) and the `snapshot` commands."""

from __future__ import annotations

from typing import Any

from .. import lvm
from ..base.errors import UsageError
from ..base.lifecycle import Status
from ..base.timeutil import utcnow
from ..catalog.catalog import BackupRecord, to_record
from ..session import Session


def lv_row(lv: lvm.LogicalVolume) -> dict[str, Any]:
    return {"vg": lv.vg, "name": lv.name, "full_name": lv.full_name, "uuid": lv.uuid,
            "size": lv.size, "created_at": lv.time, "origin": lv.origin or None,
            "thin": lv.is_thin, "open": lv.is_open, "active": lv.is_active, "state": lv.state,
            "base": lvm.BASE_TAG in lv.tags}


def volumes(session: Session) -> list[dict[str, Any]]:
    """Every logical volume (not snapshots or pools), its snapshots (`base`: kept by
    --keep-snapshot for the next incremental), and each one's last available backup (of a
    base: the backup read from it)."""
    lvs = lvm.list_lvs()
    last: dict[tuple[str, str | None], BackupRecord] = {}
    for row in session.catalog.list(status=Status.AVAILABLE):
        last[(row["volume_id"], row["snapshot_id"])] = to_record(row)
        if row.get("source_snapshot_id") and not row["snapshot_id"]:
            last[(row["volume_id"], row["source_snapshot_id"])] = to_record(row)
    out = []
    for v in sorted((x for x in lvs if not x.is_snapshot and x.segtype != "thin-pool"),
                    key=lambda x: x.full_name):
        snaps = [s for s in lvs if s.vg == v.vg and s.origin == v.name]
        out.append({**lv_row(v), "last_backup": last.get((v.uuid, None)),
                    "snapshots": [{**lv_row(s), "last_backup": last.get((v.uuid, s.uuid))}
                                  for s in sorted(snaps, key=lambda s: s.time)]})
    return out


def create_snapshot(volume: str, name: str | None, size: str | None) -> dict[str, Any]:
    """Snapshot a volume: thin for a thin volume, classic (of `size`) otherwise."""
    origin = lvm.find_lv(volume)
    if origin.is_snapshot:
        raise UsageError(f"{origin.full_name} is a snapshot; snapshot its origin instead")
    snap = lvm.create_snapshot(origin, name or f"{origin.name[:100]}-snap-"
                               f"{utcnow():%Y%m%dT%H%M%S}", size)
    return lv_row(snap)


def list_snapshots(volume: str | None) -> list[dict[str, Any]]:
    """Snapshots of one volume, or all, by VG and creation time."""
    if volume:
        origin = lvm.find_lv(volume)
        snaps = [s for s in lvm.list_lvs(origin.vg) if s.origin == origin.name]
    else:
        snaps = [s for s in lvm.list_lvs() if s.is_snapshot]
    snaps.sort(key=lambda s: (s.vg, s.time, s.name))
    return [lv_row(s) for s in snaps]


def delete_snapshot(snap: str) -> dict[str, Any]:
    """Remove a snapshot (never anything else); its backups are kept."""
    target = lvm.find_lv(snap)
    if not target.is_snapshot:
        raise UsageError(f"{target.full_name} is not a snapshot; lvbackup deletes only snapshots")
    lvm.remove_lv(target)
    return lv_row(target)
