"""Where a restore writes: a new file (written beside it, renamed when whole), standard
output, a block device, or an LVM volume (existing or new). The counterpart of sources.py.
"""

from __future__ import annotations

import fcntl
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import lvm
from .datapath.blockmap import source_size
from .diskio import open_file
from .errors import UsageError


@dataclass
class Target:
    fd: int
    name: str
    fresh: bool      # already zero-filled: holes may be skipped
    seekable: bool
    tmp_path: str | None = None   # a new file is written here, renamed to `name` when whole

    def publish(self) -> None:
        if self.tmp_path is not None:
            os.replace(self.tmp_path, self.name)
            self.tmp_path = None

    def discard(self) -> None:
        if self.tmp_path is not None:
            Path(self.tmp_path).unlink(missing_ok=True)


def open_target(to: str | None, to_file: str | None, size: int, force: bool) -> Target:
    if to_file == "-":
        _grow_pipe(1)
        return Target(1, "standard output", fresh=False, seekable=False)
    path = to if to is not None else to_file
    assert path is not None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UsageError(f"cannot access {path}: {e.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a directory; give a file or device path")
    if to is not None and st is None:
        raise UsageError(f"restore target {path} does not exist; use --to-file to create a file")
    existing = to is not None or (st is not None and stat.S_ISBLK(st.st_mode))
    flags = os.O_WRONLY
    tmp_path = None
    if not existing:
        # Write beside the destination and rename at the end: a failed restore leaves
        # whatever was at PATH untouched, never a half-written image under its name.
        flags |= os.O_CREAT | os.O_EXCL
        tmp_path = f"{path}.lvbackup-{uuid.uuid4().hex[:8]}.tmp"
    elif st is not None and stat.S_ISBLK(st.st_mode) and not force:
        flags |= os.O_EXCL  # EBUSY if mounted or held open exclusively
    try:
        # Not a character device or a FIFO: those take no O_DIRECT.
        direct = st is None or stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
        fd = open_file(tmp_path or path, flags, 0o600, direct=direct)
    except OSError as e:
        if e.errno == 16:
            raise UsageError(f"restore target {path} is in use; unmount it or pass --force") from None
        raise UsageError(f"cannot open restore target {path}: {e.strerror}") from None
    if existing:
        have = source_size(fd)
        if have < size:
            os.close(fd)
            raise UsageError(f"volume size {have} is too small to restore backup of size {size}.")
    return Target(fd, path, fresh=not existing, seekable=True, tmp_path=tmp_path)


def _grow_pipe(fd: int) -> None:
    try:  # a bigger pipe buffer means fewer wake-ups for whoever reads the stream
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    except OSError:
        pass


def is_lv_name(spec: str) -> bool:
    return not spec.startswith(("/", ".")) and spec.count("/") == 1


def lv_target(spec: str, force: bool) -> str:
    """The device path of an existing LV to restore onto (refused while open, unless forced)."""
    target = lvm.find_lv(spec)
    if target.is_open and not force:
        raise UsageError(f"volume {target.full_name} is in use; close it or pass --force")
    if not target.is_active:
        lvm.activate(target)
    return target.path


def new_volume(spec: str, size: int, thin_pool: str | None) -> tuple[str, bool]:
    """Create the LV to restore into; (device path, whether it reads as zeros already)."""
    vg, name = lvm.split_name(spec)
    created = lvm.create_lv(vg, name, size, thin_pool)
    if not created.is_active:
        lvm.activate(created)
    # An unprovisioned thin LV reads as zeros; a new linear LV holds whatever the PV held.
    return created.path, created.is_thin


