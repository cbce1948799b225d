"""Room kept for a full disk, as borg's `additional_free_space`: a file of `SIZE` allocated
bytes, `reserve`, in the cache directory (by default the filesystem of the catalog and the
index cache) and in a local repository's directory.

A filesystem filled to the last block (by lvbackup or by anything else) leaves SQLite
unable to open the catalog or the index cache (WAL needs its -shm and -wal files) and gc
unable to write the index it must write before it deletes a pack. The reserve is given
back for exactly that: a command whose catalog or cache fails to open releases it and
tries again, and `delete`, `prune` and `gc` release it before they write; every command
puts it back at its end when there is room again. Commands that store backups (`create`,
`copy`, `run`) never spend it, so they fail on a full disk with the reserve still there
for `delete` and `gc` to use.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .permissions import FILE_MODE

SIZE = 4 * 1024 * 1024
NAME = "reserve"


def places(cache_dir: Path, catalog: Path, repository: Path | str) -> list[Path]:
    """Where the reserves of a configuration are: one per filesystem among the cache
    directory, the catalog's and a local repository's (one named by a URL has none)."""
    dirs = [Path(cache_dir), Path(catalog).parent]
    if isinstance(repository, Path):
        dirs.append(repository)
    found: dict[int, Path] = {}
    for d in dirs:
        with contextlib.suppress(OSError):   # not made yet
            found.setdefault(os.stat(d).st_dev, d / NAME)
    return list(found.values())


def read_only(path: Path) -> bool:
    """Whether `path` is on a filesystem mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def short_of_space(directory: Path) -> bool:
    """Whether the filesystem of `directory` has less room than a reserve."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < SIZE


def fill(paths: list[Path]) -> bool:
    """Make each missing reserve whose directory exists, when its filesystem has the room;
    whether every one is there now. Never fails (a full or read-only filesystem keeps
    what it has)."""
    done = True
    for path in paths:
        if path.exists() or not path.parent.is_dir():
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, FILE_MODE)
        except OSError:
            done = False
            continue
        try:
            os.posix_fallocate(fd, 0, SIZE)
        except OSError:
            done = False
            with contextlib.suppress(OSError):
                path.unlink()   # no room for all of it: none, rather than a false reserve
        finally:
            os.close(fd)
    return done


def release(paths: list[Path]) -> bool:
    """Give the reserves' space back to their filesystems; whether there was any."""
    released = False
    for path in paths:
        with contextlib.suppress(OSError):   # absent, or on a read-only filesystem
            path.unlink()
            released = True
    return released
