"""`copy`: backups into the repository and catalog of another configuration (the off-site
copy), keeping their ids, lineage, timestamps and labels.

Per backup, in the order a backup writes (docs/format.md, "Order of writes"): the chunks
the target lacks (its pages and blocks), read from this repository, checked against their
ids and packed anew there; the packs indexed; the manifest, byte for byte; then the
target's catalog row. A copy cut short leaves packs the target's next run indexes and
reuses, so a rerun resumes where it stopped; one that finds every backup there copies
nothing. Parents go before their incrementals, and a selected incremental brings along
its ancestors the target lacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..catalog import BackupRecord, as_record
from ..config import load_config
from ..datapath.pipeline import ordered_map
from ..errors import UsageError
from ..lifecycle import Status
from ..locks import RunLock
from ..metrics import best_effort, record_copy
from ..repository import codec
from ..repository.manifest import Manifest, manifest_name
from ..repository.repo import Repository
from ..session import Session, recover_dead_runs
from ..timeutil import now_iso
from .maintenance import init_repository

# Entries per step: a step holds at most this many blocks (8 MiB of 128 KiB blocks), and
# workers + `depth` steps are under way at once, which bounds the memory of a copy.
_BATCH = 64


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
                 volume: str | None, progress: Callable[[int, int], None] | None = None
                 ) -> CopyReport:
    if bool(ids) + every + bool(volume) != 1:
        raise UsageError("name the backups to copy: IDs, --all or --volume V (one of them)")
    target = Session(load_config(to_config), session.wait)
    target.warn = session.warn
    try:
        with session.shared_lock():
            recover_dead_runs(session)
            chosen = _with_ancestors(session, _selected(session, ids, every, volume))
            volumes = sorted({_volume(r) for r in chosen})
            try:
                report = _into(session, target, to_config, chosen, progress)
            except BaseException:
                _record_metrics(session, volumes, ok=False)
                raise
            _record_metrics(session, volumes, ok=True, report=report)
            return report
    finally:
        target.close()


def _into(session: Session, target: Session, to_config: Path, chosen: list[BackupRecord],
          progress: Callable[[int, int], None] | None) -> CopyReport:
    init_repository(target.config, session.repo.block_size)
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
            chunks, stored = _copy_one(session, target, row["id"])
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


def _copy_one(session: Session, target: Session, backup_id: str) -> tuple[int, int]:
    """One backup's missing chunks, then its manifest; (chunks, stored bytes) sent."""
    source, dest = session.repo, target.repo
    if source.encrypted or dest.encrypted:
        # Keyed chunk ids differ between repositories: every manifest would have to be
        # rewritten with the target's ids, which copy does not do yet.
        raise UsageError("copy between encrypted repositories is not supported yet; both "
                         "repositories must be unencrypted")
    manifest = source.manifest(backup_id)
    run_id = f"copy-{backup_id}"
    with RunLock(target.lock_dir, run_id).acquire():
        packer = dest.packer(run_id)
        sent = 0
        level = target.config.compression_level

        def fetch(ids: list[bytes]) -> list[tuple[bytes, codec.Buffer, int, int]]:
            """The chunks the target lacks, read here, checked against their ids, and
            encoded for the target: (id, blob, plaintext length, flags)."""
            wanted = packer.missing(ids)
            if not wanted:
                return []
            out = []
            for cid, plain in source.read_pages(sorted(wanted)).items():
                blob, flags = dest.codec.encode(cid, plain, level)
                out.append((cid, blob, len(plain), flags))
            return out

        try:
            for new in ordered_map(fetch, _id_batches(manifest), session.config.workers,
                                   session.config.workers):
                for cid, blob, raw_length, flags in new:
                    # Again: a chunk twice in flight (two batches) is stored once.
                    if packer.missing([cid]):
                        packer.add(cid, blob, raw_length, flags)
                        sent += 1
            packer.commit()
        finally:
            manifest.close()
        _put_manifest(source, dest, backup_id)
    return sent, packer.stored_bytes


def _id_batches(manifest: Manifest) -> Iterator[list[bytes]]:
    """The chunk ids a backup needs: its manifest's pages, then its blocks'."""
    pages = manifest.page_ids()
    for i in range(0, len(pages), _BATCH):
        yield pages[i:i + _BATCH]
    for entries in manifest.entries(_BATCH):
        yield list(entries.chunk_ids())


def _put_manifest(source: Repository, dest: Repository, backup_id: str) -> None:
    name = manifest_name(backup_id)
    dest.storage.put_content_addressed(name, source.storage.get(name))
    Manifest(dest.storage, backup_id, dest.codec).close()   # it opens there: whole, checked
