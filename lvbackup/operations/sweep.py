"""`verify --deep --sample` and `--max-duration`: a deep verification a part at a time.

Chunk ids are uniformly distributed hashes, so a range of ids holds its share of the chunks.
A cycle walks the id space once, in id order, through the index cache; each run reads from
where the last one stopped: the next PERCENT of the id space (the whole rest without
--sample), or less if its time budget runs out. `--sample 5` run daily thus reads every
chunk once in 20 days. The position lives in the cache directory, one small JSON file per
repository (`verify-<repository id>.json`, 0600, replaced atomically):

    cycle        the cycle's number (1, 2, ...)
    started_at   when it began (Unix time)
    first_at     when the first cycle began (chunks never read count from then)
    next         the next chunk id to read, as a hexadecimal integer (2^256: the cycle is done)
    checked      [[end, time], ...] sorted by end: ids from the previous end (0 for the
                 first) up to `end` were last read at `time`

A lost or unreadable file starts a new cycle at the first id.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

from ..datapath.pipeline import ordered_map
from ..diskio import AtomicFile
from ..repository.pack import ChunkRef
from ..repository.repo import ChunkError, Repository
from ..timeutil import iso

SPACE = 1 << 256            # chunk ids are 32 bytes
_ID_BYTES = 32
_BATCH_CHUNKS = 256         # chunks read per task
_BATCH_BYTES = 8 << 20      # and at most this many plaintext bytes


@dataclass
class Position:
    cycle: int = 1
    started_at: float = field(default_factory=time.time)
    first_at: float = 0.0
    next: int = 0
    checked: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.first_at = self.first_at or self.started_at

    def covered(self, start: int, end: int, at: float) -> None:
        """Record that ids in [start, end) were read at `at`."""
        if end <= start:
            return
        before = [(e, t) for e, t in self.checked if e <= start]
        after = [(e, t) for e, t in self.checked if e > end]
        spanning = next(((e, t) for e, t in self.checked if e > start), None)
        if spanning and start > (before[-1][0] if before else 0):
            before.append((start, spanning[1]))  # its part before `start` keeps its time
        self.checked = [*before, (end, at), *after]

    def oldest_unverified(self) -> float:
        """When the chunk that has gone longest without being read was last read (when the
        first cycle began, for a chunk never read)."""
        if not self.checked or self.checked[-1][0] < SPACE:
            return self.first_at
        return min(t for _, t in self.checked)

    def done_percent(self) -> float:
        return round(self.next * 100 / SPACE, 2)


def state_path(cache_dir: Path, repo: Repository) -> Path:
    return Path(cache_dir) / f"verify-{repo.id}.json"


def load(path: Path) -> Position:
    try:
        raw = json.loads(path.read_text())
        pos = Position(cycle=int(raw["cycle"]), started_at=float(raw["started_at"]),
                       first_at=float(raw["first_at"]), next=int(raw["next"], 16),
                       checked=[(int(e, 16), float(t)) for e, t in raw["checked"]])
    except (OSError, ValueError, KeyError, TypeError):
        return Position()
    if not 0 <= pos.next <= SPACE or any(not 0 < e <= SPACE for e, _ in pos.checked):
        return Position()
    return pos


def save(path: Path, pos: Position) -> None:
    data = {"cycle": pos.cycle, "started_at": pos.started_at, "first_at": pos.first_at,
            "next": format(pos.next, "x"),
            "checked": [[format(e, "x"), t] for e, t in pos.checked]}
    with AtomicFile(path, mode=0o600) as f:
        os.write(f.fd, json.dumps(data).encode())


@dataclass
class SweepResult:
    checked: int                       # chunks read
    total: int                         # chunks in the repository's index
    damaged: list[ChunkError]          # the chunks found damaged (now quarantined)
    position: Position
    out_of_time: bool

    def report(self) -> dict:
        pos = self.position
        return {"number": pos.cycle, "done_percent": pos.done_percent(),
                "started_at": _iso(pos.started_at),
                "oldest_unverified_at": _iso(pos.oldest_unverified()),
                "out_of_time": self.out_of_time}


def _iso(t: float) -> str:
    return iso(datetime.fromtimestamp(t, UTC))


def sweep(repo: Repository, path: Path, share: Fraction | None, budget: float | None,
          workers: int, progress: Callable[[int, int], None] | None = None) -> SweepResult:
    """Read the next `share` of the chunk ids (all that is left of the cycle if None), in
    id order, stopping once `budget` seconds have gone (after one batch at least: every run
    moves on); save the position. `progress(bytes read, bytes expected)`: the bytes
    expected are estimated from the share of the id space and the block size."""
    pos = load(path)
    if pos.next >= SPACE:
        pos = Position(cycle=pos.cycle + 1, first_at=pos.first_at, checked=pos.checked)
    start = pos.next
    end = SPACE if share is None else min(SPACE, start + -(-SPACE * share.numerator
                                                          // share.denominator))
    total = repo.index.count_chunks()
    expected = total * (end - start) // SPACE * repo.block_size
    began = time.monotonic()
    checked, done, damaged, out_of_time = 0, 0, [], False
    reached = start
    for last, count, size, bad in ordered_map(lambda b: _check(repo, b),
                                              _batches(repo, start, end),
                                              workers=workers, depth=2 * workers):
        checked += count
        done += size
        damaged += bad
        reached = last + 1
        if progress:
            progress(done, max(done, expected))
        if budget is not None and time.monotonic() - began >= budget:
            out_of_time = True
            break
    else:
        reached = end
    if out_of_time and not _batches_left(repo, reached, end):
        out_of_time, reached = False, end
    pos.covered(start, reached, time.time())
    pos.next = reached
    save(path, pos)
    return SweepResult(checked, total, damaged, pos, out_of_time)


def _key(n: int) -> bytes:
    return n.to_bytes(_ID_BYTES, "big")


def _batches(repo: Repository, start: int, end: int) -> Iterator[list[ChunkRef]]:
    """The indexed chunks with ids in [start, end), in id order, a batch at a time."""
    bound = None if end >= SPACE else _key(end)
    cursor = start
    while True:
        refs = repo.index.refs_in_range(_key(cursor), bound, _BATCH_CHUNKS)
        if not refs:
            return
        batch: list[ChunkRef] = []
        size = 0
        for ref in refs:
            if batch and size + ref.raw_length > _BATCH_BYTES:
                yield batch
                batch, size = [], 0
            batch.append(ref)
            size += ref.raw_length
        yield batch
        cursor = int.from_bytes(refs[-1].chunk_id, "big") + 1
        if cursor >= SPACE:
            return


def _batches_left(repo: Repository, start: int, end: int) -> bool:
    return start < end and next(_batches(repo, start, end), None) is not None


def _check(repo: Repository, refs: list[ChunkRef]
           ) -> tuple[int, int, int, list[ChunkError]]:
    """(the last id of the batch, chunks read, their bytes, those found damaged): every
    chunk is read, decoded and checked against its id; read_checked quarantines a damaged
    copy."""
    bad: list[ChunkError] = []
    todo = refs
    while todo:
        try:
            repo.read_checked(todo)
            break
        except ChunkError as e:
            bad.append(e)
            todo = [r for r in todo if r.chunk_id != e.ref.chunk_id]
    return (int.from_bytes(refs[-1].chunk_id, "big"), len(refs),
            sum(r.raw_length for r in refs), bad)
