"""Crash points for the fault-injection tests (tests/test_faults.py), and one wrong answer.

`LVBACKUP_FAULT=POINT[:N]` makes the process SIGKILL itself the N-th time (default: the
first) it reaches `crash_point(POINT)`: a real crash at an exact step, as kill -9 would do
at a lucky moment. `POINT:N:TERM` sends SIGTERM instead, which lvbackup unwinds from;
`POINT:N:STOP` sends SIGSTOP (a hung process, until the test sends SIGCONT).
Unset, a crash point costs a string comparison and a set lookup; a point the code names
that POINTS does not list raises, and so does an LVBACKUP_FAULT that names none.
"""

from __future__ import annotations

import os
import signal
import threading

from .errors import UsageError

_SPEC = os.environ.get("LVBACKUP_FAULT", "")
_POINT, _, _REST = _SPEC.partition(":")
_NTH, _, _SIGNAL = _REST.partition(":")
_seen = 0
_lock = threading.Lock()

POINTS = (
    "read-segment",            # backup: a segment of the source was read
    "pack-stored",             # backup: a pack is stored, not yet recorded in the cache
    "pack-pending",            # backup: a pack is recorded as pending, not yet indexed
    "index-written",           # backup: an index file is stored, the manifest is not
    "manifest-written",        # backup: the manifest is stored, the catalog not updated
    "copy-manifest-written",   # copy: the target's manifest is stored, its catalog row not
    "restore-segment",         # restore: a segment was written to the target
    "delete-marked",           # delete: the row says deleting, the manifest still exists
    "delete-manifest-removed", # delete: the manifest is gone, the row says deleting
    "gc-repacked",             # gc: new packs hold the live chunks, the index is old
    "gc-index-rewritten",      # gc: old and new index files both exist
    "gc-old-index-deleted",    # gc: only the new index exists, dead packs remain
    "gc-pack-deleted",         # gc: some dead packs are deleted
    "index-cache-filled",      # an empty index cache: its entries are in, the pack index
                               # and the commit not yet
    "lock-extended",           # gc / run: some objects' Object Lock is extended, not all
    "metadata-reserved",       # backup: a thin pool's metadata snapshot is reserved
    "key-slot-stored",         # init --encryption / key change-passphrase: a new key slot
                               # is stored; the config / the old slot's deletion is not
    "map-server-started",      # map: nbdkit serves the backup, no device is attached
    "map-attached",            # map: the device is attached, the map not recorded ready
    "hydrate-copied",          # instant restore: a region is in the LV, not yet marked
    "hydrate-marked",          # instant restore: a region is marked (durably), a write
                               # into it not yet made
    "instant-suspended",       # instant restore: its device is suspended, the table of
                               # the LV not yet loaded
    "instant-cancel-detached", # restore --cancel: the helper stopped, the device-mapper
                               # device removed; the NBD device, record and LV not yet
    "group-frozen",            # create --group: every filesystem is frozen, no snapshot yet
    "group-snapshot-made",     # create --group: a member's snapshot is made, still frozen
    "group-thawed",            # create --group: thawed, the snapshots exist, nothing read
    "instant-cancel-lv-removed",  # restore --cancel: the LV it created is removed, the
                               # state file not yet
    "instant-released",        # restore --release: the device removed, the state file
                               # not yet marked released
)


# Not a crash: `LVBACKUP_FAULT=drop-changes` makes LVM's change lists report every change as
# none, so that the tests can show the sample check catches a wrong list.
DROP_CHANGES = "drop-changes"


def check_requested() -> None:
    """UsageError if LVBACKUP_FAULT names no crash point: the test that asked for it would
    pass for the wrong reason. Checked before a command starts."""
    if _POINT and _POINT not in _KNOWN and _POINT != DROP_CHANGES:
        raise UsageError(f"LVBACKUP_FAULT={_SPEC}: no crash point is named {_POINT} "
                         f"(known: {', '.join(POINTS)})")


def dropping_changes() -> bool:
    return _POINT == DROP_CHANGES


_KNOWN = frozenset(POINTS)
_SIGNALS = {"TERM": signal.SIGTERM, "STOP": signal.SIGSTOP}


def crash_point(name: str) -> None:
    global _seen
    if name != _POINT:
        if name not in _KNOWN:   # a misspelt point in the code would never fire
            raise ValueError(f"unknown crash point {name!r}: add it to faults.POINTS")
        return
    with _lock:
        _seen += 1
        if _seen == int(_NTH or 1):
            os.kill(os.getpid(), _SIGNALS.get(_SIGNAL, signal.SIGKILL))
