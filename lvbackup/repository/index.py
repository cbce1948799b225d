"""The chunk index: index files in the repository, and a local SQLite cache of them.

An index file (`index/<BLAKE3 of the file>`) is sealed (see codec.seal, magic "LVBIDX01");
its payload is a sequence of groups, one per pack:

    pack id (32 bytes) | N (u32) | N trailer entries (pack.ENTRY, 49 bytes each)

The union of all index files maps chunk id -> (pack, offset, length). Index files may
overlap; each can be rebuilt from the packs' own trailers.

The cache is an SQLite file per repository in the cache directory, so the index is never
held in memory: lookups are batched queries. It also records packs that a run has written
but not yet listed in an index file ("pending"), so that a rerun after a crash can index
and reuse them instead of writing them again.

On object storage a run does not list `index/` and `damaged/` each time (each listing is
a request per 1,000 names, and index files accumulate until gc merges them). The object
`index-changes` is replaced by whatever makes the cache wrong rather than incomplete: gc
(before it deletes anything) and a new damage mark. A run reads its token: unchanged since
the cache last listed, and that listing less than an hour old, the cache stands. Index
files that other hosts added meanwhile are then missing from it, which costs a backup
some deduplication; a read that misses a chunk lists at once (`lookup`).

What the repository says is checked before the cache takes it: a damage mark counts only
if it unseals under its name, and packs found missing (index files gc deleted, put back)
are recorded as lost: never reused, and replaced by any other copy of their chunks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import blake3

from ..base.errors import CorruptionError, LvbackupError, UsageError
from ..base.faults import crash_point
from ..base.permissions import create_private_file, make_private_dirs
from ..base.sqlitefile import open_error
from ..base.timeutil import now_iso
from .backends import Backend, Conflict, MissingObject, ObjectExists
from .codec import Codec
from .pack import ENTRY, MAX_PACK_BYTES, ChunkRef, entry_rows, pack_name

INDEX_MAGIC = b"LVBIDX01"
_GROUP = struct.Struct("<32sI")
_BATCH = 500
_ROWS_PER_INSERT = 199   # rows bound in one statement (5 items each: under SQLite's 999)

# A chunk's pack is the pack's number in `packs`, not its 32-byte id: the table, its sort
# when built and the index by pack are half the size. Numbers are never reused.
_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY, pack INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, raw_length INTEGER NOT NULL, flags INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_pack ON chunks(pack);
CREATE TABLE IF NOT EXISTS packs (
    n INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE, run TEXT,
    indexed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS index_files (
    name TEXT PRIMARY KEY, stamp TEXT NOT NULL, ok INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS damaged (
    chunk BLOB NOT NULL, pack BLOB NOT NULL, PRIMARY KEY (chunk, pack)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lost (
    pack BLOB PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bad_marks (
    name TEXT PRIMARY KEY, stamp TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS listed (
    one INTEGER PRIMARY KEY CHECK (one = 1), marker TEXT, at REAL NOT NULL
);
"""
# A chunk's row points at a damaged copy, or into a pack found missing: another copy, when
# one is indexed, replaces it, and no backup reuses it.
_IS_DAMAGED = ("(EXISTS (SELECT 1 FROM damaged d JOIN packs dp ON dp.id = d.pack "
               "WHERE d.chunk = {t}.id AND dp.n = {t}.pack)"
               " OR EXISTS (SELECT 1 FROM lost l JOIN packs lp ON lp.id = l.pack "
               "WHERE lp.n = {t}.pack))")
_REPLACE_DAMAGED = (" ON CONFLICT(id) DO UPDATE SET pack = excluded.pack, offset = "
                    "excluded.offset, length = excluded.length, raw_length = "
                    "excluded.raw_length, flags = excluded.flags WHERE "
                    + _IS_DAMAGED.format(t="chunks"))
_PACK_INDEX = "CREATE INDEX IF NOT EXISTS chunks_pack ON chunks(pack)"
# The cache after gc (ChunkIndex.after_gc), with gc's tables attached as `gc`.
_AFTER_GC = """
CREATE TEMP TABLE gone AS SELECT n, id FROM packs
    WHERE id NOT IN (SELECT id FROM gc.pack WHERE fate IN ('keep', 'new'));
CREATE TEMP TABLE fresh AS SELECT id FROM gc.pack
    WHERE fate IN ('keep', 'new') AND id NOT IN (SELECT id FROM packs WHERE indexed = 1);
CREATE TEMP TABLE dropped AS SELECT id FROM chunks WHERE pack IN (SELECT n FROM temp.gone);
DELETE FROM chunks WHERE pack IN (SELECT n FROM temp.gone);
DELETE FROM packs WHERE n IN (SELECT n FROM temp.gone);
DELETE FROM damaged WHERE pack IN (SELECT id FROM temp.gone);
DELETE FROM lost;
INSERT INTO packs (id, run, indexed) SELECT id, NULL, 1 FROM temp.fresh WHERE true
    ON CONFLICT(id) DO UPDATE SET indexed = 1;
INSERT INTO chunks SELECT c.id, np.n, c.offset, c.length, c.raw, c.flags
    FROM gc.chunk c JOIN gc.pack p ON p.id = c.pack JOIN packs np ON np.id = c.pack
    WHERE p.fate IN ('keep', 'new')
      AND (c.pack IN (SELECT id FROM temp.fresh) OR c.id IN (SELECT id FROM temp.dropped))
    ORDER BY c.id ON CONFLICT(id) DO NOTHING;
DROP TABLE temp.gone; DROP TABLE temp.fresh; DROP TABLE temp.dropped;
"""
# The packs of chunks that have two copies among the cache and the staged entries.
_OTHER_COPIES = """
SELECT DISTINCT p.id FROM staging.chunks AS s INDEXED BY by_id
    JOIN chunks c ON c.id = s.id JOIN packs p ON p.n = c.pack AND p.id != s.pack
UNION
SELECT DISTINCT pack FROM staging.chunks WHERE id IN (
    SELECT id FROM staging.chunks GROUP BY id HAVING count(DISTINCT pack) > 1)
"""
# The staged entries in id order, each pack's id replaced by its number in the cache.
_INSERT_STAGED = ("INSERT INTO chunks SELECT s.id, p.n, s.offset, s.length, s.raw, s.flags "
                  "FROM staging.chunks s JOIN packs p ON p.id = s.pack WHERE true ORDER BY s.id")
# Index files being merged into the cache (ChunkIndex._merge), in a file of their own.
_STAGING = """
PRAGMA staging.journal_mode=OFF; PRAGMA staging.synchronous=OFF;
CREATE TABLE staging.chunks (id BLOB, pack BLOB, offset INT, length INT, raw INT, flags INT);
CREATE TABLE staging.packs (id BLOB PRIMARY KEY) WITHOUT ROWID;
"""
DAMAGED_PREFIX = "damaged/"
DAMAGED_MAGIC = b"LVBDMG01"
CHANGES = "index-changes"
RELIST_AFTER = 3600.0   # seconds a listing is trusted while `index-changes` stands


def changes_token(storage: Backend) -> str | None:
    try:
        return storage.token(CHANGES)
    except MissingObject:
        return None


def _marked(storage: Backend) -> bool:
    # A directory of files on this host lists without a request, and is locked by this
    # host's kernel: it has no `index-changes`, its index is listed every run.
    return not storage.capabilities.local_files


def announce_change(storage: Backend) -> None:
    """Replace `index-changes`, so that every host's next run lists the index again."""
    if not _marked(storage):
        return
    data = secrets.token_hex(16).encode()
    try:
        storage.put(CHANGES, data)
        return
    except ObjectExists:
        pass
    # Conflict: replaced by another host meanwhile, which announces it all the same.
    with contextlib.suppress(Conflict, MissingObject):
        storage.replace(CHANGES, data, storage.token(CHANGES))


def damaged_name(chunk_id: bytes, pack_id: bytes) -> str:
    """The repository object that marks the copy of a chunk in a pack as damaged."""
    return f"{DAMAGED_PREFIX}{chunk_id.hex()}.{pack_id.hex()}"


def parse_damaged_name(name: str) -> tuple[bytes, bytes] | None:
    chunk, _, pack = name.removeprefix(DAMAGED_PREFIX).partition(".")
    try:
        ids = bytes.fromhex(chunk), bytes.fromhex(pack)
    except ValueError:
        return None
    return ids if all(len(i) == 32 for i in ids) else None


def encode_mark(chunk_id: bytes, pack_id: bytes, codec: Codec) -> tuple[str, bytes]:
    """(object name, sealed bytes) of the mark that says this copy of a chunk is damaged."""
    name = damaged_name(chunk_id, pack_id)
    return name, codec.seal(DAMAGED_MAGIC, json.dumps({"found_at": now_iso()}).encode(), name)


def decode_mark(name: str, data: bytes, codec: Codec) -> tuple[bytes, bytes]:
    """(chunk id, pack id) of a damage mark that unseals under its name; CorruptionError
    otherwise."""
    what = f"damage mark {name}"
    mark = parse_damaged_name(name)
    payload = codec.unseal(DAMAGED_MAGIC, data, what, name)
    try:
        ok = isinstance(json.loads(payload), dict)
    except (ValueError, UnicodeDecodeError):
        ok = False
    if mark is None or not ok:
        raise CorruptionError(f"{what} is corrupt (bad name or content)")
    return mark


# What an index file is sealed under: its name is its hash, known only once it is sealed.
INDEX_SEAL_NAME = "index/"


def encode_index(groups: Iterable[tuple[bytes, list[ChunkRef]]], codec: Codec
                 ) -> tuple[str, bytes]:
    """(object name, sealed bytes) of an index file listing `groups` of (pack id, refs)."""
    parts = []
    for pack_id, refs in groups:
        parts.append(_GROUP.pack(pack_id, len(refs)))
        parts.extend(ENTRY.pack(r.chunk_id, r.offset, r.length, r.raw_length, r.flags)
                     for r in refs)
    data = codec.seal(INDEX_MAGIC, b"".join(parts), INDEX_SEAL_NAME)
    return f"index/{blake3.blake3(data).hexdigest()}", data


def decode_index(name: str, data: bytes, codec: Codec
                 ) -> Iterator[tuple[bytes, list[ChunkRef]]]:
    for pack_id, rows in index_groups(name, data, codec):
        yield pack_id, [ChunkRef(cid, pack_id, *rest) for cid, *rest in rows]


def index_groups(name: str, data: bytes, codec: Codec
                 ) -> Iterator[tuple[bytes, list[tuple[bytes, int, int, int, int]]]]:
    """An index file's groups: (pack id, its entries as `pack.entry_rows` gives them)."""
    payload = codec.unseal(INDEX_MAGIC, data, f"index file {name}", INDEX_SEAL_NAME)
    pos = 0
    while pos < len(payload):
        if pos + _GROUP.size > len(payload):
            raise CorruptionError(f"index file {name} is corrupt (truncated group)")
        pack_id, count = _GROUP.unpack_from(payload, pos)
        pos += _GROUP.size
        end = pos + count * ENTRY.size
        if end > len(payload):
            raise CorruptionError(f"index file {name} is corrupt (truncated group)")
        rows = entry_rows(payload[pos:end], pack_id, MAX_PACK_BYTES, f"index file {name}")
        pos = end
        yield pack_id, rows


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    # The connection is in autocommit mode (isolation_level=None), where `with db:` does
    # not open a transaction; a run killed half-way must leave the cache as it was.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class ChunkIndex:
    """The local cache of the repository's index (one SQLite connection per thread)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            make_private_dirs(self.path.parent)
            create_private_file(self.path)
        except OSError as e:
            raise UsageError(f"cannot create the cache directory {self.path.parent}: "
                             f"{e.strerror}; set cache_dir in the configuration") from None
        self._local = threading.local()
        self._unlisted: tuple[Backend, Codec] | None = None   # set when sync did not list
        self._relist = threading.Lock()
        try:
            self._create(self._db())
        except sqlite3.DatabaseError as e:
            raise open_error(e, self.path, "the index cache",
                             "cache_dir: (or $LVBACKUP_CACHE_DIR; by default it is beside the "
                             "catalog)",
                             "; it can be deleted safely and is rebuilt from the repository"
                             ) from None

    @staticmethod
    def _create(db: sqlite3.Connection) -> None:
        """The tables, made or brought to this version. A cache of an earlier layout keeps
        what only it knows (pending packs, damage found, packs found missing, bad marks)
        and loses its entries, which the next sync merges again."""
        if db.execute("PRAGMA user_version").fetchone()[0] == _VERSION:
            return
        with _transaction(db):
            if db.execute("PRAGMA user_version").fetchone()[0] == _VERSION:
                return   # another process made it meanwhile
            old = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'packs'").fetchone()
            if old:
                db.execute("DROP TABLE chunks")
                db.execute("ALTER TABLE packs RENAME TO old_packs")
                db.execute("DROP TABLE IF EXISTS listed")
                db.execute("DROP TABLE IF EXISTS index_files")
            for statement in _SCHEMA.split(";"):   # executescript would commit
                db.execute(statement)
            if old:
                db.execute("INSERT INTO packs (id, run, indexed) "
                           "SELECT id, run, 0 FROM old_packs WHERE indexed = 0")
                db.execute("DROP TABLE old_packs")
            db.execute(f"PRAGMA user_version = {_VERSION}")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    # --- keeping the cache in step with the repository's index files -----------------

    def sync(self, storage: Backend, codec: Codec, *, full: bool = False) -> list[str]:
        """Merge new index files; start over if one changed or vanished (gc ran). Without
        `full`, only when `index-changes` says so or the last listing is old.

        Returns the problems found, one line each naming the object: index files that
        failed their checksum (their entries are left out, so a backup that needs them
        fails to restore and verify, loudly) and damage marks that do not unseal (ignored).
        """
        db = self._db()
        token = changes_token(storage) if _marked(storage) else None
        last = db.execute("SELECT marker, at FROM listed").fetchone()
        if (not full and token is not None and last is not None and last[0] == token
                and 0 <= time.time() - last[1] < RELIST_AFTER):
            self._unlisted = (storage, codec)
            return self._problems(db)
        if token is None and _marked(storage):
            token = self._create_changes(storage)
        self._unlisted = None
        listed_at = time.time()
        # Before the index files, so that an undamaged copy wins; a new mark has every index
        # file merged again, so that a copy that lost to the damaged one replaces it.
        if self._merge_marks(db, storage, codec):
            db.execute("DELETE FROM index_files")
        remote = dict(storage.list("index/"))
        known = dict(db.execute("SELECT name, stamp FROM index_files").fetchall())
        if any(remote.get(name) != stamp for name, stamp in known.items()):
            with _transaction(db):
                db.execute("DELETE FROM chunks "
                           "WHERE pack IN (SELECT n FROM packs WHERE indexed=1)")
                db.execute("DELETE FROM packs WHERE indexed=1")
                db.execute("DELETE FROM index_files")
            known = {}
        new = {name: remote[name] for name in sorted(set(remote) - set(known))}
        lost = self._merge(db, storage, codec, new) if new else False
        # The token read before listing: a change announced meanwhile is seen next time.
        db.execute("INSERT OR REPLACE INTO listed VALUES (1, ?, ?)", (token, listed_at))
        if lost:
            # Index files merged before a pack was found missing may list other copies of
            # its chunks: the next sync merges them again.
            self._forget_listing(db)
        return self._problems(db)

    @staticmethod
    def _displace_lost(db: sqlite3.Connection, storage: Backend) -> bool:
        """Before staged entries are merged: where a chunk has two copies (rare: two index
        files list it), in the cache and staged or both staged, record each pack of them
        that does not exist (index files gc deleted, put back) as lost, so that the copy
        that exists wins whichever came first. Whether one was lost."""
        others = {pack for (pack,) in db.execute(_OTHER_COPIES)}
        lost = [(pack,) for pack in others if not storage.exists(pack_name(pack))]
        db.executemany("INSERT OR IGNORE INTO lost VALUES (?)", lost)
        return bool(lost)

    @staticmethod
    def _merge_marks(db: sqlite3.Connection, storage: Backend, codec: Codec) -> bool:
        """Record the damage marks in the repository; whether there were new ones. Each is
        honoured only once it unseals under its name (a mark planted by name alone would
        make every backup store its chunk again); one that does not is remembered, by its
        token, as a problem."""
        new = False
        listed = dict(storage.list(DAMAGED_PREFIX))
        known = set(db.execute("SELECT chunk, pack FROM damaged").fetchall())
        rejected = dict(db.execute("SELECT name, stamp FROM bad_marks").fetchall())
        for name, stamp in listed.items():
            if parse_damaged_name(name) in known or rejected.get(name) == stamp:
                continue
            try:
                mark = decode_mark(name, storage.get(name), codec)
            except MissingObject:
                continue   # deleted since the listing (gc)
            except CorruptionError:
                db.execute("INSERT OR REPLACE INTO bad_marks VALUES (?, ?)", (name, stamp))
                continue
            db.execute("INSERT OR IGNORE INTO damaged VALUES (?, ?)", mark)
            db.execute("DELETE FROM bad_marks WHERE name = ?", (name,))
            new = True
        gone = [(n,) for n in rejected if n not in listed]
        db.executemany("DELETE FROM bad_marks WHERE name = ?", gone)
        return new

    @staticmethod
    def _problems(db: sqlite3.Connection) -> list[str]:
        return ([f"index file {n} is corrupt"
                 for (n,) in db.execute("SELECT name FROM index_files WHERE ok = 0")]
                + [f"damage mark {n} is corrupt (does not unseal): ignored"
                   for (n,) in db.execute("SELECT name FROM bad_marks")])

    def _merge(self, db: sqlite3.Connection, storage: Backend, codec: Codec,
               files: dict[str, str]) -> bool:
        """Add index files (name -> stamp) to the cache (a corrupt one is recorded as such,
        its entries left out); whether a pack was found missing meanwhile.

        Their entries are staged in a file beside the cache, one pack at a time (never a
        whole index file in memory), then inserted in chunk id order: a B-tree filled in
        order costs the same per entry at any size, where random inserts slow down as the
        table outgrows SQLite's page cache. The cache is locked only for that last step."""
        staging = self.path.with_name(self.path.name + ".staging")
        staging.unlink(missing_ok=True)
        # The sort spills to temporary files: beside the cache, not in a /tmp in memory.
        db.execute(f"PRAGMA temp_store_directory = '{_quoted(self.path.parent)}'")
        db.execute("ATTACH DATABASE ? AS staging", (str(staging),))
        try:
            db.executescript(_STAGING)
            staged = {name: self._stage(db, name, storage, codec) for name in files}
            with _transaction(db):
                lost = False
                db.execute("INSERT INTO packs (id, run, indexed) SELECT id, NULL, 1 "
                           "FROM staging.packs WHERE true "
                           "ON CONFLICT(id) DO UPDATE SET indexed = 1")
                if not self._fill_cold(db, sum(n for n in staged.values() if n > 0)):
                    # One sort, in an index that holds every column: the duplicates and the
                    # ordered insert below both read it in order, without a lookup or
                    # another sort.
                    db.execute("CREATE INDEX staging.by_id "
                               "ON chunks(id, pack, offset, length, raw, flags)")
                    lost = self._displace_lost(db, storage)
                    db.execute(_INSERT_STAGED + _REPLACE_DAMAGED)
                db.executemany("INSERT OR REPLACE INTO index_files VALUES (?, ?, ?)",
                               [(name, stamp, int(staged[name] >= 0))
                                for name, stamp in files.items()])
        finally:
            db.execute("DETACH DATABASE staging")
            staging.unlink(missing_ok=True)
        return lost

    @staticmethod
    def _fill_cold(db: sqlite3.Connection, staged: int) -> bool:
        """Fill an empty cache with the `staged` entries in id order, and build the pack
        index after them, in one sort. False, and nothing done, if the cache is not empty
        or two staged entries share an id (rare: the general path chooses between them)."""
        if not db.execute("SELECT NOT EXISTS (SELECT 1 FROM chunks)").fetchone()[0]:
            return False
        db.execute("SAVEPOINT cold")
        try:
            db.execute("DROP INDEX chunks_pack")
            inserted = db.execute(_INSERT_STAGED + " ON CONFLICT(id) DO NOTHING").rowcount
            if inserted != staged:
                db.execute("ROLLBACK TO cold")
                return False
            crash_point("index-cache-filled")
            db.execute(_PACK_INDEX)
        finally:
            db.execute("RELEASE cold")
        return True

    @staticmethod
    def _stage(db: sqlite3.Connection, name: str, storage: Backend, codec: Codec) -> int:
        """Stage one index file's entries; how many, or -1 (and nothing staged) if it is
        corrupt."""
        staged = 0
        db.execute("SAVEPOINT one_file")
        try:
            for pack_id, rows in index_groups(name, storage.get(name), codec):
                db.execute("INSERT OR IGNORE INTO staging.packs VALUES (?)", (pack_id,))
                # The pack id in the statement: each row binds only what it unpacked.
                _insert_rows(db, "staging.chunks", f"(?, X'{pack_id.hex()}', ?, ?, ?, ?)", rows)
                staged += len(rows)
        except CorruptionError:
            db.execute("ROLLBACK TO one_file")
            return -1
        finally:
            db.execute("RELEASE one_file")
        return staged

    @staticmethod
    def _create_changes(storage: Backend) -> str | None:
        """`index-changes` of a repository made before it existed (None if it cannot be
        written: then every run lists)."""
        try:
            announce_change(storage)
        except (OSError, LvbackupError):
            return None
        return changes_token(storage)

    def _insert(self, db, pack_id: bytes, refs: list[ChunkRef], run: str | None,
                indexed: int) -> None:
        db.execute("INSERT INTO packs (id, run, indexed) VALUES (?, ?, ?) ON CONFLICT(id) "
                   "DO UPDATE SET indexed = max(indexed, excluded.indexed)",
                   (pack_id, run, indexed))
        (n,) = db.execute("SELECT n FROM packs WHERE id = ?", (pack_id,)).fetchone()
        db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)" + _REPLACE_DAMAGED,
                       [(r.chunk_id, n, r.offset, r.length, r.raw_length, r.flags)
                        for r in refs])

    def add_pending(self, pack_id: bytes, run: str) -> None:
        """Record a pack that `run` has stored but not yet listed in an index file (its
        chunks are recorded when it is: until then the run itself knows them)."""
        self._db().execute("INSERT INTO packs (id, run, indexed) VALUES (?, ?, 0) "
                           "ON CONFLICT(id) DO NOTHING", (pack_id, run))
        self.found_pack(pack_id)   # if it was found missing before: stored again

    def add_indexed(self, name: str, stamp: str,
                    groups: list[tuple[bytes, list[ChunkRef]]]) -> None:
        """Record an index file this process wrote, with every entry it lists."""
        db = self._db()
        with _transaction(db):
            for pack_id, refs in groups:
                self._insert(db, pack_id, refs, run=None, indexed=1)
            db.execute("INSERT OR REPLACE INTO index_files VALUES (?, ?, 1)", (name, stamp))

    def pending_runs(self) -> list[str]:
        return [r for (r,) in self._db().execute(
            "SELECT DISTINCT run FROM packs WHERE indexed=0 AND run IS NOT NULL")]

    def pending_packs(self, run: str) -> list[bytes]:
        return [p for (p,) in self._db().execute(
            "SELECT id FROM packs WHERE indexed=0 AND run=?", (run,))]

    def forget_pack(self, pack_id: bytes) -> None:
        db = self._db()
        with _transaction(db):
            db.execute("DELETE FROM chunks WHERE pack = (SELECT n FROM packs WHERE id = ?)",
                       (pack_id,))
            db.execute("DELETE FROM packs WHERE id=?", (pack_id,))

    def mark_lost(self, pack_id: bytes) -> None:
        """Record a pack that does not exist (an index file gc deleted, put back; or a pack
        lost otherwise): its entries stay (a read of them says the pack is missing), but
        no backup reuses them and any other copy replaces them. Every index file is merged
        again at the next sync, so that copies that lost to its entries come in."""
        db = self._db()
        with _transaction(db):
            db.execute("INSERT OR IGNORE INTO lost VALUES (?)", (pack_id,))
            self._forget_listing(db)

    def found_pack(self, pack_id: bytes) -> None:
        """A pack found missing exists after all (stored again)."""
        self._db().execute("DELETE FROM lost WHERE pack = ?", (pack_id,))

    def forget_listing(self) -> None:
        """Have the next sync list the index and merge every index file again (entries
        already cached stand unless damaged)."""
        db = self._db()
        with _transaction(db):
            self._forget_listing(db)

    @staticmethod
    def _forget_listing(db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM index_files")
        db.execute("DELETE FROM listed")

    # --- lookups -------------------------------------------------------------------

    def refs_in_pack(self, pack_id: bytes) -> list[ChunkRef]:
        return [ChunkRef(*row) for row in self._db().execute(
            "SELECT c.id, p.id, c.offset, c.length, c.raw_length, c.flags FROM chunks c "
            "JOIN packs p ON c.pack = p.n WHERE p.id = ?", (pack_id,))]

    def lookup(self, ids: Iterable[bytes], *, undamaged: bool = False) -> dict[bytes, ChunkRef]:
        """Refs of those `ids` that are in indexed packs; with `undamaged`, only those whose
        copy has not been found damaged (a backup stores the others again: there a miss
        is a new chunk). Without it the ids are being read, and a miss when the last sync
        did not list lists the index and looks again."""
        ids = list(dict.fromkeys(ids))
        found = self._lookup(ids, undamaged)
        if len(found) < len(ids) and not undamaged and self._unlisted is not None:
            with self._relist:
                unlisted = self._unlisted
                if unlisted is not None:
                    self.sync(*unlisted, full=True)
            found.update(self._lookup([i for i in ids if i not in found], undamaged))
        return found

    def _lookup(self, ids: list[bytes], undamaged: bool) -> dict[bytes, ChunkRef]:
        found: dict[bytes, ChunkRef] = {}
        db = self._db()
        skip = f" AND NOT {_IS_DAMAGED.format(t='c')}" if undamaged else ""
        for i in range(0, len(ids), _BATCH):
            part = ids[i:i + _BATCH]
            marks = ",".join("?" * len(part))
            rows = db.execute(
                "SELECT c.id, p.id, c.offset, c.length, c.raw_length, c.flags FROM chunks c "
                f"JOIN packs p ON p.n = c.pack WHERE c.id IN ({marks}) AND p.indexed = 1"
                + skip, part)
            for row in rows:
                found[row[0]] = ChunkRef(*row)
        return found

    def packs_in_range(self, start: bytes, end: bytes | None, limit: int) -> list[bytes]:
        """Up to `limit` indexed packs with start <= id < end (no bound when None), in id
        order: `verify --sample` walks the packs this way, a range at a time."""
        bound = "" if end is None else " AND id < ?"
        return [p for (p,) in self._db().execute(
            "SELECT id FROM packs WHERE indexed = 1 AND id >= ?" + bound + " ORDER BY id "
            "LIMIT ?", [start, *([end] if end is not None else []), limit])]

    def count_chunks(self) -> int:
        return int(self._db().execute("SELECT count(*) FROM chunks c JOIN packs p "
                                      "ON p.n = c.pack WHERE p.indexed = 1").fetchone()[0])

    def mark_damaged(self, chunk_id: bytes, pack_id: bytes) -> None:
        """Record a damaged (or missing) copy; the next sync merges every index file
        again, so that another copy they list replaces it."""
        self._db().execute("INSERT OR IGNORE INTO damaged VALUES (?, ?)", (chunk_id, pack_id))
        self.forget_listing()

    def damaged_ids(self) -> set[bytes]:
        """Chunk ids whose only indexed copy is damaged (or in a pack found missing)."""
        return {c for (c,) in self._db().execute(
            "SELECT c.id FROM damaged d JOIN packs p ON p.id = d.pack "
            "JOIN chunks c ON c.id = d.chunk AND c.pack = p.n "
            "UNION SELECT c.id FROM lost l JOIN packs p ON p.id = l.pack "
            "JOIN chunks c ON c.pack = p.n")}

    def after_gc(self, storage: Backend, work: Path) -> None:
        """Update the cache for what gc changed, from gc's own tables of every pack it
        examined (`work`: pack(id, fate), chunk(id, pack, ...)): entries in packs that are
        not there any more (deleted, repacked, or lost before) go, other copies of those
        chunks take their place, packs that no index file listed before come in, and the
        index files are those now in the repository.
        Nothing is fetched again, and the entries that stand are not touched."""
        db = self._db()
        db.execute("ATTACH DATABASE ? AS gc", (str(work),))
        try:
            with _transaction(db):
                for statement in _AFTER_GC.split(";"):   # executescript would commit
                    db.execute(statement)
                db.execute("DELETE FROM index_files")
                db.executemany("INSERT INTO index_files VALUES (?, ?, 1)", storage.list("index/"))
                db.execute("INSERT OR REPLACE INTO listed VALUES (1, ?, ?)",
                           (changes_token(storage) if _marked(storage) else None, time.time()))
        finally:
            db.execute("DETACH DATABASE gc")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _insert_rows(db: sqlite3.Connection, table: str, values: str,
                 rows: list[tuple[bytes, int, int, int, int]]) -> None:
    """Insert `rows` into `table`, each as the `values` clause with its items bound to the
    ?s: _ROWS_PER_INSERT rows a statement, which halves the cost of executemany's one."""
    if not rows:
        return
    flat = list(itertools.chain.from_iterable(rows))
    width = len(flat) // len(rows)
    full = len(rows) - len(rows) % _ROWS_PER_INSERT
    many = f"INSERT INTO {table} VALUES " + ",".join([values] * _ROWS_PER_INSERT)
    for i in range(0, full * width, _ROWS_PER_INSERT * width):
        db.execute(many, flat[i:i + _ROWS_PER_INSERT * width])
    if full < len(rows):
        db.execute(f"INSERT INTO {table} VALUES " + ",".join([values] * (len(rows) - full)),
                   flat[full * width:])


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")
