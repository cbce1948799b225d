"""How a backup finds what changed: LVM's own record when it can be trusted, else a scan.

`plan()` gives create the block source it reads through and how it was chosen
(`change_source`):
- `thin_delta`: the pool compared the parent's thin snapshot with the new one;
- `cow`: the parent's classic snapshot's exception store lists the origin chunks written
  since it was taken, which the new, later snapshot of the same origin has or has not;
- `scan`: an incremental that reads the whole volume (of a thin volume, only the blocks
  its pool has mapped) and compares each block with the parent's;
- `full`: a full backup (of a thin volume, again only its mapped blocks).
A shortcut is taken only if the parent's recorded snapshot is found again by lv_uuid with
the same creation time (and, for thin, in the same pool), and only after a random sample
of the blocks it calls unchanged proved equal to the parent's. Otherwise the backup scans
and `fallback` says why.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import xxhash

from ... import lvm
from ...base.errors import ChangeTrackingError
from ...base.faults import crash_point, dropping_changes
from ...base.locks import FileLock
from ...config import DEFAULT_SAMPLE_PERCENT
from ...datapath.blockmap import FileBlocks, Kind, Run
from ...repository.manifest import Manifest
from .cow import ExceptionStore, read_exception_store
from .ranges import Change, Extent, block_runs
from .thin import parse_delta, parse_mappings

# One metadata snapshot per pool may exist, host-wide: the lock serialises lvbackup runs of
# every configuration, so a reservation found while holding it is a dead run's.
POOL_LOCK_DIR = Path("/run/lock/lvbackup")
POOL_LOCK_WAIT = 600.0
SAMPLE_MIN_BLOCKS = 16
SAMPLE_CAP_BYTES = 256 << 20     # what the default sample may read: a few seconds at most
COW_USAGE_WARNING = 80.0         # percent of a kept classic snapshot's COW space

log = logging.getLogger(__name__)

Warn = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    blocks: FileBlocks | MappedBlocks
    change_source: str
    fallback: str | None = None
    sampled_bytes: int = 0     # read by the sample check
    identity: dict[str, str | None] = field(default_factory=lambda: source_identity(None, []))


class MappedBlocks:
    """A file or device read through a block map that LVM's metadata gave."""

    def __init__(self, base: FileBlocks, runs: list[Run], block_size: int):
        self.base, self.runs, self.block_size = base, runs, block_size
        self.size = base.size
        self.readinto = base.readinto
        self.check_size = base.check_size

    def block_map(self, block_size: int) -> Iterator[Run]:
        if block_size != self.block_size:
            raise ChangeTrackingError(f"block map made for {self.block_size}-byte blocks, "
                                      f"asked for {block_size}")
        return iter(self.runs)


def source_identity(lv: lvm.LogicalVolume | None, vg_lvs: list[lvm.LogicalVolume]
                    ) -> dict[str, str | None]:
    """What the catalog records of the snapshot read, for the next run to pair with."""
    if lv is None or not lv.is_snapshot:
        return {"source_snapshot_id": None, "source_snapshot_time": None, "source_pool_id": None}
    pool = _pool(lv, vg_lvs) if lv.is_thin else None
    return {"source_snapshot_id": lv.uuid, "source_snapshot_time": lv.time,
            "source_pool_id": pool.uuid if pool else None}


def plan(base: FileBlocks, lv: lvm.LogicalVolume | None, parent: dict | None,
         parent_manifest: Manifest | None, block_size: int, *, track: bool = True,
         sample_percent: float, warn: Warn) -> Plan:
    """How to read `base` (the device of `lv`, or an image when `lv` is None); without
    `track`, every block, though the identity of what was read is still recorded."""
    scan = "scan" if parent_manifest is not None else "full"
    if lv is None:
        log.debug("not an LV: every block is read (%s)", scan)
        return Plan(base, scan)
    vg_lvs = lvm.vg_lvs(lv.vg)   # afresh: the parent's snapshot may have changed meanwhile
    if track:
        found = _choose(base, lv, vg_lvs, parent, parent_manifest, block_size, scan,
                        sample_percent, warn)
    else:
        log.debug("%s: change tracking is off, every block is read (%s)", lv.full_name,
                  scan)
        found = Plan(base, scan)
    log.debug("%s: change source %s%s", lv.full_name, found.change_source,
              f" (fallback: {found.fallback})" if found.fallback else "")
    try:
        return replace(found, identity=source_identity(lv, vg_lvs))
    except ChangeTrackingError:   # no pool in the report: nothing to pair with next time
        log.debug("%s: its pool is not in the report: nothing to pair the next backup "
                  "with", lv.full_name)
        return found


def _choose(base: FileBlocks, lv: lvm.LogicalVolume, vg_lvs: list[lvm.LogicalVolume],
            parent: dict | None, parent_manifest: Manifest | None, block_size: int, scan: str,
            sample_percent: float, warn: Warn) -> Plan:
    fallback = None
    if parent is not None and parent_manifest is not None:
        try:
            runs, how = _changed_runs(base, lv, vg_lvs, parent, parent_manifest.size,
                                      block_size, warn)
            bad, sampled = sample_check(base, runs, parent_manifest, block_size, sample_percent)
            if bad is None:
                log.debug("%s: %s lists the changes since the parent backup %s; the sample "
                          "check re-read %d bytes it calls unchanged, all equal",
                          lv.full_name, how, parent["id"], sampled)
                return Plan(MappedBlocks(base, runs, block_size), how, sampled_bytes=sampled)
            fallback = bad
        except (ChangeTrackingError, lvm.LvmError) as e:
            fallback = str(e)
        log.debug("%s: LVM's list of changes is not used: %s", lv.full_name, fallback)
    elif parent is not None:
        log.debug("%s: the parent backup %s has no manifest to compare with", lv.full_name,
                  parent["id"])
    if lv.is_thin:
        try:
            runs = _mapped_runs(base, lv, vg_lvs, block_size)
            log.debug("%s: only the blocks its thin pool maps are read", lv.full_name)
            return Plan(MappedBlocks(base, runs, block_size), scan, fallback)
        except (ChangeTrackingError, lvm.LvmError) as e:
            log.debug("%s: the pool's mappings cannot be listed: %s", lv.full_name, e)
            fallback = f"{fallback}; " if fallback else ""
            fallback += f"reading every block ({e})"
    return Plan(base, scan, fallback)


# --- pairing with the parent's snapshot -----------------------------------------------------

def _changed_runs(base: FileBlocks, lv: lvm.LogicalVolume, vg_lvs: list[lvm.LogicalVolume],
                  parent: dict, parent_size: int, block_size: int,
                  warn: Warn) -> tuple[list[Run], str]:
    old = _parent_snapshot(parent, vg_lvs)
    if old.uuid == lv.uuid:
        raise ChangeTrackingError(f"the parent backup was read from {lv.full_name} itself")
    if not lv.is_snapshot:
        raise ChangeTrackingError(f"{lv.full_name} is not a snapshot: only a snapshot's "
                                  "changes can be listed")
    if lv.is_thin and old.is_thin:
        _refuse_external_origin(lv, vg_lvs)
        pool = _pool(lv, vg_lvs)
        if old.pool_lv != lv.pool_lv or parent.get("source_pool_id") != pool.uuid:
            raise ChangeTrackingError(f"the parent's snapshot {old.full_name} is in another "
                                      "thin pool")
        return _thin_delta_runs(base, lv, old, pool, parent_size, block_size), "thin_delta"
    if not lv.is_thin and not old.is_thin:
        return _cow_runs(base, lv, old, parent_size, block_size, warn), "cow"
    raise ChangeTrackingError(f"the parent's snapshot {old.full_name} and {lv.full_name} are "
                              "not both thin or both classic")


def _parent_snapshot(parent: dict, vg_lvs: list[lvm.LogicalVolume]) -> lvm.LogicalVolume:
    uuid = parent.get("source_snapshot_id")
    if not uuid:
        raise ChangeTrackingError(f"the parent backup {parent['id']} was not read from a "
                                  "snapshot")
    old = next((x for x in vg_lvs if x.uuid == uuid), None)
    log.debug("the parent backup %s was read from snapshot %s: %s", parent["id"], uuid,
              old.full_name if old else "gone")
    if old is None:
        raise ChangeTrackingError(f"the parent's snapshot (lv_uuid {uuid}) no longer exists")
    if old.time != parent.get("source_snapshot_time"):
        raise ChangeTrackingError(f"the parent's snapshot {old.full_name} has another creation "
                                  "time than the one recorded")
    return old


def _pool(lv: lvm.LogicalVolume, vg_lvs: list[lvm.LogicalVolume]) -> lvm.LogicalVolume:
    pool = next((x for x in vg_lvs if x.name == lv.pool_lv and x.segtype == "thin-pool"), None)
    if pool is None:
        raise ChangeTrackingError(f"the thin pool of {lv.full_name} is not in its VG's report")
    return pool


def _refuse_external_origin(lv: lvm.LogicalVolume, vg_lvs: list[lvm.LogicalVolume]) -> None:
    """Unmapped blocks of a thin volume read as zeros, unless it has an external origin."""
    origin = next((x for x in vg_lvs if x.name == lv.origin), None) if lv.origin else None
    if origin is not None and not origin.is_thin:
        raise ChangeTrackingError(f"{lv.full_name} has an external origin, which its "
                                  "unmapped blocks read from")


def _with_drops(extents: list[Extent]) -> list[Extent]:
    """The test hook for a wrong change list: every change reported as none."""
    if not dropping_changes():
        return extents
    return [e._replace(change=Change.UNCHANGED) if e.change == Change.CHANGED else e
            for e in extents]


# --- thin pools ----------------------------------------------------------------------------

@contextlib.contextmanager
def pool_metadata(lv: lvm.LogicalVolume, pool: lvm.LogicalVolume) -> Iterator[dict[str, int]]:
    """The pool's metadata snapshot reserved for the block (released however it ends), and
    the thin ids of the VG's thin volumes, looked up afresh (LVM reuses them)."""
    lock = FileLock(POOL_LOCK_DIR / f"pool-{pool.uuid}.lock",
                    f"thin pool {pool.full_name}'s metadata snapshot")
    with lock.acquire(POOL_LOCK_WAIT):
        if lvm.metadata_snap_held(pool.vg, pool.name):
            # Under the lock no live lvbackup holds it: a killed run left it.
            log.debug("%s: releasing the metadata snapshot a killed run left",
                      pool.full_name)
            lvm.release_metadata_snap(pool.vg, pool.name)
        lvm.reserve_metadata_snap(pool.vg, pool.name)
        try:
            crash_point("metadata-reserved")
            yield lvm.thin_ids(lv.vg)
        finally:
            lvm.release_metadata_snap(pool.vg, pool.name)


def _thin_id(ids: dict[str, int], lv: lvm.LogicalVolume) -> int:
    if lv.name not in ids:
        raise ChangeTrackingError(f"lvs reports no thin id for {lv.full_name}")
    return ids[lv.name]


def _thin_delta_runs(base: FileBlocks, lv: lvm.LogicalVolume, old: lvm.LogicalVolume,
                     pool: lvm.LogicalVolume, parent_size: int, block_size: int) -> list[Run]:
    with pool_metadata(lv, pool) as ids:
        left, right = _thin_id(ids, old), _thin_id(ids, lv)
        report = parse_delta(lvm.thin_delta(pool.vg, pool.name, left, right), left, right)
    return block_runs(_with_drops(report.extents), report.block_bytes, base.size, block_size,
                      parent_size, rest=Change.UNMAPPED)


def _mapped_runs(base: FileBlocks, lv: lvm.LogicalVolume, vg_lvs: list[lvm.LogicalVolume],
                 block_size: int) -> list[Run]:
    """READ where the pool maps blocks of `lv`, HOLE elsewhere."""
    _refuse_external_origin(lv, vg_lvs)
    pool = _pool(lv, vg_lvs)
    with pool_metadata(lv, pool) as ids, tempfile.TemporaryDirectory() as tmp:
        dev = _thin_id(ids, lv)
        out = os.path.join(tmp, "mappings.xml")
        lvm.thin_dump_mappings(pool.vg, pool.name, dev, out)
        with open(out, "rb") as f:
            report = parse_mappings(f, dev)
    return block_runs(report.extents, report.block_bytes, base.size, block_size, None,
                      rest=Change.UNMAPPED)


# --- classic snapshots ---------------------------------------------------------------------

def _cow_runs(base: FileBlocks, lv: lvm.LogicalVolume, old: lvm.LogicalVolume,
              parent_size: int, block_size: int, warn: Warn) -> list[Run]:
    if old.origin != lv.origin:
        raise ChangeTrackingError(f"the parent's snapshot {old.full_name} is of another origin")
    if old.state != "available":
        raise ChangeTrackingError(f"the parent's snapshot {old.full_name} is {old.state}")
    if not old.time < lv.time:
        # Creation times have one-second resolution: the order must be certain, since the
        # old store lists only what changed after the old snapshot was taken.
        raise ChangeTrackingError(f"{lv.full_name} is not known to be newer than the parent's "
                                  f"snapshot {old.full_name}")
    if old.snap_percent is not None and old.snap_percent >= COW_USAGE_WARNING:
        warn(f"snapshot {old.full_name} has used {old.snap_percent:.0f}% of its space; it "
             "becomes invalid when full, and the next incremental then reads the whole "
             "volume: give it more space (lvextend)")
    # Read now, after the new snapshot was made: a write between the two is in the list.
    store = _read_store(lvm.cow_path(old))
    return block_runs(_with_drops(store.extents()), store.chunk_bytes, base.size, block_size,
                      parent_size, rest=Change.UNCHANGED)


def _read_store(path: str) -> ExceptionStore:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        raise ChangeTrackingError(f"cannot open the COW device {path}: {e.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)

        def readinto(view: memoryview, offset: int) -> None:
            got = os.preadv(fd, [view], offset)
            if got != len(view):
                raise ChangeTrackingError(f"the COW device {path} ended at byte "
                                          f"{offset + got}")
        try:
            return read_exception_store(readinto, size)
        except OSError as e:
            raise ChangeTrackingError(f"cannot read the COW device {path}: "
                                      f"{e.strerror}") from None
    finally:
        os.close(fd)


# --- the guard -----------------------------------------------------------------------------

def sample_size(inherited: int, percent: float, block_size: int) -> int:
    want = max(SAMPLE_MIN_BLOCKS, math.ceil(inherited * percent / 100))
    if percent <= DEFAULT_SAMPLE_PERCENT:
        want = min(want, max(SAMPLE_MIN_BLOCKS, SAMPLE_CAP_BYTES // block_size))
    return min(want, inherited)


def sample_check(base: FileBlocks, runs: list[Run], parent: Manifest, block_size: int,
                 percent: float) -> tuple[str | None, int]:
    """Re-read a random sample of the blocks `runs` inherit and compare each with the
    parent's entry: (a reason to distrust the runs, or None; the bytes read)."""
    inherit = [r for r in runs if r.kind == Kind.INHERIT]
    total = sum(r.blocks for r in inherit)
    picks = sorted(random.sample(range(total), sample_size(total, percent, block_size)))
    read = 0
    with mmap.mmap(-1, block_size) as buf, memoryview(buf) as view:
        k = passed = 0
        for r in inherit:
            while k < len(picks) and picks[k] < passed + r.blocks:
                block = r.first + picks[k] - passed
                k += 1
                n = min(block_size, base.size - block * block_size)
                base.readinto(view[:n], block * block_size)
                read += n
                e = parent.entries_at(block, 1)
                same = (buf[:n] == bytes(n) if e.is_hole(0)
                        else e.same_block(0, xxhash.xxh3_128_digest(view[:n])) is not None)
                if not same:
                    return (f"the change list calls block {block} unchanged, but it differs "
                            "from the parent backup's: read the whole volume instead"), read
            passed += r.blocks
    return None, read
