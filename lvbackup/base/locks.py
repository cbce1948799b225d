"""Kernel file locks (flock): they vanish with the process, so no stale lock ever blocks cron.

- the repository lock: shared by every run that writes, exclusive for gc and catalog rebuild;
- a volume lock: one backup of a volume at a time;
- a run lock: held by the process working on one backup (or one gc), so that a later run
  can tell a dead run's leftovers (a `creating` row, packs not yet indexed) from a live one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from .errors import LockedError, UsageError
from .permissions import FILE_MODE, make_private_dirs


class FileLock:
    def __init__(self, path: Path, what: str, shared: bool = False):
        self.path = Path(path)
        self.what = what
        self.shared = shared
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0) -> FileLock:
        """Take the lock, waiting up to `wait` seconds; raise LockedError (exit 75) if held."""
        try:
            fd = self._open()
        except OSError as e:
            raise UsageError(f"cannot create the lock file {self.path}: {e.strerror}; "
                             "set cache_dir in the configuration") from None
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pids = holders(fd)
                    os.close(fd)
                    who = (f" (pid {pids[0]})" if len(pids) == 1 else
                           f" (pids {', '.join(map(str, pids))})" if pids else "")
                    raise LockedError(f"{self.what} is locked by another lvbackup run{who}; "
                                      "retry later or pass --wait SECONDS") from None
                time.sleep(0.1)
        if not self.shared:
            # Only a hint for holders() (the kernel's word comes first): a full or
            # read-only filesystem must not stop the run.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _open(self) -> int:
        make_private_dirs(self.path.parent)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as e:
            # flock needs no write access: an existing lock file on a filesystem mounted
            # read-only still locks (reading commands go on; writes fail on their own).
            if e.errno != errno.EROFS or not self.path.is_file():
                raise
            return os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)

    def release(self) -> None:
        if self._fd is not None:
            if not self.shared:
                # A later run must not name this process as the holder.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holders(fd: int) -> list[int]:
    """The pids of the processes that hold a lock on the file open at `fd`, sorted.

    The kernel's word (/proc/locks), so a shared lock's holders are named too, and a dead
    process never is; each candidate is confirmed through /proc/PID/fd, since /proc/locks
    shows the superblock's device, which stat() does not always report (btrfs, overlayfs).
    Without /proc/locks: the pid an exclusive holder wrote into the file, if it is alive.
    """
    st = os.fstat(fd)
    me = os.getpid()
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = None
    if lines is not None:
        found = set()
        for line in lines:
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (waiters: "1: -> FLOCK ...")
            if len(parts) < 6 or parts[1] != "FLOCK":
                continue
            try:
                pid, ino = int(parts[4]), int(parts[5].rsplit(":", 1)[1])
            except (ValueError, IndexError):
                continue
            if pid > 0 and pid != me and ino == st.st_ino and has_open(pid, st):
                found.add(pid)
        if found:
            return sorted(found)
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    if text.isdigit() and int(text) != me and pid_alive(int(text)):
        return [int(text)]
    return []


def has_open(pid: int, st: os.stat_result) -> bool:
    """Whether `pid` has the file `st` open (True when /proc does not let us look)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    except OSError:
        return True
    for n in names:
        try:
            other = os.stat(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def repository_lock(lock_dir: Path, exclusive: bool) -> FileLock:
    return FileLock(lock_dir / "repository.lock", "the repository", shared=not exclusive)


def volume_lock(lock_dir: Path, volume_id: str, volume_name: str) -> FileLock:
    return FileLock(lock_dir / f"volume-{volume_id}.lock", f"volume {volume_name}")


class RunLock(FileLock):
    """Held for the life of one run; its file is removed when the run ends cleanly."""

    def __init__(self, lock_dir: Path, run_id: str, what: str | None = None):
        super().__init__(lock_dir / f"run-{run_id}.lock", what or f"backup {run_id}")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):   # gone, or a read-only filesystem
                self.path.unlink()
        super().release()


def hold_backup(lock_dir: Path, backup_id: str, activity: str | None, wait: float) -> RunLock:
    """The run lock of a backup, taken within `wait` seconds; else LockedError (exit 75)
    saying it is busy with `activity` (what its status says a live run is doing)."""
    what = f"backup {backup_id}" + (f" (busy: {activity})" if activity else "")
    lock = RunLock(lock_dir, backup_id, what)
    lock.acquire(wait)
    return lock


def is_held(path: Path) -> bool:
    """True while some process holds a lock on the file at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def run_is_alive(lock_dir: Path, run_id: str) -> bool:
    """True while some process holds the run lock of `run_id`."""
    path = lock_dir / f"run-{run_id}.lock"
    if is_held(path):
        return True
    path.unlink(missing_ok=True)
    return False
