"""Consistency groups: several volumes backed up from one instant (`create --group`), and
the group's backups listed, shown, deleted and restored as one (docs/lineage.md, "Groups").

The instant: the `pre_snapshot` command, then every filesystem mounted read-write from a
member frozen (lvbackup.volumes.freeze: a watchdog holds the freeze and never leaves it behind),
every member's snapshot taken, everything thawed, then `post_snapshot`. Each member is
then backed up from its snapshot as `create --volume` would, with the group's id and name
in its record.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from .. import lvm
from ..base.errors import LvbackupError, UsageError
from ..base.faults import crash_point
from ..base.locks import RunLock
from ..catalog.catalog import BackupRecord, to_record
from ..metrics import best_effort, record_group
from ..session import Session
from ..volumes.freeze import frozen, thaw_leftovers
from ..volumes.quiesce import Quiesce, quiesced
from ..volumes.sources import (
    Begin,
    Source,
    held_snapshot,
    make_temporary_snapshot,
    mounted_read_write,
    remove_extra_bases,
    remove_leftover_snapshots,
    snapshot_read,
    volume_to_back_up,
)
from ..volumes.targets import is_lv_name
from .create import create_backup, report_failure
from .delete import delete_row
from .restore import restore_backup

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ProgressFactory = Callable[[str], AbstractContextManager[Callable[..., None] | None]]


def group_document(group_id: str, name: str, backups: list[BackupRecord]) -> dict:
    """What `create --group`, `show` of a group and `run` print for a group backup."""
    return {"group_id": group_id, "name": name, "backups": [to_record(b) for b in backups]}


def create_group(session: Session, name: str, volumes: list[str], *, incremental: bool,
                 force: bool = False, keep_snapshot: bool = False,
                 labels: dict[str, str] | None = None, quiesce: Quiesce | None = None,
                 progress: ProgressFactory | None = None) -> dict:
    """Back up `volumes` (VG/LV) from snapshots taken at one instant, as group `name`."""
    if not _NAME.match(name):
        raise UsageError(f"invalid group name {name!r}: use letters, digits and _ . - "
                         "(starting with a letter or digit)")
    if not volumes:
        raise UsageError("a group needs its volumes: --volume VG/LV (repeatable)")
    specs = [v.removeprefix("/dev/") for v in volumes]
    if len(set(specs)) != len(specs):
        raise UsageError("a group names each volume once")
    session.require_repository()
    session.keep_reserve()
    try:
        doc = _create_group(session, name, specs, incremental=incremental, force=force,
                            keep_snapshot=keep_snapshot, labels=labels, quiesce=quiesce,
                            progress=progress)
    except BaseException:
        _group_metrics(session, name, ok=False)
        raise
    _group_metrics(session, name, ok=True)
    return doc


def _group_metrics(session: Session, name: str, *, ok: bool) -> None:
    ended = time.time()
    best_effort(session.config.metrics, session.warn, lambda path: record_group(
        path, session.lock_dir, name, ok=ok, ended_at=ended))


def _create_group(session: Session, name: str, specs: list[str], *, incremental: bool,
                  force: bool, keep_snapshot: bool, labels: dict[str, str] | None,
                  quiesce: Quiesce | None, progress: ProgressFactory | None) -> dict:
    group_id = str(uuid.uuid4())
    started = time.monotonic()
    with RunLock(session.lock_dir, group_id).acquire():
        try:
            lvs = _members(session, specs, force)
            snaps = _instant(session, lvs, group_id, quiesce)
        except BaseException as e:
            for spec in specs:   # no member got a row: one error per volume, naming the group
                report_failure(session, {"volume": spec, "record": None,
                                         "group": (group_id, name)}, e, started)
            raise
        records: list[BackupRecord] = []
        try:
            for lv, snap in zip(lvs, snaps, strict=True):
                with progress(lv.full_name) if progress else contextlib.nullcontext() as bar:
                    result = create_backup(
                        session, _member_source(lv, snap, keep_snapshot),
                        incremental=incremental, labels=labels, progress=bar,
                        source_name=lv.full_name, group=(group_id, name))
                records.append(result.record)
        except BaseException:
            # A member failed: the snapshots no backup read are removed (the failed
            # member's own, if its backup did not remove it, too).
            for snap in snaps[len(records):]:
                _remove_quietly(snap)
            raise
    return group_document(group_id, name, records)


def _members(session: Session, specs: list[str], force: bool) -> list[lvm.LogicalVolume]:
    lvs = []
    for spec in specs:
        lv, vg_lvs = volume_to_back_up(
            spec, force, snapshot_hint="a group backs up volumes",
            force_hint="back the group up through snapshots taken at one instant")
        remove_leftover_snapshots(vg_lvs, session.lock_dir)
        lvs.append(lv)
    return lvs


def _instant(session: Session, lvs: list[lvm.LogicalVolume], group_id: str,
             quiesce: Quiesce | None) -> list[lvm.LogicalVolume]:
    """Every member's snapshot, taken with their filesystems frozen."""
    config = session.config
    for mountpoint in thaw_leftovers(session.lock_dir):
        session.warn(f"thawed {mountpoint}, left frozen by a run that was killed")
    mounts = {lv.full_name: _mountpoints(session, lv) for lv in lvs}
    # Classic members first, their I/O held (lvm.hold_io); thin ones last, each thawed for
    # its own lvcreate (which cannot snapshot a suspended thin volume) while the others
    # stay frozen: with one thin member, that is still one instant (docs/reliability.md).
    order = sorted(range(len(lvs)), key=lambda i: lvs[i].is_thin)
    held = [lvm.dm_device_name(lv) for lv in lvs if lv.is_active and not lv.is_thin]
    made: dict[int, lvm.LogicalVolume] = {}
    try:
        with quiesced(quiesce), frozen([m for ms in mounts.values() for m in ms], held,
                                       sorted({lv.vg for lv in lvs}), config.freeze_timeout,
                                       session.lock_dir, group_id) as freeze:
            crash_point("group-frozen")
            for i in order:
                lv = lvs[i]
                with freeze.opened(mounts[lv.full_name] if lv.is_thin else []):
                    made[i] = make_temporary_snapshot(lv, group_id, config.temp_snapshot_size)
                crash_point("group-snapshot-made")
        crash_point("group-thawed")
    except BaseException:
        for snap in made.values():
            _remove_quietly(snap)
        raise
    return [made[i] for i in range(len(lvs))]


def _mountpoints(session: Session, lv: lvm.LogicalVolume) -> list[str]:
    """The read-write mount point of the member's filesystem, to freeze (one per
    filesystem, however often it is mounted). One that holds lvbackup's lock directory or
    LVM's metadata backups is refused: lvcreate (and the watchdog's record) would wait on
    it until the freeze timed out."""
    needed = {}
    for path in (session.lock_dir, "/etc/lvm"):
        with contextlib.suppress(OSError):
            needed[os.stat(path).st_dev] = str(path)
    try:
        st = os.stat(lv.path)
    except OSError:
        return []   # not active: not mounted either
    for _device, where in mounted_read_write(lv.path, st):
        if st.st_rdev in needed:
            raise UsageError(f"{lv.full_name} is mounted on {where}, which holds "
                             f"{needed[st.st_rdev]}: it cannot be frozen for a group backup")
        return [where]
    return []


def _member_source(lv: lvm.LogicalVolume, snap: lvm.LogicalVolume, keep: bool):
    """The source of one member: its snapshot taken at the group's instant."""
    @contextmanager
    def open_source(_run_id: str, begin: Begin) -> Iterator[Source]:
        source = Source(path=lv.path, volume_id=lv.uuid, volume_name=lv.full_name, lv=lv)
        begin(source)
        if keep:
            remove_extra_bases(lvm.vg_lvs(lv.vg), lv, snap)
        with held_snapshot(lv, snap, keep):
            yield snapshot_read(source, snap)
    return open_source


def _remove_quietly(snap: lvm.LogicalVolume) -> None:
    with contextlib.suppress(lvm.LvmError):   # gone already; else the next run removes it
        lvm.remove_lv(snap)


# --- the group's backups ------------------------------------------------------------------

def group_backups(session: Session, ref: str) -> list[BackupRecord]:
    """The members of the group backups `ref` (a group name or id) names, oldest first."""
    rows = session.catalog.group(ref)
    if not rows:
        raise UsageError(f"group {ref} not found; 'lvbackup list' shows each backup's group")
    return rows


def one_group(session: Session, ref: str) -> dict:
    """The group backup `ref` names (its id, or a unique prefix of it), as a document."""
    rows = group_backups(session, ref)
    ids = sorted({r["group_id"] or "" for r in rows})
    if len(ids) > 1:
        raise UsageError(f"{ref} names {len(ids)} group backups ({', '.join(ids)}); give "
                         "the id of one")
    return group_document(ids[0], rows[0]["group_name"] or "", rows)


def delete_group(session: Session, ref: str, *, force: bool = False) -> dict:
    """Delete every member of one group backup, or none: each is checked first (protected,
    status, dependents) and nothing is deleted if one is refused."""
    session.refuse_if_append_only("delete")
    session.release_reserve()
    with session.shared_lock():
        group = one_group(session, ref)
        cat = session.catalog
        rows = [cat.get(r["id"]) for r in group["backups"]]
        for row in rows:
            if row["protected"]:
                raise UsageError(f"backup {row['id']} of group {group['group_id']} is "
                                 f"protected; run 'lvbackup unprotect {row['id']}' first")
            if row["status"] not in ("available", "error") and not force:
                raise UsageError(f"Backup status must be available or error (backup "
                                 f"{row['id']} of group {group['group_id']} is "
                                 f"{row['status']}); pass --force to delete it anyway")
            children = cat.children(row["id"])
            if children:
                raise UsageError(f"Incremental backups exist for this backup. (backup "
                                 f"{row['id']} of group {group['group_id']} has dependents: "
                                 f"{', '.join(c['id'] for c in children)}; delete them first)")
        deleted = [delete_row(session, row, force=force)[0] for row in rows]
    return group_document(group["group_id"], group["name"], deleted)


def restore_group(session: Session, ref: str) -> dict:
    """Restore every member of one group backup to a new LV `restore_backup_<id>` in its
    volume's VG; all or nothing: if one fails, the LVs this restore created are removed."""
    group = one_group(session, ref)
    targets = []
    for row in group["backups"]:
        if row["status"] != "available":
            raise UsageError(f"Backup status must be available (backup {row['id']} of group "
                             f"{group['group_id']} is {row['status']})")
        vg = (row["volume_name"] or "").split("/")[0]
        if not is_lv_name(row["volume_name"] or ""):
            raise UsageError(f"backup {row['id']} is not of an LVM volume")
        targets.append(f"{vg}/restore_backup_{row['id']}")
    existing = {t for t in targets if _exists(t)}
    if existing:
        raise UsageError(f"{', '.join(sorted(existing))} exists already: remove it (or "
                         "restore the members one by one with --to)")
    results = []
    try:
        for row in group["backups"]:
            results.append(restore_backup(session, row["id"]))
    except BaseException:
        for target in targets:
            if _exists(target):
                with contextlib.suppress(lvm.LvmError):
                    lvm.remove_lv(target)
        raise
    return {"group_id": group["group_id"], "name": group["name"], "restored": results}


def _exists(name: str) -> bool:
    try:
        lvm.find_lv(name)
    except LvbackupError:
        return False
    return True
