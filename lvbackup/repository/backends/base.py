"""The storage backend interface: named, immutable objects that are put once, read whole or
by range, listed, and deleted.

Everything above the backends (packs, index, manifests, gc) uses only this interface, so an
object store can replace the local directory without touching it. Names are '/'-separated
relative paths such as 'packs/ab/ab12...'; a prefix to list is '' or ends with '/'.

A put is atomic (a reader sees the whole object or none of it) and write-once (a put of a
name that exists raises ObjectExists and leaves the object as it was). What a backend
guarantees beyond that it declares in its Capabilities, so callers and tests ask rather
than assume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ...base.errors import CorruptionError, LvbackupError, UsageError

Data = bytes | bytearray | memoryview


class MissingObject(CorruptionError):
    """The object asked for does not exist."""


class ObjectExists(LvbackupError):
    """A put refused because the name is taken: a put never replaces an object."""


class ReadOnly(UsageError):
    """A write to a repository opened as it stood at a past time (--as-of)."""


class Conflict(LvbackupError):
    """A conditional replace or delete found the object changed since its token was read."""


@dataclass(frozen=True)
class Capabilities:
    local_files: bool
    """Objects are files on this host: interrupted puts leave temporary files here."""
    conditional_put: bool
    """The store itself refuses a second put of a name atomically, so of concurrent puts of
    one name exactly one succeeds; without it two writers may both believe they won."""
    ranged_get: bool
    """A ranged read fetches only the bytes asked for, not the whole object."""
    concurrent_puts: int = 1
    """How many puts a writer keeps in flight at once: more where each waits on a network."""
    concurrent_gets: int = 1
    """How many reads a restore keeps in flight at least (it runs as many workers)."""
    token_resolution: float = 0.0
    """Seconds within which an object deleted and put again with the same bytes may keep
    its token (stores that date objects to the second)."""


def holds_no_backup(name: str) -> bool:
    """Coordination objects (leases, the index-changes marker): renewed and released all
    the time, they are never locked nor pinned to a past time, and append_only: lets them
    be replaced and deleted."""
    return name.startswith("locks/") or name == "index-changes"


@dataclass(frozen=True)
class Held:
    """Versions of objects gc would remove that their Object Lock still keeps."""
    objects: int = 0
    bytes: int = 0
    until: float | None = None      # when the last of them can go (seconds since the epoch)


def check_name(name: str) -> str:
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad object name {name!r}")
    return name


def check_prefix(prefix: str) -> str:
    if prefix:
        if not prefix.endswith("/"):
            raise ValueError(f"bad object prefix {prefix!r}: a folder, ending with '/'")
        check_name(prefix[:-1])
    return prefix


def check_span(name: str, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"bad range {offset}+{length} of {name!r}")


def short_read(name: str, offset: int, length: int, size: int) -> CorruptionError:
    return CorruptionError(f"repository object {name} is truncated: {length} bytes at "
                           f"offset {offset} asked for, it has {size}")


def missing(name: str) -> MissingObject:
    return MissingObject(f"repository object {name} is missing")


class Backend(ABC):
    capabilities: ClassVar[Capabilities]

    @abstractmethod
    def put(self, name: str, data: Data) -> None:
        """Store `data` under `name`, atomically and durably; ObjectExists if it exists."""

    def put_content_addressed(self, name: str, data: Data) -> None:
        """put() of an object named by its content (packs, index files). Finding the name
        taken is success (a rerun storing a pack again, gc repacking into a pack that
        exists), unless the stored bytes differ: then that copy is damaged, and is
        replaced, as a new put of the same content always has."""
        try:
            self.put(name, data)
        except ObjectExists:
            if memoryview(data).cast("B") == self.get(name):
                return
            self.delete(name)
            self.put(name, data)

    @abstractmethod
    def get(self, name: str) -> bytes:
        """The whole object."""

    @abstractmethod
    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """`length` bytes from `offset`; CorruptionError if the object ends before that."""

    @abstractmethod
    def get_range_into(self, name: str, offset: int, outs: list[memoryview]) -> None:
        """Fill `outs`, in order, with the bytes from `offset` on (one vectored read where
        the backend has one); CorruptionError if the object ends before they are full."""

    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(name, token()) of every object whose name starts with `prefix`, in no order."""

    @abstractmethod
    def token(self, name: str) -> str:
        """An opaque token that changes when the object is replaced or deleted and put
        again (what a cache of the object's content is keyed on)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object. Deleting a missing object is not an error: a run that was
        killed while deleting (gc, delete) repeats its deletions."""

    @abstractmethod
    def modified(self, name: str) -> float:
        """When the object was put (seconds since the epoch): gc spares young packs."""

    def replace(self, name: str, data: Data, token: str) -> None:
        """Put `data` over the object only if its token is still `token` (Conflict if not),
        atomically: what a lease on a store shared between hosts is renewed with."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional replace")

    def delete_if(self, name: str, token: str) -> None:
        """Delete the object only if its token is still `token` (Conflict if not)."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional delete")

    def extend_locks(self) -> int:
        """Where objects are written locked (S3 Object Lock): extend the lock of every
        current object whose lock ends within half the configured days, to now + days;
        how many were extended. Elsewhere nothing is locked."""
        return 0

    def release_expired(self) -> Held:
        """Where objects are written locked: delete the past versions (deleted or
        overwritten objects) whose lock has ended, and say what is still held."""
        return Held()

    def overwritten(self) -> Sequence[tuple[str, float]]:
        """(name, when) of every object whose current version replaced an earlier one, or
        deleted it, where the store keeps versions: lvbackup never does either to an
        object that holds a backup, so each is a sign of an attack."""
        return []

    @abstractmethod
    def remove_incomplete(self, older_than: float) -> int:
        """Remove what puts that never finished left behind (temporary files, abandoned
        uploads) older than `older_than` seconds; how many were removed. A grace period
        spares the puts of other processes still in progress."""

    @abstractmethod
    def close(self) -> None: ...
