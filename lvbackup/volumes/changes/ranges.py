"""Changed ranges in some unit (pool data blocks, COW chunks) -> repository block runs.

A range says what happened to the units it covers between the parent backup's source and
the new one; units no range covers are `rest` (UNCHANGED for a COW store, which lists only
what changed; UNMAPPED for thin_delta, which lists everything mapped on either side).
A repository block is
- READ if any of its bytes may differ: touched by a CHANGED range, by a DISCARDED range
  that does not, with UNMAPPED ones, cover all of it, or lying (partly) beyond the parent's
  size (what the parent holds there is not this volume's data);
- HOLE if all of its bytes are DISCARDED or UNMAPPED (they read as zeros, whatever the
  parent held: so also past the parent's size);
- INHERIT otherwise (its bytes are UNCHANGED or were unmapped on both sides).
Without a parent, nothing can be inherited: blocks that would be are READ.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import IntEnum
from typing import NamedTuple

from ...base.errors import ChangeTrackingError
from ...datapath.blockmap import Kind, Run


class Change(IntEnum):
    UNCHANGED = 0
    CHANGED = 1      # written (or mapped anew) since the parent
    DISCARDED = 2    # mapped in the parent's source, unmapped now: reads as zeros
    UNMAPPED = 3     # unmapped on both sides: zeros then and now


class Extent(NamedTuple):
    change: Change
    begin: int       # in units
    length: int


Interval = tuple[int, int]   # [first, end) in repository blocks


def validated(extents: Iterable[Extent]) -> Iterator[Extent]:
    """The extents, refused unless sorted, non-overlapping, non-negative and non-empty:
    a list that breaks these was not written by the tool this module expects."""
    end = 0
    for e in extents:
        if e.begin < 0 or e.length <= 0:
            raise ChangeTrackingError(f"change list: a range at {e.begin} of length "
                                      f"{e.length}")
        if e.begin < end:
            raise ChangeTrackingError(f"change list: a range at {e.begin} overlaps or "
                                      f"precedes the one ending at {end}")
        end = e.begin + e.length
        yield e


def block_runs(extents: Iterable[Extent], unit: int, size: int, block_size: int,
               parent_size: int | None, rest: Change = Change.UNCHANGED) -> list[Run]:
    """Runs covering the ceil(size / block_size) blocks of a volume of `size` bytes, from
    `extents` in units of `unit` bytes (see the module's docstring). Ranges past `size`
    (a shrunk volume, a pool block past the end) are cut."""
    if unit <= 0 or block_size <= 0 or size < 0:
        raise ChangeTrackingError(f"change list: unit {unit}, block size {block_size}, "
                                  f"size {size}")
    nblocks = -(-size // block_size)
    touched: list[Interval] = []    # blocks some byte of which may differ
    zero_bytes: list[Interval] = []  # byte ranges known to read as zeros
    pos = 0
    for e in _with_rest(validated(extents), rest):
        start, stop = e.begin * unit, min(size, (e.begin + e.length) * unit)
        pos = e.begin + e.length
        if start >= size:
            continue
        if e.change in (Change.DISCARDED, Change.UNMAPPED):
            zero_bytes.append((start, stop))
        if e.change in (Change.CHANGED, Change.DISCARDED):
            touched.append((start // block_size, -(-stop // block_size)))
    if rest != Change.UNCHANGED and pos * unit < size:
        # Past the last range: the volume's tail, all `rest`.
        zero_bytes.append((pos * unit, size))
    zero = [(-(-a // block_size), nblocks if b >= size else b // block_size)
            for a, b in _merged(zero_bytes)]
    beyond = ([(parent_size // block_size, nblocks)]
              if parent_size is not None and parent_size < size else [])
    return list(_classify(nblocks, _merged(touched), _merged(zero), _merged(beyond),
                          inherit=parent_size is not None))


def _with_rest(extents: Iterator[Extent], rest: Change) -> Iterator[Extent]:
    """The extents with the gaps between them filled in as `rest` (if it says anything)."""
    end = 0
    for e in extents:
        if rest != Change.UNCHANGED and e.begin > end:
            yield Extent(rest, end, e.begin - end)
        end = e.begin + e.length
        yield e


def _merged(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(iv for iv in intervals if iv[0] < iv[1]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _classify(nblocks: int, touched: list[Interval], zero: list[Interval],
              beyond: list[Interval], inherit: bool) -> Iterator[Run]:
    """Sweep the interval lists' boundaries, one kind per stretch between them, merging
    neighbours of the same kind."""
    lists = (touched, zero, beyond)
    points = sorted({0, nblocks, *(p for ivs in lists for iv in ivs for p in iv
                                    if p <= nblocks)})
    index = [0, 0, 0]
    kind: Kind | None = None
    first = 0
    for a in points[:-1]:
        inside = []
        for n, ivs in enumerate(lists):
            while index[n] < len(ivs) and ivs[index[n]][1] <= a:
                index[n] += 1
            inside.append(index[n] < len(ivs) and ivs[index[n]][0] <= a)
        in_touched, in_zero, in_beyond = inside
        if in_zero:
            k = Kind.HOLE
        elif in_touched or in_beyond or not inherit:
            k = Kind.READ
        else:
            k = Kind.INHERIT
        if k != kind:
            if kind is not None:
                yield Run(kind, first, a - first)
            kind, first = k, a
    if kind is not None:
        yield Run(kind, first, nblocks - first)
