"""The index cache's layout: built cold in one ordered pass, and a cache of the earlier
layout brought forward without losing what only it knows."""

import sqlite3
import uuid
from pathlib import Path

from lvbackup.repository.backends import MemoryBackend
from lvbackup.repository.codec import PLAIN
from lvbackup.repository.index import ChunkIndex, encode_index
from lvbackup.repository.pack import ChunkRef, pack_name


def _index(storage: MemoryBackend, pack: bytes, ids: list[bytes]) -> None:
    storage.put_content_addressed(*encode_index(
        [(pack, [ChunkRef(i, pack, 8 + 100 * k, 100, 200, 1) for k, i in enumerate(ids)])],
        PLAIN))


def test_a_cold_build_with_two_copies_of_a_chunk_keeps_the_one_that_exists(tmp_path: Path):
    storage = MemoryBackend(f"cold-{uuid.uuid4().hex}")
    lost, kept = b"\x01" * 32, b"\xff" * 32   # the lost pack sorts first, and is merged first
    storage.put(pack_name(kept), b"a pack")
    shared, only = b"c" * 32, b"d" * 32
    _index(storage, lost, [shared, only])
    _index(storage, kept, [shared])
    cache = ChunkIndex(tmp_path / "cache.sqlite")
    assert cache.sync(storage, PLAIN) == []
    assert cache.lookup([shared], undamaged=True)[shared].pack_id == kept
    assert cache.lookup([only])[only].pack_id == lost
    assert cache.damaged_ids() == {only} and cache.count_chunks() == 2
    assert [r.chunk_id for r in cache.refs_in_pack(kept)] == [shared]
    cache.close()


_FIRST_LAYOUT = """
CREATE TABLE chunks (id BLOB PRIMARY KEY, pack BLOB NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, raw_length INTEGER NOT NULL, flags INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX chunks_pack ON chunks(pack);
CREATE TABLE packs (id BLOB PRIMARY KEY, run TEXT, indexed INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE index_files (name TEXT PRIMARY KEY, stamp TEXT NOT NULL, ok INTEGER NOT NULL);
CREATE TABLE damaged (chunk BLOB NOT NULL, pack BLOB NOT NULL, PRIMARY KEY (chunk, pack))
    WITHOUT ROWID;
CREATE TABLE lost (pack BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE bad_marks (name TEXT PRIMARY KEY, stamp TEXT NOT NULL);
CREATE TABLE listed (one INTEGER PRIMARY KEY CHECK (one = 1), marker TEXT, at REAL NOT NULL);
"""


def test_a_cache_of_the_first_layout_keeps_pending_packs_and_damage(tmp_path: Path):
    storage = MemoryBackend(f"layout-{uuid.uuid4().hex}")
    indexed, pending = b"a" * 32, b"b" * 32
    storage.put(pack_name(indexed), b"a pack")
    good, bad = b"c" * 32, b"d" * 32
    _index(storage, indexed, [good, bad])
    path = tmp_path / "cache.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_FIRST_LAYOUT)
    db.execute("INSERT INTO packs VALUES (?, NULL, 1), (?, 'run-1', 0)", (indexed, pending))
    db.execute("INSERT INTO chunks VALUES (?, ?, 8, 100, 200, 1)", (good, indexed))
    db.execute("INSERT INTO index_files VALUES ('index/x', 'stamp', 1)")
    db.execute("INSERT INTO damaged VALUES (?, ?)", (bad, indexed))
    db.commit()
    db.close()
    cache = ChunkIndex(path)
    assert cache.pending_runs() == ["run-1"] and cache.pending_packs("run-1") == [pending]
    assert cache.count_chunks() == 0          # the entries are merged again
    assert cache.sync(storage, PLAIN) == []
    assert set(cache.lookup([good, bad])) == {good, bad}
    assert set(cache.lookup([good, bad], undamaged=True)) == {good}
    assert cache.damaged_ids() == {bad}
    cache.close()
    assert ChunkIndex(path).count_chunks() == 2   # opened again: nothing is lost
