"""The SQLite catalog of backups and their lineage (through sqlite-utils).

Table `backups`: one row per backup; its columns are the JSON field names of a backup
record (docs/format.md, "Manifests"). The catalog is an index: every available backup's manifest
carries its record, so `catalog rebuild` recreates it from the repository alone.
A row's status changes only through `Catalog.transition` (or `put`), which refuses a move
that lvbackup.base.lifecycle does not allow.
"""

from __future__ import annotations

import builtins  # Catalog.list hides the builtin in the annotations of its class
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict, cast

import sqlite_utils
from sqlite_utils import Migrations

from ..base.errors import LvbackupError, NotFoundError, UsageError
from ..base.lifecycle import COUNTED, Status, check_initial, check_transition
from ..base.permissions import create_private_file, make_private_dirs, refuse_writable_by_others
from ..base.sqlitefile import open_error
from ..base.timeutil import now_iso

STATUSES = tuple(s.value for s in Status)
FAIL_REASON_MAX = 255
_COUNTED = [s.value for s in COUNTED]
# How many ids an ambiguous prefix names in its error.
_CANDIDATES = 10
# The shortest id prefix that delete, protect and unprotect take.
MIN_PREFIX_TO_CHANGE = 4

# The columns of the first schema (m001); later migrations add to it. Never change this.
_V1_COLUMNS: dict[str, type] = {
    "id": str, "name": str, "description": str,
    "volume_id": str, "volume_name": str, "snapshot_id": str, "snapshot_name": str,
    "parent_id": str, "is_incremental": bool, "data_timestamp": str,
    "created_at": str, "updated_at": str, "status": str, "fail_reason": str,
    "size": int, "block_size": int, "stored_bytes": int, "num_dependent_backups": int,
}

# How the backup found what changed (lvbackup.volumes.changes.tracker) and what it read; the
# snapshot it read (by lv_uuid, creation time and thin pool lv_uuid), to pair with next time.
_V3_COLUMNS: dict[str, type] = {
    "change_source": str, "change_fallback": str, "bytes_read": int,
    "source_snapshot_id": str, "source_snapshot_time": str, "source_pool_id": str,
}

# A consistency group (`create --group`): the id of the group backup a member belongs to,
# and the group's name, which its next group backups share (their parents are found there).
_V4_COLUMNS: dict[str, type] = {"group_id": str, "group_name": str}

# Every column, as the JSON field names of a record. `labels` is a JSON object of strings
# (stored as JSON text); `protected` backups are never pruned or deleted.
COLUMNS: dict[str, type] = {**_V1_COLUMNS, "labels": dict, "protected": bool, **_V3_COLUMNS,
                            **_V4_COLUMNS}



class BackupRecord(TypedDict, total=False):
    """A backup: a catalog row, or the record users see (`to_record`), which adds
    `has_dependent_backups`. Partial while a backup is being described (a failure before
    it had a row). SQLite has no booleans: a row holds 0/1 where a record holds bool, and
    its `labels` as JSON text."""
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
    stored_bytes: int
    num_dependent_backups: int
    labels: dict[str, str] | str | None
    protected: bool | None
    change_source: str | None
    change_fallback: str | None
    bytes_read: int | None
    source_snapshot_id: str | None
    source_snapshot_time: str | None
    source_pool_id: str | None
    group_id: str | None
    group_name: str | None
    has_dependent_backups: bool


migrations = Migrations("lvbackup.catalog")


@migrations()
def m001_backups(db: sqlite_utils.Database) -> None:
    db.table("backups").create(
        {name: (int if kind in (int, bool) else str) for name, kind in _V1_COLUMNS.items()},
        pk="id",
        not_null={"volume_id", "status", "created_at", "updated_at", "data_timestamp"},
        defaults={"num_dependent_backups": 0, "stored_bytes": 0, "is_incremental": 0},
    )
    db.table("backups").create_index(["volume_id", "status"])
    db.table("backups").create_index(["parent_id"])


@migrations()
def m002_labels_protection(db: sqlite_utils.Database) -> None:
    table = db.table("backups")
    have = set(table.columns_dict)
    if "labels" not in have:
        table.add_column("labels", str)
    if "protected" not in have:
        # Nullable: records written before this column (old manifests, exports) lack it.
        db.execute("ALTER TABLE backups ADD COLUMN protected INTEGER DEFAULT 0")


def _add_columns(db: sqlite_utils.Database, columns: dict[str, type]) -> sqlite_utils.db.Table:
    table = db.table("backups")
    have = set(table.columns_dict)
    for name, kind in columns.items():
        if name not in have:
            table.add_column(name, kind)
    return table


@migrations()
def m003_change_tracking(db: sqlite_utils.Database) -> None:
    _add_columns(db, _V3_COLUMNS)


@migrations()
def m004_groups(db: sqlite_utils.Database) -> None:
    table = _add_columns(db, _V4_COLUMNS)
    table.create_index(["group_id"], if_not_exists=True)
    table.create_index(["group_name"], if_not_exists=True)


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern (ESCAPE '\\') matching what starts with `prefix`."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def row_labels(row: Mapping[str, Any]) -> dict[str, str]:
    """The labels of a catalog row (its `labels` column is JSON text, or already a dict)."""
    raw = row.get("labels")
    if not raw:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def has_labels(row: Mapping[str, Any], wanted: dict[str, str]) -> bool:
    have = row_labels(row)
    return all(have.get(k) == v for k, v in wanted.items())


def as_record(raw: Mapping[str, Any], **fields: Any) -> BackupRecord:
    """The catalog's fields of `raw` (None where it lacks one), `fields` replacing them."""
    return cast(BackupRecord, {**{name: raw.get(name) for name in COLUMNS}, **fields})


def to_record(row: Mapping[str, Any]) -> BackupRecord:
    """A row as the JSON record users see (booleans, and has_dependent_backups)."""
    rec = as_record(row)
    rec["is_incremental"] = bool(rec["is_incremental"])
    rec["labels"] = row_labels(row)
    rec["protected"] = bool(rec["protected"])
    rec["num_dependent_backups"] = rec["num_dependent_backups"] or 0
    rec["has_dependent_backups"] = rec["num_dependent_backups"] > 0
    return rec


def _as_row(record: BackupRecord, status: Status) -> dict[str, Any]:
    return {**as_record(record), "status": status.value,
            "labels": json.dumps(row_labels(record), sort_keys=True),
            "protected": int(bool(record.get("protected")))}


class Catalog:
    def __init__(self, path: Path, read_only: bool = False):
        """The catalog at `path`, made if missing; with `read_only`, opened to read only
        (a full or read-only filesystem, where SQLite cannot write its -wal and -shm)."""
        self.path = Path(path)
        self.read_only = read_only
        if read_only:
            self._open_read_only()
            return
        try:
            make_private_dirs(self.path.parent)
            refuse_writable_by_others(self.path.parent, "catalog directory")
            refuse_writable_by_others(self.path, "catalog")
            create_private_file(self.path)
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            # No sqlite-utils plugins: they have no business in the catalog, and finding
            # them (an entry-point scan) is a tenth of every command's start-up.
            self._db = sqlite_utils.Database(conn, execute_plugins=False)
            self._db.execute("PRAGMA busy_timeout = 60000")
            if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._db.enable_wal()
            migrations.apply(self._db)
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise LvbackupError(f"catalog {self.path} is unreadable ({e}); "
                                    "recreate it with 'lvbackup catalog rebuild'") from None
            raise open_error(e, self.path, "catalog", "catalog: (or $LVBACKUP_CATALOG)",
                             "") from None
        except OSError as e:
            raise UsageError(f"cannot open catalog {self.path}: {e.strerror}") from None
        self._table = self._db.table("backups")

    def _open_read_only(self) -> None:
        wal = Path(f"{self.path}-wal")
        # With nothing in the write-ahead log, the file alone is the catalog, read without
        # the shared memory (-shm) that a full or read-only filesystem cannot give.
        flag = "mode=ro" if wal.exists() and wal.stat().st_size else "immutable=1"
        try:
            if not self.path.is_file():
                raise sqlite3.OperationalError("unable to open database file")
            conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?{flag}", uri=True, timeout=60,
                                   isolation_level=None)
            self._db = sqlite_utils.Database(conn, execute_plugins=False)
            self._table = self._db.table("backups")
            self._table.count_where("1")   # fails here on a file SQLite cannot read
        except sqlite3.DatabaseError as e:
            raise LvbackupError(f"cannot open catalog {self.path} (read-only: its filesystem "
                                f"is full or read-only): {e}") from None

    def _check_writable(self) -> None:
        if self.read_only:
            raise LvbackupError(f"the catalog {self.path} cannot be written: its filesystem "
                                "is full or read-only; free space (delete backups, then "
                                "'lvbackup gc') or make it writable, and run it again")

    def close(self) -> None:
        self._db.conn.close()

    @contextmanager
    def write(self) -> Iterator[None]:
        """A write transaction, taken up front (BEGIN IMMEDIATE).

        In WAL mode a deferred transaction that reads before it writes fails at once with
        SQLITE_BUSY_SNAPSHOT ("database is locked") when another process committed in
        between; no busy timeout retries that. Taking the write lock first waits instead.
        """
        self._check_writable()
        if self._db.conn.in_transaction:
            with self._db.atomic():
                yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- rows -----------------------------------------------------------------------

    def get(self, backup_id: str) -> BackupRecord:
        row = self.find(backup_id)
        if row is None:
            raise NotFoundError(f"backup {backup_id} not found")
        return row

    def find(self, backup_id: str) -> BackupRecord | None:
        rows = list(self._rows("id = ?", [backup_id]))
        return rows[0] if rows else None

    def count(self) -> int:
        """How many rows there are; reading them fails on a catalog SQLite cannot read."""
        return int(self._db.execute("SELECT count(*) FROM backups").fetchone()[0])

    def empty(self) -> bool:
        """Whether there is no row at all (a new catalog, or one truncated to nothing)."""
        return self._db.execute("SELECT 1 FROM backups LIMIT 1").fetchone() is None

    def resolve(self, prefix: str, include_deleted: bool = True,
                min_prefix: int = 1) -> BackupRecord:
        """The backup whose id is or starts with `prefix` (unique), else NotFoundError
        (naming the candidates of an ambiguous prefix). Commands that change a backup
        (delete, protect) ask for `min_prefix` characters: a slip of one key must not
        pick another backup."""
        prefix = prefix.strip().lower()
        if not prefix:
            raise NotFoundError("a backup id must not be empty")
        where = "id LIKE ? ESCAPE '\\'"
        if not include_deleted:
            where += " AND status != 'deleted'"
        like = _like_prefix(prefix)
        rows = list(self._rows(where, [like], order_by="id", limit=_CANDIDATES + 1))
        exact = [r for r in rows if r["id"] == prefix]
        if exact:
            return exact[0]
        if not rows:
            raise NotFoundError(f"backup {prefix} not found; 'lvbackup list' shows the ids")
        names = ", ".join(r["id"] for r in rows[:_CANDIDATES])
        matches = f"it matches {names}{' and more' if len(rows) > _CANDIDATES else ''}"
        if len(prefix) < min_prefix:
            raise UsageError(f"backup id prefix {prefix} is too short: give at least "
                             f"{min_prefix} characters of the id"
                             + (f" (it is ambiguous: {matches})" if len(rows) > 1 else ""))
        if len(rows) > 1:
            raise NotFoundError(f"backup id prefix {prefix} is ambiguous: {matches}; give "
                                "more characters")
        return rows[0]

    def insert(self, record: BackupRecord, status: Status) -> None:
        """Add a backup's row in `status`, which must be a status a backup can start in."""
        check_initial(record["id"], status)
        self._check_writable()
        self._table.insert(_as_row(record, status))

    def put(self, record: BackupRecord, status: Status) -> None:
        """Add or replace the row of a backup re-created from its manifest or an exported
        record; replacing it moves its status as `transition` would."""
        with self.write():
            old = self.find(record["id"])
            if old is None:
                self.insert(record, status)
                return
            if old["status"] != status:
                check_transition(record["id"], Status(old["status"]), status)
            self._table.upsert(_as_row(record, status), pk="id")

    def transition(self, backup_id: str, to: Status, **fields: Any) -> None:
        """Move a backup to status `to`, updating `fields` with it; IllegalTransition (and
        nothing written) if its current status does not lead there."""
        with self.write():
            check_transition(backup_id, Status(self.get(backup_id)["status"]), to)
            self._update(backup_id, {**fields, "status": to.value})

    def update(self, backup_id: str, **fields: Any) -> None:
        """Change fields other than `status`, which only `transition` changes."""
        if "status" in fields:
            raise TypeError("Catalog.update cannot change a status; use Catalog.transition")
        self._update(backup_id, fields)

    def _update(self, backup_id: str, fields: dict[str, Any]) -> None:
        self._check_writable()
        if fields.get("fail_reason"):
            fields["fail_reason"] = str(fields["fail_reason"])[:FAIL_REASON_MAX]
        fields["updated_at"] = now_iso()
        self._table.update(backup_id, fields)

    def _rows(self, where: str | None, args: builtins.list[Any],
              **kwargs: Any) -> Iterator[BackupRecord]:
        return cast(Iterator[BackupRecord], self._table.rows_where(where, args, **kwargs))

    def list(self, volumes: Iterable[str] = (), status: str | None = None,
             include_deleted: bool = False,
             labels: dict[str, str] | None = None) -> builtins.list[BackupRecord]:
        """Backups, oldest first; `volumes` are names, ids or id prefixes of volumes; with
        `labels`, only backups carrying every one of them."""
        where: list[str] = []
        args: list[Any] = []
        volumes = list(dict.fromkeys(volumes))   # one term per volume, however often named
        if volumes:
            where.append("(" + " OR ".join(["volume_id = ? OR volume_name = ? OR volume_id LIKE ?"]
                                           * len(volumes)) + ")")
            for v in volumes:
                args += [v, v, v.lower() + "%"]
        if status:
            where.append("status = ?")
            args.append(status)
        elif not include_deleted:
            where.append("status != 'deleted'")
        rows = self._rows(" AND ".join(where) or None, args, order_by="created_at, id")
        return [r for r in rows if not labels or has_labels(r, labels)]

    # The ancestors of a backup in one query, nearest first. A parent the catalog lacks ends
    # it; a cycle (a damaged catalog) is cut where an id repeats, the depth bound ends it.
    _CHAIN = ("WITH RECURSIVE chain(id, depth) AS (SELECT ?, 0 UNION ALL "
              "SELECT b.parent_id, c.depth + 1 FROM chain c JOIN backups b ON b.id = c.id "
              "WHERE b.parent_id IS NOT NULL AND c.depth < (SELECT count(*) FROM backups)) "
              "SELECT backups.* FROM chain JOIN backups ON backups.id = chain.id "
              "ORDER BY chain.depth")

    def chain(self, backup_id: str) -> builtins.list[BackupRecord]:
        """The backup's row, then its parent's, and so on back to its full backup (or to
        the first parent the catalog does not have)."""
        rows: list[BackupRecord] = []
        seen: set[str] = set()
        for row in self._db.query(self._CHAIN, [backup_id]):
            if row["id"] in seen:
                break
            seen.add(row["id"])
            rows.append(cast(BackupRecord, row))
        if not rows:
            raise NotFoundError(f"backup {backup_id} not found")
        return rows

    def candidates(self, volume_id: str, group_name: str | None = None
                   ) -> builtins.list[BackupRecord]:
        """Non-deleted backups of a volume: the incremental parent candidates; with
        `group_name`, only those made as members of that group's backups."""
        if group_name is None:
            return list(self._rows("volume_id = ? AND status != 'deleted'", [volume_id]))
        return list(self._rows("volume_id = ? AND group_name = ? AND status != 'deleted'",
                               [volume_id, group_name]))

    def group(self, ref: str, include_deleted: bool = False) -> builtins.list[BackupRecord]:
        """The members of the group backups `ref` names: a group name (all its group
        backups), or the id of one group backup or a unique prefix of it; oldest first."""
        ref = ref.strip()
        live = "" if include_deleted else " AND status != 'deleted'"
        rows = list(self._rows(f"group_name = ?{live}", [ref], order_by="created_at, id"))
        if rows or not ref:
            return rows
        rows = list(self._rows(f"group_id LIKE ? ESCAPE '\\'{live}",
                               [_like_prefix(ref.lower())], order_by="created_at, id"))
        ids = sorted({r["group_id"] or "" for r in rows})
        if len(ids) > 1:
            raise NotFoundError(f"group id prefix {ref} is ambiguous: it matches "
                                f"{', '.join(ids)}; give more characters")
        return rows

    def children(self, backup_id: str) -> builtins.list[BackupRecord]:
        return list(self._rows("parent_id = ? AND status != 'deleted'", [backup_id],
                               order_by="created_at"))

    def in_states(self, *states: Status) -> builtins.list[BackupRecord]:
        marks = ",".join("?" * len(states))
        return list(self._rows(f"status IN ({marks})", [s.value for s in states]))

    _RECOUNT = ("UPDATE backups SET num_dependent_backups = (SELECT count(*) FROM backups c "
                f"WHERE c.parent_id = backups.id AND c.status IN ({','.join('?' * len(COUNTED))}))")

    def refresh_dependents(self, backup_id: str | None) -> None:
        """Recount num_dependent_backups of `backup_id` (no-op for None)."""
        if backup_id:
            self._check_writable()
            self._db.execute(self._RECOUNT + " WHERE id = ?", [*_COUNTED, backup_id])

    def refresh_all_dependents(self) -> None:
        self._check_writable()
        self._db.execute(self._RECOUNT, _COUNTED)


def require_available(row: BackupRecord) -> BackupRecord:
    """`row`, if its backup is available; UsageError with Cinder's message otherwise (what
    restore, map, instant restore, diff and export-record check first)."""
    if row["status"] != Status.AVAILABLE:
        raise UsageError(f"Backup status must be available (backup {row['id']} is "
                         f"{row['status']})")
    return row
