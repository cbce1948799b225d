"""Who may read and write what lvbackup keeps.

Everything lvbackup creates is its owner's alone: directories 0700, files 0600 (the
repository, catalog, index cache, locks, event log, key files and exports). The one
exception is a metrics file, 0644, which node_exporter (another user) must read. A
catalog, configuration or repository that another user can write could be made to say
anything (a hook to run as root, a manifest to restore), so one is refused, with the path
and the fix. A directory with the sticky bit (/tmp) is not refused: others may create files
in it but not replace or remove this user's.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import UsageError

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private_dirs(path: Path) -> None:
    """mkdir -p, each directory it creates 0700 (existing ones are left as they are)."""
    missing = []
    p = Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):   # made meanwhile by a concurrent run
            os.mkdir(d, DIR_MODE)


def refuse_writable_by_others(path: Path, what: str) -> None:
    """UsageError if `path` (a file or directory that exists) can be written by its group
    or by anyone, unless it is a sticky directory."""
    try:
        st = os.stat(path)
    except OSError:
        return   # absent: whoever creates it next creates it private
    if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        raise UsageError(f"{what} {path} can be written by other users "
                         f"(mode {stat.filemode(st.st_mode)}); fix: chmod go-w {path}")


def refuse_writable_tree(root: Path, what: str, depth: int) -> None:
    """refuse_writable_by_others for `root` and the directories `depth` levels below it (a
    repository's packs/, manifests/, keys/, ... and packs/<xx>/: whoever can write one can
    plant or replace objects in it as well as in the root)."""
    refuse_writable_by_others(root, what)
    if depth == 0:
        return
    try:
        with os.scandir(root) as entries:
            subdirs = [Path(e.path) for e in entries if e.is_dir()]
    except OSError:
        return   # absent or unreadable: reading it fails louder
    for d in subdirs:
        refuse_writable_tree(d, what, depth - 1)


def create_private_file(path: Path) -> None:
    """Create `path` empty and 0600 if it does not exist (before SQLite opens it: SQLite
    gives its -wal and -shm files the database file's mode). Never through a link."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, FILE_MODE))
