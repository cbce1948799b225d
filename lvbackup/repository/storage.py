"""Storage backends: named immutable objects with put / get / ranged get / list / delete.

Everything above this module (packs, index, manifests, gc) uses only this interface, so an
object-storage backend can replace the local directory without touching it. Names are
'/'-separated relative paths such as 'packs/ab/ab12...'.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..diskio import ALIGN, open_file, pwrite_all
from ..errors import CorruptionError, UsageError


class MissingObject(CorruptionError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A repository in a local directory. Each put is write-to-temp, fsync, rename, fsync dir."""

    _MAX_OPEN = 64

    def __init__(self, root: Path):
        self.root = Path(root)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return self.root / name

    def _tmp_path(self) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(exist_ok=True)
        return tmp / f"{uuid.uuid4().hex}.tmp"

    def _publish(self, tmp: Path, name: str) -> None:
        final = self._path(name)
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(final.parent.parent)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Store `data` under `name` atomically and durably."""
        with self.writer(name) as f:
            f.write(data)

    def put_aligned(self, name: str, buf: memoryview, length: int) -> None:
        """put(name, buf[:length]), where `buf` is page-aligned with room to pad `length`
        to a multiple of ALIGN: written with O_DIRECT where the filesystem allows."""
        tmp = self._tmp_path()
        fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, direct=True)
        try:
            pwrite_all(fd, buf[:length], 0, buf[:-(-length // ALIGN) * ALIGN])
            os.ftruncate(fd, length)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._publish(tmp, name)

    def create(self, name: str) -> "AtomicWriter":
        """A file to stream an object into; it appears under `name` only on commit()."""
        return AtomicWriter(self, name)

    @contextmanager
    def writer(self, name: str) -> Iterator["AtomicWriter"]:
        """create() as a context manager: commit on success, abort on an exception."""
        w = self.create(name)
        try:
            yield w
        except BaseException:
            w.abort()
            raise
        w.commit()

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                return fd
            try:
                fd = os.open(self._path(name), os.O_RDONLY)
            except FileNotFoundError:
                raise MissingObject(f"repository object {name} is missing") from None
            self._fds[name] = fd
            if len(self._fds) > self._MAX_OPEN:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"repository object {name} is missing") from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(name), length, offset)
        if len(data) != length:
            raise CorruptionError(f"repository object {name} is truncated")
        return data

    def get_range_into(self, name: str, offset: int, outs: list[memoryview]) -> None:
        """Fill `outs`, in order, with the bytes from `offset` on: one vectored read."""
        want = sum(len(o) for o in outs)
        if os.preadv(self._fd(name), outs, offset) != want:
            raise CorruptionError(f"repository object {name} is truncated")

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise MissingObject(f"repository object {name} is missing") from None

    def stamp(self, name: str) -> str:
        """What list() reports for `name`: changes whenever the object does."""
        try:
            st = self._path(name).stat()
        except FileNotFoundError:
            raise MissingObject(f"repository object {name} is missing") from None
        return f"{st.st_size}:{st.st_mtime_ns}"

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(name, stamp) for every object under `prefix`; the stamp changes when the object does."""
        base = self._path(prefix)
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for fname in files:
                if fname.endswith(".tmp"):
                    continue
                full = Path(dirpath, fname)
                name = full.relative_to(self.root).as_posix()
                try:
                    yield name, self.stamp(name)
                except MissingObject:
                    continue

    def delete(self, name: str) -> None:
        with self._lock:
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)
        self._path(name).unlink(missing_ok=True)

    def clean_tmp(self) -> None:
        """Remove temporary files left by killed runs (call only under the exclusive lock)."""
        tmp = self.root / "tmp"
        if tmp.is_dir():
            for f in tmp.iterdir():
                f.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class AtomicWriter:
    def __init__(self, storage: LocalStorage, name: str):
        self.storage = storage
        self.name = name
        self.tmp = storage._tmp_path()
        self.f = os.fdopen(open_file(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb")

    def write(self, data) -> int:
        return self.f.write(data)

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.storage._publish(self.tmp, self.name)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def open_storage(location: Path, create: bool = False) -> LocalStorage:
    root = Path(location)
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"repository {root} is not writable: {e.strerror}; "
                                "check the path and its permissions") from None
    return LocalStorage(root)
