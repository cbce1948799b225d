"""Check backups: `verify`."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from fractions import Fraction

from ..base.errors import CorruptionError, UsageError
from ..base.lifecycle import ACTIVITY, Status
from ..base.locks import hold_backup
from ..base.timeutil import iso
from ..catalog.catalog import BackupRecord
from ..datapath.unpack import restore_blocks
from ..metrics import best_effort, record_verify
from ..repository.pack import pack_name, read_trailer
from ..repository.repo import ChunkError, Repository
from ..session import Session, recover_dead_runs
from . import sweep


def verify_backups(session: Session, ids: list[str], *, deep: bool,
                   sample: Fraction | None = None, budget: float | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Check backups: manifests, index entries and packs; with `deep`, every chunk's hash.
    With `sample` (a share of the chunks) or `budget` (seconds), the deep part reads the
    next part of the repository's chunks in id order (operations/sweep.py) instead."""
    sampled = sample is not None or budget is not None
    if sampled and ids:
        raise UsageError("--sample and --max-duration verify the whole repository: "
                         "give no backup id")
    cat = session.catalog
    with session.shared_lock():
        recover_dead_runs(session)
        rows = ([_settled(session, cat.resolve(i)) for i in ids] if ids
                else cat.list(status=Status.AVAILABLE))
        repo = session.repo
        problems = repo.sync_index(session.lock_dir, full=True)
        swept = (sweep.sweep(repo, sweep.state_path(session.config.cache_dir, repo), sample,
                             budget, os.cpu_count() or 2, progress) if sampled else None)
        damaged = {e.ref.chunk_id: e for e in swept.damaged} if swept else {}
        results = []
        total = sum(r["size"] or 0 for r in rows)
        done = 0
        for row in rows:
            error = None
            if row["status"] != Status.AVAILABLE:
                error = f"backup {row['id']} is {row['status']}, not available"
            else:
                try:
                    _verify_one(repo, row["id"], deep and not sampled, damaged)
                except CorruptionError as e:
                    error = f"backup {row['id']}: {e}"
            results.append({"id": row["id"], "name": row["name"],
                            "volume_name": row["volume_name"], "ok": error is None,
                            "error": error})
            done += row["size"] or 0
            if progress:
                progress(done, total)
    # Repository objects at fault that no backup's check names: corrupt index files, damage
    # marks that do not unseal (planted by name: ignored), and chunks a sampled read found
    # damaged.
    problems = [*problems, *(str(e) for e in damaged.values())]
    # Objects replaced behind lvbackup's back (it never replaces one that holds a backup),
    # where the store keeps versions: the alarm that the host's credentials were used
    # against its backups (docs/security.md).
    overwritten = [{"object": name, "overwritten_at": iso(datetime.fromtimestamp(when, UTC))}
                   for name, when in repo.storage.overwritten()]
    report = {"ok": not problems and not overwritten and all(r["ok"] for r in results),
              "deep": deep or sampled, "index_errors": problems, "overwritten": overwritten,
              "backups": results, "chunks_checked": None, "chunks_total": None, "cycle": None}
    if swept:
        report.update(chunks_checked=swept.checked, chunks_total=swept.total,
                      cycle=swept.report())
        best_effort(session.config.metrics, session.warn, lambda path: record_verify(
            path, session.lock_dir, str(session.config.repository),
            oldest_unverified=swept.position.oldest_unverified()))
    return report


def _settled(session: Session, row: BackupRecord) -> BackupRecord:
    """A named backup that a live run is restoring (or creating, deleting) is busy, not
    damaged: wait --wait for that run to end (then its row as it left it), else exit 75."""
    activity = ACTIVITY.get(Status(row["status"]))
    if activity is None:
        return row
    hold_backup(session.lock_dir, row["id"], activity, session.wait).release()
    return session.catalog.get(row["id"])


def _verify_one(repo: Repository, backup_id: str, deep: bool,
                damaged: dict[bytes, ChunkError]) -> None:
    """Every block's chunk is indexed, inside a pack whose trailer is intact, and not among
    the chunks a sampled read found `damaged`; with `deep`, every chunk is also read,
    decompressed and checked against its BLAKE3 id."""
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
            if cid in damaged:
                raise CorruptionError(f"block {block}: {damaged[cid]}")
            ref = refs.get(cid)
            if ref is None:
                raise CorruptionError(f"block {block}: chunk {cid.hex()} is not in the "
                                      "repository index")
            size = pack_sizes.get(ref.pack_id)
            if size is None:
                try:
                    read_trailer(repo.storage, ref.pack_id, repo.codec)
                except CorruptionError as e:
                    raise CorruptionError(f"block {block}: {e}") from None
                size = pack_sizes[ref.pack_id] = repo.storage.size(pack_name(ref.pack_id))
            if ref.offset + ref.length > size:
                raise CorruptionError(f"block {block}: pack {ref.pack_id.hex()} is truncated")
    if deep:
        for _ in restore_blocks(repo, manifest, workers=os.cpu_count() or 2, fill_holes=False,
                                by_id=True):
            pass
