"""What is mapped: one record per map under the lock directory, and a lock file that the
serving process (nbdkit) holds for its whole life.

A map is alive while its lock is held: a killed server releases it with its last file
descriptor, so a crashed map never holds a backup against delete or gc; its record stays
until `unmap` clears the device it left behind. The registry lock serializes the changes
that must see each other: a map starting (its backup still available) against a delete
(no live map of its backup) or a gc (no live map at all).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NotRequired, TypedDict

from ..base.diskio import AtomicFile
from ..base.errors import LvbackupError, UsageError
from ..base.locks import FileLock, has_open, holders, is_held
from . import devices

REGISTRY_WAIT = 60.0   # seconds: the registry lock is only held while a map starts or ends


class InstantRef(TypedDict):
    state: str                # the restore's state file (nbd/hydrate.py)
    volume: str               # VG/NAME restored onto


class MapRecord(TypedDict):
    map_id: str
    backup_id: str
    device: str | None        # /dev/nbdN once attached
    writable: bool
    ready: bool               # set up completely (else its setup died: undone)
    pid: int | None           # the server's (nbdkit)
    run_dir: str              # the server's socket, pid file and log
    overlay_dir: str | None   # --writable: where the copy-on-write overlay lives
    started_at: str
    instant: NotRequired[InstantRef]   # an instant restore's server, not a `map`


def maps_dir(lock_dir: Path) -> Path:
    return lock_dir / "maps"


def lock_path(lock_dir: Path, map_id: str) -> Path:
    return maps_dir(lock_dir) / f"{map_id}.lock"


@contextlib.contextmanager
def registry(lock_dir: Path) -> Iterator[None]:
    """The registry, locked. A map is set up under this lock from its first record to its
    last, so a map found unfinished here was being set up by a process that died: it is
    undone first (its server stopped, its device detached). An instant restore's is left
    to `restore --resume`, which takes over its devices."""
    with FileLock(lock_dir / "maps.lock", "the map registry").acquire(REGISTRY_WAIT):
        for record in records(lock_dir):
            if not record["ready"] and "instant" not in record:
                with contextlib.suppress(LvbackupError):   # then it stays listed, for unmap
                    teardown(lock_dir, record)
        yield


def save(lock_dir: Path, record: MapRecord) -> None:
    maps_dir(lock_dir).mkdir(parents=True, exist_ok=True)
    with AtomicFile(maps_dir(lock_dir) / f"{record['map_id']}.json", mode=0o644) as f:
        os.write(f.fd, json.dumps(record).encode())


def remove(lock_dir: Path, map_id: str) -> None:
    (maps_dir(lock_dir) / f"{map_id}.json").unlink(missing_ok=True)
    lock_path(lock_dir, map_id).unlink(missing_ok=True)


def records(lock_dir: Path) -> list[MapRecord]:
    """Every recorded map, alive or not, oldest first."""
    found: list[MapRecord] = []
    try:
        names = sorted(maps_dir(lock_dir).glob("*.json"))
    except OSError:
        return found
    for path in names:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue   # removed meanwhile, or a torn record of a map that never started
    return sorted(found, key=lambda r: r["started_at"])


def is_alive(lock_dir: Path, map_id: str) -> bool:
    """Whether a process still serves the map (holds its lock). Call under registry():
    the probe takes the lock for an instant, which a server starting then would meet."""
    return is_held(lock_path(lock_dir, map_id))


def server_pids(lock_dir: Path, record: MapRecord) -> list[int]:
    """The processes serving a map: the lock's holders the kernel names, and the server's
    recorded pid (nbdkit takes the lock before it daemonizes, so /proc/locks may name its
    exited parent), each confirmed to have the lock file open."""
    try:
        fd = os.open(lock_path(lock_dir, record["map_id"]), os.O_RDONLY)
    except FileNotFoundError:
        return []
    try:
        st = os.fstat(fd)
        found = set(holders(fd))
        pid = record["pid"]
        if pid is None:   # its setup died before recording it: nbdkit's pid file
            with contextlib.suppress(OSError, ValueError):
                pid = int((Path(record["run_dir"]) / "pid").read_text())
        if pid and has_open(pid, st):
            found.add(pid)
        return sorted(found)
    finally:
        os.close(fd)


def hold(path: Path) -> int:
    """Take a map's lock for the serving process; the descriptor stays open for its life."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"map lock {path} is held by another process") from None
    return fd


def held_backups(lock_dir: Path) -> dict[str, str]:
    """Backups held, by a live map or by an unfinished instant restore (live or not: its
    --resume needs the backup): backup id -> why, and what to do. Call under registry()."""
    held = {}
    for r in records(lock_dir):
        if "instant" in r:
            volume = r["instant"]["volume"]
            held[r["backup_id"]] = (f"being restored onto {volume} (instant restore); wait "
                                    f"for it to end: 'lvbackup restore --status {volume}'")
        elif is_alive(lock_dir, r["map_id"]):
            device = r["device"] or "a device being attached"
            held[r["backup_id"]] = (f"mapped on {device}; run 'lvbackup unmap {device}' "
                                    "first")
    return held


def refuse_if_mapped(lock_dir: Path, backup_id: str | None, doing: str) -> None:
    """UsageError if `backup_id` (None: any backup) is mapped by a live process or being
    restored instantly."""
    held = held_backups(lock_dir)
    if backup_id is not None:
        held = {b: d for b, d in held.items() if b == backup_id}
    if held:
        backup, why = next(iter(held.items()))
        raise UsageError(f"cannot {doing}: backup {backup} is {why}")


def teardown(lock_dir: Path, record: MapRecord) -> None:
    """Detach the device, stop the server, remove what the map left (its overlay too).
    Works on a crashed map as on a live one. Call under registry()."""
    device = record["device"]
    alive = is_alive(lock_dir, record["map_id"])
    # A dead map's device may have been detached and attached again by a later map.
    reused = not alive and any(r["device"] == device and r["map_id"] != record["map_id"]
                               and is_alive(lock_dir, r["map_id"])
                               for r in records(lock_dir))
    if device and devices.is_attached(device) and not reused:
        devices.detach(device)
    if alive:
        pids = server_pids(lock_dir, record)
        if not pids:
            raise LvbackupError(f"cannot tell which process serves {device}; "
                                "stop its nbdkit process, then unmap again")
        devices.stop_server(pids, lambda: is_alive(lock_dir, record["map_id"]))
    for directory in (record["run_dir"], record["overlay_dir"]):
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
    remove(lock_dir, record["map_id"])
