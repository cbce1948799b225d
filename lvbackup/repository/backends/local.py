"""A backend in a local directory (also 9p, NFS: any filesystem with fsync and hard links).

A put writes a temporary file in `<root>/tmp/`, fsyncs it, then publishes it with link():
link fails if the name exists, so publishing is atomic and write-once at once (rename
would replace). The directory is fsynced after, and the temporary name removed. Page-aligned
data (the packer's buffers) is written with O_DIRECT, past the page cache (see diskio.py).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ...base.diskio import ALIGN, AtomicFile, aligned_buffer, fsync_dir, pwrite_all
from ...base.errors import UsageError
from ...base.lru import LRU
from ...base.permissions import DIR_MODE, FILE_MODE, make_private_dirs, refuse_writable_tree
from .base import (
    Backend,
    Capabilities,
    Data,
    MissingObject,
    ObjectExists,
    check_name,
    check_prefix,
    check_span,
    missing,
    short_read,
)

_INCOMPLETE = "tmp"   # the backend's own area: never an object name


def _page_aligned(view: memoryview) -> bool:
    # ctypes needs a writable buffer to tell its address: read-only data (bytes) is
    # written buffered, as is anything not starting on a page.
    if view.readonly or not len(view):
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0


def _write(fd: int, view: memoryview, direct: bool) -> None:
    """All of `view` at offset 0; with `direct`, the last partial page goes out padded
    from a scratch page (O_DIRECT writes whole pages) and the file is cut back after."""
    whole = len(view) // ALIGN * ALIGN if direct else len(view)
    pwrite_all(fd, view[:whole], 0)
    tail = len(view) - whole
    if tail:
        scratch = memoryview(aligned_buffer(ALIGN))
        scratch[:tail] = view[whole:]
        pwrite_all(fd, scratch[:tail], whole, scratch)
        os.ftruncate(fd, len(view))


def _check_read(fd: int, name: str, offset: int, length: int, got: int) -> None:
    # An empty read past the end reads nothing, like one at the end: only the size tells.
    if got != length or (not length and offset > os.fstat(fd).st_size):
        raise short_read(name, offset, length, os.fstat(fd).st_size)


class LocalBackend(Backend):
    capabilities = Capabilities(local_files=True, conditional_put=True, ranged_get=True)

    _MAX_OPEN = 64

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._fds: LRU[str, int] = LRU(self._MAX_OPEN, lambda _, fd: os.close(fd))
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: Path, create: bool) -> LocalBackend:
        if create:
            try:
                make_private_dirs(root)
                probe = root / f".probe-{uuid.uuid4().hex}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise UsageError(f"repository {root} is not writable: {e.strerror}; "
                                 "check the path and its permissions") from None
        # The root and its subdirectories (packs/<xx>/ is the deepest).
        refuse_writable_tree(root, "repository directory", depth=2)
        return cls(root)

    def _path(self, name: str) -> Path:
        if check_name(name).split("/", 1)[0] == _INCOMPLETE:
            raise ValueError(f"bad object name {name!r}: {_INCOMPLETE}/ is the backend's own")
        return self.root / name

    def put(self, name: str, data: Data) -> None:
        final = self._path(name)
        view = memoryview(data).cast("B")
        direct = _page_aligned(view)
        tmp_dir = self.root / _INCOMPLETE
        tmp_dir.mkdir(DIR_MODE, exist_ok=True)
        f = AtomicFile(final, mode=FILE_MODE, direct=direct, replace=False, tmp_dir=tmp_dir)
        try:
            _write(f.fd, view, direct)
            # token() reads the mtime: a fine-grained one tells apart an object deleted
            # and put again, where the filesystem's own clock ticks only every few ms.
            now = time.time_ns()
            os.utime(f.fd, ns=(now, now))
            os.fsync(f.fd)
            if not final.parent.is_dir():
                make_private_dirs(final.parent)
                fsync_dir(final.parent.parent)
            f.commit(fsync=False)
        except FileExistsError:
            raise ObjectExists(f"repository object {name} exists already") from None
        except BaseException:
            f.discard()
            raise

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                return fd
            try:
                fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise missing(name) from None
            self._fds.put(name, fd)
            return fd

    def _stat(self, name: str) -> os.stat_result:
        try:
            return self._path(name).stat()
        except FileNotFoundError:
            raise missing(name) from None

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise missing(name) from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        check_span(name, offset, length)
        fd = self._fd(name)
        data = os.pread(fd, length, offset)
        _check_read(fd, name, offset, length, len(data))
        return data

    def get_range_into(self, name: str, offset: int, outs: list[memoryview]) -> None:
        want = sum(len(o) for o in outs)
        check_span(name, offset, want)
        fd = self._fd(name)
        _check_read(fd, name, offset, want, os.preadv(fd, outs, offset) if want else 0)

    def size(self, name: str) -> int:
        return self._stat(name).st_size

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def token(self, name: str) -> str:
        st = self._stat(name)
        return f"{st.st_size}:{st.st_mtime_ns}"

    def modified(self, name: str) -> float:
        return self._stat(name).st_mtime

    def list(self, prefix: str) -> Iterator[tuple[str, str]]:
        base = self.root / check_prefix(prefix)
        if not base.is_dir():
            return
        for dirpath, dirs, files in os.walk(base):
            if Path(dirpath) == self.root:
                dirs[:] = [d for d in dirs if d != _INCOMPLETE]
            for fname in files:
                name = Path(dirpath, fname).relative_to(self.root).as_posix()
                try:
                    yield name, self.token(name)
                except MissingObject:
                    continue   # deleted since the walk saw it

    def delete(self, name: str) -> None:
        path = self._path(name)
        with self._lock:
            fd = self._fds.pop(name)
            if fd is not None:
                os.close(fd)
        path.unlink(missing_ok=True)

    def remove_incomplete(self, older_than: float) -> int:
        tmp_dir = self.root / _INCOMPLETE
        if not tmp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than
        removed = 0
        for f in tmp_dir.iterdir():
            try:
                if f.stat().st_mtime <= cutoff:
                    f.unlink()
                    removed += 1
            except FileNotFoundError:
                continue   # a put finished with it meanwhile
        return removed

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.clear():
                os.close(fd)
