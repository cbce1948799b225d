"""The SQLite catalog of backups and their lineage (through sqlite-utils).

Table `backups`: one row per backup; its columns are the JSON field names of a backup
record (DESIGN.md, "Catalog"). The catalog is an index: every available backup's manifest
carries its record, so `catalog rebuild` recreates it from the repository alone.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import sqlite_utils
from sqlite_utils import Migrations

from .errors import LvbackupError, NotFoundError, UsageError
from .sqlitefile import open_error
from .timeutil import now_iso

STATUSES = ("creating", "available", "error", "restoring", "deleting", "deleted",
            "error_deleting")
FAIL_REASON_MAX = 255
NO_PARENT = "No backups available to do an incremental backup."
# Children in these states count in their parent's num_dependent_backups (rule 12).
COUNTED = ("available", "restoring", "deleting", "error_deleting")

# The columns of the first schema (m001); later migrations add to it. Never change this.
_V1_COLUMNS: dict[str, type] = {
    "id": str, "name": str, "description": str,
    "volume_id": str, "volume_name": str, "snapshot_id": str, "snapshot_name": str,
    "parent_id": str, "is_incremental": bool, "data_timestamp": str,
    "created_at": str, "updated_at": str, "status": str, "fail_reason": str,
    "size": int, "block_size": int, "stored_bytes": int, "num_dependent_backups": int,
}

# Every column, as the JSON field names of a record. `labels` is a JSON object of strings
# (stored as JSON text); `protected` backups are never pruned or deleted.
COLUMNS: dict[str, type] = {**_V1_COLUMNS, "labels": dict, "protected": bool}

migrations = Migrations("lvbackup.catalog")


@migrations()
def m001_backups(db: sqlite_utils.Database) -> None:
    db["backups"].create(
        {name: (int if kind in (int, bool) else str) for name, kind in _V1_COLUMNS.items()},
        pk="id",
        not_null={"volume_id", "status", "created_at", "updated_at", "data_timestamp"},
        defaults={"num_dependent_backups": 0, "stored_bytes": 0, "is_incremental": 0},
    )
    db["backups"].create_index(["volume_id", "status"])
    db["backups"].create_index(["parent_id"])


@migrations()
def m002_labels_protection(db: sqlite_utils.Database) -> None:
    table = db["backups"]
    have = set(table.columns_dict)
    if "labels" not in have:
        table.add_column("labels", str)
    if "protected" not in have:
        # Nullable: records written before this column (old manifests, exports) lack it.
        db.execute("ALTER TABLE backups ADD COLUMN protected INTEGER DEFAULT 0")


# --- labels ----------------------------------------------------------------------------

LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
LABEL_VALUE_MAX = 255


def check_label(key: Any, value: Any, what: str = "label") -> tuple[str, str]:
    """A validated (key, value) pair; UsageError naming `what` otherwise."""
    if not isinstance(key, str) or not LABEL_KEY.match(key):
        raise UsageError(f"{what}: invalid label key {key!r}: use letters, digits and _ . - "
                         "(starting with a letter or digit), at most 63 characters")
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise UsageError(f"{what}: the value of label {key!r} must be a string "
                         "(quote it in YAML)")
    value = str(value)
    if len(value) > LABEL_VALUE_MAX or any(c in value for c in "\n\r\0"):
        raise UsageError(f"{what}: the value of label {key!r} must be one line of at most "
                         f"{LABEL_VALUE_MAX} characters")
    return key, value


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` arguments (as given to --label) as a dict; UsageError if malformed."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--label {item!r}: expected KEY=VALUE")
        key, value = check_label(key, value, f"--label {item!r}")
        labels[key] = value
    return labels


def row_labels(row: dict) -> dict[str, str]:
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


def has_labels(row: dict, wanted: dict[str, str]) -> bool:
    have = row_labels(row)
    return all(have.get(k) == v for k, v in wanted.items())


def choose_parent(candidates: Iterable[dict], snapshot_time: str | None = None) -> dict:
    """Cinder's parent for an incremental backup (CINDER-RULES.md rules 6-8).

    `candidates` are the non-deleted backups of the volume; `snapshot_time` is the
    creation time of the snapshot being backed up (None for a volume backup). Raises
    UsageError(NO_PARENT) if there is no usable parent.
    """
    candidates = [c for c in candidates if c["status"] != "deleted"]
    available = [c for c in candidates if c["status"] == "available"]
    eligible = [c for c in available
                if snapshot_time is None or c["data_timestamp"] < snapshot_time]
    if eligible:
        return max(eligible, key=lambda c: (c["data_timestamp"], c["created_at"]))
    if snapshot_time is not None and available:
        # Rule 8: nothing is older than the snapshot, so fall back to the newest backup.
        newest = max(candidates, key=lambda c: c["created_at"])
        if newest["status"] == "available":
            return newest
    raise UsageError(NO_PARENT)


def to_record(row: dict) -> dict[str, Any]:
    """A row as the JSON record users see (booleans, and has_dependent_backups)."""
    rec = {name: row.get(name) for name in COLUMNS}
    rec["is_incremental"] = bool(rec["is_incremental"])
    rec["labels"] = row_labels(row)
    rec["protected"] = bool(rec["protected"])
    rec["num_dependent_backups"] = rec["num_dependent_backups"] or 0
    rec["has_dependent_backups"] = rec["num_dependent_backups"] > 0
    return rec


class Catalog:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            # No sqlite-utils plugins: they have no business in the catalog, and finding
            # them (an entry-point scan) is a tenth of every command's start-up.
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            self.db.execute("PRAGMA busy_timeout = 60000")
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.enable_wal()
            migrations.apply(self.db)
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise LvbackupError(f"catalog {self.path} is unreadable ({e}); "
                                    "recreate it with 'lvbackup catalog rebuild'") from None
            raise open_error(e, self.path, "catalog", "catalog: (or $LVBACKUP_CATALOG)",
                             "") from None
        except OSError as e:
            raise UsageError(f"cannot open catalog {self.path}: {e.strerror}") from None
        self.table = self.db["backups"]

    def close(self) -> None:
        self.db.conn.close()

    @contextmanager
    def write(self) -> Iterator[None]:
        """A write transaction, taken up front (BEGIN IMMEDIATE).

        In WAL mode a deferred transaction that reads before it writes fails at once with
        SQLITE_BUSY_SNAPSHOT ("database is locked") when another process committed in
        between; no busy timeout retries that. Taking the write lock first waits instead.
        """
        if self.db.conn.in_transaction:
            with self.db.atomic():
                yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- rows -----------------------------------------------------------------------

    def get(self, backup_id: str) -> dict:
        rows = list(self.table.rows_where("id = ?", [backup_id]))
        if not rows:
            raise NotFoundError(f"backup {backup_id} not found")
        return rows[0]

    def find(self, backup_id: str) -> dict | None:
        rows = list(self.table.rows_where("id = ?", [backup_id]))
        return rows[0] if rows else None

    def resolve(self, prefix: str, include_deleted: bool = True) -> dict:
        """The backup whose id is or starts with `prefix` (unique), else NotFoundError."""
        prefix = prefix.strip().lower()
        if not prefix:
            raise NotFoundError("a backup id must not be empty")
        where = "id LIKE ? ESCAPE '\\'"
        if not include_deleted:
            where += " AND status != 'deleted'"
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = list(self.table.rows_where(where, [like], limit=3))
        exact = [r for r in rows if r["id"] == prefix]
        if exact:
            return exact[0]
        if not rows:
            raise NotFoundError(f"backup {prefix} not found; 'lvbackup list' shows the ids")
        if len(rows) > 1:
            raise NotFoundError(f"backup id prefix {prefix} is ambiguous; give more characters")
        return rows[0]

    def insert(self, record: dict) -> None:
        row = {k: record.get(k) for k in COLUMNS}
        row["labels"] = json.dumps(row["labels"] or {}, sort_keys=True)
        row["protected"] = int(bool(row["protected"]))
        self.table.insert(row)

    def update(self, backup_id: str, **fields: Any) -> None:
        if "fail_reason" in fields and fields["fail_reason"]:
            fields["fail_reason"] = str(fields["fail_reason"])[:FAIL_REASON_MAX]
        fields["updated_at"] = now_iso()
        self.table.update(backup_id, fields)

    def list(self, volumes: Iterable[str] = (), status: str | None = None,
             include_deleted: bool = False, labels: dict[str, str] | None = None) -> list[dict]:
        """Backups, oldest first; `volumes` are names, ids or id prefixes of volumes; with
        `labels`, only backups carrying every one of them."""
        where, args = [], []
        volumes = list(volumes)
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
        rows = self.table.rows_where(" AND ".join(where) or None, args,
                                     order_by="created_at, id")
        return [r for r in rows if not labels or has_labels(r, labels)]

    def candidates(self, volume_id: str) -> list[dict]:
        """Non-deleted backups of a volume: the incremental parent candidates."""
        return list(self.table.rows_where("volume_id = ? AND status != 'deleted'", [volume_id]))

    def children(self, backup_id: str) -> list[dict]:
        return list(self.table.rows_where("parent_id = ? AND status != 'deleted'", [backup_id],
                                          order_by="created_at"))

    def in_states(self, *states: str) -> list[dict]:
        marks = ",".join("?" * len(states))
        return list(self.table.rows_where(f"status IN ({marks})", list(states)))

    _RECOUNT = ("UPDATE backups SET num_dependent_backups = (SELECT count(*) FROM backups c "
                f"WHERE c.parent_id = backups.id AND c.status IN ({','.join('?' * len(COUNTED))}))")

    def refresh_dependents(self, backup_id: str | None) -> None:
        """Recount num_dependent_backups (rule 12) of `backup_id` (no-op for None)."""
        if backup_id:
            self.db.execute(self._RECOUNT + " WHERE id = ?", [*COUNTED, backup_id])

    def refresh_all_dependents(self) -> None:
        self.db.execute(self._RECOUNT, list(COUNTED))
