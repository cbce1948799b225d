"""Change ranges -> block runs, against a byte-by-byte model on random inputs.

Sizes are tiny (units and blocks of a few bytes): the arithmetic does not depend on scale,
and a byte-level model stays cheap.
"""

from __future__ import annotations

import random

import pytest

from lvbackup.base.errors import ChangeTrackingError
from lvbackup.datapath.blockmap import Kind, Run, checked
from lvbackup.volumes.changes.ranges import Change, Extent, block_runs


def random_extents(rng: random.Random, nunits: int, kinds: list[Change]) -> list[Extent]:
    out, pos = [], 0
    while pos < nunits:
        pos += rng.choice([0, 0, 1, rng.randrange(1, 8)])
        length = rng.choice([1, 1, 2, rng.randrange(1, 12)])
        if pos >= nunits:
            break
        out.append(Extent(rng.choice(kinds), pos, length))
        pos += length
    return out


def model(extents: list[Extent], unit: int, size: int, bs: int, parent: int | None,
          rest: Change) -> list[Kind]:
    """The expected kind of each block, from each byte's state."""
    state = [rest] * size
    for e in extents:
        for i in range(e.begin * unit, min(size, (e.begin + e.length) * unit)):
            state[i] = e.change
    kinds = []
    for b in range(-(-size // bs)):
        byte_states = set(state[b * bs:(b + 1) * bs])
        beyond = parent is not None and parent < size and (b + 1) * bs > parent
        if byte_states <= {Change.DISCARDED, Change.UNMAPPED}:
            kinds.append(Kind.HOLE)
        elif (byte_states & {Change.CHANGED, Change.DISCARDED} or beyond
              or parent is None):
            kinds.append(Kind.READ)
        else:
            kinds.append(Kind.INHERIT)
    return kinds


def expand(runs: list[Run]) -> list[Kind]:
    return [r.kind for r in runs for _ in range(r.blocks)]


@pytest.mark.parametrize("seed", range(400))
def test_random_against_model(seed: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice([4, 8, 16])
    unit = rng.choice([1, 2, 3, 4, 8, 12, 16, 32, 48])   # smaller, larger, unaligned
    size = rng.randrange(0, 40 * bs)                     # often not a block multiple
    parent = rng.choice([None, size, size, rng.randrange(0, 50 * bs)])
    thin = rng.random() < 0.5
    kinds = (list(Change) if thin else [Change.CHANGED])
    rest = Change.UNMAPPED if thin else Change.UNCHANGED
    # Ranges reach past the end sometimes: a shrunk volume, a pool block past the end.
    extents = random_extents(rng, -(-size // unit) + rng.randrange(0, 4), kinds)
    runs = list(checked(iter(block_runs(extents, unit, size, bs, parent, rest)),
                        size, bs, parent))
    assert expand(runs) == model(extents, unit, size, bs, parent, rest)
    # Runs are maximal: neighbours differ in kind.
    assert all(a.kind != b.kind for a, b in zip(runs, runs[1:], strict=False))
    # No block a change touches is inherited (the model says so too; stated directly).
    got = expand(runs)
    for e in extents:
        if e.change in (Change.CHANGED, Change.DISCARDED):
            lo, hi = e.begin * unit, min(size, (e.begin + e.length) * unit)
            for b in range(lo // bs, -(-hi // bs) if lo < size else 0):
                assert got[b] != Kind.INHERIT


def test_pool_block_larger_than_repository_block() -> None:
    # 64 KiB pool blocks, 16 KiB repository blocks: one changed pool block is 4 reads.
    runs = block_runs([Extent(Change.CHANGED, 1, 1)], 65536, 4 * 65536, 16384, 4 * 65536)
    assert runs == [Run(Kind.INHERIT, 0, 4), Run(Kind.READ, 4, 4), Run(Kind.INHERIT, 8, 8)]


def test_pool_block_smaller_than_repository_block() -> None:
    runs = block_runs([Extent(Change.CHANGED, 5, 1)], 65536, 16 << 20, 4 << 20, 16 << 20)
    assert runs == [Run(Kind.READ, 0, 1), Run(Kind.INHERIT, 1, 3)]


def test_partly_discarded_block_is_read_wholly_discarded_is_hole() -> None:
    runs = block_runs([Extent(Change.UNCHANGED, 0, 4), Extent(Change.DISCARDED, 4, 2)],
                      1, 8, 4, 8, Change.UNMAPPED)
    # Block 1 is half discarded, half unmapped on both sides: all zeros now.
    assert runs == [Run(Kind.INHERIT, 0, 1), Run(Kind.HOLE, 1, 1)]
    runs = block_runs([Extent(Change.UNCHANGED, 0, 3), Extent(Change.DISCARDED, 3, 1)],
                      1, 8, 4, 8, Change.UNCHANGED)
    assert runs == [Run(Kind.READ, 0, 1), Run(Kind.INHERIT, 1, 1)]


def test_grown_and_shrunk_volumes() -> None:
    # Grown from 10 to 16 bytes in 4-byte blocks: block 2 holds parent bytes 8-9 and new
    # bytes 10-11, so it is read with block 3.
    assert block_runs([], 1, 16, 4, 10) == [Run(Kind.INHERIT, 0, 2), Run(Kind.READ, 2, 2)]
    # Shrunk: ranges past the end are cut; an unaligned last block may be inherited only
    # when the parent ends at the same byte.
    assert block_runs([Extent(Change.CHANGED, 12, 4)], 1, 10, 4, 16) == \
        [Run(Kind.INHERIT, 0, 3)]
    assert block_runs([], 1, 10, 4, 10) == [Run(Kind.INHERIT, 0, 3)]
    # Grown thin: unmapped past the parent's end reads as zeros, whatever the parent held.
    assert block_runs([Extent(Change.UNCHANGED, 0, 2)], 4, 32, 4, 8, Change.UNMAPPED) == \
        [Run(Kind.INHERIT, 0, 2), Run(Kind.HOLE, 2, 6)]


def test_no_parent_reads_everything_not_known_zero() -> None:
    runs = block_runs([Extent(Change.CHANGED, 2, 1)], 4, 32, 4, None, Change.UNMAPPED)
    assert runs == [Run(Kind.HOLE, 0, 2), Run(Kind.READ, 2, 1), Run(Kind.HOLE, 3, 5)]


def test_empty_volume() -> None:
    assert block_runs([Extent(Change.CHANGED, 0, 3)], 4, 0, 4, 0) == []


@pytest.mark.parametrize("extents", [
    [Extent(Change.CHANGED, 4, 2), Extent(Change.CHANGED, 0, 1)],   # unsorted
    [Extent(Change.CHANGED, 0, 4), Extent(Change.CHANGED, 3, 1)],   # overlapping
    [Extent(Change.CHANGED, 0, 0)],                                  # empty
    [Extent(Change.CHANGED, -1, 2)],                                 # negative
])
def test_bad_lists_are_refused(extents: list[Extent]) -> None:
    with pytest.raises(ChangeTrackingError):
        block_runs(extents, 1, 16, 4, 16)


def test_bad_geometry_is_refused() -> None:
    with pytest.raises(ChangeTrackingError):
        block_runs([], 0, 16, 4, 16)
