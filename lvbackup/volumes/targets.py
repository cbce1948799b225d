"""Where a restore writes: a new file (written beside it, renamed when whole), standard
output, a block device, or an LVM volume (existing or new). The counterpart of sources.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .. import lvm
from ..base.diskio import AtomicFile, open_file
from ..base.errors import UsageError
from ..datapath.blockmap import source_size


@dataclass
class Target:
    fd: int
    name: str
    fresh: bool      # already zero-filled: holes may be skipped
    seekable: bool
    atomic: AtomicFile | None = None   # a new file: it appears under `name` only when whole
    created: bool = False              # nothing was at `name` before

    def publish(self) -> None:
        """The restore is complete: a new file takes its name (the image was fsynced)."""
        if self.atomic is not None:
            self.atomic.commit(fsync=False)

    def close(self) -> None:
        """Release the target; a new file that was not published is removed."""
        if self.atomic is not None:
            self.atomic.discard()
        elif self.fd != 1:
            os.close(self.fd)


def open_target(to: str | None, to_file: str | None, size: int, force: bool) -> Target:
    if to_file == "-":
        _grow_pipe(1)
        return Target(1, "standard output", fresh=False, seekable=False)
    path = to if to is not None else to_file
    assert path is not None
    try:
        # --to follows links (/dev/VG/LV is one); --to-file never writes through one.
        st = os.stat(path) if to is not None else os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UsageError(f"cannot access {path}: {e.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a directory; give a file or device path")
    if to_file is not None and st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise UsageError(f"restore target {path} is {kind}; --to-file writes only a new or "
                         "regular file (never through a link, never over a device node): "
                         "give another path, or restore onto a device with --to")
    if to is not None and st is None:
        raise UsageError(f"restore target {path} does not exist; use --to-file to create a file")
    if st is not None and stat.S_ISREG(st.st_mode):
        _refuse_clobbering(path, replacing=to_file is not None, force=force)
    existing = to is not None
    # Not a character device or a FIFO: those take no O_DIRECT.
    direct = st is None or stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
    try:
        if not existing:
            # Written beside the destination and renamed at the end: a failed restore
            # leaves whatever was at PATH untouched, never a half-written image under its name.
            # Without --force, linked (not renamed) into place: a file that appeared
            # meanwhile is never replaced.
            atomic = AtomicFile(path, direct=direct, replace=force)
            if st is not None:  # --force over a file: it keeps its mode and owner
                _take_mode_and_owner(atomic, st)
            return Target(atomic.fd, path, fresh=True, seekable=True, atomic=atomic,
                          created=st is None)
        flags = os.O_WRONLY
        if st is not None and stat.S_ISBLK(st.st_mode) and not force:
            flags |= os.O_EXCL  # EBUSY if mounted or held open exclusively
        fd = open_file(path, flags, 0o600, direct=direct)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UsageError(f"restore target {path} is in use; "
                             "unmount it or pass --force") from None
        raise UsageError(f"cannot open restore target {path}: {e.strerror}") from None
    have = source_size(fd)
    if have < size:
        os.close(fd)
        raise UsageError(f"volume size {have} is too small to restore backup of size {size}.")
    return Target(fd, path, fresh=False, seekable=True)


def _take_mode_and_owner(atomic: AtomicFile, st: os.stat_result) -> None:
    try:
        os.fchown(atomic.fd, st.st_uid, st.st_gid)
        os.fchmod(atomic.fd, stat.S_IMODE(st.st_mode))
    except OSError:
        atomic.discard()
        raise


def _refuse_clobbering(path: str, replacing: bool, force: bool) -> None:
    """An existing image file: --to-file replaces it only with --force, and neither --to-file
    nor --to writes to one that backs a loop device in use (mounted, held, or opened
    exclusively), which would corrupt a live filesystem."""
    for loop in loop_devices_of(path):
        if loop_in_use(loop):
            raise UsageError(f"restore target {path} is attached to {loop}, which is in use "
                             f"(mounted or open); unmount it and detach it (losetup -d "
                             f"{loop}) first")
    if replacing and not force:
        raise UsageError(f"restore target {path} exists; pass --force to replace it, or "
                         "give a new path")


def loop_devices_of(path: str, sys_block: Path = Path("/sys/block")) -> list[str]:
    """The loop devices (/dev/loopN) whose backing file is `path`."""
    real = os.path.realpath(path)
    found = []
    for backing in sorted(sys_block.glob("loop*/loop/backing_file")):
        try:
            name = backing.read_text().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue
        if name == real:
            found.append(f"/dev/{backing.parent.parent.name}")
    return sorted(found, key=lambda d: (len(d), d))


def loop_in_use(device: str, sys_block: Path = Path("/sys/block"),
                mounts: Path = Path("/proc/self/mounts")) -> bool:
    """Whether a loop device is mounted, held by another device (device-mapper, LVM, md),
    or open exclusively: opening it with O_EXCL fails with EBUSY in each case. When it
    cannot be opened (not root), the mount table and the holders decide."""
    name = os.path.basename(device)
    try:
        if any((sys_block / name / "holders").iterdir()):
            return True
    except OSError:
        pass
    try:
        if any(line.split(" ", 1)[0] == device for line in mounts.read_text().splitlines()):
            return True
    except OSError:
        pass
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL))
    except OSError as e:
        return e.errno == errno.EBUSY
    return False


def _grow_pipe(fd: int) -> None:
    try:  # a bigger pipe buffer means fewer wake-ups for whoever reads the stream
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    except OSError:
        pass


def is_lv_name(spec: str) -> bool:
    return not spec.startswith(("/", ".")) and spec.count("/") == 1


def lv_target(spec: str, force: bool) -> tuple[str, str]:
    """(device path, LV uuid) of an existing LV to restore onto (refused while open, unless
    forced)."""
    target = lvm.find_lv(spec)
    if target.is_open and not force:
        raise UsageError(f"volume {target.full_name} is in use; close it or pass --force")
    if not target.is_active:
        lvm.activate(target)
    return target.path, target.uuid


def create_volume_target(spec: str, size: int, thin_pool: str | None) -> tuple[str, bool]:
    """Create the LV to restore into; (device path, whether it reads as zeros already)."""
    vg, name = lvm.split_name(spec)
    created = lvm.create_lv(vg, name, size, thin_pool)
    if not created.is_active:
        lvm.activate(created)
    # An unprovisioned thin LV reads as zeros; a new linear LV holds whatever the PV held.
    return created.path, created.is_thin


