"""What a backup reads: a readable device path plus its identity and data timestamp.

Every kind of source (an image file or block device, an LVM volume, an LVM snapshot)
reduces to a `Source`; the data path needs nothing else. Each source is a context manager
factory taking the run id, so that whatever it sets up (an activation, a temporary
snapshot) is undone when the backup ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace

from .. import lvm
from ..base.errors import LvbackupError, UsageError
from ..base.locks import run_is_alive
from ..base.timeutil import now_iso
from ..events import stderr_warning
from .quiesce import Quiesce, quiesced

# Fixed namespace so that the same path always maps to the same volume id.
_DEVICE_NAMESPACE = uuid.UUID("5b0f9d3e-6c55-4b8e-9a8e-2f6f3f1c7d10")
_RUN_TAG = "lvbackup_run_"


@dataclass(frozen=True)
class Source:
    path: str                          # what to read
    volume_id: str
    volume_name: str
    snapshot_id: str | None = None
    snapshot_name: str | None = None
    snapshot_time: str | None = None   # a snapshot backup: the snapshot's creation time
    data_timestamp: str | None = None  # else, when the data was frozen (a temporary snapshot)
    check: Callable[[], None] | None = None   # raises if what was read cannot be trusted
    lv: lvm.LogicalVolume | None = None       # the LV read (a snapshot, or a closed volume)


# (run id, begin) -> the source. A factory calls begin(identity) as soon as it knows what it
# will read (a Source whose path may still be empty), before it changes anything
# (activations, temporary snapshots): `create` then locks the volume and records the
# backup, so that a failure from there on leaves an `error` row.
Begin = Callable[[Source], None]
SourceFactory = Callable[[str, Begin], AbstractContextManager[Source]]


def check_readable(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"device {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot access device {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"{path} is neither a block device nor a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read device {path}: permission denied (run as root?)")
    return st


def device_volume_id(resolved: str) -> str:
    """The volume id of a device or image, from its resolved path (no LVM lineage)."""
    return str(uuid.uuid5(_DEVICE_NAMESPACE, resolved))


def device_source(path: str, warn: Callable[[str], None] = stderr_warning) -> SourceFactory:
    """Any block device or image file; its volume id is derived from its resolved path.
    One mounted read-write (an image through a loop device) is read as it changes: that
    is said, as a warning."""
    @contextmanager
    def open_source(_run_id: str, begin: Begin) -> Iterator[Source]:
        resolved = os.path.realpath(path)
        st = check_readable(resolved)
        source = Source(path=resolved, volume_id=device_volume_id(resolved),
                        volume_name=resolved)
        begin(source)
        mounted = mounted_read_write(resolved, st)
        if mounted:
            device, where = mounted[0]
            via = "" if device == resolved else f" (through {device})"
            warn(f"{resolved} is mounted read-write on {where}{via}: the backup is "
                 "crash-consistent at best; unmount it or back up a snapshot")
        yield source
    return open_source


def mounted_read_write(path: str, st: os.stat_result) -> list[tuple[str, str]]:
    """(device, mount point) of each read-write mount of the block device `path`, or of a
    loop device backed by the image file `path`, or of a partition of either."""
    devices = ({_dev_name(st.st_rdev): st.st_rdev} if stat.S_ISBLK(st.st_mode)
               else _loop_devices_of(path))
    numbers: dict[str, str] = {}
    for name, rdev in devices.items():
        numbers[f"{os.major(rdev)}:{os.minor(rdev)}"] = name
        for part in _partitions(rdev):
            numbers[part] = os.path.realpath(f"/dev/block/{part}")
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        # "36 35 7:0 / /mnt rw,relatime shared:1 - ext4 /dev/loop0 rw"
        if len(fields) > 5 and fields[2] in numbers and "rw" in fields[5].split(","):
            found.append((numbers[fields[2]], _unescape(fields[4])))
    return found


def _dev_name(rdev: int) -> str:
    return os.path.realpath(f"/dev/block/{os.major(rdev)}:{os.minor(rdev)}")


def _loop_devices_of(path: str) -> dict[str, int]:
    """{/dev/loopN: its device number} of the loop devices backed by the file `path`."""
    found = {}
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return {}
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
            with open(f"/sys/block/{name}/dev") as f:
                major, minor = f.read().strip().split(":")
        except (OSError, ValueError):
            continue   # not attached
        if os.path.realpath(backing) == path:
            found[f"/dev/{name}"] = os.makedev(int(major), int(minor))
    return found


def _partitions(rdev: int) -> list[str]:
    """The "major:minor" of each partition of the block device `rdev`."""
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            with contextlib.suppress(OSError):
                if os.path.exists(f"{base}/{entry}/partition"):
                    with open(f"{base}/{entry}/dev") as f:
                        found.append(f.read().strip())
    return found


def _unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it (space, tab, newline, backslash octal)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


@contextmanager
def _active(lv: lvm.LogicalVolume) -> Iterator[None]:
    """Keep `lv` active for the block, and put it back the way it was."""
    if lv.is_active:
        yield
        return
    lvm.activate(lv)
    try:
        yield
    finally:
        lvm.deactivate(lv)


def _refuse_unusable(snap: lvm.LogicalVolume) -> None:
    if snap.state != "available":
        raise UsageError("Snapshot to be backed up must be available, but the current "
                         f'status is "{snap.state}". ({snap.full_name})')


def _still_valid(snap: lvm.LogicalVolume) -> Callable[[], None] | None:
    """A check that `snap` did not overflow while it was read (None: a thin snapshot,
    which cannot become invalid)."""
    if snap.is_thin:
        return None

    def check() -> None:
        now = lvm.find_lv(snap.full_name)
        if now.state != "available":
            raise LvbackupError(f"snapshot {snap.full_name} became {now.state} during the "
                                "backup (a classic snapshot overflowed?); the data read from "
                                "it cannot be trusted")
    return check


def snapshot_source(spec: str, volume: str | None = None, lock_dir=None) -> SourceFactory:
    """An LVM snapshot (classic or thin); the volume is its origin (docs/lineage.md, rules 1-2)."""
    @contextmanager
    def open_source(_run_id: str, begin: Begin) -> Iterator[Source]:
        snap, vg_lvs = lvm.lookup(spec)
        if not snap.is_snapshot:
            raise UsageError(f"{snap.full_name} is not a snapshot; back it up with --volume")
        origin = next((lv for lv in vg_lvs if lv.name == snap.origin), None)
        if origin is None:
            raise UsageError(f"the origin {snap.vg}/{snap.origin} of {snap.full_name} is gone")
        if volume is not None:
            vol = lvm.find_lv(volume)
            if vol.uuid != origin.uuid:
                raise UsageError(f"Volume {vol.uuid} does not match with snapshot.volume_id "
                                 f"{origin.uuid}.")
        _refuse_unusable(snap)
        source = Source(path=snap.path, volume_id=origin.uuid, volume_name=origin.full_name,
                        snapshot_id=snap.uuid, snapshot_name=snap.full_name,
                        snapshot_time=snap.time, check=_still_valid(snap), lv=snap)
        begin(source)
        remove_leftover_snapshots(vg_lvs, lock_dir)
        with _active(snap):
            yield source
    return open_source


def volume_source(spec: str, *, force: bool, snapshot_size: str | None,
                  lock_dir, keep_snapshot: bool = False,
                  quiesce: Quiesce | None = None) -> SourceFactory:
    """An LVM volume: read directly when closed, through a temporary snapshot with --force
    when open (docs/lineage.md, rule 3). With `keep_snapshot`, always through a snapshot,
    which a successful backup keeps as the volume's base for the next incremental.
    `quiesce`: the commands run around the taking of that snapshot."""
    @contextmanager
    def open_source(run_id: str, begin: Begin) -> Iterator[Source]:
        lv, vg_lvs = volume_to_back_up(spec, force, snapshot_hint="back it up with --snapshot",
                                       force_hint="read it through a temporary snapshot")
        source = Source(path=lv.path, volume_id=lv.uuid, volume_name=lv.full_name, lv=lv)
        begin(source)
        remove_leftover_snapshots(vg_lvs, lock_dir)
        if not lv.is_open and not keep_snapshot:
            with _active(lv):
                yield source
            return
        remove_extra_bases(vg_lvs, lv)
        with _active(lv):
            with quiesced(quiesce):
                snap = make_temporary_snapshot(lv, run_id, snapshot_size)
            with held_snapshot(lv, snap, keep_snapshot):
                yield snapshot_read(source, snap)
    return open_source


def snapshot_read(source: Source, snap: lvm.LogicalVolume) -> Source:
    """`source`, a volume, as read through its temporary snapshot `snap`."""
    return replace(source, path=snap.path, data_timestamp=snap.time or now_iso(),
                   check=_still_valid(snap), lv=snap)


def make_temporary_snapshot(lv: lvm.LogicalVolume, run_id: str,
                            size: str | None) -> lvm.LogicalVolume:
    """A snapshot of `lv` tagged as lvbackup's, of run `run_id` (the next run removes it
    if this one dies: `remove_leftover_snapshots`)."""
    name = f"{lv.name[:80]}_lvbackup_{run_id[:8]}"
    try:
        snap = lvm.create_snapshot(lv, name, None if lv.is_thin else size,
                                   tags=(lvm.TEMP_TAG, _RUN_TAG + run_id))
    except lvm.LvmError as e:
        text = str(e).lower()
        if lv.is_thin and ("thin pool" in text or "free" in text):
            raise LvbackupError(f"thin pool {lv.vg}/{lv.pool_lv} has no room for a temporary "
                                f"snapshot of {lv.full_name} ({e}); extend the pool") from None
        if "insufficient" in text or "free" in text:
            raise LvbackupError(f"volume group {lv.vg} lacks the free space for a temporary "
                                f"snapshot of {lv.full_name} ({e}); free some space or set "
                                "temp_snapshot_size in the configuration") from None
        raise
    except (KeyboardInterrupt, SystemExit):
        # A signal arrived while LVM created it (lvm._run lets LVM finish): remove it now
        # rather than leave it to the next run.
        with contextlib.suppress(lvm.LvmError):  # it was not created after all
            lvm.remove_lv(f"{lv.vg}/{name}")
        raise
    return snap


@contextmanager
def held_snapshot(lv: lvm.LogicalVolume, snap: lvm.LogicalVolume,
                  keep: bool = False) -> Iterator[lvm.LogicalVolume]:
    """`snap`, lvbackup's temporary snapshot of `lv`, active for the block and removed
    after it; with `keep`, kept instead if the block ends without an error, as the
    volume's only base."""
    kept = False
    try:
        if not snap.is_active:
            lvm.activate(snap)
        yield snap
        if keep:
            # The backup is available: from here on the snapshot is a base, not a leftover.
            with contextlib.suppress(lvm.LvmError):
                lvm.retag(snap, lvm.BASE_TAG, lvm.TEMP_TAG)
                kept = True
    finally:
        if not kept:
            lvm.remove_lv(snap)
    if kept:
        remove_extra_bases(lvm.vg_lvs(lv.vg), lv, snap)


def remove_extra_bases(vg_lvs: list[lvm.LogicalVolume], origin: lvm.LogicalVolume,
                       keep: lvm.LogicalVolume | None = None) -> None:
    """Remove the base snapshots of `origin` but `keep` (by default, the newest): older ones
    (a run killed between keeping its snapshot and removing the previous base) serve no
    next backup."""
    bases = sorted((x for x in vg_lvs if x.origin == origin.name and lvm.BASE_TAG in x.tags),
                   key=lambda x: (x.time, x.name))
    if keep is None and bases:
        keep = bases[-1]
    for old in bases:
        if keep is None or old.uuid != keep.uuid:
            with contextlib.suppress(lvm.LvmError):  # busy, or gone: the next run retries
                lvm.remove_lv(old)


def volume_to_back_up(spec: str, force: bool, *, snapshot_hint: str, force_hint: str
                      ) -> tuple[lvm.LogicalVolume, list[lvm.LogicalVolume]]:
    """The volume `spec` names and its VG's volumes; a snapshot, a thin pool or (without
    `force`) an open volume refused, the line ending with the hint for the case."""
    lv, vg_lvs = lvm.lookup(spec)
    if lv.is_snapshot:
        raise UsageError(f"{lv.full_name} is a snapshot; {snapshot_hint}")
    if lv.segtype == "thin-pool":
        raise UsageError(f"{lv.full_name} is a thin pool, not a volume")
    if lv.is_open and not force:
        raise UsageError("Backing up an in-use volume must use the force flag. "
                         f"({lv.full_name} is open; pass --force to {force_hint})")
    return lv, vg_lvs


def remove_leftover_snapshots(vg_lvs: list[lvm.LogicalVolume], lock_dir) -> list[str]:
    """Remove the temporary snapshots among `vg_lvs` whose run died (its run lock is free)."""
    if lock_dir is None:
        return []
    removed = []
    for lv in vg_lvs:
        # An open one is being read: by a run we cannot see (another configuration's
        # lock directory), or by whoever else; a dead run's snapshot is closed.
        if lvm.TEMP_TAG not in lv.tags or lv.is_open:
            continue
        runs = [t[len(_RUN_TAG):] for t in lv.tags if t.startswith(_RUN_TAG)]
        if runs and run_is_alive(lock_dir, runs[0]):
            continue
        try:
            lvm.remove_lv(lv)
        except lvm.LvmError:
            continue  # another run removed it first, or it is busy: not this backup's problem
        removed.append(lv.full_name)
    return removed
