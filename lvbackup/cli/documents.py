"""The JSON documents the commands print with --json (docs/json.md, field by field).

Naming, the same in every document: a backup record's own id is `id`; any other document
names the backup it is about `backup_id`; `volume_name` is always the backed-up volume (an
LV as VG/LV, or an image's path); what a restore writes is its `target`. Sizes are bytes,
times are ISO 8601 UTC with microseconds. tests/test_json_contract.py checks each command's
output against these types.
"""

from __future__ import annotations

from typing import Literal, TypedDict

from ..operations.instant import InstantInfo
from ..operations.nbd import MapInfo
from ..operations.restore import RestoreResult

__all__ = ["InstantInfo", "MapInfo", "RestoreResult"]


class Record(TypedDict):
    """A backup (create, list, show, delete, protect, unprotect, import-record)."""

    id: str
    name: str | None
    description: str | None
    volume_id: str
    volume_name: str | None
    snapshot_id: str | None
    snapshot_name: str | None
    parent_id: str | None
    is_incremental: bool
    data_timestamp: str
    created_at: str
    updated_at: str
    status: str
    fail_reason: str | None
    size: int | None
    block_size: int | None
    stored_bytes: int | None
    num_dependent_backups: int
    labels: dict[str, str]
    protected: bool
    change_source: str | None
    change_fallback: str | None
    bytes_read: int | None
    source_snapshot_id: str | None
    source_snapshot_time: str | None
    source_pool_id: str | None
    group_id: str | None
    group_name: str | None
    has_dependent_backups: bool


class Error(TypedDict):
    """The one line on stderr of any failed command run with --json."""

    error: str
    exit_code: int


class Init(TypedDict):
    repository: str
    catalog: str
    repository_id: str
    block_size: int
    created: bool
    encrypted: bool


class VerifiedBackup(TypedDict):
    id: str
    name: str | None
    volume_name: str | None
    ok: bool
    error: str | None


class Overwritten(TypedDict):
    object: str
    overwritten_at: str


class VerifyCycle(TypedDict):
    number: int
    done_percent: float
    started_at: str
    oldest_unverified_at: str
    out_of_time: bool


class Verify(TypedDict):
    ok: bool
    deep: bool
    index_errors: list[str]
    overwritten: list[Overwritten]
    backups: list[VerifiedBackup]
    chunks_checked: int | None
    chunks_total: int | None
    cycle: VerifyCycle | None


class PruneEntry(TypedDict):
    id: str
    volume_name: str | None
    data_timestamp: str
    parent_id: str | None
    is_incremental: bool


class PruneKept(PruneEntry):
    reasons: list[str]


class Reparented(TypedDict):
    id: str
    old_parent_id: str | None
    new_parent_id: str | None


class Prune(TypedDict, total=False):
    dry_run: bool
    policy: dict[str, int]
    labels: dict[str, str]
    keep: list[PruneKept]
    remove: list[PruneEntry]
    reparented: list[Reparented]
    deleted: list[str]          # not with --dry-run: the ids deleted


class Job(TypedDict):
    job: str
    source: str
    status: Literal["ok", "skipped", "failed"]
    exit_code: int
    error: str | None
    kind: Literal["full", "incremental"] | None
    why: str | None
    backup: Record | None
    group: Group | None
    pruned: list[str]
    reparented: list[Reparented]
    copied: list[str]
    duration_seconds: float


class Group(TypedDict):
    """A group backup (`create --group`, `show` of a group, `delete --group`)."""
    group_id: str
    name: str
    backups: list[Record]


class GroupRestore(TypedDict):
    group_id: str
    name: str
    restored: list[RestoreResult]


class Run(TypedDict):
    ok: bool
    exit_code: int
    jobs: list[Job]


class Range(TypedDict):
    offset: int
    length: int
    change: str


class Diff(TypedDict):
    backup_id: str
    other_id: str
    block_size: int
    size: int
    other_size: int
    differing_bytes: int
    ranges: list[Range]


class Gc(TypedDict):
    packs_deleted: int
    packs_repacked: int
    packs_kept: int
    packs_spared_young: int
    bytes_freed: int
    unreadable_packs: list[str]
    locks_extended: int
    locked_objects_held: int
    locked_bytes_held: int
    locked_until: str | None


class Copy(TypedDict):
    target: str
    copied: list[str]
    already_present: list[str]
    chunks_sent: int
    bytes_sent: int


class ExportedRecord(TypedDict):
    backup_id: str
    record: str                 # base64, as import-record reads it


class Rebuild(TypedDict):
    recovered: int
    corrupt_manifests: list[str]
    old_catalog_moved_to: str | None


class KeySlot(TypedDict):
    slot: str
    kind: str
    used: bool


class KeyExported(TypedDict):
    exported_to: str


class KeyImported(TypedDict):
    repository: str
    slots_added: list[str]


class KeyAdded(TypedDict):
    repository: str
    slot: str
    kind: str


class PassphraseChanged(TypedDict):
    repository: str
    slot: str
    replaced: str


class Mounted(MapInfo):
    mountpoint: str
    mounted: str                # the device mounted (the map's, or its partition)
    filesystem: str


class Lv(TypedDict):
    vg: str
    name: str
    full_name: str
    uuid: str
    size: int
    created_at: str | None
    origin: str | None
    thin: bool
    open: bool
    active: bool
    state: str
    base: bool


class Snapshot(Lv):
    last_backup: Record | None  # the latest available backup read from it


class Volume(Lv):
    last_backup: Record | None
    snapshots: list[Snapshot]
