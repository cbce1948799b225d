"""Back up a source: `create`."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from .. import events as ev
from .. import lvm
from ..base.errors import CorruptionError, LvbackupError, UsageError
from ..base.lifecycle import Status
from ..base.locks import RunLock, volume_lock
from ..base.timeutil import now_iso
from ..catalog.catalog import (
    BackupRecord,
    as_record,
    to_record,
)
from ..catalog.lineage import choose_parent
from ..config import Config
from ..datapath.backup import ScanStats, write_backup
from ..datapath.blockmap import FileBlocks
from ..metrics import best_effort, record_backup
from ..repository.repo import Packer
from ..session import Session, reason, recover_dead_runs
from ..volumes.changes import tracker
from ..volumes.quiesce import Quiesce
from ..volumes.sources import (
    Source,
    SourceFactory,
    device_source,
    snapshot_source,
    volume_source,
)


@dataclass
class CreateResult:
    record: BackupRecord
    stats: ScanStats


def create_backup(session: Session, open_source: SourceFactory, *, incremental: bool,
                  name: str | None = None, description: str | None = None,
                  labels: dict[str, str] | None = None,
                  progress: Callable[..., None] | None = None,
                  source_name: str | None = None,
                  group: tuple[str, str] | None = None) -> CreateResult:
    """Back up a source; returns the new record (status `available`) and what was stored.

    Sends backup.create.start / createprogress / end, or backup.create.error (also for a
    failure before the backup had a row: then the payload names `source_name`), and
    updates the metrics file. `progress(done, total, {"stored": n, "reused": n})`.
    `group`: (group id, group name) of the group backup it is a member of; its parent is
    then found among that group's backups (docs/lineage.md, "Groups").
    """
    session.keep_reserve()   # a full disk stops it with the room kept for delete and gc
    started = time.monotonic()
    run: dict = {"volume": source_name, "record": None, "group": group}
    try:
        result = _create_backup(session, open_source, run, incremental=incremental, name=name,
                                description=description, labels=labels, progress=progress,
                                group=group)
    except BaseException as e:
        report_failure(session, run, e, started)
        raise
    session.events.emit(ev.CREATE_END, result.record)
    _record_metrics(session, result.record["volume_name"], started, ok=True, stats=result.stats)
    return result


def report_failure(session: Session, run: dict, e: BaseException, started: float) -> None:
    """backup.create.error and the metrics of a failed backup; `run`: {"volume": its
    name, "record": its row or None, "group": (group id, name) or None}."""
    session.events.emit(ev.CREATE_ERROR, _failed_payload(session, run, e))
    _record_metrics(session, run["volume"], started, ok=False)


def _failed_payload(session: Session, run: dict, e: BaseException) -> dict:
    """The record of a failed backup, or, if it never got one, what is known of it."""
    rec = run["record"]
    try:
        if rec is not None:
            rec = to_record(session.catalog.get(rec["id"]))
    except Exception:  # noqa: BLE001 - the catalog itself may be what failed
        rec = {**to_record(rec), "status": Status.ERROR, "fail_reason": reason(e)}
    if rec is None:
        group_id, group_name = run.get("group") or (None, None)
        rec = to_record(as_record({}, volume_name=run["volume"], status=Status.ERROR,
                                  fail_reason=reason(e)[:255], labels={},
                                  group_id=group_id, group_name=group_name))
    return {**rec, "reason": reason(e)}


def _record_metrics(session: Session, volume: str | None, started: float, *, ok: bool,
                    stats: ScanStats | None = None) -> None:
    if not volume:
        return
    ended = time.time()
    best_effort(session.config.metrics, session.warn, lambda path: record_backup(
        path, session.lock_dir, volume, ok=ok, ended_at=ended,
        duration=time.monotonic() - started,
        bytes_read=stats.bytes_read if stats else None,
        bytes_stored=stats.stored_bytes if stats else None))


def _create_backup(session: Session, open_source: SourceFactory, run: dict, *, incremental: bool,
                   name: str | None, description: str | None, labels: dict[str, str] | None,
                   progress, group: tuple[str, str] | None) -> CreateResult:
    backup_id = str(uuid.uuid4())
    with ExitStack() as stack:
        stack.enter_context(session.shared_lock())
        stack.enter_context(RunLock(session.lock_dir, backup_id).acquire())
        repo, cat = session.repo, session.catalog

        def begin(ident: Source) -> None:
            # The source knows what it will read and has changed nothing yet: lock the
            # volume, pick the parent, and record the backup, so that from here on any
            # failure (a temporary snapshot that cannot be made, a signal) leaves `error`.
            stack.enter_context(volume_lock(session.lock_dir, ident.volume_id, ident.volume_name)
                                .acquire(session.wait))
            run["volume"] = ident.volume_name
            recover_dead_runs(session)
            group_id, group_name = group or (None, None)
            parent = (choose_parent(cat.candidates(ident.volume_id, group_name),
                                    ident.snapshot_time)
                      if incremental else None)
            now = now_iso()
            record: BackupRecord = {
                "id": backup_id, "name": name, "description": description,
                "volume_id": ident.volume_id, "volume_name": ident.volume_name,
                "snapshot_id": ident.snapshot_id, "snapshot_name": ident.snapshot_name,
                "parent_id": parent["id"] if parent else None,
                "is_incremental": parent is not None,
                "data_timestamp": ident.snapshot_time or now, "created_at": now,
                "updated_at": now, "status": Status.CREATING, "fail_reason": None, "size": None,
                "block_size": repo.block_size, "stored_bytes": 0, "num_dependent_backups": 0,
                "labels": dict(labels or {}), "protected": False,
                "group_id": group_id, "group_name": group_name,
            }
            cat.insert(record, Status.CREATING)
            run["record"], run["parent"] = record, parent
            session.events.emit(ev.CREATE_START, to_record(record))

        try:
            source = stack.enter_context(open_source(backup_id, begin))
            record, parent = run["record"], run["parent"]
            try:
                fd = os.open(source.path, os.O_RDONLY)
            except OSError as e:
                raise LvbackupError(f"cannot open {source.path}: {e.strerror}") from None
            stack.callback(os.close, fd)
            blocks = FileBlocks(fd)
            stack.callback(blocks.close)
            # With a temporary snapshot, the data is as of the snapshot (rule 9).
            record.update({"size": blocks.size, "data_timestamp": (
                source.snapshot_time or source.data_timestamp or record["data_timestamp"])})
            stats = _write_backup(session, source, blocks, record, parent, progress)
        except BaseException as e:
            if run["record"] is not None:
                cat.transition(backup_id, Status.ERROR, fail_reason=reason(e))
            if isinstance(e, OSError):
                raise LvbackupError(f"backup of {run['volume']} failed: {reason(e)}") from None
            raise
        return CreateResult(to_record(cat.get(backup_id)), stats)


def _write_backup(session: Session, source: Source, file: FileBlocks, record: BackupRecord,
                  parent: BackupRecord | None, progress) -> ScanStats:
    repo, cat = session.repo, session.catalog
    size = file.size
    repo.sync_index(session.lock_dir)
    parent_manifest = None
    if parent is not None:
        try:
            parent_manifest = repo.manifest(parent["id"])
        except CorruptionError as e:
            raise CorruptionError(f"parent backup {parent['id']}: {e}; "
                                  "make a full backup") from None
    plan = tracker.plan(file, source.lv, dict(parent) if parent else None, parent_manifest,
                        repo.block_size, track=session.config.change_tracking,
                        sample_percent=session.config.change_sample, warn=session.warn)
    # One write with the size: from the moment a row shows its size, this run writes the
    # catalog again only at its end.
    fields = {**plan.identity, "change_source": plan.change_source,
              "change_fallback": plan.fallback, "size": size,
              "data_timestamp": record["data_timestamp"]}
    record.update(fields)  # type: ignore[typeddict-item]
    cat.update(record["id"], **fields)
    sent = [0]  # the last multiple of PROGRESS_STEP percent announced

    def on_progress(done: int, packer: Packer) -> None:
        if progress:
            progress(done, size, {"stored": packer.stored_bytes,
                                  "reused": done - packer.new_bytes})
        percent = done * 100 // size if size else 100
        if session.events.enabled and percent // ev.PROGRESS_STEP > sent[0]:
            sent[0] = percent // ev.PROGRESS_STEP
            session.events.emit(ev.CREATE_PROGRESS, {**to_record(record), "percent": percent})

    def finish(stats: ScanStats) -> BackupRecord:
        stats.bytes_read += plan.sampled_bytes   # the sample check's reads count too
        if source.check is not None:
            source.check()
        return to_record({**record, "status": Status.AVAILABLE, "stored_bytes": stats.stored_bytes,
                          "bytes_read": stats.bytes_read, "updated_at": now_iso()})

    stats = write_backup(repo, plan.blocks, parent_manifest, record["id"], finish,
                         workers=session.config.workers, level=session.config.compression_level,
                         progress=on_progress)
    with cat.write():
        cat.transition(record["id"], Status.AVAILABLE, stored_bytes=stats.stored_bytes,
                       bytes_read=stats.bytes_read)
        cat.refresh_dependents(record["parent_id"])
    return stats


def select_source(config: Config, *, volume: str | None = None, snapshot: str | None = None,
                  device: str | None = None, force: bool = False,
                  keep_snapshot: bool | None = None,
                  quiesce: Quiesce | None = None) -> tuple[SourceFactory, str | None]:
    """The source `create` and `run` back up: an LVM snapshot (of `volume`, if given), an
    LVM volume (through a temporary snapshot with `force`), or a device or image file.
    Returns its factory and the name it goes by before it is opened (for metrics and the
    error event of a source that cannot be opened). `keep_snapshot` unset: the
    configuration's `keep_snapshot:` for a volume read through its own snapshot.
    `quiesce` unset: the configuration's pre_snapshot and post_snapshot commands."""
    if device and (volume or snapshot):
        raise UsageError("--device cannot be combined with --volume or --snapshot")
    if keep_snapshot and not volume or keep_snapshot and snapshot:
        raise UsageError("--keep-snapshot applies to --volume only (it keeps the snapshot "
                         "lvbackup takes of the volume)")
    if keep_snapshot is None:
        keep_snapshot = config.keep_snapshot and bool(volume) and not snapshot
    if snapshot:
        return snapshot_source(snapshot, volume, lock_dir=config.lock_dir), None
    if volume:
        return (volume_source(volume, force=force, snapshot_size=config.temp_snapshot_size,
                              lock_dir=config.lock_dir, keep_snapshot=keep_snapshot,
                              quiesce=quiesce or quiesce_of(config)),
                volume.removeprefix("/dev/") if "/" in volume else None)
    if device:
        return device_source(device), os.path.realpath(device)
    raise UsageError("give the source: --volume VG/LV, --snapshot VG/SNAP or --device PATH")


def quiesce_of(config: Config, pre: tuple[str, ...] | None = None,
               post: tuple[str, ...] | None = None) -> Quiesce:
    """The quiesce commands: `pre` and `post` (a job's), else the configuration's."""
    return Quiesce(pre=pre or config.pre_snapshot, post=post or config.post_snapshot,
                   warn=ev.stderr_warning)


def newest_snapshot(origin_spec: str) -> tuple[lvm.LogicalVolume, lvm.LogicalVolume]:
    """(origin, its newest snapshot by creation time); lvbackup's own temporary snapshots
    do not count. UsageError if the volume has none."""
    origin = lvm.find_lv(origin_spec)
    if origin.is_snapshot:
        raise UsageError(f"{origin.full_name} is a snapshot; snapshot_of: names its origin")
    snaps = [s for s in lvm.list_lvs(origin.vg)
             if s.origin == origin.name and lvm.TEMP_TAG not in s.tags]
    if not snaps:
        raise UsageError(f"volume {origin.full_name} has no snapshot to back up; create one "
                         f"first (lvbackup snapshot create {origin.full_name})")
    return origin, max(snaps, key=lambda s: (s.time, s.name))


