"""Instant restore's data path: the restored volume, served while it is copied from the
backup into the LV ("hydrated") region by region. No nbdkit, kernel or LVM here (that is
`instant_export.py`), so every rule below is tested against plain files.

The rules (docs/reliability.md, "Instant restore"):
- a region is read from the LV once its bit in the region map is set, from the backup
  before;
- a bit is set only after the region's data is in the LV and synced, and the bit itself is
  synced before anything else happens: a region is never served from the backup again once
  it was hydrated;
- a write into a region hydrates the region first, so a write lands on the backup's data
  and never on whatever the LV held before, and no write is ever hidden by a read from the
  backup;
- a flush syncs the LV (the region map is synced at each change already).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NotRequired, TypedDict

from ..base.diskio import AtomicFile
from ..base.errors import CorruptionError
from ..base.faults import crash_point

REGION = 4 << 20          # bytes per region: one bit of the region map
STATE_FORMAT = 1
_LOCKS = 64               # region locks, striped: region i takes lock i % _LOCKS


class InstantState(TypedDict):
    """The state file of one instant restore (`<cache_dir>/instant/<name>.json`)."""
    format: int
    volume: str               # VG/NAME restored onto
    target: str               # its device path
    backup_id: str
    backup: dict              # the backup's record when the restore started (for events)
    size: int                 # bytes restored (the backup's size)
    region_size: int
    fresh: bool               # the LV read as zeros at the start: all-zero regions skipped
    rate: int | None          # bytes per second the background copy may take, or unlimited
    dm_name: str              # the device-mapper device the user was given
    device: str               # /dev/mapper/<dm_name>
    started_at: str
    done_at: str | None       # set once the device maps the LV itself
    error: str | None         # why the background copy stopped, if it did
    # Absent from the files of lvbackup versions before `--cancel` and `--release`:
    created: NotRequired[bool]            # the restore created the LV (cancel removes it)
    lv_uuid: NotRequired[str]             # the LV's, so that cancel removes no other
    cancelled_at: NotRequired[str | None]  # `restore --cancel` began undoing the restore
    released_at: NotRequired[str | None]   # the device is removed: the LV is used as itself


def regions_of(size: int, region_size: int) -> int:
    return -(-size // region_size)


def state_path(cache_dir: Path, dm_name: str) -> Path:
    return cache_dir / "instant" / f"{dm_name}.json"


def regions_path(state: Path) -> Path:
    """The region map beside its state file."""
    return state.with_suffix(".regions")


def load_state(path: Path) -> InstantState:
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise CorruptionError(f"instant restore state {path} is not valid JSON") from None
    if state.get("format") != STATE_FORMAT:
        raise CorruptionError(f"instant restore state {path} has unknown format "
                              f"{state.get('format')!r}")
    return state


def save_state(path: Path, state: InstantState) -> None:
    with AtomicFile(path, mode=0o600) as f:
        os.write(f.fd, json.dumps(state, indent=1).encode())


class RegionBitmap:
    """Which regions of the target hold the restored data: one bit per region in a file
    (region i is bit i % 8, least significant first, of byte i // 8), only ever set, each
    change written in place and synced before `mark` returns."""

    def __init__(self, path: Path, regions: int, writable: bool = True):
        self.path = path
        self.regions = regions
        self._fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        length = -(-regions // 8)
        bits = os.pread(self._fd, length + 1, 0)
        if len(bits) != length:
            os.close(self._fd)
            raise CorruptionError(f"region map {path} holds {len(bits)} bytes, expected "
                                  f"{length}")
        self._bits = bytearray(bits)
        self._count = sum(bin(b).count("1") for b in self._bits)
        self._lock = threading.Lock()

    @staticmethod
    def create(path: Path, regions: int) -> None:
        """A region map with no region hydrated, appearing whole."""
        with AtomicFile(path, mode=0o600) as f:
            os.write(f.fd, bytes(-(-regions // 8)))

    def __contains__(self, region: int) -> bool:
        return bool(self._bits[region >> 3] >> (region & 7) & 1)

    @property
    def count(self) -> int:
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.regions

    def mark(self, region: int) -> None:
        """Set region's bit, durably: its byte is rewritten and the file synced."""
        with self._lock:
            byte = region >> 3
            if self._bits[byte] >> (region & 7) & 1:
                return
            self._bits[byte] |= 1 << (region & 7)
            os.pwrite(self._fd, self._bits[byte:byte + 1], byte)
            os.fdatasync(self._fd)
            self._count += 1

    def close(self) -> None:
        os.close(self._fd)


def hydrated_bytes(regions: RegionBitmap, size: int, region_size: int) -> int:
    last = regions.regions - 1
    done = regions.count * region_size
    if regions.regions and last in regions:   # the last region may be short
        done -= regions.regions * region_size - size
    return done


Read = Callable[[int, int], bytes]   # (offset, length) of the backup's image -> its bytes


class Hydrator:
    """The restored volume over `target` (an open file descriptor of the LV): reads,
    writes and flushes as a block device gets them, and the background copy."""

    def __init__(self, target: int, regions: RegionBitmap, size: int, region_size: int,
                 serve: Read, copy: Read, fresh: bool):
        self.target = target
        self.regions = regions
        self.size = size
        self.region_size = region_size
        self._serve = serve      # reads for the user (a cache worth keeping)
        self._copy = copy        # reads for hydration (each region read once)
        self._fresh = fresh
        self._locks = [threading.Lock() for _ in range(_LOCKS)]

    def _span(self, region: int) -> tuple[int, int]:
        start = region * self.region_size
        return start, min(self.region_size, self.size - start)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(22, f"request of {length} bytes at {offset} is outside the "
                              f"volume's {self.size} bytes")

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill `buf` with the volume at `offset`: hydrated regions from the LV, the
        others from the backup."""
        self._check(offset, len(buf))
        view = memoryview(buf).cast("B")
        pos = 0
        while pos < len(view):
            at = offset + pos
            region = at // self.region_size
            end = min(len(view), (region + 1) * self.region_size - offset)
            if region in self.regions:
                _pread_all(self.target, view[pos:end], at)
            else:
                view[pos:end] = self._serve(at, end - pos)
            pos = end

    def pwrite(self, buf: memoryview | bytes, offset: int) -> None:
        """Write into the LV, each region it touches hydrated first."""
        self._check(offset, len(buf))
        if not buf:
            return
        first, last = offset // self.region_size, (offset + len(buf) - 1) // self.region_size
        for region in range(first, last + 1):
            self.hydrate(region)
        _pwrite_all(self.target, memoryview(buf).cast("B"), offset)

    def flush(self) -> None:
        os.fdatasync(self.target)

    def hydrate(self, region: int) -> bool:
        """Copy one region from the backup into the LV and mark it; whether it was
        copied now (False: it was already)."""
        with self._locks[region % _LOCKS]:
            if region in self.regions:
                return False
            start, length = self._span(region)
            data = self._copy(start, length)
            if not (self._fresh and data == bytes(length)):   # a fresh LV reads zeros
                _pwrite_all(self.target, memoryview(data), start)
                os.fdatasync(self.target)
            crash_point("hydrate-copied")
            self.regions.mark(region)
            crash_point("hydrate-marked")
            return True

    def run(self, stop: threading.Event, rate: int | None,
            progress: Callable[[], None] = lambda: None) -> bool:
        """Hydrate every region not yet hydrated, in order, at most `rate` bytes a second;
        whether all are (False: `stop` was set)."""
        started, copied = time.monotonic(), 0
        for region in range(self.regions.regions):
            if stop.is_set():
                return False
            if not self.hydrate(region):
                continue
            progress()
            copied += self._span(region)[1]
            if rate:
                ahead = copied / rate - (time.monotonic() - started)
                if ahead > 0 and stop.wait(ahead):
                    return False
        return self.regions.complete


def _pread_all(fd: int, view: memoryview, pos: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], pos + done)
        if n == 0:
            raise OSError(5, f"the volume ends before byte {pos + done}")
        done += n


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], pos + done)
