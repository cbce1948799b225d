"""`copy`: backups into the repository and catalog of another configuration (the off-site
copy), keeping their ids, lineage, timestamps and labels.

Per backup, in the order a backup writes (docs/format.md, "Order of writes"): the chunks
the target lacks, read from this repository, checked against their ids and packed anew
there; the packs indexed; the manifest; then the target's catalog row. Between
repositories that name chunks alike (both unencrypted, or under one master key) every id
stays: the chunks are the manifest's pages and blocks, and the manifest is copied byte for
byte (resealed for the target if encrypted). Otherwise (other keys, or one side
encrypted) each block's chunk is renamed by the target's codec from its plaintext, what
the target lacks by that name is sent, and the manifest is written anew with the
target's ids (ManifestWriter, as a backup writes it). A copy cut short leaves packs the
target's next run indexes and reuses, so a rerun resumes where it stopped; one that finds
every backup there copies nothing. Parents go before their incrementals, and a selected
incremental brings along its ancestors the target lacks.

The target's secret is its own (credentials.target_secrets), never this configuration's.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..base.errors import CorruptionError, UsageError
from ..base.faults import crash_point
from ..base.lifecycle import Status
from ..base.locks import RunLock
from ..base.sqlitefile import no_room
from ..base.timeutil import now_iso
from ..catalog.catalog import BackupRecord, as_record
from ..config import load_config
from ..credentials import target_secrets
from ..datapath.pipeline import ordered_map
from ..metrics import best_effort, record_copy
from ..repository import codec
from ..repository.manifest import (
    Entries,
    Manifest,
    ManifestWriter,
    copy_manifest,
    manifest_name,
)
from ..repository.repo import Packer, Repository
from ..session import Session, recover_dead_runs
from .maintenance import init_repository

# A step holds at most this many bytes of blocks (64 blocks of 128 KiB), and workers +
# `depth` steps are under way at once, which bounds the memory of a copy.
_STEP_BYTES = 8 * 1024 * 1024


@dataclass
class CopyReport:
    target: str
    copied: list[str]
    present: list[str]
    chunks_sent: int = 0
    bytes_sent: int = 0      # stored (compressed) bytes added to the target
    by_volume: dict[str, int] = field(default_factory=dict)   # bytes_sent per volume

    def as_dict(self) -> dict:
        return {"target": self.target, "copied": self.copied, "already_present": self.present,
                "chunks_sent": self.chunks_sent, "bytes_sent": self.bytes_sent}


def copy_backups(session: Session, to_config: Path, ids: list[str], every: bool,
                 volume: str | None, progress: Callable[[int, int], None] | None = None,
                 init: bool = False) -> CopyReport:
    """Copy the backups chosen by `ids`, `every` or `volume` into `to_config`'s repository,
    which must exist unless `init` (then it is created as `init` would)."""
    if bool(ids) + every + bool(volume) != 1:
        raise UsageError("name the backups to copy: IDs, --all or --volume V (one of them)")
    target = Session(load_config(to_config), session.wait, target_secrets)
    target.warn = session.warn
    session.keep_reserve()   # it stores backups: never in the room kept for delete and gc
    target.keep_reserve()
    try:
        with session.shared_lock():
            recover_dead_runs(session)
            chosen = _with_ancestors(session, _selected(session, ids, every, volume))
            volumes = sorted({_volume(r) for r in chosen})
            try:
                report = _into(session, target, to_config, chosen, progress, init)
            except (OSError, sqlite3.Error) as e:
                _record_metrics(session, volumes, ok=False)
                failure = no_room(e, f"copy to {to_config}")
                if failure is None:
                    raise
                raise failure from None
            except BaseException:
                _record_metrics(session, volumes, ok=False)
                raise
            _record_metrics(session, volumes, ok=True, report=report)
            return report
    finally:
        target.close()


def _into(session: Session, target: Session, to_config: Path, chosen: list[BackupRecord],
          progress: Callable[[int, int], None] | None, init: bool) -> CopyReport:
    config = target.config
    if not init and not Repository.exists(config.repository, config.s3):
        # A typo, or a mount point whose disk is not mounted, would otherwise put the
        # off-site copy on the local disk.
        raise UsageError(f"no repository at {config.repository} (the target in "
                         f"{to_config}); create it with 'lvbackup copy --init' or "
                         f"'lvbackup --config {to_config} init'")
    init_repository(config, session.repo.block_size, find_secrets=target_secrets)
    if target.repo.id == session.repo.id and target.config.catalog == session.config.catalog:
        raise UsageError(f"{to_config} names this configuration's own repository and "
                         "catalog: nothing to copy to")
    with target.shared_lock():
        target.repo.sync_index(target.lock_dir)
        recover_dead_runs(target)
        return _copy(session, target, chosen, progress)


def _volume(row: BackupRecord) -> str:
    return row["volume_name"] or row["volume_id"]


def _record_metrics(session: Session, volumes: list[str], *, ok: bool,
                    report: CopyReport | None = None) -> None:
    if not volumes:
        return
    ended = time.time()
    best_effort(session.config.metrics, session.warn, lambda path: record_copy(
        path, session.lock_dir, volumes, ok=ok, ended_at=ended,
        bytes_sent=report.by_volume if report else {}))


def _selected(session: Session, ids: list[str], every: bool, volume: str | None
              ) -> list[BackupRecord]:
    cat = session.catalog
    if ids:
        rows = [cat.resolve(i, include_deleted=False) for i in ids]
        for row in rows:
            if row["status"] != Status.AVAILABLE:
                raise UsageError(f"backup {row['id']} is {row['status']}: only available "
                                 "backups are copied")
        return rows
    rows = cat.list(volumes=[volume] if volume else [], status=Status.AVAILABLE)
    if volume and not rows:
        raise UsageError(f"no available backups of volume {volume}")
    return rows


def _with_ancestors(session: Session, rows: list[BackupRecord]) -> list[BackupRecord]:
    """`rows` and the available ancestors of each, every parent before its children."""
    by_id = {r["id"]: r for r in rows}
    for row in rows:
        parent_id = row["parent_id"]
        while parent_id and parent_id not in by_id:
            parent = session.catalog.find(parent_id)
            if parent is None or parent["status"] != Status.AVAILABLE:
                break
            by_id[parent_id] = parent
            parent_id = parent["parent_id"]
    ordered: list[BackupRecord] = []
    placed: set[str] = set()

    def place(row: BackupRecord) -> None:
        if row["id"] in placed:
            return
        parent = by_id.get(row["parent_id"] or "")
        if parent is not None:
            place(parent)
        placed.add(row["id"])
        ordered.append(row)

    for row in sorted(by_id.values(), key=lambda r: (r["created_at"], r["id"])):
        place(row)
    return ordered


def _copy(session: Session, target: Session, chosen: list[BackupRecord],
          progress: Callable[[int, int], None] | None) -> CopyReport:
    report = CopyReport(str(target.config.repository), [], [])
    total = sum(r["size"] or 0 for r in chosen)
    done = 0
    for row in chosen:
        there = target.catalog.find(row["id"])
        if there is not None and there["status"] == Status.AVAILABLE:
            report.present.append(row["id"])
        else:
            chunks, stored = _copy_one(session, target, row)
            report.chunks_sent += chunks
            report.bytes_sent += stored
            report.by_volume[_volume(row)] = report.by_volume.get(_volume(row), 0) + stored
            record = as_record(row, fail_reason=None, updated_at=now_iso())
            with target.catalog.write():
                target.catalog.put(record, Status.AVAILABLE)
                target.catalog.refresh_dependents(row["id"])
                target.catalog.refresh_dependents(row["parent_id"])
            report.copied.append(row["id"])
        done += row["size"] or 0
        if progress:
            progress(done, total)
    return report


def _copy_one(session: Session, target: Session, row: BackupRecord) -> tuple[int, int]:
    """One backup's missing chunks, then its manifest; (chunks, stored bytes) sent."""
    source, dest = session.repo, target.repo
    backup_id = row["id"]
    run_id = f"copy-{backup_id}"
    with RunLock(target.lock_dir, run_id).acquire():
        if dest.storage.exists(manifest_name(backup_id)):
            # A copy stopped after the manifest: its chunks went before it, only the row
            # is missing. Opening it checks that it is whole and this backup's.
            dest.manifest(backup_id).close()
            return 0, 0
        manifest = source.manifest(backup_id)
        packer = dest.packer(run_id)
        try:
            if dest.codec.same_ids(source.codec):
                sent = _copy_chunks(session, target, manifest, packer)
                packer.commit()
                copy_manifest(source.storage, source.codec, dest.storage, dest.codec,
                              backup_id)
            else:
                sent = _rename_chunks(session, target, manifest, packer, row["parent_id"])
            crash_point("copy-manifest-written")
        except BaseException:
            # Index what was stored, so that a rerun reuses it (and the packer's writers
            # end); the original failure is the one to report.
            with contextlib.suppress(Exception):
                packer.commit()
            raise
        finally:
            manifest.close()
        dest.manifest(backup_id).close()   # it opens there: whole, checked
    return sent, packer.stored_bytes


def _batch(repo: Repository) -> int:
    """Entries per step: at most _STEP_BYTES of blocks in memory per step."""
    return max(1, _STEP_BYTES // repo.block_size)


def _copy_chunks(session: Session, target: Session, manifest: Manifest, packer: Packer
                 ) -> int:
    """Between repositories that name chunks alike: the chunks (pages and blocks) the target
    lacks, read here, checked against their ids and encoded for the target."""
    source, dest = session.repo, target.repo
    level = target.config.compression_level

    def fetch(ids: list[bytes]) -> list[tuple[bytes, codec.Buffer, int, int]]:
        """(id, blob, plaintext length, flags) of the chunks the target lacks."""
        wanted = packer.missing(ids)
        if not wanted:
            return []
        out = []
        for cid, plain in source.read_pages(sorted(wanted)).items():
            blob, flags = dest.codec.encode(cid, plain, level)
            out.append((cid, blob, len(plain), flags))
        return out

    sent = 0
    for new in ordered_map(fetch, _id_batches(manifest, _batch(source)),
                           session.config.workers, session.config.workers):
        sent += _store(packer, new)
    return sent


def _store(packer: Packer, new: list[tuple[bytes, codec.Buffer, int, int]]) -> int:
    sent = 0
    for cid, blob, raw_length, flags in new:
        # Again: a chunk twice in flight (two steps) is stored once.
        if packer.missing([cid]):
            packer.add(cid, blob, raw_length, flags)
            sent += 1
    return sent


def _id_batches(manifest: Manifest, per_batch: int) -> Iterator[list[bytes]]:
    """The chunk ids a backup needs: its manifest's pages, then its blocks'."""
    pages = manifest.page_ids()
    for i in range(0, len(pages), per_batch):
        yield pages[i:i + per_batch]
    for entries in manifest.entries(per_batch):
        yield list(entries.chunk_ids())


class _Renamed(NamedTuple):
    entries: bytes                                       # with the target's chunk ids
    new: list[tuple[bytes, codec.Buffer, int, int]]      # chunks the target lacks


def _rename_chunks(session: Session, target: Session, manifest: Manifest, packer: Packer,
                   parent_id: str | None) -> int:
    """Between repositories that name chunks differently (other keys, or one encrypted):
    every block's chunk is named by the target's codec (its plaintext read here and
    checked against its id, unless the parent's two manifests already tell the name), the
    chunks the target lacks are encoded for it, and the manifest is written anew, pages and
    all, with the target's ids and sealed with its keys."""
    source, dest = session.repo, target.repo
    level = target.config.compression_level
    backup_id = manifest.record["id"]
    known = _parent_names(session, target, parent_id)
    writer = ManifestWriter(dest.storage, backup_id, dest.codec,
                            lambda page_id, page: packer.add_if_missing(page_id, page, level))

    def rename(step: tuple[int, Entries]) -> _Renamed:
        first, entries = step
        names: dict[bytes, bytes] = known(first, entries) if known else {}
        plains = _read(source, entries.chunk_ids() - names.keys())
        for cid, plain in plains.items():
            names[cid] = dest.codec.chunk_id(plain)
        lacking = packer.missing(list(set(names.values())))
        # A chunk the parent names whose copy there is gone or damaged is sent again.
        plains.update(_read(source, {cid for cid, name in names.items()
                                     if name in lacking and cid not in plains}))
        new = []
        for cid, plain in plains.items():
            name = names[cid]
            if name in lacking:
                blob, flags = dest.codec.encode(name, plain, level)
                new.append((name, blob, len(plain), flags))
                lacking.discard(name)
        return _Renamed(entries.renamed(names), new)

    def steps() -> Iterator[tuple[int, Entries]]:
        first = 0
        for entries in manifest.entries(_batch(source)):
            yield first, entries
            first += len(entries)

    sent = 0
    try:
        for done in ordered_map(rename, steps(), session.config.workers,
                                session.config.workers):
            writer.append(done.entries)
            sent += _store(packer, done.new)
        writer.flush()
        packer.commit()
        writer.close({k: v for k, v in manifest.header.items()
                      if k not in ("format", "blocks", "page_entries")})
    finally:
        if known:
            known.close()
    return sent


def _read(source: Repository, ids: set[bytes]) -> dict[bytes, bytes]:
    return source.read_pages(sorted(ids)) if ids else {}


class _ParentNames:
    """Chunk names taken from a parent copied before: where a block's entry equals the
    parent's here, its name there is the parent's entry at the same index in the target,
    so an incremental's unchanged blocks are neither read nor renamed."""

    def __init__(self, here: Manifest, there: Manifest):
        self.here, self.there = here, there

    def __call__(self, first: int, entries: Entries) -> dict[bytes, bytes]:
        mine = self.here.entries_at(first, len(entries))
        theirs = self.there.entries_at(first, len(entries))
        names = {}
        for i, digest, cid in entries.chunks():
            if (i < len(mine) and i < len(theirs) and mine.entry(i) == entries.entry(i)
                    and not theirs.is_hole(i) and theirs.entry(i)[:16] == digest):
                names[cid] = theirs.chunk_id(i)
        return names

    def close(self) -> None:
        self.here.close()
        self.there.close()


def _parent_names(session: Session, target: Session, parent_id: str | None
                  ) -> _ParentNames | None:
    if parent_id is None:
        return None
    there = target.catalog.find(parent_id)
    if there is None or there["status"] != Status.AVAILABLE:
        return None
    try:
        here = session.repo.manifest(parent_id)
    except CorruptionError:
        return None   # a hint only: without it every block is read and named
    try:
        return _ParentNames(here, target.repo.manifest(parent_id))
    except CorruptionError:
        here.close()
        return None
