"""Restore a backup: `restore`."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from contextlib import ExitStack
from typing import Literal, TypedDict

from .. import events as ev
from ..base.diskio import ALIGN, pwrite_all
from ..base.errors import CorruptionError, LvbackupError, UsageError
from ..base.faults import crash_point
from ..base.lifecycle import ACTIVITY, Status
from ..base.locks import hold_backup, volume_lock
from ..catalog.catalog import (
    BackupRecord,
    require_available,
    to_record,
)
from ..datapath.blockmap import ones
from ..datapath.unpack import Restored, restore_blocks
from ..repository.manifest import Manifest
from ..repository.repo import Repository
from ..session import Session, reason, recover_dead_runs
from ..volumes.sources import device_volume_id
from ..volumes.targets import Target, create_volume_target, is_lv_name, lv_target, open_target


class RestoreResult(TypedDict):
    """What `restore` did (docs/json.md), the same whatever the target."""

    backup_id: str
    target: str          # the LV (VG/NAME), device, file path, or "-" for standard output
    target_kind: Literal["volume", "device", "file", "stdout"]
    created: bool        # the restore created it (a new LV, or a file where there was none)
    size: int            # bytes written (the backup's size)
    record: BackupRecord


def restore_backup(session: Session, backup_id: str, *, to: str | None = None,
                   to_file: str | None = None, new_volume: str | None = None,
                   thin_pool: str | None = None, force: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> RestoreResult:
    """Write a backup's image to a device, LV, new LV, file or stdout.

    With no target at all, a new LV `restore_backup_<id>` is created in the VG of the
    backed-up volume (rule 17).
    """
    given_to = to
    with ExitStack() as stack:
        stack.enter_context(session.shared_lock())
        cat = session.catalog
        row = cat.resolve(backup_id)
        if to is None and to_file is None and new_volume is None:
            volume_name = row["volume_name"] or ""
            if not is_lv_name(volume_name):
                raise UsageError(f"backup {row['id']} is not of an LVM volume; "
                                 "give --to or --to-file")
            new_volume = f"{volume_name.split('/')[0]}/restore_backup_{row['id']}"
        # Never onto a volume a backup is reading (directly, or the origin of its snapshot):
        # its volume lock, which every backup holds, is taken for the restore.
        locks = []
        if to is not None and is_lv_name(to):
            to, lv_uuid = lv_target(to, force)
            locks.append((lv_uuid, to))
        for path in (to, to_file):
            if path is not None and path != "-":
                resolved = os.path.realpath(path)
                locks.append((device_volume_id(resolved), resolved))
        for volume_id, name in locks:
            stack.enter_context(volume_lock(session.lock_dir, volume_id, name)
                                .acquire(session.wait))
        recover_dead_runs(session)
        row = cat.get(row["id"])
        # One run at a time per backup: a second restore waits up to --wait for the first,
        # then exits 75 (docs/lineage.md, "One restore at a time").
        stack.enter_context(hold_backup(session.lock_dir, row["id"],
                                        ACTIVITY.get(Status(row["status"])), session.wait))
        row = cat.get(row["id"])
        require_available(row)
        repo = session.repo
        repo.sync_index(session.lock_dir)
        try:
            manifest = repo.manifest(row["id"])
        except CorruptionError as e:
            raise CorruptionError(f"backup {row['id']}: {e}") from None
        fresh_device = False
        if new_volume is not None:
            to, fresh_device = create_volume_target(new_volume, manifest.size, thin_pool)
        target = open_target(to, to_file, manifest.size, force)
        target.fresh = target.fresh or fresh_device
        stack.callback(target.close)
        cat.transition(row["id"], Status.RESTORING)
        session.events.emit(ev.RESTORE_START,
                            {**to_record(cat.get(row["id"])), "target": target.name})
        try:
            try:
                # A remote store answers each read after a round trip: more in flight.
                workers = max(session.config.workers,
                              repo.storage.capabilities.concurrent_gets)
                _write_image(repo, manifest, target, workers, progress)
                target.publish()
            except CorruptionError as e:
                raise CorruptionError(f"backup {row['id']}: {e}") from None
            except BrokenPipeError:
                raise LvbackupError(f"restore of backup {row['id']}: the reader of the output "
                                    "closed it early") from None
            except OSError as e:
                raise LvbackupError(f"restore of backup {row['id']} to {target.name} failed: "
                                    f"{reason(e)}") from None
            finally:
                cat.transition(row["id"], Status.AVAILABLE)
        except BaseException as e:
            session.events.emit(ev.RESTORE_ERROR, {**to_record(cat.get(row["id"])),
                                              "target": target.name, "reason": reason(e)})
            raise
    rec = to_record(cat.get(row["id"]))
    session.events.emit(ev.RESTORE_END, {**rec, "target": target.name})
    kind: Literal["volume", "device", "file", "stdout"]
    written: str | None
    if new_volume is not None or (given_to is not None and is_lv_name(given_to)):
        kind, written = "volume", new_volume or given_to
    elif to_file is not None:
        kind, written = ("stdout", "-") if to_file == "-" else ("file", to_file)
    else:
        kind, written = "device", target.name
    assert written is not None
    return {"backup_id": rec["id"], "target": written, "target_kind": kind,
            "created": new_volume is not None or target.created, "size": manifest.size,
            "record": rec}


def _write_image(repo: Repository, manifest: Manifest, target: Target, workers: int,
                 progress) -> None:
    bs, size = manifest.block_size, manifest.size
    skip_holes = target.fresh and target.seekable

    def write_at(seg: Restored) -> None:
        base = seg.first_block * bs
        if not skip_holes:
            pwrite_all(target.fd, seg.view, base)
            return
        for i, j in ones(seg.data):  # a sparse write: only blocks that hold data
            run = seg.view[i * bs:j * bs]
            padded = memoryview(seg.buf)[i * bs:i * bs + -(-len(run) // ALIGN) * ALIGN]
            pwrite_all(target.fd, run, base + i * bs, padded)

    for seg in restore_blocks(repo, manifest, workers=workers, fill_holes=not skip_holes,
                              write=write_at if target.seekable else None):
        if not target.seekable:
            _write_all(target.fd, seg.view)
        crash_point("restore-segment")
        if progress:
            progress(min(seg.first_block * bs + len(seg.view), size), size)
    if target.seekable:
        if target.fresh and stat.S_ISREG(os.fstat(target.fd).st_mode):
            os.ftruncate(target.fd, size)  # a trailing hole, or the padding of the last write
        os.fsync(target.fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]
