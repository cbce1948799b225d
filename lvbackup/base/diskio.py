"""Direct I/O: writing big, page-aligned buffers past the page cache, with a buffered fallback.

Writing a new file through the page cache costs about a CPU-second per GiB on the machines
we measured (copies, then writeback), more than compressing it; O_DIRECT writes cost almost
nothing and leave the cache to the workload the machine is for. O_DIRECT wants the buffer
address, the file offset and the length aligned to the device's logical block size: the
buffers here are anonymous mmaps (page-aligned) and offsets are multiples of the block size.
Where a filesystem refuses O_DIRECT (tmpfs before Linux 6.6, some FUSE and network
filesystems), or one write is not aligned, the file falls back to ordinary buffered writes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import uuid
from pathlib import Path
from types import TracebackType

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)


def aligned_buffer(size: int) -> mmap.mmap:
    """A zero-filled, page-aligned, writable buffer of `size` bytes."""
    return mmap.mmap(-1, size)


def open_file(path: str | os.PathLike, flags: int, mode: int = 0o600,
              direct: bool = False) -> int:
    """os.open(path, flags, mode), close-on-exec; with `direct`, O_DIRECT is switched on
    where the filesystem takes it and silently left off where it does not.

    This is the one place that opens files to create them exclusively or to write them
    directly. O_DIRECT is set after the open, never passed to it: a filesystem that refuses
    it (tmpfs before Linux 6.6, some FUSE and network filesystems) may do so only after
    O_CREAT made the file, leaving a stray file behind that a retry with O_EXCL then
    fails on (EEXIST)."""
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    if direct and O_DIRECT:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                os.close(fd)
                raise
    return fd


def _drop_direct(fd: int) -> bool:
    """Turn O_DIRECT off on `fd`; whether it was on."""
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not O_DIRECT or not fl & O_DIRECT:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~O_DIRECT)
    return True


def pwrite_all(fd: int, data: memoryview, pos: int, padded: memoryview | None = None) -> None:
    """Write all of `data` at `pos`. `padded`, if given, is `data` followed by bytes up to
    the next ALIGN multiple; an O_DIRECT file writes that instead (the caller truncates
    the file to its real size afterwards)."""
    out = padded if padded is not None and len(data) % ALIGN else data
    done = 0
    while done < len(out):
        try:
            done += os.pwrite(fd, out[done:], pos + done)
        except OSError as e:
            if e.errno != errno.EINVAL or not _drop_direct(fd):
                raise
            out = data  # unaligned for this filesystem: the rest goes through the cache


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_LOW_BIT = bytes(i & 1 for i in range(256))


class PageCacheView:
    """Which pages of an open file are in the page cache now: mincore over one read-only
    mapping of the whole file, made once (mapping per call cost as much as the question).
    mincore asks without reading anything, where a read with RWF_NOWAIT may itself start
    the I/O it then reports as cached. Where the file cannot be mapped, nothing is known."""

    def __init__(self, fd: int, size: int):
        self.size = size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) if size else None
        self._addr = None if addr in (None, _MAP_FAILED) else addr

    def resident(self, offset: int, length: int) -> bytes | None:
        """Per page of [offset, offset + length) (offset page-aligned), 1 if cached; None
        where that cannot be told."""
        if self._addr is None or length <= 0 or offset % mmap.PAGESIZE \
                or offset + length > self.size:
            return None
        vec = ctypes.create_string_buffer(-(-length // mmap.PAGESIZE))
        if _libc.mincore(self._addr + offset, length, vec) != 0:
            return None
        return vec.raw.translate(_LOW_BIT)

    def close(self) -> None:
        if self._addr is not None:
            _libc.munmap(self._addr, self.size)
            self._addr = None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A new file that appears at `path` whole or not at all, the one way lvbackup makes
    one: written under a temporary name (in `tmp_dir`, else beside `path`), fsynced, then
    renamed over `path` or, with `replace=False`, linked to it (which refuses an existing
    `path` with FileExistsError: write-once), and the directory fsynced. As a context
    manager it commits on success and discards the temporary file on an exception."""

    def __init__(self, path: str | os.PathLike[str], *, mode: int = 0o600, direct: bool = False,
                 replace: bool = True, tmp_dir: str | os.PathLike[str] | None = None):
        self.path = Path(path)
        self.replace = replace
        where = Path(tmp_dir) if tmp_dir is not None else self.path.parent
        self.tmp = where / f"{self.path.name}.lvbackup-{uuid.uuid4().hex[:8]}.tmp"
        self.fd = open_file(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode,
                            direct=direct)
        self._open = True

    def _close(self) -> None:
        if self._open:
            self._open = False
            os.close(self.fd)

    def commit(self, fsync: bool = True) -> None:
        try:
            if fsync:
                os.fsync(self.fd)
            self._close()
            if self.replace:
                os.replace(self.tmp, self.path)
            else:
                os.link(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        if not self.replace:
            self.tmp.unlink(missing_ok=True)
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()
