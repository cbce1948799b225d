"""Map a backup as a block device: `map`, `unmap`, `mount`, `unmount`, `list --mapped`.

A map is an nbdkit process serving the backup (lvbackup/nbd/server.py) and a kernel NBD
device attached to it. lvbackup itself does not stay running: the registry
(lvbackup/nbd/registry.py) records each map, and the server's lock on its record holds
the backup against delete and gc for as long as the server lives.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import TypedDict

from ..base.errors import CorruptionError, LvbackupError, NotFoundError, UsageError
from ..base.faults import crash_point
from ..base.timeutil import now_iso
from ..catalog.catalog import require_available
from ..nbd import devices
from ..nbd import registry as reg
from ..nbd.registry import MapRecord
from ..session import Session, recover_dead_runs

ATTACH_TRIES = 3        # free devices tried, in case another tool takes one meanwhile
PARTITION_WAIT = 10.0   # seconds for a partition's device node to appear


class MapInfo(TypedDict):
    device: str | None
    backup_id: str
    volume_name: str | None
    writable: bool
    alive: bool
    pids: list[int]
    mountpoints: list[str]
    started_at: str
    map_id: str
    instant_volume: str | None   # the LV an instant restore fills, if the map is one


def map_backup(session: Session, backup_id: str, *, writable: bool = False) -> MapInfo:
    """Serve a backup as /dev/nbdN, read-only or with writes kept in an overlay outside
    the repository (in cache_dir, discarded at unmap)."""
    session.require_repository()
    devices.load_module()
    lock_dir = session.lock_dir
    with session.shared_lock():   # no gc while the map starts
        cat = session.catalog
        row = cat.resolve(backup_id)
        recover_dead_runs(session)
        repo = session.repo
        repo.sync_index(lock_dir)
        with reg.registry(lock_dir):   # a delete sees this map, or the map sees the delete
            row = cat.get(row["id"])
            require_available(row)
            try:
                repo.manifest(row["id"])
            except CorruptionError as e:
                raise CorruptionError(f"backup {row['id']}: {e}") from None
            record = new_record(session, row["id"], writable)
            try:
                start(session, record)
                record["ready"] = True
                reg.save(lock_dir, record)
            except BaseException:
                reg.teardown(lock_dir, record)
                raise
            return _info(session, record)


def new_record(session: Session, backup_id: str, writable: bool, *,
               overlay_writes: bool = True) -> MapRecord:
    """A map's record, not yet saved, with its run directory made. A writable map keeps
    its writes in an overlay unless `overlay_writes` is False (its export writes them)."""
    map_id = uuid.uuid4().hex[:12]
    overlay = None
    if writable and overlay_writes:
        overlay = session.config.cache_dir / "overlays" / map_id
        repository = Path(session.config.repository).resolve()
        if overlay.resolve().is_relative_to(repository):
            raise UsageError(f"cache_dir {session.config.cache_dir} is inside the repository; "
                             "--writable keeps its overlay in cache_dir: move cache_dir")
    # The server's Unix socket needs a short path.
    base = Path("/run/lvbackup") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    base.mkdir(mode=0o700, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"map-{map_id}-", dir=base))
    return {"map_id": map_id, "backup_id": backup_id, "device": None, "writable": writable,
            "ready": False, "pid": None, "run_dir": str(run_dir),
            "overlay_dir": str(overlay) if overlay else None, "started_at": now_iso()}


def start(session: Session, record: MapRecord, export: dict[str, str] | None = None) -> None:
    """Record the map, start its server (with `export`'s parameters: another export than
    the backup's, see nbd/nbdkit_plugin.py) and attach a free NBD device to it. The
    caller marks it ready."""
    lock_dir, config = session.lock_dir, session.config
    reg.save(lock_dir, record)
    overlay = Path(record["overlay_dir"]) if record["overlay_dir"] else None
    if overlay is not None:
        overlay.mkdir(mode=0o700, parents=True)
    run_dir = Path(record["run_dir"])
    record["pid"] = devices.start_server(run_dir, {
        **(export or {}),
        # Absolute: nbdkit runs from / once in the background.
        "config": "" if config.source == "defaults" else os.path.abspath(config.source),
        "backup": record["backup_id"],
        "lock": str(reg.lock_path(lock_dir, record["map_id"])),
        # --as-of: the server reads the repository as it stood then, as this command does.
        **({"as_of": repr(config.s3.as_of)} if config.s3.as_of is not None else {})}, overlay,
        writable=export is not None and record["writable"])
    reg.save(lock_dir, record)
    candidates = [d for d in devices.free_devices()
                  if d not in {r["device"] for r in reg.records(lock_dir)}]
    if not candidates:
        raise UsageError("every NBD device is in use (/dev/nbd*); unmap one, or load the "
                         "nbd module with a larger nbds_max")
    crash_point("map-server-started")
    failure: LvbackupError | None = None
    for device in candidates[:ATTACH_TRIES]:
        # Recorded first: a map killed while attaching leaves the device to detach.
        record["device"] = device
        reg.save(lock_dir, record)
        try:
            devices.attach(device, run_dir / "socket", record["writable"])
        except UsageError:
            raise
        except LvbackupError as e:
            failure = e   # taken by another tool meanwhile: try the next one
            continue
        crash_point("map-attached")
        return
    assert failure is not None
    raise failure


def _info(session: Session, record: MapRecord) -> MapInfo:
    lock_dir = session.lock_dir
    found = session.catalog.find(record["backup_id"])
    device = record["device"]
    alive = reg.is_alive(lock_dir, record["map_id"])
    return {"device": device, "backup_id": record["backup_id"],
            "volume_name": found["volume_name"] if found else None,
            "writable": record["writable"], "alive": alive,
            "pids": reg.server_pids(lock_dir, record) if alive else [],
            "mountpoints": devices.mountpoints_of(device) if device else [],
            "started_at": record["started_at"], "map_id": record["map_id"],
            "instant_volume": record["instant"]["volume"] if "instant" in record else None}


def mapped_backups(session: Session) -> list[MapInfo]:
    """Every map: live ones, and dead ones (their server killed) until `unmap`."""
    with reg.registry(session.lock_dir):
        return [_info(session, r) for r in reg.records(session.lock_dir)]


_DEVICE = re.compile(r"^(/dev/)?(nbd\d+)$")


def unmap(session: Session, target: str) -> list[MapInfo]:
    """Remove the map on a device (/dev/nbdN), or every map of a backup (ID or prefix)."""
    lock_dir = session.lock_dir
    with reg.registry(lock_dir):
        chosen = _select(reg.records(lock_dir), target)
        for record in chosen:
            if "instant" in record:
                volume = record["instant"]["volume"]
                raise UsageError(f"{record['device']} serves the instant restore onto "
                                 f"{volume}, which ends by itself: see 'lvbackup restore "
                                 f"--status {volume}'")
            points = devices.mountpoints_of(record["device"]) if record["device"] else []
            if points:
                raise UsageError(f"{record['device']} is mounted on {points[0]}; run "
                                 f"'lvbackup unmount {points[0]}' first")
        infos = [_info(session, r) for r in chosen]
        for record in chosen:
            reg.teardown(lock_dir, record)
    return infos


def _select(records: list[MapRecord], target: str) -> list[MapRecord]:
    m = _DEVICE.match(target)
    if m:
        device = f"/dev/{m.group(2)}"
        chosen = [r for r in records if r["device"] == device]
        if not chosen:
            raise NotFoundError(f"no backup is mapped on {device}")
        return chosen
    ids = {r["backup_id"] for r in records if r["backup_id"].startswith(target)}
    if not ids:
        raise NotFoundError(f"no mapped backup matches {target!r} (see 'lvbackup list "
                            "--mapped')")
    if len(ids) > 1:
        raise NotFoundError(f"{target!r} matches several mapped backups: "
                            f"{', '.join(sorted(ids))}")
    return [r for r in records if r["backup_id"] in ids]


class MountInfo(MapInfo):
    mountpoint: str
    mounted: str          # the device mounted: the map's, or its partition
    filesystem: str


def mount_backup(session: Session, backup_id: str, mountpoint: str, *,
                 partition: int | None = None, writable: bool = False) -> MountInfo:
    """Map a backup and mount the filesystem on it (or on its partition N), read-only
    unless `writable`."""
    point = os.path.realpath(mountpoint)
    if not os.path.isdir(point):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(point):
        raise UsageError(f"something is already mounted on {point}")
    info = map_backup(session, backup_id, writable=writable)
    assert info["device"] is not None
    try:
        device = info["device"] + (f"p{partition}" if partition else "")
        if partition and not os.path.exists(device):
            devices.rescan_partitions(info["device"])
        if partition and not devices.wait_for(device, PARTITION_WAIT):
            raise UsageError(f"backup {info['backup_id']} has no partition {partition}")
        fstype = devices.filesystem_type(device)
        if fstype is None:
            raise UsageError(f"no filesystem found on {device} (backup {info['backup_id']})"
                             + ("" if partition else "; a disk image? give --partition N"))
        devices.mount(device, point, fstype, writable)
    except BaseException:
        unmap(session, info["device"])
        raise
    return {**info, "mountpoints": [point], "mountpoint": point, "mounted": device,
            "filesystem": fstype}


def unmount(session: Session, mountpoint: str) -> MapInfo:
    """Unmount a mapped backup's filesystem and unmap the backup."""
    point = os.path.realpath(mountpoint)
    sources = [source for source, where in devices.mounts() if where == point]
    if not sources:
        raise UsageError(f"nothing is mounted on {point}")
    with reg.registry(session.lock_dir):
        records = reg.records(session.lock_dir)
    owner = [r for r in records if r["device"]
             and re.fullmatch(re.escape(r["device"]) + r"(p\d+)?", sources[-1])]
    if not owner:
        raise UsageError(f"{point} is not a mapped backup ({sources[-1]} is mounted there)")
    devices.umount(point)
    return unmap(session, owner[0]["device"] or "")[0]
