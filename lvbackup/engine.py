"""Backup, restore, delete, verify, gc and record import/export: one function per operation.

The order of writes for a backup is packs, then the index entries that point into them,
then the manifest, then the catalog row turns `available`; a run killed anywhere leaves no
`available` backup that cannot be restored (docs/format.md, docs/reliability.md).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import stat
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, TypedDict

from . import events as ev
from . import lvm
from .catalog import COLUMNS, BackupRecord, Catalog, as_record, choose_parent, to_record
from .datapath.backup import ScanStats, write_backup
from .datapath.blockmap import FileBlocks, ones, source_size
from .datapath.restore import Restored, restore_blocks
from .config import Config
from .diskio import ALIGN, open_file, pwrite_all
from .faults import crash_point
from .errors import CorruptionError, LvbackupError, UsageError
from .lifecycle import Status
from .locks import RunLock, repository_lock, run_is_alive, volume_lock
from .repository.manifest import Manifest, manifest_name
from .metrics import record_backup
from .repository.pack import pack_name, read_trailer
from .repository.repo import Packer, Repository
from .sources import Source, SourceFactory
from .timeutil import now_iso

Progress = Callable[[int], None]

class Lvbackup:
    """An open configuration: the catalog and repository it names, opened on first use."""

    def __init__(self, config: Config, wait: float = 0.0):
        self.config = config
        self.wait = wait
        self._catalog: Catalog | None = None
        self._repo: Repository | None = None
        # Where warnings go (failed hooks, an unwritable event log or metrics file).
        self.warn: Callable[[str], None] = ev.stderr_warning
        self._events: ev.Events | None = None

    @property
    def events(self) -> ev.Events:
        if self._events is None:
            self._events = ev.Events(self.config.event_log, self.config.hooks,
                                     warn=lambda m: self.warn(m))
        return self._events

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog(self.config.catalog)
        return self._catalog

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = Repository.open(self.config.repository, self.config.cache_dir)
        return self._repo

    @property
    def lock_dir(self) -> Path:
        return self.config.lock_dir

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
        if self._repo is not None:
            self._repo.close()

    def shared_lock(self) -> ContextManager:
        return repository_lock(self.lock_dir, exclusive=False).acquire(self.wait)

    def exclusive_lock(self) -> ContextManager:
        return repository_lock(self.lock_dir, exclusive=True).acquire(self.wait)


# --- init ----------------------------------------------------------------------------

def init_repository(config: Config, block_size: int | None) -> dict:
    """Create the repository and the catalog if they do not exist (idempotent)."""
    repo, created = Repository.init(config.repository, config.cache_dir, block_size)
    try:
        Catalog(config.catalog).close()
    finally:
        repo.close()
    return {"repository": str(config.repository), "catalog": str(config.catalog),
            "repository_id": repo.id, "block_size": repo.block_size, "created": created}


# --- recovery of dead runs -------------------------------------------------------------

def recover_dead_runs(lv: Lvbackup) -> list[BackupRecord]:
    """Settle rows left in a transitional state by runs that died (rule 11).

    A `creating` backup whose manifest was written is complete and becomes `available`;
    otherwise it becomes `error`. A `restoring` one is `available` again. A `deleting` one
    is `deleted` if its manifest is gone, else `error_deleting`.
    """
    cat = lv.catalog
    changed: list[BackupRecord] = []
    for row in cat.in_states(Status.CREATING, Status.RESTORING, Status.DELETING):
        if run_is_alive(lv.lock_dir, row["id"]):
            continue
        manifest = _manifest_or_none(lv, row["id"])
        has_manifest = manifest is not None
        fields: dict[str, object]
        if row["status"] == Status.CREATING:
            if manifest is not None:
                to = Status.AVAILABLE
                fields = {"fail_reason": None,
                          "stored_bytes": manifest.record.get("stored_bytes") or 0}
            else:
                to = Status.ERROR
                fields = {"fail_reason":
                          "incomplete backup reset: the run creating it was interrupted"}
        elif row["status"] == Status.RESTORING:
            to, fields = Status.AVAILABLE, {}
        elif has_manifest:
            to = Status.ERROR_DELETING
            fields = {"fail_reason":
                      "the run deleting it was interrupted; delete it again with --force"}
        else:
            to, fields = Status.DELETED, {}
        with cat.write():
            if cat.get(row["id"])["status"] != row["status"]:
                continue  # another run recovered it meanwhile
            cat.transition(row["id"], to, **fields)
            cat.refresh_dependents(row["parent_id"])
        changed.append(as_record(row, **fields, status=to))
    return changed


def _manifest_or_none(lv: Lvbackup, backup_id: str) -> Manifest | None:
    try:
        return lv.repo.manifest(backup_id)
    except (CorruptionError, UsageError):
        return None


# --- create --------------------------------------------------------------------------

@dataclass
class CreateResult:
    record: BackupRecord
    stats: ScanStats


def create_backup(lv: Lvbackup, open_source: SourceFactory, *, incremental: bool,
                  name: str | None = None, description: str | None = None,
                  labels: dict[str, str] | None = None,
                  progress: Callable[..., None] | None = None,
                  source_name: str | None = None) -> CreateResult:
    """Back up a source; returns the new record (status `available`) and what was stored.

    Sends backup.create.start / createprogress / end, or backup.create.error (also for a
    failure before the backup had a row: then the payload names `source_name`), and
    updates the metrics file. `progress(done, total, {"stored": n, "reused": n})`.
    """
    started = time.monotonic()
    run: dict = {"volume": source_name, "record": None}
    try:
        result = _create_backup(lv, open_source, run, incremental=incremental, name=name,
                                description=description, labels=labels, progress=progress)
    except BaseException as e:
        payload = _failed_payload(lv, run, e)
        lv.events.emit(ev.CREATE_ERROR, payload)
        _record_metrics(lv, run["volume"], started, ok=False)
        raise
    lv.events.emit(ev.CREATE_END, result.record)
    _record_metrics(lv, result.record["volume_name"], started, ok=True, stats=result.stats)
    return result


def _failed_payload(lv: Lvbackup, run: dict, e: BaseException) -> dict:
    """The record of a failed backup, or, if it never got one, what is known of it."""
    rec = run["record"]
    try:
        if rec is not None:
            rec = to_record(lv.catalog.get(rec["id"]))
    except Exception:  # noqa: BLE001 - the catalog itself may be what failed
        rec = {**to_record(rec), "status": Status.ERROR, "fail_reason": _reason(e)}
    if rec is None:
        rec = to_record(as_record({}, volume_name=run["volume"], status=Status.ERROR,
                                  fail_reason=_reason(e)[:255], labels={}))
    return {**rec, "reason": _reason(e)}


def _record_metrics(lv: Lvbackup, volume: str | None, started: float, *, ok: bool,
                    stats: ScanStats | None = None) -> None:
    path = lv.config.metrics
    if path is None or not volume:
        return
    try:
        record_backup(path, lv.lock_dir, volume, ok=ok, ended_at=time.time(),
                      duration=time.monotonic() - started,
                      bytes_read=stats.bytes_read if stats else None,
                      bytes_stored=stats.stored_bytes if stats else None)
    except Exception as e:  # noqa: BLE001 - metrics never fail a backup
        lv.warn(f"cannot write the metrics file {path}: {getattr(e, 'strerror', None) or e}")


def _create_backup(lv: Lvbackup, open_source: SourceFactory, run: dict, *, incremental: bool,
                   name: str | None, description: str | None, labels: dict[str, str] | None,
                   progress) -> CreateResult:
    repo, cat = lv.repo, lv.catalog
    backup_id = str(uuid.uuid4())
    with ExitStack() as stack:
        stack.enter_context(lv.shared_lock())
        stack.enter_context(RunLock(lv.lock_dir, backup_id).acquire())

        def begin(ident: Source) -> None:
            # The source knows what it will read and has changed nothing yet: lock the
            # volume, pick the parent, and record the backup, so that from here on any
            # failure (a temporary snapshot that cannot be made, a signal) leaves `error`.
            stack.enter_context(volume_lock(lv.lock_dir, ident.volume_id, ident.volume_name)
                                .acquire(lv.wait))
            run["volume"] = ident.volume_name
            recover_dead_runs(lv)
            parent = (choose_parent(cat.candidates(ident.volume_id), ident.snapshot_time)
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
            }
            cat.insert(record, Status.CREATING)
            run["record"], run["parent"] = record, parent
            lv.events.emit(ev.CREATE_START, to_record(record))

        try:
            source = stack.enter_context(open_source(backup_id, begin))
            record, parent = run["record"], run["parent"]
            try:
                fd = os.open(source.path, os.O_RDONLY)
            except OSError as e:
                raise LvbackupError(f"cannot open {source.path}: {e.strerror}") from None
            stack.callback(os.close, fd)
            blocks = FileBlocks(fd)
            # With a temporary snapshot, the data is as of the snapshot (rule 9).
            fields = {"size": blocks.size, "data_timestamp": (source.snapshot_time or
                      source.data_timestamp or record["data_timestamp"])}
            record.update(fields)
            cat.update(backup_id, **fields)
            stats = _write_backup(lv, source, blocks, record, parent, progress)
        except BaseException as e:
            if run["record"] is not None:
                cat.transition(backup_id, Status.ERROR, fail_reason=_reason(e))
            if isinstance(e, OSError):
                raise LvbackupError(f"backup of {run['volume']} failed: {_reason(e)}") from None
            raise
        return CreateResult(to_record(cat.get(backup_id)), stats)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or e}{where}"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, SystemExit):
        return "terminated by a signal"
    return str(e) or type(e).__name__


def _write_backup(lv: Lvbackup, source: Source, blocks: FileBlocks, record: BackupRecord,
                  parent: BackupRecord | None, progress) -> ScanStats:
    repo, cat = lv.repo, lv.catalog
    size = blocks.size
    repo.sync_index(lv.lock_dir)
    parent_manifest = None
    if parent is not None:
        try:
            parent_manifest = repo.manifest(parent["id"])
        except CorruptionError as e:
            raise CorruptionError(f"parent backup {parent['id']}: {e}; make a full backup") from None
    sent = [0]  # the last multiple of PROGRESS_STEP percent announced

    def on_progress(done: int, packer: Packer) -> None:
        if progress:
            progress(done, size, {"stored": packer.stored_bytes,
                                  "reused": done - packer.new_bytes})
        percent = done * 100 // size if size else 100
        if lv.events.enabled and percent // ev.PROGRESS_STEP > sent[0]:
            sent[0] = percent // ev.PROGRESS_STEP
            lv.events.emit(ev.CREATE_PROGRESS, {**to_record(record), "percent": percent})

    def finish(stats: ScanStats) -> dict:
        if source.check is not None:
            source.check()
        return to_record({**record, "status": Status.AVAILABLE, "stored_bytes": stats.stored_bytes,
                          "updated_at": now_iso()})

    stats = write_backup(repo, blocks, parent_manifest, record["id"], finish,
                         workers=lv.config.workers, level=lv.config.compression_level,
                         progress=on_progress)
    with cat.write():
        cat.transition(record["id"], Status.AVAILABLE, stored_bytes=stats.stored_bytes)
        cat.refresh_dependents(record["parent_id"])
    return stats


# --- restore -------------------------------------------------------------------------

@dataclass
class Target:
    fd: int
    name: str
    fresh: bool      # already zero-filled: holes may be skipped
    seekable: bool
    tmp_path: str | None = None   # a new file is written here, renamed to `name` when whole

    def publish(self) -> None:
        if self.tmp_path is not None:
            os.replace(self.tmp_path, self.name)
            self.tmp_path = None

    def discard(self) -> None:
        if self.tmp_path is not None:
            Path(self.tmp_path).unlink(missing_ok=True)


def _open_target(to: str | None, to_file: str | None, size: int, force: bool) -> Target:
    if to_file == "-":
        _grow_pipe(1)
        return Target(1, "standard output", fresh=False, seekable=False)
    path = to if to is not None else to_file
    assert path is not None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UsageError(f"cannot access {path}: {e.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a directory; give a file or device path")
    if to is not None and st is None:
        raise UsageError(f"restore target {path} does not exist; use --to-file to create a file")
    existing = to is not None or (st is not None and stat.S_ISBLK(st.st_mode))
    flags = os.O_WRONLY
    tmp_path = None
    if not existing:
        # Write beside the destination and rename at the end: a failed restore leaves
        # whatever was at PATH untouched, never a half-written image under its name.
        flags |= os.O_CREAT | os.O_EXCL
        tmp_path = f"{path}.lvbackup-{uuid.uuid4().hex[:8]}.tmp"
    elif st is not None and stat.S_ISBLK(st.st_mode) and not force:
        flags |= os.O_EXCL  # EBUSY if mounted or held open exclusively
    try:
        # Not a character device or a FIFO: those take no O_DIRECT.
        direct = st is None or stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
        fd = open_file(tmp_path or path, flags, 0o600, direct=direct)
    except OSError as e:
        if e.errno == 16:
            raise UsageError(f"restore target {path} is in use; unmount it or pass --force") from None
        raise UsageError(f"cannot open restore target {path}: {e.strerror}") from None
    if existing:
        have = source_size(fd)
        if have < size:
            os.close(fd)
            raise UsageError(f"volume size {have} is too small to restore backup of size {size}.")
    return Target(fd, path, fresh=not existing, seekable=True, tmp_path=tmp_path)


def _grow_pipe(fd: int) -> None:
    try:  # a bigger pipe buffer means fewer wake-ups for whoever reads the stream
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    except OSError:
        pass


def _is_lv_name(spec: str) -> bool:
    return not spec.startswith(("/", ".")) and spec.count("/") == 1


def _lv_target(spec: str, force: bool) -> str:
    """The device path of an existing LV to restore onto (refused while open, unless forced)."""
    target = lvm.find_lv(spec)
    if target.is_open and not force:
        raise UsageError(f"volume {target.full_name} is in use; close it or pass --force")
    if not target.is_active:
        lvm.activate(target)
    return target.path


def _new_volume(spec: str, size: int, thin_pool: str | None) -> tuple[str, bool]:
    """Create the LV to restore into; (device path, whether it reads as zeros already)."""
    vg, name = lvm.split_name(spec)
    created = lvm.create_lv(vg, name, size, thin_pool)
    if not created.is_active:
        lvm.activate(created)
    # An unprovisioned thin LV reads as zeros; a new linear LV holds whatever the PV held.
    return created.path, created.is_thin


def restore_backup(lv: Lvbackup, backup_id: str, *, to: str | None = None,
                   to_file: str | None = None, new_volume: str | None = None,
                   thin_pool: str | None = None, force: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> BackupRecord:
    """Write a backup's image to a device, LV, new LV, file or stdout.

    With no target at all, a new LV `restore_backup_<id>` is created in the VG of the
    backed-up volume (rule 17). Returns the backup's record.
    """
    cat = lv.catalog
    row = cat.resolve(backup_id)
    if to is None and to_file is None and new_volume is None:
        volume_name = row["volume_name"] or ""
        if not _is_lv_name(volume_name):
            raise UsageError(f"backup {row['id']} is not of an LVM volume; give --to or --to-file")
        new_volume = f"{volume_name.split('/')[0]}/restore_backup_{row['id']}"
    if to is not None and _is_lv_name(to):
        to = _lv_target(to, force)
    with ExitStack() as stack:
        stack.enter_context(lv.shared_lock())
        recover_dead_runs(lv)
        row = cat.get(row["id"])
        if row["status"] != Status.AVAILABLE:
            raise UsageError(f"Backup status must be available (backup {row['id']} is {row['status']})")
        repo = lv.repo
        repo.sync_index(lv.lock_dir)
        try:
            manifest = repo.manifest(row["id"])
        except CorruptionError as e:
            raise CorruptionError(f"backup {row['id']}: {e}") from None
        fresh_device = False
        if new_volume is not None:
            to, fresh_device = _new_volume(new_volume, manifest.size, thin_pool)
        target = _open_target(to, to_file, manifest.size, force)
        target.fresh = target.fresh or fresh_device
        if target.fd != 1:
            stack.callback(target.discard)
            stack.callback(os.close, target.fd)
        stack.enter_context(RunLock(lv.lock_dir, row["id"]).acquire())
        cat.transition(row["id"], Status.RESTORING)
        lv.events.emit(ev.RESTORE_START, {**to_record(cat.get(row["id"])), "target": target.name})
        try:
            try:
                _write_image(repo, manifest, target, lv.config.workers, progress)
                target.publish()
            except CorruptionError as e:
                raise CorruptionError(f"backup {row['id']}: {e}") from None
            except BrokenPipeError:
                raise LvbackupError(f"restore of backup {row['id']}: the reader of the output "
                                    "closed it early") from None
            except OSError as e:
                raise LvbackupError(f"restore of backup {row['id']} to {target.name} failed: "
                                    f"{_reason(e)}") from None
            finally:
                cat.transition(row["id"], Status.AVAILABLE)
        except BaseException as e:
            lv.events.emit(ev.RESTORE_ERROR, {**to_record(cat.get(row["id"])),
                                              "target": target.name, "reason": _reason(e)})
            raise
    rec = to_record(cat.get(row["id"]))
    lv.events.emit(ev.RESTORE_END, {**rec, "target": target.name})
    return rec


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


# --- delete --------------------------------------------------------------------------

def delete_backup(lv: Lvbackup, backup_id: str, *, force: bool = False) -> BackupRecord:
    """Remove a backup's manifest and mark it deleted (its chunks go at the next gc)."""
    cat = lv.catalog
    row = cat.resolve(backup_id)
    with lv.shared_lock():
        recover_dead_runs(lv)
        return delete_row(lv, cat.get(row["id"]), force=force)[0]


class Reparented(TypedDict):
    id: str
    old_parent_id: str
    new_parent_id: str | None


def delete_row(lv: Lvbackup, row: BackupRecord, *, force: bool = False,
               reparent: bool = False) -> tuple[BackupRecord, list[Reparented]]:
    """Delete one backup (the caller holds the repository lock); (its record, the children
    re-parented). A protected backup is refused. Children refuse the delete (Cinder's rule
    14) unless `reparent`: then, since manifests are self-contained, each child's parent
    becomes the deleted backup's parent (none: the child is a full backup from then on),
    recorded in the catalog in the same transaction that marks the backup `deleting`."""
    cat = lv.catalog
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
    with RunLock(lv.lock_dir, row["id"]).acquire():
        lv.events.emit(ev.DELETE_START, to_record(row))
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
            lv.repo.storage.delete(manifest_name(row["id"]))
            crash_point("delete-manifest-removed")
        except OSError as e:
            cat.transition(row["id"], Status.ERROR_DELETING, fail_reason=_reason(e))
            lv.events.emit(ev.DELETE_ERROR, {**to_record(cat.get(row["id"])),
                                             "reason": _reason(e)})
            raise LvbackupError(f"cannot delete backup {row['id']}: {_reason(e)}") from None
        with cat.write():
            cat.transition(row["id"], Status.DELETED)
            cat.refresh_dependents(row["parent_id"])
    rec = to_record(cat.get(row["id"]))
    lv.events.emit(ev.DELETE_END, rec)
    return rec, moved


# --- verify --------------------------------------------------------------------------

def verify_backups(lv: Lvbackup, ids: list[str], *, deep: bool,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Check backups: manifests, index entries and packs; with `deep`, every chunk's hash."""
    cat = lv.catalog
    with lv.shared_lock():
        recover_dead_runs(lv)
        rows = ([cat.resolve(i) for i in ids] if ids else cat.list(status=Status.AVAILABLE))
        repo = lv.repo
        bad_index = repo.sync_index(lv.lock_dir)
        results = []
        total = sum(r["size"] or 0 for r in rows)
        done = 0
        for row in rows:
            error = None
            if row["status"] != Status.AVAILABLE:
                error = f"backup {row['id']} is {row['status']}, not available"
            else:
                try:
                    _verify_one(repo, row["id"], deep)
                except CorruptionError as e:
                    error = f"backup {row['id']}: {e}"
            results.append({"id": row["id"], "name": row["name"],
                            "volume_name": row["volume_name"], "ok": error is None,
                            "error": error})
            done += row["size"] or 0
            if progress:
                progress(done, total)
    errors = [f"index file {n} is corrupt" for n in bad_index]
    return {"ok": not errors and all(r["ok"] for r in results), "deep": deep,
            "index_errors": errors, "backups": results}


def _verify_one(repo: Repository, backup_id: str, deep: bool) -> None:
    """Every block's chunk is indexed, inside a pack whose trailer is intact; with `deep`,
    every chunk is also read, decompressed and checked against its BLAKE3 id."""
    manifest = repo.manifest(backup_id)
    if manifest.record.get("id") != backup_id:
        raise CorruptionError(f"manifest {manifest.name} holds the record of another backup")
    pack_sizes: dict[bytes, int] = {}
    per = 4096
    for n, entries in enumerate(manifest.entries(per)):
        ids: dict[bytes, int] = {}
        for i, _, cid in entries.chunks():
            ids.setdefault(cid, n * per + i)
        refs = repo.index.lookup(ids)
        for cid, block in ids.items():
            ref = refs.get(cid)
            if ref is None:
                raise CorruptionError(f"block {block}: chunk {cid.hex()} is not in the "
                                      "repository index")
            size = pack_sizes.get(ref.pack_id)
            if size is None:
                try:
                    read_trailer(repo.storage, ref.pack_id)
                except CorruptionError as e:
                    raise CorruptionError(f"block {block}: {e}") from None
                size = pack_sizes[ref.pack_id] = repo.storage.size(pack_name(ref.pack_id))
            if ref.offset + ref.length > size:
                raise CorruptionError(f"block {block}: pack {ref.pack_id.hex()} is truncated")
    if deep:
        for _ in restore_blocks(repo, manifest, workers=os.cpu_count() or 2, fill_holes=False,
                                by_id=True):
            pass


# --- export / import of records ---------------------------------------------------------

def export_record(lv: Lvbackup, backup_id: str) -> str:
    """Base64 of a JSON object with every catalog field of an available backup (rule 19)."""
    row = lv.catalog.resolve(backup_id)
    if row["status"] != Status.AVAILABLE:
        raise UsageError(f"Backup status must be available (backup {row['id']} is {row['status']})")
    rec = {k: v for k, v in to_record(row).items() if k in COLUMNS}
    return base64.b64encode(json.dumps(rec, sort_keys=True).encode()).decode()


def import_record(lv: Lvbackup, text: str) -> BackupRecord:
    """Re-create a catalog row from export_record's output (rule 20)."""
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
    except (ValueError, UnicodeDecodeError):
        raise UsageError("Can't parse backup record.") from None
    cat = lv.catalog
    with lv.shared_lock():
        existing = cat.find(rec["id"])
        if existing is not None and existing["status"] != Status.DELETED:
            raise UsageError("Backup already exists in database.")
        try:
            manifest = lv.repo.manifest(rec["id"])
        except CorruptionError as e:
            raise LvbackupError(f"cannot import backup {rec['id']}: {e}; copy its manifest "
                                f"into {lv.config.repository} first") from None
        row = as_record(rec, fail_reason=None, updated_at=now_iso(), size=manifest.size,
                        block_size=manifest.block_size,
                        is_incremental=bool(rec.get("parent_id")), num_dependent_backups=0)
        for key in ("created_at", "data_timestamp"):
            row[key] = row[key] or manifest.record.get(key) or now_iso()  # type: ignore[literal-required]
        with cat.write():
            cat.put(row, Status.AVAILABLE)
            cat.refresh_dependents(row["id"])
            cat.refresh_dependents(row["parent_id"])
    return to_record(cat.get(row["id"]))


# --- catalog rebuild ------------------------------------------------------------------

def rebuild_catalog(config: Config, wait: float = 0.0) -> dict:
    """Recreate the catalog from the manifests in the repository.

    Rows for manifests are restored as `available`; rows whose manifest is gone are kept
    but no longer claim to be restorable. A catalog that SQLite cannot read is moved
    aside (…corrupt-<time>) first.
    """
    lv = Lvbackup(config, wait)
    try:
        with lv.exclusive_lock():
            repo = lv.repo
            moved = None
            try:
                cat = lv.catalog
                cat.count()
            except LvbackupError:
                moved = config.catalog.with_name(
                    f"{config.catalog.name}.corrupt-{now_iso().replace(':', '')}")
                for suffix in ("", "-wal", "-shm"):
                    src = Path(str(config.catalog) + suffix)
                    if src.exists():
                        src.rename(str(moved) + suffix)
                lv._catalog = None
                cat = lv.catalog
            found, bad = set(), []
            for name, _ in repo.storage.list("manifests/"):
                backup_id = name.rsplit("/", 1)[1]
                try:
                    rec = repo.manifest(backup_id).record
                except CorruptionError as e:
                    bad.append(str(e))
                    continue
                row = as_record(rec, fail_reason=None)
                old = cat.find(backup_id)
                if old is not None:
                    # Catalog-only facts, changed after the manifest was written: keep them.
                    for key in ("protected", "parent_id", "is_incremental"):
                        row[key] = old[key]  # type: ignore[literal-required]
                cat.put(row, Status.AVAILABLE)
                found.add(backup_id)
            for row in cat.list(include_deleted=True):
                if row["id"] in found or row["status"] in (Status.DELETED, Status.ERROR):
                    continue
                if row["status"] == Status.DELETING:
                    cat.transition(row["id"], Status.DELETED)
                else:
                    cat.transition(row["id"], Status.ERROR, fail_reason="manifest missing or "
                                   "corrupt in the repository")
            _orphans_become_full(cat)
            cat.refresh_all_dependents()
    finally:
        lv.close()
    return {"recovered": len(found), "corrupt_manifests": bad,
            "old_catalog_moved_to": str(moved) if moved else None}


def _orphans_become_full(cat: Catalog) -> None:
    """A backup whose recorded parent is gone (pruned: the manifest still names it) needs
    nothing from it, manifests being self-contained: record it as a full backup."""
    rows = {r["id"]: r for r in cat.list(include_deleted=True)}
    for r in rows.values():
        parent = rows.get(r["parent_id"]) if r["parent_id"] else None
        if (r["parent_id"] and r["status"] != Status.DELETED
                and (parent is None or parent["status"] == Status.DELETED)):
            cat.update(r["id"], parent_id=None, is_incremental=False)


# --- protection ----------------------------------------------------------------------

def set_protected(lv: Lvbackup, backup_id: str, protected: bool) -> BackupRecord:
    """Protect a backup from prune and delete, or lift that protection."""
    cat = lv.catalog
    row = cat.resolve(backup_id)
    if row["status"] == Status.DELETED:
        raise UsageError(f"backup {row['id']} is deleted")
    cat.update(row["id"], protected=int(protected))
    return to_record(cat.get(row["id"]))


def backup_chain(lv: Lvbackup, backup_id: str) -> list[BackupRecord]:
    """The backup's row, then its parent's, and so on back to its full backup (the list
    ends early at a parent the catalog does not have)."""
    cat = lv.catalog
    chain = [cat.get(backup_id)]
    seen = {backup_id}
    while chain[-1]["parent_id"] and chain[-1]["parent_id"] not in seen:
        parent = cat.find(chain[-1]["parent_id"])
        if parent is None:
            break
        seen.add(parent["id"])
        chain.append(parent)
    return chain
