"""`verify --deep --sample` and `--max-duration`: a deep verification a part at a time.

Every indexed chunk lives in one pack (the one the index cache names), and pack ids are
uniformly distributed hashes, so a range of pack ids holds its share of the chunks. A
cycle walks the pack id space once, in id order, through the index cache; each run reads
from where the last one stopped: the chunks of the packs in the next PERCENT of the id
space (the whole rest without --sample), or fewer if its time budget runs out. Reading
by pack keeps the reads sequential (chunks back to back in a pack come in one vectored
read; on object storage, from the same ranged windows). `--sample 5` run daily reads
every chunk once in 20 days. The position lives in the cache directory, one small JSON
file per repository (`verify-<repository id>.json`, 0600, replaced atomically):

    cycle        the cycle's number (1, 2, ...)
    started_at   when it began (Unix time)
    first_at     when the first cycle began (chunks never read count from then)
    next         the next pack id to read, as a hexadecimal integer (2^256: the cycle is done)
    checked      [[end, time], ...] sorted by end: pack ids from the previous end (0 for the
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

from ..base.diskio import AtomicFile
from ..base.timeutil import iso
from ..datapath.pipeline import ordered_map
from ..repository.pack import ChunkRef
from ..repository.repo import ChunkError, Repository

SPACE = 1 << 256            # pack ids are 32 bytes
_ID_BYTES = 32
_PACKS = 64                 # pack ids asked of the index cache at once
_BATCH_CHUNKS = 512         # chunks read per task (one vectored read at most)
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
    """Read the chunks of the next `share` of the pack ids (all that is left of the cycle
    if None), in id order, stopping once `budget` seconds have gone (after one pack at
    least: every run moves on); save the position. `progress(bytes read, bytes expected)`:
    the bytes expected are estimated from the share of the id space and the block size."""
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
    for (pack, last), (count, size, bad) in ordered_map(
            lambda b: (b[0], _check(repo, b[1])), _batches(repo, start, end),
            workers=workers, depth=2 * workers):
        checked += count
        done += size
        damaged += bad
        if progress:
            progress(done, max(done, expected))
        if last:    # the pack's last batch: the position moves past it
            reached = pack + 1
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


def _batches(repo: Repository, start: int, end: int
             ) -> Iterator[tuple[tuple[int, bool], list[ChunkRef]]]:
    """((pack id, whether this is the pack's last batch), chunks in pack order) for the
    indexed packs with ids in [start, end), in id order."""
    bound = None if end >= SPACE else _key(end)
    cursor = start
    while cursor < SPACE:
        packs = repo.index.packs_in_range(_key(cursor), bound, _PACKS)
        if not packs:
            return
        for pack in packs:
            number = int.from_bytes(pack, "big")
            groups = _groups(sorted(repo.index.refs_in_pack(pack), key=lambda r: r.offset))
            for n, group in enumerate(groups):
                yield (number, n == len(groups) - 1), group
            if not groups:
                yield (number, True), []
        cursor = int.from_bytes(packs[-1], "big") + 1


def _groups(refs: list[ChunkRef]) -> list[list[ChunkRef]]:
    """Batches of at most _BATCH_CHUNKS chunks and _BATCH_BYTES bytes."""
    out: list[list[ChunkRef]] = []
    size = 0
    for ref in refs:
        if not out or len(out[-1]) == _BATCH_CHUNKS or size + ref.raw_length > _BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(ref)
        size += ref.raw_length
    return out


def _batches_left(repo: Repository, start: int, end: int) -> bool:
    return start < end and bool(repo.index.packs_in_range(
        _key(start), None if end >= SPACE else _key(end), 1))


def _check(repo: Repository, refs: list[ChunkRef]) -> tuple[int, int, list[ChunkError]]:
    """(chunks read, their bytes, those found damaged): every chunk is read, decoded and
    checked against its id; read_checked quarantines a damaged copy."""
    bad: list[ChunkError] = []
    todo = refs
    while todo:
        try:
            repo.read_checked(todo)
            break
        except ChunkError as e:
            bad.append(e)
            todo = [r for r in todo if r.chunk_id != e.ref.chunk_id]
    return len(refs), sum(r.raw_length for r in refs), bad
