"""Freezing filesystems for one instant (FIFREEZE, as `fsfreeze -f`), never left frozen.

The freeze is held by a watchdog process (`python -m lvbackup.volumes.freeze`), not by lvbackup:
lvbackup starts it in a session of its own and talks to it through a pipe. The watchdog
freezes the filesystems, then holds the I/O of the members' devices (lvm.hold_io: what lets
lvcreate snapshot a frozen filesystem), says `frozen`, and resumes and thaws everything
when the first of these happens:
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
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .. import lvm
from ..base import proc
from ..base.errors import LvbackupError
from ..base.locks import pid_alive

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


class Freeze:
    """A freeze held by the watchdog, as lvbackup sees it (`frozen`)."""

    def __init__(self, guard, what: dict, timeout: float):
        self.guard, self.what, self.timeout = guard, what, timeout

    def _ask(self, *command: str) -> str:
        """Send `command` (a JSON line); the watchdog's answer, "" if it is gone."""
        try:
            self.guard.stdin.write(json.dumps(command).encode() + b"\n")
            self.guard.stdin.flush()
            return self.guard.stdout.readline().decode(errors="replace").strip()
        except OSError:
            return ""

    @contextmanager
    def opened(self, mountpoints: Sequence[str]) -> Iterator[None]:
        """Thaw `mountpoints` for the block, freeze them again after it: a thin volume's
        snapshot, which lvcreate can take only of a running volume (it freezes the
        filesystem itself meanwhile), while every other member stays frozen."""
        for mountpoint in mountpoints:
            self._check(self._ask("open", mountpoint))
        yield
        for mountpoint in mountpoints:
            self._check(self._ask("close", mountpoint))

    def _check(self, answer: str) -> None:
        if answer == "timeout":
            raise self.timed_out()
        if answer != "ok":
            raise LvbackupError(f"the freeze watchdog failed: {answer or 'it died'}")

    def timed_out(self) -> LvbackupError:
        names = ", ".join(self.what["mounts"] or self.what["devices"])
        return LvbackupError(f"the freeze of {names} outlasted freeze_timeout "
                             f"({self.timeout:g} s) and was ended: the snapshots are not from "
                             "one instant; run it again (or raise freeze_timeout)")

    def end(self) -> str:
        """Ask the watchdog to thaw; its answer (`thawed`, `timeout`), or, if it is gone,
        thaw here."""
        answer = self._ask("thaw")
        with contextlib.suppress(OSError):
            self.guard.stdin.close()
        if answer not in ("thawed", "timeout"):
            _release(self.what)   # the watchdog died: whatever it froze, thaw it
        with contextlib.suppress(Exception):
            self.guard.wait(proc.KILL_WAIT)
        return answer


@contextmanager
def frozen(mountpoints: Sequence[str], devices: Sequence[str], vgs: Sequence[str],
           timeout: float, lock_dir: Path, run_id: str) -> Iterator[Freeze]:
    """Hold `mountpoints` frozen and the I/O of `devices` (device-mapper names, of volumes
    in `vgs`) suspended for the block. LvbackupError if one cannot be, or if the block
    outlasted `timeout` (the watchdog ended the freeze then: what the block made is not
    from one instant)."""
    what = {"mounts": list(mountpoints), "devices": list(devices), "vgs": list(vgs)}
    record = lock_dir / FREEZE_RECORD_GLOB.replace("*", run_id)
    guard = proc.spawn([sys.executable, "-m", "lvbackup.volumes.freeze", str(timeout), str(record),
                        json.dumps(what)])
    assert guard.stdin is not None and guard.stdout is not None
    held = Freeze(guard, what, timeout)
    try:
        said = guard.stdout.readline().decode(errors="replace").strip()
        if said != "frozen":
            names = ", ".join(what["mounts"] or what["devices"])
            raise LvbackupError(f"cannot freeze {names}: "
                                f"{said.removeprefix('error ') or 'the freeze watchdog died'}")
        yield held
    except BaseException:
        held.end()
        raise
    if held.end() == "timeout":
        raise held.timed_out()


def thaw_leftovers(lock_dir: Path) -> list[str]:
    """Thaw what a dead watchdog's record lists (it and its lvbackup were both killed);
    the mount points thawed."""
    thawed: list[str] = []
    for path in sorted(lock_dir.glob(FREEZE_RECORD_GLOB)):
        try:
            record = json.loads(path.read_text())
            if pid_alive(int(record["pid"])):
                continue
            what = {key: [str(x) for x in record[key]] for key in ("mounts", "vgs")}
        except (OSError, ValueError, KeyError, TypeError):
            what = {"mounts": [], "vgs": []}
        thawed += _release(what)
        with contextlib.suppress(OSError):
            path.unlink()
    return thawed


def _release(what: dict) -> list[str]:
    """Resume the devices and thaw the filesystems of `what`, each as far as it goes; the
    mount points that were frozen."""
    for vg in what["vgs"]:
        with contextlib.suppress(LvbackupError):   # gone
            lvm.release_io(vg)
    thawed = []
    for mountpoint in what["mounts"]:
        with contextlib.suppress(OSError):
            if thaw(mountpoint):
                thawed.append(mountpoint)
    return thawed


def _watch(timeout: float, record: Path, what: dict) -> int:
    """The watchdog: freeze, hold the I/O, say so, then answer `open`/`close` (of one mount
    point) until `thaw`; release everything on `thaw`, the end of its input (lvbackup
    died), the timeout or a signal, whichever comes first."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    # Written before anything is frozen: the lock directory may be on one of them.
    record.write_text(json.dumps({"pid": os.getpid(), **what}))
    done: dict = {"mounts": [], "vgs": what["vgs"]}
    try:
        try:
            for mountpoint in what["mounts"]:
                done["mounts"].append(mountpoint)
                freeze(mountpoint)
            for device in what["devices"]:
                lvm.hold_io(device)
        except (OSError, LvbackupError) as e:
            _say(f"error {getattr(e, 'strerror', None) or e}")
            return 1
        _say("frozen")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = left > 0 and select.select([sys.stdin.buffer], [], [], left)[0]
            if not ready:
                _release(done)
                _answer_until_thaw("timeout")
                return 0
            command = _command()
            if command[0] == "thaw":
                _release(done)
                _say("thawed")
                return 0
            try:
                (freeze if command[0] == "close" else thaw)(command[1])
                _say("ok")
            except OSError as e:
                _say(f"error {command[1]}: {e.strerror}")
    finally:
        _release(done)
        with contextlib.suppress(OSError):
            record.unlink()


def _command() -> list[str]:
    """lvbackup's next command; `thaw` if it is gone."""
    line = sys.stdin.buffer.readline()
    try:
        command = json.loads(line) if line else ["thaw"]
    except ValueError:
        command = ["thaw"]
    return command if isinstance(command, list) and command else ["thaw"]


def _answer_until_thaw(answer: str) -> None:
    while _command()[0] != "thaw":
        _say(answer)
    _say(answer)


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(_watch(float(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])))
