"""`--as-of TIME`: the repository as it stood at a past time, read-only.

Every object is read in its newest version not newer than TIME (the S3 backend pins them:
a versioned bucket keeps what was overwritten or deleted since). Only commands that read
the repository run; a writer is refused before it starts, and the backend refuses any
write that would still reach it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from ..base.errors import UsageError
from ..config import Config
from ..repository.backends import open_backend

# Command paths (below `lvbackup`) that only read the repository.
READING_COMMANDS = frozenset({
    "list", "show", "restore", "verify", "diff", "map", "unmap", "mount", "unmount", "copy",
    "export-record", "catalog rebuild", "key list", "key export", "volumes", "config check"})


def parse_as_of(text: str, now: float | None = None) -> float:
    """Seconds since the epoch of an ISO 8601 time (UTC unless it says otherwise), not in
    the future."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--as-of {text!r} is not a time (ISO 8601 UTC, e.g. "
                         "2026-12-01T08:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp()
    if seconds > (time.time() if now is None else now):
        raise UsageError(f"--as-of {text} is in the future")
    return seconds


# ... of which these do not read it at all.
NO_REPOSITORY = frozenset({"volumes", "config check", "unmap", "unmount"})


def check_command(path: str, config: Config) -> None:
    """Refuse a command that writes the repository (exit 2), and a time at which the
    repository did not exist yet, before the command starts (even one that reads only the
    catalog)."""
    refuse_writer(path)
    if path not in NO_REPOSITORY:
        open_backend(config.repository, s3=config.s3).close()


def refuse_writer(path: str) -> None:
    if path not in READING_COMMANDS:
        raise UsageError(f"--as-of opens the repository read-only: '{path}' writes it; "
                         "only list, show, restore, verify, map, mount, copy (from it) and "
                         "catalog rebuild (into a new catalog) run")


def check_new_catalog(config: Config) -> None:
    """`catalog rebuild` under --as-of fills a new catalog: the present one stays as it is."""
    if config.catalog.exists() and config.catalog.stat().st_size:
        raise UsageError(f"--as-of: catalog rebuild writes a new catalog, and "
                         f"{config.catalog} exists; point catalog: (or LVBACKUP_CATALOG) at a "
                         "new file")
