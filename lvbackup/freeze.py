"""Freezing filesystems for one instant (FIFREEZE, as `fsfreeze -f`), never left frozen.

The freeze is held by a watchdog process (`python -m lvbackup.freeze`), not by lvbackup:
lvbackup starts it in a session of its own and talks to it through a pipe. The watchdog
freezes the filesystems, says `frozen`, and thaws them when the first of these happens:
lvbackup asks (`thaw`), lvbackup dies (the pipe ends: an exception, SIGTERM, SIGKILL, the
OOM killer), `freeze_timeout` passes (a hung lvcreate), or the watchdog gets SIGTERM,
SIGINT or SIGHUP. If the watchdog itself dies, lvbackup thaws them; if both die by SIGKILL,
the record the watchdog wrote before freezing (FREEZE_RECORD_GLOB in the lock directory)
makes the next run thaw them (`thaw_leftovers`). docs/reliability.md has the guarantee.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import proc
from .errors import LvbackupError
from .locks import pid_alive

FIFREEZE = 0xC0045877   # _IOWR('X', 119, int)
FITHAW = 0xC0045878     # _IOWR('X', 120, int)
FREEZE_RECORD_GLOB = "freeze-*.json"


def freeze(mountpoint: str) -> None:
    _ioctl(mountpoint, FIFREEZE)


def thaw(mountpoint: str) -> bool:
    """Thaw `mountpoint`; False if it was not frozen (or is gone)."""
    try:
        _ioctl(mountpoint, FITHAW)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    return True


def _ioctl(mountpoint: str, request: int) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


@contextmanager
def frozen(mountpoints: Sequence[str], timeout: float, lock_dir: Path,
           run_id: str) -> Iterator[None]:
    """Hold `mountpoints` frozen for the block (nothing to do for none). LvbackupError if
    one cannot be frozen, or if the freeze outlasted `timeout` (the watchdog thawed them
    then: what the block made is not from one instant)."""
    if not mountpoints:
        yield
        return
    record = lock_dir / FREEZE_RECORD_GLOB.replace("*", run_id)
    guard = proc.spawn([sys.executable, "-m", "lvbackup.freeze", str(timeout), str(record),
                        *mountpoints])
    assert guard.stdin is not None and guard.stdout is not None
    try:
        said = guard.stdout.readline().decode(errors="replace").strip()
        if said != "frozen":
            raise LvbackupError(f"cannot freeze {', '.join(mountpoints)}: "
                                f"{said.removeprefix('error ') or 'the freeze watchdog died'}")
        yield
    except BaseException:
        _end(guard, mountpoints)
        raise
    if _end(guard, mountpoints) == "timeout":
        raise LvbackupError(f"the freeze of {', '.join(mountpoints)} outlasted freeze_timeout "
                            f"({timeout:g} s) and was ended: the snapshots are not from one "
                            "instant; run it again (or raise freeze_timeout)")


def _end(guard, mountpoints: Sequence[str]) -> str:
    """Ask the watchdog to thaw; its answer (`thawed`, `timeout`), or, if it is gone, thaw
    here."""
    answer = ""
    with contextlib.suppress(OSError):
        guard.stdin.write(b"thaw\n")
        guard.stdin.flush()
        answer = guard.stdout.readline().decode(errors="replace").strip()
    with contextlib.suppress(OSError):
        guard.stdin.close()
    if answer not in ("thawed", "timeout"):
        for mountpoint in mountpoints:   # the watchdog died: whatever it froze, thaw it
            with contextlib.suppress(OSError):
                thaw(mountpoint)
    with contextlib.suppress(Exception):
        guard.wait(proc.KILL_WAIT)
    return answer


def thaw_leftovers(lock_dir: Path) -> list[str]:
    """Thaw what a dead watchdog's record lists (it and its lvbackup were both killed);
    the mount points thawed."""
    thawed: list[str] = []
    for path in sorted(lock_dir.glob(FREEZE_RECORD_GLOB)):
        try:
            record = json.loads(path.read_text())
            if pid_alive(int(record["pid"])):
                continue
            mounts = [str(m) for m in record["mounts"]]
        except (OSError, ValueError, KeyError, TypeError):
            mounts = []
        for mountpoint in mounts:
            with contextlib.suppress(OSError):
                if thaw(mountpoint):
                    thawed.append(mountpoint)
        with contextlib.suppress(OSError):
            path.unlink()
    return thawed


def _watch(timeout: float, record: Path, mountpoints: list[str]) -> int:
    """The watchdog: freeze, say so, thaw on the first of: `thaw`, the end of its input,
    the timeout, a signal."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    # Written before anything is frozen: the lock directory may be on one of them.
    record.write_text(json.dumps({"pid": os.getpid(), "mounts": mountpoints}))
    done: list[str] = []
    try:
        try:
            for mountpoint in mountpoints:
                freeze(mountpoint)
                done.append(mountpoint)
        except OSError as e:
            _say(f"error {mountpoint}: {e.strerror}")
            return 1
        _say("frozen")
        ready, _, _ = select.select([sys.stdin.buffer], [], [], timeout)
        _thaw_all(done)
        if ready:
            sys.stdin.buffer.readline()
            _say("thawed")
        else:
            sys.stdin.buffer.readline()   # lvbackup's `thaw`, or its death
            _say("timeout")
        return 0
    finally:
        _thaw_all(done)
        with contextlib.suppress(OSError):
            record.unlink()


def _thaw_all(mountpoints: list[str]) -> None:
    while mountpoints:
        with contextlib.suppress(OSError):
            thaw(mountpoints[-1])
        mountpoints.pop()


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(_watch(float(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
