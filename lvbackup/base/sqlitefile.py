"""What the catalog and the index cache share about their SQLite files: why one cannot
be opened, said in terms a user can act on.

Both run in WAL mode, which maps a `-shm` file shared between processes. A filesystem
without shared writable mmap (9p mounted with cache=none, some NFS setups) fails every
access with SQLite's generic "disk I/O error", which deleting the file does not cure. There
is no safe fallback for the catalog (a rollback journal on such a filesystem relies on
network locks that may not hold) and the cache lives in the same place by default, so
both refuse with the setting to change.
"""

from __future__ import annotations

import errno
import mmap
import os
import sqlite3
import tempfile
from pathlib import Path

from .errors import LvbackupError, UsageError

# A filesystem that takes no more: full, over quota, or mounted read-only.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_SQLITE_NO_ROOM = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR_WRITE", "SQLITE_IOERR_SHMSIZE")


def no_room(e: BaseException, what: str) -> LvbackupError | None:
    """The one-line error for `what` (e.g. "gc") stopped by a full, over-quota or
    read-only filesystem (an OSError, or SQLite saying so); None for any other error."""
    if isinstance(e, OSError) and e.errno in _NO_ROOM:
        where = f" ({e.filename})" if e.filename else ""
        return LvbackupError(f"{what} failed: {e.strerror}{where}; free space (delete "
                             "backups, then 'lvbackup gc') or make the filesystem writable, "
                             "and run it again")
    if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorname", "") in _SQLITE_NO_ROOM:
        return LvbackupError(f"{what} failed: {e}; free space or make the filesystem "
                             "writable, and run it again")
    return None


def filesystem_full_hint(path: Path) -> str:
    """' (its filesystem is full)' when it is, for messages about failed writes."""
    try:
        st = os.statvfs(Path(path).parent)
    except OSError:
        return ""
    return " (its filesystem is full)" if st.f_bavail == 0 else ""


def shared_mmap_works(directory: Path) -> bool:
    """Whether files in `directory` can be mapped shared and writable, as WAL needs."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".lvbackup-mmap-probe-")
    except OSError:
        return True  # cannot tell; the caller reports the original error
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(name)


def open_error(e: sqlite3.DatabaseError, path: Path, what: str, setting: str,
               advice: str) -> LvbackupError:
    """The error to raise when opening the SQLite file `path` (the `what`, configured by
    `setting`) failed with `e`; `advice` ends the message of other failures."""
    if (getattr(e, "sqlite_errorname", "").startswith("SQLITE_IOERR")
            and not shared_mmap_works(path.parent)):
        return UsageError(
            f"cannot open {what} {path}: its filesystem does not support the shared memory "
            f"mapping SQLite needs (9p, some NFS mounts); set {setting} to a local filesystem")
    return LvbackupError(f"cannot open {what} {path}: {e}{filesystem_full_hint(path)}{advice}")
