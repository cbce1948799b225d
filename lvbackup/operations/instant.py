"""Instant restore onto an LV: `restore --instant`, `--resume`, `--status`, `--cancel`,
`--release`.

The device the user gets is a device-mapper device, /dev/mapper/lvbackup-restore-VG-NAME,
mapped linearly onto /dev/nbdN, which nbdkit serves with `nbd/instant_export.py`: reads
of regions not yet copied come from the backup, the rest and every write go to the LV,
and a background thread copies (hydrates) the regions in order. Once all are in the LV,
that process swaps the device's table to the LV itself, detaches /dev/nbdN and exits.
What is done is in a state file and a region map under cache_dir/instant/ (hydrate.py); a
killed helper or a reboot is taken up again by `--resume`. `--cancel` undoes an unfinished
restore; after the switch the device is removed (`--release`, or by itself once nothing
holds it open), leaving the LV under its own name.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TypedDict

from .. import events as ev
from .. import lvm
from ..base.errors import CorruptionError, LvbackupError, NotFoundError, UsageError
from ..base.faults import crash_point
from ..base.timeutil import now_iso
from ..catalog.catalog import require_available, to_record
from ..nbd import devices
from ..nbd import registry as reg
from ..nbd.hydrate import (
    REGION,
    STATE_FORMAT,
    InstantState,
    RegionBitmap,
    hydrated_bytes,
    load_state,
    regions_of,
    regions_path,
    save_state,
    state_path,
)
from ..nbd.instant_export import release_device
from ..nbd.registry import MapRecord
from ..session import Session, recover_dead_runs
from ..volumes.targets import create_volume_target, is_lv_name, lv_target
from .nbd import new_record, start

SECTOR = 512


class InstantInfo(TypedDict):
    volume: str
    device: str
    backup_id: str
    hydrated_bytes: int
    total_bytes: int
    done: bool
    running: bool           # its helper (nbdkit) is alive
    pid: int | None
    error: str | None
    released: bool          # its device is removed: the LV is used under its own name
    cancelling: bool        # a `restore --cancel` began and did not finish


class CancelInfo(TypedDict):
    volume: str
    device: str
    backup_id: str
    hydrated_bytes: int     # of the backup's data in the LV when the copy was stopped
    total_bytes: int
    volume_removed: bool    # the LV, which the restore had created, is removed
    partly_restored: bool   # the LV existed before: it is left partly overwritten


def dm_name_of(volume: str) -> str:
    vg, name = lvm.split_name(volume)
    return f"lvbackup-restore-{vg.replace('-', '--')}-{name.replace('-', '--')}"


def instant_restore(session: Session, backup_id: str, *, to: str | None = None,
                    new_volume: str | None = None, thin_pool: str | None = None,
                    force: bool = False, rate: int | None = None) -> InstantInfo:
    """Make a backup usable at once as a device over the LV `to` (existing) or
    `new_volume` (created), which it fills in the background."""
    if (to is None) == (new_volume is None):
        raise UsageError("--instant restores onto an LV: give --new-volume VG/NAME or "
                         "--to VG/LV")
    if to is not None and not is_lv_name(to):
        raise UsageError(f"--instant restores onto an LV (VG/LV), not onto {to}")
    session.require_repository()
    devices.load_module()
    volume = "/".join(lvm.split_name(to or new_volume or ""))
    dm_name = dm_name_of(volume)
    state_file = state_path(session.config.cache_dir, dm_name)
    lock_dir = session.lock_dir
    release_idle(session)
    with session.shared_lock():   # no gc while the restore starts; then it holds the backup
        cat = session.catalog
        row = cat.resolve(backup_id)
        recover_dead_runs(session)
        repo = session.repo
        repo.sync_index(lock_dir)
        with reg.registry(lock_dir):
            row = cat.get(row["id"])
            require_available(row)
            try:
                size = repo.manifest(row["id"]).size
            except CorruptionError as e:
                raise CorruptionError(f"backup {row['id']}: {e}") from None
            if size % SECTOR:
                raise UsageError(f"backup {row['id']} is {size} bytes, not a whole number "
                                 "of 512-byte sectors: restore it without --instant")
            if state_file.exists():
                _refuse_another(load_state(state_file))
            if lvm.dm_table(dm_name) is not None:
                raise UsageError(f"/dev/mapper/{dm_name} exists, and lvbackup has no record "
                                 f"of it; remove it first: dmsetup remove {dm_name}")
            if to is not None:
                target, _ = lv_target(to, force)
                lv = lvm.find_lv(volume)
                if lv.size < size:
                    raise UsageError(f"volume {volume} is smaller than backup {row['id']} "
                                     f"({size} bytes)")
                fresh = False
            else:
                target, fresh = create_volume_target(volume, size, thin_pool)
                lv = lvm.find_lv(volume)
            state: InstantState = {
                "format": STATE_FORMAT, "volume": volume, "target": target,
                "backup_id": row["id"], "backup": dict(to_record(row)), "size": size,
                "region_size": REGION, "fresh": fresh, "rate": rate, "dm_name": dm_name,
                "device": f"/dev/mapper/{dm_name}", "started_at": now_iso(),
                "done_at": None, "error": None, "created": to is None, "lv_uuid": lv.uuid,
                "cancelled_at": None, "released_at": None}
            state_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            RegionBitmap.create(regions_path(state_file), regions_of(size, REGION))
            save_state(state_file, state)
            record = _instant_record(session, state, state_file)
            try:
                _serve(session, record, state, state_file)
            except BaseException:
                _undo(lock_dir, record, state, state_file)
                raise
    session.events.emit(ev.RESTORE_START, {**state["backup"], "target": volume,
                                           "device": state["device"], "instant": True})
    return _info(session, state, state_file)


def _refuse_another(state: InstantState) -> None:
    """A new instant restore onto the LV of `state`'s: only once that one is over."""
    volume = state["volume"]
    _refuse_cancelling(state)
    if not state["done_at"]:
        raise UsageError(f"an instant restore onto {volume} is unfinished; continue it with "
                         f"'lvbackup restore --resume {volume}' or stop it with "
                         f"'lvbackup restore --cancel {volume}'")
    if not state.get("released_at"):
        raise UsageError(f"{state['device']} (the finished instant restore onto {volume}) is "
                         f"in use: unmount it, then 'lvbackup restore --release {volume}'")


def _refuse_cancelling(state: InstantState) -> None:
    if state.get("cancelled_at"):
        raise UsageError(f"the instant restore onto {state['volume']} is being cancelled; "
                         f"finish that: lvbackup restore --cancel {state['volume']}")


def _instant_record(session: Session, state: InstantState, state_file: Path) -> MapRecord:
    record = new_record(session, state["backup_id"], writable=True, overlay_writes=False)
    record["instant"] = {"state": str(state_file), "volume": state["volume"]}
    return record


def _serve(session: Session, record: MapRecord, state: InstantState, state_file: Path
           ) -> None:
    """Start the helper, attach its NBD device, and point the user's device at it (create
    it, or swap its table: a resumed restore's device may be mounted). Then the record is
    ready, and the helper may switch the device to the LV once it has copied everything."""
    start(session, record, {"export": "instant", "state": str(state_file)})
    assert record["device"] is not None
    table = lvm.linear_table(record["device"], state["size"])
    if lvm.dm_table(state["dm_name"]) is None:
        lvm.dm_create(state["dm_name"], table)
    else:
        lvm.dm_swap(state["dm_name"], table)
    record["ready"] = True
    reg.save(session.lock_dir, record)


def _undo(lock_dir: Path, record: MapRecord, state: InstantState, state_file: Path) -> None:
    """A new instant restore failed to start: remove all of it (not the LV)."""
    with contextlib.suppress(LvbackupError):
        if lvm.dm_table(state["dm_name"]) is not None:
            lvm.dm_remove(state["dm_name"])
    with contextlib.suppress(LvbackupError):
        reg.teardown(lock_dir, record)
    state_file.unlink(missing_ok=True)
    regions_path(state_file).unlink(missing_ok=True)


def resume(session: Session, volume: str, rate: int | None = None) -> InstantInfo:
    """Take up an instant restore whose helper died (killed, or the host rebooted): a new
    helper, a new NBD device under the same device-mapper device."""
    release_idle(session)
    state_file, state = _load(session, volume)
    if state["done_at"]:
        return _info(session, state, state_file)
    _refuse_cancelling(state)
    devices.load_module()
    if rate is not None:
        state["rate"] = rate
        save_state(state_file, state)
    lock_dir = session.lock_dir
    with session.shared_lock(), reg.registry(lock_dir):
        old = _records_of(lock_dir, state_file)
        for r in old:
            if reg.is_alive(lock_dir, r["map_id"]):
                if r["ready"]:
                    raise UsageError(f"the instant restore onto {state['volume']} is running "
                                     f"(pid {', '.join(map(str, reg.server_pids(lock_dir, r)))})")
                # A --resume or restore killed while it set this helper up: replace it.
                devices.stop_server(reg.server_pids(lock_dir, r),
                                    lambda r=r: reg.is_alive(lock_dir, r["map_id"]))
        record = _instant_record(session, state, state_file)
        _serve(session, record, state, state_file)
        in_use = {r["device"] for r in reg.records(lock_dir)
                  if r not in old and reg.is_alive(lock_dir, r["map_id"])}
        for r in old:   # the old NBD devices: nothing maps them any more
            if r["device"] and r["device"] not in in_use and devices.is_attached(r["device"]):
                with contextlib.suppress(LvbackupError):
                    devices.detach(r["device"])
            shutil.rmtree(r["run_dir"], ignore_errors=True)
            reg.remove(lock_dir, r["map_id"])
    return _info(session, state, state_file)


def status(session: Session, volume: str | None = None) -> list[InstantInfo]:
    """Every instant restore (or the one onto `volume`): finished ones too. Finished ones'
    devices that nothing holds open are removed first (`release_idle`)."""
    release_idle(session)
    if volume is not None:
        state_file, state = _load(session, volume)
        return [_info(session, state, state_file)]
    found = []
    for path in sorted((session.config.cache_dir / "instant").glob("*.json")):
        with contextlib.suppress(OSError, CorruptionError):
            found.append(_info(session, load_state(path), path))
    return found


def _load(session: Session, volume: str) -> tuple[Path, InstantState]:
    name = "/".join(lvm.split_name(volume))
    path = state_path(session.config.cache_dir, dm_name_of(name))
    try:
        return path, load_state(path)
    except FileNotFoundError:
        raise NotFoundError(f"no instant restore onto {name} (see 'lvbackup restore "
                            "--status')") from None


def _records_of(lock_dir: Path, state_file: Path) -> list[MapRecord]:
    return [r for r in reg.records(lock_dir)
            if "instant" in r and r["instant"]["state"] == str(state_file)]


def _info(session: Session, state: InstantState, state_file: Path) -> InstantInfo:
    lock_dir = session.lock_dir
    live = [r for r in _records_of(lock_dir, state_file) if reg.is_alive(lock_dir, r["map_id"])]
    pids = reg.server_pids(lock_dir, live[0]) if live else []
    done = _hydrated(state_file, state)
    return {"volume": state["volume"], "device": state["device"],
            "backup_id": state["backup_id"], "hydrated_bytes": done,
            "total_bytes": state["size"],
            "done": bool(state["done_at"]), "running": bool(live),
            "pid": pids[0] if pids else None, "error": state["error"],
            "released": bool(state.get("released_at")),
            "cancelling": bool(state.get("cancelled_at"))}


def _hydrated(state_file: Path, state: InstantState) -> int:
    size, region = state["size"], state["region_size"]
    if state["done_at"]:
        return size
    regions = RegionBitmap(regions_path(state_file), regions_of(size, region), writable=False)
    try:
        return hydrated_bytes(regions, size, region)
    finally:
        regions.close()


def _state_files(session: Session) -> list[Path]:
    return sorted((session.config.cache_dir / "instant").glob("*.json"))


# --- the end of an instant restore: release, cancel ------------------------------------

def release_idle(session: Session) -> None:
    """Remove the devices of finished instant restores that nothing holds open (the LV is
    used under its own name from then on). Best effort: a device in use, or a user who
    may not run dmsetup, leaves it for later."""
    pending = []
    for path in _state_files(session):
        with contextlib.suppress(OSError, CorruptionError):
            state = load_state(path)
            if state["done_at"] and not state.get("released_at"):
                pending.append(path)
    if not pending:
        return
    with contextlib.suppress(LvbackupError, OSError), reg.registry(session.lock_dir):
        for path in pending:
            with contextlib.suppress(LvbackupError, OSError):
                release_device(path)


def release(session: Session, volume: str) -> InstantInfo:
    """`restore --release`: remove the device of a finished instant restore, so that the
    LV is used under its own name; refused while the device is open."""
    state_file, state = _load(session, volume)
    with reg.registry(session.lock_dir):
        state = load_state(state_file)
        name = state["volume"]
        _refuse_cancelling(state)
        if not state["done_at"]:
            percent = _hydrated(state_file, state) * 100 // (state["size"] or 1)
            raise UsageError(f"the instant restore onto {name} is not finished ({percent}% "
                             f"copied): its device is released once the copy is done (see "
                             f"'lvbackup restore --status {name}'); to stop it: "
                             f"lvbackup restore --cancel {name}")
        if not release_device(state_file):
            raise UsageError(f"{state['device']} is in use (mounted or open): unmount it, "
                             f"then run 'lvbackup restore --release {name}' again")
        state = load_state(state_file)
    return _info(session, state, state_file)


def cancel(session: Session, volume: str, *, force: bool = False) -> CancelInfo:
    """`restore --cancel`: stop an unfinished instant restore and undo it. Its helper is
    stopped, its devices removed, its records too (the backup is no longer held), and the
    LV it created removed. An existing LV cannot be given back as it was (the copy has
    been overwriting it from the start): cancelling one needs `force`, and leaves it partly
    restored. Killed midway, the state says so and another --cancel finishes the job."""
    state_file, state = _load(session, volume)
    lock_dir = session.lock_dir
    with reg.registry(lock_dir):
        state = load_state(state_file)
        _check_cancel(state, force)
        if not state.get("cancelled_at"):
            _stop_helpers(lock_dir, state_file)
            state = load_state(state_file)   # as the helper left it
            state["cancelled_at"] = now_iso()
            save_state(state_file, state)
        hydrated = _hydrated(state_file, state)
        if lvm.dm_table(state["dm_name"]) is not None:
            lvm.dm_remove(state["dm_name"])
        crash_point("instant-cancel-detached")
        for record in _records_of(lock_dir, state_file):
            reg.teardown(lock_dir, record)
        removed = state.get("created", False) and _remove_created(state)
        crash_point("instant-cancel-lv-removed")
        state_file.unlink()
        regions_path(state_file).unlink(missing_ok=True)
    session.events.emit(ev.RESTORE_ERROR, {**state["backup"], "target": state["volume"],
                                           "device": state["device"], "instant": True,
                                           "reason": "cancelled (restore --cancel)"})
    return {"volume": state["volume"], "device": state["device"],
            "backup_id": state["backup_id"], "hydrated_bytes": hydrated,
            "total_bytes": state["size"], "volume_removed": removed,
            "partly_restored": not state.get("created", False)}


def _check_cancel(state: InstantState, force: bool) -> None:
    name = state["volume"]
    begun = bool(state.get("cancelled_at"))   # then only finished, whatever it says
    if state["done_at"] and not begun:
        raise UsageError(f"the instant restore onto {name} is finished: nothing to cancel "
                         f"(its device goes with 'lvbackup restore --release {name}')")
    if not state.get("created", False) and not force and not begun:
        raise UsageError(f"{name} existed before the instant restore, which has been "
                         "overwriting it since it started: cancelling cannot give it back "
                         "as it was. Let the restore finish, or cancel with --force to "
                         "stop it and leave the LV partly restored")
    if lvm.dm_open_count(state["dm_name"]):
        raise UsageError(f"{state['device']} is in use (mounted or open): unmount it, then "
                         "cancel")


def _stop_helpers(lock_dir: Path, state_file: Path) -> None:
    for r in _records_of(lock_dir, state_file):
        if reg.is_alive(lock_dir, r["map_id"]):
            devices.stop_server(reg.server_pids(lock_dir, r),
                                lambda r=r: reg.is_alive(lock_dir, r["map_id"]))


def _remove_created(state: InstantState) -> bool:
    """Remove the LV the restore created, if it is still that LV; whether it did."""
    try:
        lv = lvm.find_lv(state["volume"])
    except NotFoundError:
        return True   # removed by an earlier --cancel, killed before it finished
    if lv.uuid != state.get("lv_uuid"):   # another LV of that name since: not ours
        return False
    lvm.remove_lv(lv)
    return True
