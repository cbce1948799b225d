"""The statuses of a backup and the moves between them (Cinder's backup status rules).

The catalog checks every status change against `TRANSITIONS` inside the write transaction
that makes it, so a move the code was never meant to make fails loudly instead of leaving
a row in a state no operation expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Status(StrEnum):
    # The values are what the catalog, manifests, exports and JSON output hold.
    CREATING = "creating"
    AVAILABLE = "available"
    ERROR = "error"
    RESTORING = "restoring"
    DELETING = "deleting"
    DELETED = "deleted"
    ERROR_DELETING = "error_deleting"


# A new row is either a backup being made, or one re-created from its manifest or from an
# exported record (import-record, catalog rebuild), which is complete by then.
INITIAL: frozenset[Status] = frozenset({Status.CREATING, Status.AVAILABLE})

# The moves each operation makes; `delete --force` adds its own below.
_MOVES: dict[Status, set[Status]] = {
    # A finished backup, or a failed one (recovery ends a dead run's row either way).
    Status.CREATING: {Status.AVAILABLE, Status.ERROR},
    # Catalog rebuild marks `error` a backup whose manifest is gone.
    Status.AVAILABLE: {Status.RESTORING, Status.DELETING, Status.ERROR},
    # Back to available when the restore ends, however it ends; rebuild as above.
    Status.RESTORING: {Status.AVAILABLE, Status.ERROR},
    # The manifest removed, or not; rebuild finding the manifest makes it available again.
    Status.DELETING: {Status.DELETED, Status.ERROR_DELETING, Status.AVAILABLE},
    # Rebuild finds the manifest after all (a failure after it was written).
    Status.ERROR: {Status.DELETING, Status.AVAILABLE},
    # Retried by `delete --force` (below); rebuild decides by the manifest as above.
    Status.ERROR_DELETING: {Status.AVAILABLE, Status.ERROR},
    # import-record revives a deleted row; rebuild does when a manifest is back.
    Status.DELETED: {Status.AVAILABLE},
}

# `delete --force` deletes a backup in any state but `deleted`. Recovery settles the rows
# of dead runs just before, so creating, restoring and deleting reach it only from a run
# that died in between; a live run holds the backup's run lock and the delete stops there.
_FORCED_DELETE = frozenset({Status.CREATING, Status.RESTORING, Status.DELETING,
                            Status.ERROR_DELETING})

TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    status: frozenset(to | ({Status.DELETING} if status in _FORCED_DELETE else set()))
    for status, to in _MOVES.items()
}

# What the live run that holds a backup in a transitional status is doing, for the "busy"
# line of a run that finds it so.
ACTIVITY: Mapping[Status, str] = {Status.CREATING: "being created",
                                  Status.RESTORING: "being restored",
                                  Status.DELETING: "being deleted"}

# Children in these states count in their parent's num_dependent_backups.
COUNTED: tuple[Status, ...] = (Status.AVAILABLE, Status.RESTORING, Status.DELETING,
                               Status.ERROR_DELETING)


class IllegalTransition(Exception):
    """A status change the lifecycle does not allow: a bug in lvbackup, not a user error."""

    def __init__(self, backup_id: str, current: Status | None, to: Status):
        where = f"from {current}" if current is not None else "as a new row"
        super().__init__(f"backup {backup_id}: status {to} is not allowed {where}")
        self.backup_id, self.current, self.to = backup_id, current, to


def check_transition(backup_id: str, current: Status, to: Status) -> None:
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(backup_id, current, to)


def check_initial(backup_id: str, status: Status) -> None:
    if status not in INITIAL:
        raise IllegalTransition(backup_id, None, status)
