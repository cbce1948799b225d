"""Garbage collection: mark the chunks that manifests use, sweep the packs, rewrite the index.

Runs under the exclusive repository lock. Packs are judged from their own trailers, not from
the index, so gc also repairs a damaged or incomplete index. The order of writes keeps every
backup restorable at every instant:

1. new packs with the live chunks of mostly-dead packs (repack), indexed by their run;
2. new index files listing every chunk of every pack that stays;
3. the old index files are deleted;
4. the dead and repacked packs are deleted.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from ..base.errors import CorruptionError
from ..base.faults import crash_point
from ..base.locks import RunLock
from ..base.timeutil import iso
from .index import DAMAGED_PREFIX, announce_change, parse_damaged_name
from .manifest import Manifest
from .pack import ChunkRef, pack_name, read_trailer
from .repo import Repository

REPACK_BELOW = 0.5       # repack a pack when less than this share of its bytes is live
# Entries per rewritten index file: what gc holds in memory at once to write one, and what
# a reader decodes at once, whatever the number of packs (at small blocks a pack lists
# thousands of chunks).
INDEX_ENTRIES = 65536


def collect(repo: Repository, cache_dir: Path, lock_dir: Path,
                    progress: Callable[[int, int], None] | None = None, *, grace: float = 0,
                    guard: Callable[[], None] | None = None) -> dict:
    """Delete packs no manifest uses and repack mostly-dead ones. Caller holds the lock.

    `progress(done, total)` follows the bytes of packs examined. Packs and unfinished
    uploads younger than `grace` seconds are left alone (0 under a local lock, which no
    other run can be writing under). `guard()` is called before each deletion: it raises
    if the lock was lost meanwhile."""
    storage = repo.storage
    check = guard or (lambda: None)
    storage.remove_incomplete(older_than=grace)
    # Before anything is deleted: every host's next run then lists the index anew.
    announce_change(storage)
    repo.index.sync(storage, repo.codec, full=True)  # the fallback for unreadable trailers
    work = Path(cache_dir) / f"gc-{uuid.uuid4().hex}.sqlite"
    db = sqlite3.connect(work, isolation_level=None)
    try:
        db.executescript("""
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
            CREATE TABLE live (id BLOB PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE chunk (id BLOB, pack BLOB, offset INT, length INT, raw INT, flags INT);
            CREATE TABLE pack (id BLOB PRIMARY KEY, bytes INT, live_bytes INT, fate TEXT,
                               readable INT);
        """)
        unreadable = _load_packs(repo, db, progress)
        db.execute("CREATE INDEX chunk_pack ON chunk(pack)")
        db.execute("CREATE INDEX chunk_id ON chunk(id)")
        _mark(repo, db)
        db.execute("UPDATE pack SET live_bytes = (SELECT coalesce(sum(c.length), 0) FROM chunk c "
                   "JOIN live l ON l.id = c.id WHERE c.pack = pack.id)")
        db.execute("UPDATE pack SET fate = CASE WHEN NOT readable THEN 'keep' "
                   "WHEN live_bytes = 0 THEN 'delete' "
                   f"WHEN live_bytes < bytes * {REPACK_BELOW} THEN 'repack' ELSE 'keep' END")
        young = _spare_young(repo, db, grace)
        old_index = [name for name, _ in storage.list("index/")]
        repacked_bytes = _repack(repo, db, lock_dir)
        crash_point("gc-repacked")
        # An old index file may have the same content, hence name, as a rewritten one.
        new_index = _rewrite_index(repo, db)
        crash_point("gc-index-rewritten")
        check()
        for name in old_index:
            if name not in new_index:
                storage.delete(name)
        crash_point("gc-old-index-deleted")
        freed = 0
        for pack_id, size in db.execute("SELECT id, bytes FROM pack "
                                        "WHERE fate IN ('delete', 'repack')"):
            check()
            storage.delete(pack_name(pack_id))
            crash_point("gc-pack-deleted")
            freed += size
        for name, _ in list(storage.list(DAMAGED_PREFIX)):  # marks of copies now deleted
            mark = parse_damaged_name(name)
            if mark is None or db.execute("SELECT 1 FROM pack WHERE id = ? AND fate IN "
                                          "('delete', 'repack')", (mark[1],)).fetchone():
                storage.delete(name)
        fates = dict(db.execute("SELECT fate, count(*) FROM pack GROUP BY fate").fetchall())
        db.close()
        repo.index.after_gc(storage, work)
        # Under Object Lock: what stays is kept locked, what went is freed once unlocked.
        check()
        extended = storage.extend_locks()
        held = storage.release_expired()
        return {"packs_deleted": fates.get("delete", 0), "packs_repacked": fates.get("repack", 0),
                "packs_kept": fates.get("keep", 0) + fates.get("new", 0),
                "packs_spared_young": young,
                "bytes_freed": freed - repacked_bytes, "unreadable_packs": unreadable,
                "locks_extended": extended, "locked_objects_held": held.objects,
                "locked_bytes_held": held.bytes,
                "locked_until": None if held.until is None else iso(
                    datetime.fromtimestamp(held.until, UTC))}
    finally:
        db.close()
        work.unlink(missing_ok=True)


def _spare_young(repo: Repository, db: sqlite3.Connection, grace: float) -> int:
    """Keep the packs gc would remove that were put less than `grace` seconds ago."""
    if grace <= 0:
        return 0
    cutoff = time.time() - grace
    candidates = db.execute("SELECT id FROM pack WHERE fate IN ('delete', 'repack')").fetchall()
    young = [(pid,) for (pid,) in candidates
             if repo.storage.modified(pack_name(pid)) > cutoff]
    db.executemany("UPDATE pack SET fate = 'keep' WHERE id = ?", young)
    return len(young)


def _mark(repo: Repository, db: sqlite3.Connection) -> None:
    """Every chunk a manifest names is live: its pages, and the blocks they list. Pages are
    found through the packs' own trailers (loaded first), not the index that gc rebuilds."""
    def read_pages(ids: list[bytes]) -> dict[bytes, bytes]:
        refs = []
        for cid in ids:
            row = db.execute("SELECT id, pack, offset, length, raw, flags FROM chunk "
                             "WHERE id = ? LIMIT 1", (cid,)).fetchone()
            if row is None:
                raise CorruptionError(f"chunk {cid.hex()} is in no pack")
            refs.append(ChunkRef(*row))
        return repo.read_checked(refs)

    for name, _ in repo.storage.list("manifests/"):
        try:
            manifest = Manifest(repo.storage, name.rsplit("/", 1)[1], repo.codec, read_pages)
            db.executemany("INSERT OR IGNORE INTO live VALUES (?)",
                           [(pid,) for pid in manifest.page_ids()])
            for entries in manifest.entries(4096):
                db.executemany("INSERT OR IGNORE INTO live VALUES (?)",
                               [(cid,) for _, _, cid in entries.chunks()])
        except CorruptionError as e:
            raise CorruptionError(f"gc stopped before deleting anything: {e}") from None


def _load_packs(repo: Repository, db: sqlite3.Connection,
                progress: Callable[[int, int], None] | None) -> list[str]:
    """Read every pack's trailer. A pack whose trailer is unreadable is kept as it is, and
    described by what the existing index says of it: gc never deletes what it cannot read."""
    unreadable = []
    # Listed into the table first (never a list of every pack in memory), read from it.
    db.executemany("INSERT INTO pack VALUES (?, ?, 0, NULL, 1)",
                   ((bytes.fromhex(name.rsplit("/", 1)[1]), repo.storage.size(name))
                    for name, _ in repo.storage.list("packs/")))
    total, done = db.execute("SELECT coalesce(sum(bytes), 0) FROM pack").fetchone()[0], 0
    for pack_id, size in db.execute("SELECT id, bytes FROM pack"):
        name = pack_name(pack_id)
        try:
            refs = read_trailer(repo.storage, pack_id, repo.codec)
        except CorruptionError:
            unreadable.append(name)
            refs = repo.index.refs_in_pack(pack_id)
        db.executemany("INSERT INTO chunk VALUES (?, ?, ?, ?, ?, ?)",
                       [(r.chunk_id, pack_id, r.offset, r.length, r.raw_length, r.flags)
                        for r in refs])
        done += size
        if progress:
            progress(done, total)
    db.executemany("UPDATE pack SET readable = 0 WHERE id = ?",
                   [(bytes.fromhex(name.rsplit("/", 1)[1]),) for name in unreadable])
    return unreadable


def _repack(repo: Repository, db: sqlite3.Connection, lock_dir: Path) -> int:
    """Copy live chunks that exist only in packs being removed; returns bytes written."""
    rows = db.execute(
        "SELECT c.id, c.pack, c.offset, c.length, c.raw, c.flags FROM chunk c "
        "JOIN live l ON l.id = c.id JOIN pack p ON p.id = c.pack WHERE p.fate = 'repack' "
        "AND NOT EXISTS (SELECT 1 FROM chunk k JOIN pack q ON q.id = k.pack "
        "                WHERE k.id = c.id AND q.fate = 'keep') "
        "GROUP BY c.id").fetchall()
    if not rows:
        return 0
    run_id = f"gc-{uuid.uuid4().hex}"
    with RunLock(lock_dir, run_id).acquire():
        packer = repo.packer(run_id)
        for row in rows:
            ref = ChunkRef(*row)
            repo.read_chunk(ref)  # verify before copying: never spread a corrupt chunk
            blob = repo.storage.get_range(pack_name(ref.pack_id), ref.offset, ref.length)
            packer.add(ref.chunk_id, blob, ref.raw_length, ref.flags)
        packer.commit()
        for pack_id in packer.pack_ids:
            refs = read_trailer(repo.storage, pack_id, repo.codec)
            db.executemany("INSERT INTO chunk VALUES (?, ?, ?, ?, ?, ?)",
                           [(r.chunk_id, pack_id, r.offset, r.length, r.raw_length, r.flags)
                            for r in refs])
            db.execute("INSERT INTO pack VALUES (?, ?, 0, 'new', 1)",
                       (pack_id, repo.storage.size(pack_name(pack_id))))
    return packer.stored_bytes


def _rewrite_index(repo: Repository, db: sqlite3.Connection) -> set[str]:
    """Index files listing every pack that stays, about INDEX_ENTRIES entries each; returns
    their names. They are not cached one by one: the cache is updated once, at the end."""
    names: set[str] = set()
    groups: list[tuple[bytes, list[ChunkRef]]] = []
    entries = 0
    for (pack_id,) in db.execute("SELECT id FROM pack WHERE fate IN ('keep', 'new')").fetchall():
        refs = [ChunkRef(cid, pack_id, off, ln, raw, fl) for cid, off, ln, raw, fl in db.execute(
            "SELECT id, offset, length, raw, flags FROM chunk WHERE pack = ?", (pack_id,))]
        groups.append((pack_id, refs))
        entries += len(refs)
        if entries >= INDEX_ENTRIES:
            names.add(repo.write_index(groups, cached=False))
            groups, entries = [], 0
    if groups:
        names.add(repo.write_index(groups, cached=False))
    return names
