"""The only module that runs LVM commands: argv lists, validated names, typed results.

Reports come from `lvs --reportformat json --units b --nosuffix` (lvm2 2.03.16 gives every
value as a string; newer versions add a "log" array beside "report", which is ignored).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .base import proc
from .base.errors import ChangeTrackingError, LvbackupError, NotFoundError, UsageError
from .base.faults import crash_point
from .base.timeutil import iso
from .config import DEFAULT_SNAPSHOT_SIZE

# What lvbackup tags its temporary snapshots with, so a later run can find leftovers.
TEMP_TAG = "lvbackup_temp"
# A temporary snapshot kept (--keep-snapshot) as the base of the next incremental.
BASE_TAG = "lvbackup_base"


_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
_FIELDS = ("lv_uuid,lv_name,vg_name,lv_size,lv_attr,origin,pool_lv,lv_time,lv_tags,"
           "segtype,lv_role,snap_percent")
# lvm.conf is left alone on purpose: the host's udev synchronisation and its metadata
# archive in /etc/lvm (what vgcfgrestore needs) must apply to our changes too.


class LvmError(LvbackupError):
    pass


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    uuid: str
    size: int
    attr: str
    origin: str
    pool_lv: str
    time: str            # creation time, UTC ISO 8601
    tags: tuple[str, ...]
    segtype: str
    snap_percent: float | None = None   # a classic snapshot's COW usage


    @property
    def full_name(self) -> str:
        return f"{self.vg}/{self.name}"

    @property
    def path(self) -> str:
        return f"/dev/{self.vg}/{self.name}"

    @property
    def is_snapshot(self) -> bool:
        return bool(self.origin)

    @property
    def is_thin(self) -> bool:
        return self.segtype == "thin"

    @property
    def is_open(self) -> bool:
        return len(self.attr) > 5 and self.attr[5] == "o"

    @property
    def is_active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"

    @property
    def is_invalid(self) -> bool:
        # I: invalid snapshot, S: invalid suspended snapshot, m/M: snapshot merge failed.
        return len(self.attr) > 4 and self.attr[4] in "ISmM"

    @property
    def is_merging(self) -> bool:
        return self.attr[:1] in ("S", "O")

    @property
    def state(self) -> str:
        """A word for the snapshot's condition, as used in error messages."""
        if self.is_invalid:
            return "invalid"
        if self.is_merging:
            return "merging"
        return "available"


def validate_name(name: str, what: str = "name", *, lv: bool = True) -> str:
    """An LVM VG or LV name as lvm2 accepts it (LV names may not start with snapshot/pvmove)."""
    if (not _NAME.match(name) or name in (".", "..")
            or (lv and name.startswith(("snapshot", "pvmove")))):
        raise UsageError(f"invalid LVM {what} {name!r}: use letters, digits and + _ . - "
                         "(not starting with -), at most 127 characters")
    return name


def split_name(spec: str) -> tuple[str, str]:
    """'VG/LV' (or /dev/VG/LV, /dev/mapper is not accepted) -> (vg, lv), validated."""
    s = spec.removeprefix("/dev/")
    parts = s.split("/")
    if len(parts) != 2:
        raise UsageError(f"{spec!r} is not a logical volume name of the form VG/LV")
    return (validate_name(parts[0], "volume group name", lv=False),
            validate_name(parts[1], "volume name"))


def _percent(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_time(text: str) -> str:
    # lvm2 prints "2026-11-24 17:04:35 +0000" (one-second resolution).
    return iso(datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S %z").astimezone(UTC))


def _tool(name: str) -> str:
    found = proc.find_tool(name)
    if found is None:
        raise UsageError(f"lvm2 is not installed ({name} not found); install the lvm2 package")
    return found


def _run(argv: list[str], what: str) -> str:
    exe = _tool(argv[0])
    if os.geteuid() != 0:
        raise UsageError("LVM commands need root: run lvbackup as root")
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
    # A signal unwinding lvbackup lets the command finish: LVM killed halfway may leave a
    # device suspended or its metadata half written.
    done = proc.run([exe, *argv[1:]], env=env, finish=True)
    assert done.stdout is not None and done.stderr is not None
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.decode(errors="replace").splitlines()
                 if ln.strip()]
        errors = [ln for ln in lines if not ln.startswith("WARNING")] or lines
        detail = errors[-1] if errors else proc.describe_status(done.returncode)
        raise LvmError(f"{what} failed: {detail}")
    return done.stdout.decode(errors="replace")


def list_lvs(select: str | None = None) -> list[LogicalVolume]:
    """Every LV (or those of one VG, or one VG/LV) as reported by lvs."""
    argv = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-a", "-o", _FIELDS]
    if select:
        argv.append(select)
    out = _run(argv, "lvs")
    try:
        rows = json.loads(out)["report"][0]["lv"]
    except (ValueError, KeyError, IndexError):
        raise LvmError("lvs printed a report lvbackup cannot read") from None
    return [LogicalVolume(
        vg=r["vg_name"], name=r["lv_name"], uuid=r["lv_uuid"], size=int(r["lv_size"] or 0),
        attr=r["lv_attr"], origin=r.get("origin", ""), pool_lv=r.get("pool_lv", ""),
        time=_parse_time(r["lv_time"]) if r.get("lv_time") else "",
        tags=tuple(t for t in r.get("lv_tags", "").split(",") if t),
        segtype=r.get("segtype", r.get("seg_type", "")),
        snap_percent=_percent(r.get("snap_percent", "")))
        for r in rows if not r["lv_name"].startswith("[")]


def vg_lvs(vg: str) -> list[LogicalVolume]:
    """The LVs of one VG; NotFoundError if there is no such VG."""
    validate_name(vg, "volume group name", lv=False)
    try:
        return list_lvs(vg)
    except LvmError:
        if vg not in _vg_names():  # only on failure: each LVM command costs time
            raise NotFoundError(f"volume group {vg} not found") from None
        raise


def find_lv(spec: str) -> LogicalVolume:
    """A logical volume by VG/LV or by its LV UUID (or a unique prefix of it)."""
    return lookup(spec)[0]


def lookup(spec: str) -> tuple[LogicalVolume, list[LogicalVolume]]:
    """find_lv(spec), and every LV of its VG from the same report (one lvs run)."""
    if "/" in spec:
        vg, name = split_name(spec)
        lvs = vg_lvs(vg)
        for lv in lvs:
            if lv.name == name:
                return lv, lvs
        raise NotFoundError(f"logical volume {vg}/{name} not found")
    if not re.match(r"^[A-Za-z0-9-]+$", spec):
        raise UsageError(f"{spec!r} is neither VG/LV nor an LV UUID")
    every = list_lvs()
    matches = [lv for lv in every if lv.uuid == spec or lv.uuid.startswith(spec)]
    if not matches:
        raise NotFoundError(f"no logical volume has UUID {spec} (name a volume as VG/LV, "
                            f"e.g. vg0/{spec})")
    if len(matches) > 1:
        raise NotFoundError(f"UUID prefix {spec} is ambiguous")
    return matches[0], [lv for lv in every if lv.vg == matches[0].vg]


def _vg_names() -> set[str]:
    out = _run(["vgs", "--reportformat", "json", "-o", "vg_name"], "vgs")
    return {r["vg_name"] for r in json.loads(out)["report"][0]["vg"]}


def create_snapshot(origin: LogicalVolume, name: str, size: str | None = None,
                    tags: tuple[str, ...] = ()) -> LogicalVolume:
    """A thin snapshot of a thin origin (no size), else a classic one of `size`."""
    validate_name(name, "snapshot name")
    argv = ["lvcreate", "--snapshot", "--name", name]
    if not origin.is_thin:
        size = size or DEFAULT_SNAPSHOT_SIZE
        argv += ["--extents", size] if "%" in size else ["--size", size]
    elif size:
        raise UsageError("a thin snapshot takes no --size (it shares the thin pool)")
    for tag in tags:
        argv += ["--addtag", tag]
    argv.append(origin.full_name)
    _run(argv, f"creating snapshot {origin.vg}/{name}")
    return find_lv(f"{origin.vg}/{name}")


def create_lv(vg: str, name: str, size: int, thin_pool: str | None = None) -> LogicalVolume:
    validate_name(name, "volume name")
    existing = {lv.name: lv for lv in vg_lvs(vg)}
    if name in existing:
        raise UsageError(f"logical volume {vg}/{name} already exists; choose another name")
    if thin_pool:
        validate_name(thin_pool, "thin pool name")
        if thin_pool not in existing or existing[thin_pool].segtype != "thin-pool":
            raise NotFoundError(f"thin pool {vg}/{thin_pool} not found")
        argv = ["lvcreate", "--virtualsize", f"{size}b", "--thin", "--name", name,
                f"{vg}/{thin_pool}"]
    else:
        argv = ["lvcreate", "--yes", "--wipesignatures", "y", "--zero", "y",
                "--size", f"{size}b", "--name", name, vg]
    _run(argv, f"creating {vg}/{name}")
    return find_lv(f"{vg}/{name}")


def remove_lv(lv: LogicalVolume | str) -> None:
    """Remove an LV (a LogicalVolume, or a validated "VG/LV" name)."""
    name = lv.full_name if isinstance(lv, LogicalVolume) else "/".join(split_name(lv))
    _run(["lvremove", "--yes", "--force", name], f"removing {name}")


def retag(lv: LogicalVolume, add: str, delete: str) -> None:
    _run(["lvchange", "--addtag", add, "--deltag", delete, lv.full_name],
         f"tagging {lv.full_name}")


def _activation_unit(lv: LogicalVolume) -> str:
    # lvm2 (de)activates a classic snapshot only together with its origin, and refuses
    # (it prompts, and reads "no" from /dev/null) when asked for the snapshot alone.
    if lv.is_snapshot and not lv.is_thin:
        return f"{lv.vg}/{lv.origin}"
    return lv.full_name


def activate(lv: LogicalVolume) -> None:
    """Activate, ignoring the activation-skip flag thin snapshots are created with."""
    _run(["lvchange", "--activate", "y", "--ignoreactivationskip", _activation_unit(lv)],
         f"activating {lv.full_name}")


def deactivate(lv: LogicalVolume) -> None:
    _run(["lvchange", "--activate", "n", _activation_unit(lv)], f"deactivating {lv.full_name}")


# Change tracking: thin pool metadata and thin ids. thin_delta and thin_dump come from
# thin-provisioning-tools, which lvm2 does not need; their absence, like anything else
# that makes LVM's record of changes unusable, is a ChangeTrackingError, on which the
# caller reads the whole volume instead.

def dm_device_name(lv: LogicalVolume) -> str:
    """The device-mapper name of `lv` (what dmsetup takes)."""
    return _dm_name(lv.vg, lv.name)


# A consistency group's instant (lvbackup.volumes.freeze): with its filesystem frozen, a member's
# device is suspended without a second freeze (--nolockfs). lvcreate then finds the origin
# suspended already, takes the snapshot without suspending it again (which would freeze the
# filesystem again: EBUSY on a frozen one before Linux 6.8), and resumes it; the writes the
# other members would take wait until their own snapshot is taken.
def hold_io(dm_name: str) -> None:
    _run(["dmsetup", "suspend", "--nolockfs", _dm_checked(dm_name)], f"suspending {dm_name}")


def release_io(vg: str) -> list[str]:
    """Resume every suspended device of `vg`: those hold_io suspended and lvcreate did not
    resume (a snapshot that failed). Pools first: a thin volume resumes over a running
    pool. The names resumed."""
    out = _run(["dmsetup", "info", "-c", "--noheadings", "--separator", ":", "-o",
                "name,suspended"], "listing device-mapper devices")
    prefix = vg.replace("-", "--") + "-"
    held = [name for name, _, state in (ln.strip().rpartition(":") for ln in out.splitlines())
            if name.startswith(prefix) and state.lower() == "suspended"]
    held.sort(key=lambda n: not n.endswith(("-tpool", "_tdata", "_tmeta")))
    for name in held:
        _run(["dmsetup", "resume", _dm_checked(name)], f"resuming {name}")
    return held


def _dm_name(vg: str, lv: str) -> str:
    """device-mapper's name for VG/LV: each dash in either name doubled, then joined by one."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def pool_metadata_path(vg: str, pool: str) -> str:
    """The active pool's metadata device, which thin_delta and thin_dump read."""
    validate_name(vg, "volume group name", lv=False)
    validate_name(pool, "thin pool name")
    return f"/dev/mapper/{_dm_name(vg, pool + '_tmeta')}"


def _pool_message(vg: str, pool: str, message: str) -> None:
    validate_name(vg, "volume group name", lv=False)
    validate_name(pool, "thin pool name")
    # The message goes to the pool target itself, which lvm2 names VG-POOL-tpool while
    # thin volumes use the pool.
    _run(["dmsetup", "message", f"{_dm_name(vg, pool)}-tpool", "0", message],
         f"{message} on thin pool {vg}/{pool}")


def cow_path(snap: LogicalVolume) -> str:
    """The device-mapper device holding a classic snapshot's exception store."""
    return f"/dev/mapper/{_dm_name(snap.vg, snap.name)}-cow"


def _parse_held_root(status: str) -> bool:
    # "START LEN thin-pool TRANSACTION USED/TOTAL(meta) USED/TOTAL(data) HELD_ROOT ...":
    # the held metadata root is "-" when no metadata snapshot is reserved.
    fields = status.split()
    try:
        return fields[fields.index("thin-pool") + 4] != "-"
    except (ValueError, IndexError):
        raise LvmError(f"dmsetup status printed a thin-pool line lvbackup cannot read: "
                       f"{status.strip()!r}") from None


def metadata_snap_held(vg: str, pool: str) -> bool:
    """Whether a metadata snapshot of the pool is reserved now."""
    validate_name(vg, "volume group name", lv=False)
    validate_name(pool, "thin pool name")
    return _parse_held_root(_run(["dmsetup", "status", f"{_dm_name(vg, pool)}-tpool"],
                                 f"status of thin pool {vg}/{pool}"))


def reserve_metadata_snap(vg: str, pool: str) -> None:
    """Freeze a copy of the pool's mapping metadata for thin_delta -m / thin_dump -m to
    read while the pool is in use. The kernel keeps one at most: this fails while one
    is reserved, and it must be released (it pins metadata blocks until then)."""
    _pool_message(vg, pool, "reserve_metadata_snap")


def release_metadata_snap(vg: str, pool: str) -> None:
    _pool_message(vg, pool, "release_metadata_snap")


def _thin_tool(name: str) -> str:
    try:
        return _tool(name)
    except UsageError:
        raise ChangeTrackingError(f"{name} not found: install thin-provisioning-tools "
                                  "to back up only what changed in thin volumes") from None


def thin_delta(vg: str, pool: str, left: int, right: int) -> str:
    """thin_delta's XML report (see changes/thin.py) comparing thin ids `left` and
    `right`, from the reserved metadata snapshot."""
    _thin_tool("thin_delta")
    return _run(["thin_delta", "-m", "--snap1", str(left), "--snap2", str(right),
                 pool_metadata_path(vg, pool)], f"thin_delta on thin pool {vg}/{pool}")


def thin_dump_mappings(vg: str, pool: str, dev_id: int, out: str) -> None:
    """Write thin_dump's XML listing of thin id `dev_id`'s mappings (see changes/thin.py),
    from the reserved metadata snapshot, to the file `out`: a fragmented volume's
    listing can run to gigabytes."""
    _thin_tool("thin_dump")
    _run(["thin_dump", "-m", "--dev-id", str(dev_id), "-o", out,
          pool_metadata_path(vg, pool)], f"thin_dump on thin pool {vg}/{pool}")


def _report_rows(out: str) -> list[dict[str, str]]:
    try:
        rows = json.loads(out)["report"][0]["lv"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LvmError("lvs printed a report lvbackup cannot read") from None
    return [r for r in rows if not r.get("lv_name", "[").startswith("[")]


def _parse_thin_ids(out: str) -> dict[str, int]:
    ids = {}
    for r in _report_rows(out):
        text = r.get("thin_id", "")
        if text:
            if not text.isdigit():
                raise LvmError(f"lvs reports thin id {text!r} for {r['lv_name']}")
            ids[r["lv_name"]] = int(text)
    return ids


def thin_ids(vg: str) -> dict[str, int]:
    """The pool-internal device id (what thin_delta and thin_dump call a thin id) of each
    thin volume and thin snapshot of a VG, by LV name."""
    validate_name(vg, "volume group name", lv=False)
    return _parse_thin_ids(_run(["lvs", "--reportformat", "json", "-o", "lv_name,thin_id",
                                 vg], "lvs"))


def _parse_chunk_size(out: str, name: str) -> int:
    rows = _report_rows(out)
    text = rows[0].get("chunk_size", "") if len(rows) == 1 else ""
    if not text.isdigit() or int(text) <= 0:
        raise LvmError(f"lvs reports no chunk size for {name}")
    return int(text)


def chunk_size(lv: str) -> int:
    """In bytes: a thin pool's data block size, or a classic snapshot's chunk size."""
    name = "/".join(split_name(lv))
    return _parse_chunk_size(_run(["lvs", "--reportformat", "json", "--units", "b",
                                   "--nosuffix", "-o", "lv_name,chunk_size", name], "lvs"),
                             name)


# device-mapper devices of our own (instant restore): dmsetup, by name.

def linear_table(device: str, size: int) -> str:
    """A table mapping `size` bytes (a multiple of 512) linearly onto `device`."""
    rdev = os.stat(device).st_rdev
    return f"0 {size // 512} linear {os.major(rdev)}:{os.minor(rdev)} 0"


def _dm_checked(name: str) -> str:
    if not re.match(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,127}$", name):
        raise UsageError(f"invalid device-mapper name {name!r}")
    return name


def dm_create(name: str, table: str) -> str:
    """Create device-mapper device `name` with `table`; its path."""
    _run(["dmsetup", "create", _dm_checked(name), "--table", table], f"creating /dev/mapper/{name}")
    path = f"/dev/mapper/{name}"
    if not os.path.exists(path):   # no udev to make the node: device-mapper's own way
        _run(["dmsetup", "mknodes", name], f"making the node of {path}")
    return path


def dm_table(name: str) -> str | None:
    """The live table of device-mapper device `name`, or None if there is none."""
    # Every device's table ("NAME: TABLE" per line): no failure to tell from "no device".
    prefix = _dm_checked(name) + ": "
    for line in _run(["dmsetup", "table"], "listing device-mapper tables").splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def dm_swap(name: str, table: str, while_suspended: Callable[[], None] | None = None) -> None:
    """Replace the table under a live device: suspend it (the I/O in flight completes
    first; a filesystem on it is not frozen, it stays mounted), load `table`, call
    `while_suspended`, resume. A failure after the suspend resumes the device anyway."""
    _run(["dmsetup", "suspend", "--nolockfs", _dm_checked(name)], f"suspending {name}")
    try:
        crash_point("instant-suspended")
        _run(["dmsetup", "load", name, "--table", table], f"loading a table into {name}")
        if while_suspended is not None:
            while_suspended()
    finally:
        _run(["dmsetup", "resume", name], f"resuming {name}")


def _parse_open_count(out: str, name: str) -> int | None:
    # "NAME:OPEN" per device (or "No devices found"); another device's name may hold colons.
    for line in out.splitlines():
        found, _, count = line.strip().rpartition(":")
        if found == name:
            if not count.isdigit():
                raise LvmError(f"dmsetup info printed an open count lvbackup cannot read for "
                               f"{name}: {count!r}")
            return int(count)
    return None


def dm_open_count(name: str) -> int | None:
    """How many hold device-mapper device `name` open (a mounted filesystem, a process,
    another device over it), or None if there is no such device."""
    # Every device, as dm_table: no failure to tell from "no device".
    out = _run(["dmsetup", "info", "-c", "--noheadings", "--separator", ":", "-o",
                "name,open"], "listing device-mapper devices")
    return _parse_open_count(out, _dm_checked(name))


def dm_remove(name: str) -> None:
    # --retry: udev may hold the device open for a moment (it probes every new table).
    _run(["dmsetup", "remove", "--retry", _dm_checked(name)], f"removing /dev/mapper/{name}")
